"""Five TrainShortcut runs in a row in one ComfyUI process: does memory grow?

Needs a ComfyUI checkout (found as the host tests find it). Trains a Flux built from ComfyUI's
classes (random weights, built under inference_mode as ComfyUI builds models) five times with
the same node and inputs, and prints after each run the process RSS (after gc and malloc_trim,
so that freed memory is returned), the live torch tensors the garbage collector sees, and the
parameter count of the shared network (adapters must be gone). Figures only; nothing asserted.

    python -m benchmarks.repeat_training [--runs 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import comfy_host  # noqa: E402

from .report import machine_line, markdown_table  # noqa: E402

FLUX = dict(hidden_size=256, num_heads=4, axes_dim=[16, 24, 24], depth=1, depth_single_blocks=2)


def _rss_mib() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _live_tensors() -> int:
    with warnings.catch_warnings():  # isinstance on some torch module objects warns about deprecated aliases
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    path = comfy_host.pack_or_exit()
    import comfy.utils
    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False
    train = nodes.NODE_CLASS_MAPPINGS["TrainShortcut"]
    defaults = comfy_host.widget_defaults(train)
    with torch.inference_mode():
        _, patcher = comfy_host.tiny_flux(seed=0, **FLUX)
    positive = comfy_host.flux_positive(patcher, guidance=None)
    latents = {"samples": torch.randn(8, 16, 16, 16, generator=torch.Generator().manual_seed(0))}
    network = patcher.model.diffusion_model
    rows = [["before", f"{_rss_mib():.1f}", "", _live_tensors(), sum(p.numel() for p in network.parameters())]]
    first = None
    with tempfile.TemporaryDirectory() as folder, comfy_host.host_folders(loras=Path(folder)):
        for run in range(1, args.runs + 1):
            values = dict(defaults, resume_lora="(none)", steps=args.steps, batch_size=4, learning_rate=1e-4, rank=16,
                          alpha=16.0, checkpoint_every=10, save_name="repeat")
            outputs = train().train(model=patcher, latents=latents, positive=positive, **values)
            del outputs
            rss = _rss_mib()
            first = rss if first is None else first
            rows.append([f"after run {run}", f"{rss:.1f}", f"{rss - first:+.1f}", _live_tensors(),
                         sum(p.numel() for p in network.parameters())])
    print(machine_line())
    print(f"ComfyUI at {path}; Flux w{FLUX['hidden_size']} (1+2 blocks), 8 latents 16x16, batch 4, rank 16, "
          f"{args.steps} steps per run, checkpoints every 10\n")
    print(markdown_table(["", "RSS MiB", "vs run 1", "live tensors", "network parameters"], rows))


if __name__ == "__main__":
    main()

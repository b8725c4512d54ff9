"""ShortcutSampler vs ComfyUI's stock KSampler (euler) at equal steps, side by side, in ComfyUI.

Needs a ComfyUI checkout (found as the host tests find it: COMFYUI_PATH, ../ComfyUI, or the
ComfyUI tree the pack sits in). Runs real Flux models built from ComfyUI's own classes with
random weights: the tiny one of the host tests and a mid-size one. Both samplers run through the
host's guider on the same latent, seed and steps; runs alternate in ABBA order, medians are printed.

    python -m benchmarks.sampler_speed [--repeats 15] [--steps 3 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import comfy_host  # noqa: E402  (the host tests' way of finding and starting ComfyUI)

from .report import machine_line, markdown_table  # noqa: E402

MODELS = {  # name: (Flux overrides, latent H = W, batch)
    "tiny Flux (w64, 1+2 blocks), 8x8 latent": (dict(), 8, 1),
    "mid Flux (w512, 2+4 blocks), 32x32 latent": (dict(hidden_size=512, num_heads=8, axes_dim=[16, 24, 24], depth=2,
                                                       depth_single_blocks=4, context_in_dim=256, vec_in_dim=64), 32, 1),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 8])
    args = parser.parse_args(argv)
    path = comfy_host.pack_or_exit()
    import comfy.utils
    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False
    shortcut, stock = nodes.NODE_CLASS_MAPPINGS["ShortcutSampler"](), nodes.KSampler()
    rows = []
    for name, (overrides, size, batch) in MODELS.items():
        with torch.inference_mode():
            _, patcher = comfy_host.tiny_flux(seed=0, **overrides)
            positive = comfy_host.flux_positive(patcher)
            latent = {"samples": torch.zeros(batch, 16, size, size)}
            for steps in args.steps:
                runs = {
                    "ours": lambda: shortcut.sample(patcher, positive, latent, 1, steps, 3.25, False, 1.0, 1.0),
                    "stock": lambda: stock.sample(patcher, 1, steps, 1.0, "euler", "simple", positive, positive,
                                                  latent, 1.0),
                }
                times: dict[str, list[float]] = {k: [] for k in runs}
                for fn in runs.values():
                    fn()  # warm-up: model load, first-call overheads
                for r in range(args.repeats):
                    order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]  # ABBA: no order bias
                    for key, fn in order:
                        start = time.perf_counter()
                        fn()
                        times[key].append(time.perf_counter() - start)
                ours, base = statistics.median(times["ours"]), statistics.median(times["stock"])
                rows.append([name, steps, f"{base * 1e3:.1f}", f"{ours * 1e3:.1f}", f"{ours / base:.3f}"])
    print(machine_line())
    print(f"ComfyUI at {path}; median of {args.repeats} alternating runs, same latent, seed and steps, cfg 1\n")
    print(markdown_table(["model", "steps", "KSampler euler ms", "ShortcutSampler ms", "ours / stock"], rows))


if __name__ == "__main__":
    main()

"""What TrainShortcut's previews and calibration cost, as a share of a training run, on ComfyUI-built Flux.

Needs a ComfyUI checkout (found as the host tests find it). Runs the TrainShortcut node (random-weight
Flux built from ComfyUI's classes, batch 8, the paper's recipe otherwise) with previews every step and
calibration on, timing each part where it runs: a training step, the teacher's one-time preview samples,
one preview picture (student at the LoRA's steps, decoded and sent), and the calibration. Then prints the
share previews and calibration take of a run of the default length (10k steps, a preview every 100) and
of the workflows' 2000 steps. Figures only; nothing asserted.

    python -m benchmarks.watch_cost [--steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import comfy_host  # noqa: E402

from .report import machine_line, markdown_table  # noqa: E402

CASES = [  # name, Flux overrides, latent side
    ("tiny Flux (w64, 1+2 blocks), 8x8 latents", dict(), 8),
    ("mid Flux (w512, 2+4 blocks), 32x32 latents",
     dict(hidden_size=512, num_heads=8, axes_dim=[16, 24, 24], depth=2, depth_single_blocks=4, context_in_dim=256,
          vec_in_dim=64), 32),
]
RUNS = ((10_000, 100), (2_000, 100))  # (steps, preview_every): the default run and the example workflows'


class Timer:
    """Wraps a method so that every call's wall time is recorded under a name."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def wrap(self, owner, name: str, label: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.times.setdefault(label, []).append(time.perf_counter() - t0)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


def run_case(name: str, overrides: dict, side: int, steps: int) -> list[object]:
    import nodes

    host_preview = comfy_host.pack_module("host.preview")
    trainer_module = comfy_host.pack_module("shortcut_core.trainer")
    with torch.inference_mode():
        _, patcher = comfy_host.tiny_flux(seed=0, **overrides)
    positive = comfy_host.flux_positive(patcher)
    latents = {"samples": torch.randn(16, 16, side, side, generator=torch.Generator().manual_seed(0))}
    timer = Timer()
    undo = [timer.wrap(trainer_module.ShortcutTrainer, "step", "step"),
            timer.wrap(host_preview.TrainingPreview, "__init__", "teacher samples + first picture"),
            timer.wrap(host_preview.TrainingPreview, "picture", "picture"),
            timer.wrap(trainer_module.ShortcutTrainer, "calibrate", "calibration")]
    train = nodes.NODE_CLASS_MAPPINGS["TrainShortcut"]()
    values = comfy_host.widget_defaults(type(train))
    values.update(steps=steps, batch_size=8, rank=64, checkpoint_every=0, save_name="watch_cost", preview_every=1,
                  calibrate=True, resume_lora="(none)")
    try:
        with tempfile.TemporaryDirectory() as folder, comfy_host.host_folders(loras=Path(folder)):
            train.train(model=patcher, latents=latents, positive=positive, **values)
    finally:
        for restore in undo:
            restore()
    t = timer.times
    step = statistics.median(t["step"][1:] or t["step"])  # the first step warms caches up
    picture = statistics.median(t["picture"])
    start = t["teacher samples + first picture"][0] - t["picture"][0]  # __init__ includes its first picture
    calibration = t["calibration"][0]
    row = [name, f"{1000 * step:.0f}", f"{1000 * start:.0f}", f"{1000 * picture:.0f}", f"{calibration:.2f}"]
    for run_steps, every in RUNS:
        training = run_steps * step
        previews = start + (run_steps // every + 2) * picture  # one at step 0, every `every`, the final one
        row += [f"{100 * previews / training:.2f}%", f"{100 * calibration / training:.2f}%"]
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="training steps timed per case (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier timings on a shared machine)")
    args = ap.parse_args(argv)
    path = comfy_host.pack_or_exit()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"ComfyUI at {path}; TrainShortcut, batch 8, rank 64, the paper's recipe; medians of {args.steps} steps\n")
    headers = ["model", "train step ms", "teacher previews ms (once)", "preview ms", "calibration s"]
    for run_steps, every in RUNS:
        headers += [f"previews / {run_steps} steps", f"calibration / {run_steps} steps"]
    rows = [run_case(name, overrides, side, args.steps) for name, overrides, side in CASES]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()

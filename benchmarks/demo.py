"""The built-in default job: make a real flow model sample well in 3 steps, on a CPU, with no download.

    python -m benchmarks.demo

1. Pre-train (or restore from the local cache) an unconditional flow-matching teacher on
   scikit-learn's real handwritten digits (shipped in the wheel).
2. Distil it with SCFM into a shortcut LoRA (velocity-field self-distillation, dual EMA).
3. Calibrate the LoRA's few-step recipe (strength, shift) on 16 held-out noises against the teacher.
4. Save the LoRA with its metadata, read it back, and compare from the same noise:
   teacher at 3 steps, shortcut at 3 steps (strength 1 and the calibrated recipe), teacher at 32
   steps, each against the teacher's 128-step samples (RMSE) and against the real digits
   (Fréchet distance on pixels).
5. Write outputs/demo/digits-grid.png and outputs/demo/results.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from shortcut_core import (Calibration, Recipe, ShortcutConfig, ShortcutTrainer, TrainResult, load_lora, lora_applied,
                           save_lora)
from shortcut_core.calibration import walk_text

from .digits import (TeacherTraining, frechet_distance, image_grid, load_digits_images, load_or_pretrain_teacher,
                     rmse_to, sample, velocity_of, write_png)
from .report import machine_line, markdown_table

REFERENCE_STEPS = 128
EVAL_SAMPLES = 2000
DISTILL_STEPS = 1000
TEACHER_SHIFTS = (0.5, 0.7, 1.0, 1.4, 2.0, 3.25)


def demo_config(steps: int, recipe: str = "paper") -> ShortcutConfig:
    """The paper's recipe, adapted where a 0.4M-parameter CPU model on 8x8 images differs from Flux, with the
    training recipe (`recipe`: "paper", the default, or "fast")."""
    return ShortcutConfig(
        recipe=recipe,
        rank=32, alpha=32,             # the net is ~200x narrower than Flux
        learning_rate=1e-3,            # small model, large batch: a larger step than Flux's 2e-5
        batch_size=256, steps=steps,
        # 64 pixels are nothing like 4096 latent tokens: Flux's high shifts (U[2.5, 4.5], sampled
        # at 3.25) spend the 3 steps where this teacher needs none. Low shifts suit it; the
        # teacher's own best 3-step shift is 1.0 (the demo's table finds it on a grid).
        shift_min=0.4, shift_max=1.0, sample_shift=0.5,
        guidance_range=None,           # no distilled-guidance input in this teacher
        resolution_shift_prob=0.0,     # Flux's resolution line is meaningless for 16 "tokens"
        gradient_checkpointing=False,  # activations are tiny
        checkpoint_every=0,
    )


CALIBRATION_NOISES = 16  # held out: their own seed, never the evaluation's


def distill(net, latents: torch.Tensor, cfg: ShortcutConfig, progress: bool = True,
            calibrate: bool = True) -> tuple[TrainResult, float]:
    """SCFM, then (calibrate) the recipe measured on held-out noises; (result, seconds the calibration took)."""
    with ShortcutTrainer(net, velocity_of(net), latents, cfg) as trainer:
        trainer.run(progress=progress)
        t0 = time.perf_counter()
        if calibrate:
            trainer.calibrate(torch.randn(CALIBRATION_NOISES, *latents.shape[1:],
                                          generator=torch.Generator().manual_seed(cfg.seed + 1)))
        return trainer.result(), time.perf_counter() - t0


def evaluate(net, lora, real: torch.Tensor, noise: torch.Tensor, shift: float, recipe: Recipe | None = None):
    """Rows of the demo's table and the samples behind them; every RMSE is to one reference. `recipe`:
    the LoRA's calibrated 3-step recipe, evaluated beside strength 1 at the training config's shift."""
    reference = sample(net, noise, REFERENCE_STEPS, shift)
    # The shortcut's schedule need not suit the teacher: give the teacher its best shift too.
    three_step = {s: sample(net, noise, 3, s) for s in {*TEACHER_SHIFTS, shift}}
    best = min(TEACHER_SHIFTS, key=lambda s: rmse_to(three_step[s], reference))
    runs = {"teacher, 3 steps, same schedule": three_step[shift],
            f"teacher, 3 steps, its best shift ({best:g})": three_step[best]}
    with lora_applied(net, lora, 1.0):
        runs["shortcut LoRA, 3 steps"] = sample(net, noise, 3, shift)
    if recipe is not None:
        told = f", {walk_text(recipe)}" if walk_text(recipe) else ""
        with lora_applied(net, lora, recipe.strength):
            runs[f"shortcut LoRA, 3 steps, calibrated (strength {recipe.strength:g}, shift {recipe.shift:.3g}{told})"] = \
                sample(net, noise, 3, recipe.shift, **recipe.walk)
    runs["teacher, 32 steps"] = sample(net, noise, 32, shift)
    runs[f"teacher, {REFERENCE_STEPS} steps (reference)"] = reference
    rows = [[name, f"{rmse_to(x, reference):.4f}", f"{frechet_distance(x, real):.3f}"] for name, x in runs.items()]
    return rows, runs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=DISTILL_STEPS, help=f"SCFM optimizer steps (default {DISTILL_STEPS})")
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"), help="where the LoRA, PNG and table go")
    ap.add_argument("--cache-dir", type=Path, default=None, help="teacher cache (default ~/.cache/shortcut-flow)")
    ap.add_argument("--teacher-steps", type=int, default=TeacherTraining().steps, help="teacher pre-training steps")
    ap.add_argument("--samples", type=int, default=EVAL_SAMPLES, help="samples per evaluated sampler")
    ap.add_argument("--recipe", default="paper", choices=("paper", "fast"),
                    help="the training recipe (default paper; fast: 4 sub-steps a target)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    print(machine_line())
    real = load_digits_images()
    net, where = load_or_pretrain_teacher(real, train=TeacherTraining(steps=args.teacher_steps),
                                          cache_dir=args.cache_dir, progress=progress)
    print(f"teacher: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {where}")

    cfg = demo_config(args.steps, args.recipe)
    t0 = time.perf_counter()
    result, calibration_s = distill(net, real, cfg, progress=progress)
    train_s = time.perf_counter() - t0 - calibration_s
    print(f"SCFM distillation: {cfg.steps} steps of batch {cfg.batch_size} in {train_s:.0f} s, "
          f"loss {sum(result.losses[:20]) / 20:.4f} -> {sum(result.losses[-20:]) / 20:.4f}; calibration "
          f"{calibration_s:.1f} s ({100 * calibration_s / train_s:.1f}% of the training time)")

    lora_path = args.out / "digits-shortcut.safetensors"
    save_lora(lora_path, result.lora, metadata=result.metadata)
    loaded = load_lora(lora_path)  # evaluate what the file holds, not the in-memory copy
    calibration = Calibration.from_dict(loaded.metadata.calibration)
    print(calibration.text())

    noise = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(2025))
    rows, runs = evaluate(net, loaded.weights, real, noise, shift=cfg.sample_shift,
                          recipe=calibration.best[0])
    table = markdown_table(["sampler (same noise)", f"RMSE to teacher {REFERENCE_STEPS}-step", "FD to real digits"], rows)
    rmse = {r[0]: float(r[1]) for r in rows}
    calibrated = next(v for k, v in rmse.items() if k.startswith("shortcut LoRA, 3 steps, calibrated"))
    teacher_best = min(v for k, v in rmse.items() if k.startswith("teacher, 3 steps"))
    ratio = teacher_best / rmse["shortcut LoRA, 3 steps"]
    same = rmse["teacher, 3 steps, same schedule"] / rmse["shortcut LoRA, 3 steps"]
    summary = (f"shortcut at 3 steps is {same:.2f}x closer to the teacher's {REFERENCE_STEPS}-step samples than the "
               f"teacher at 3 steps on the same schedule, {ratio:.2f}x closer than the teacher at its best 3-step shift; "
               f"its calibrated recipe is {rmse['shortcut LoRA, 3 steps'] / calibrated:.2f}x closer than strength 1 "
               f"at the training shift (calibration: {100 * calibration_s / train_s:.1f}% of the training time)")
    print()
    print(table)
    print(summary)

    shown = slice(0, 16)
    grid = image_grid([runs["teacher, 3 steps, same schedule"][shown], runs["shortcut LoRA, 3 steps"][shown],
                       runs["teacher, 32 steps"][shown], runs[f"teacher, {REFERENCE_STEPS} steps (reference)"][shown]])
    write_png(args.out / "digits-grid.png", grid)
    (args.out / "results.md").write_text(f"{machine_line()}\n\n{table}\n\n{summary}\n\nGrid rows: teacher 3 steps, "
                                         f"shortcut 3 steps, teacher 32 steps, teacher {REFERENCE_STEPS} steps.\n")
    print(f"\nwrote {lora_path}, {args.out / 'digits-grid.png'} (rows: teacher 3, shortcut 3, teacher 32, "
          f"teacher {REFERENCE_STEPS} steps) and {args.out / 'results.md'} in {time.perf_counter() - start:.0f} s")
    return {"rmse": rmse, "ratio": ratio, "ratio_same_schedule": same, "rows": rows, "calibration": calibration,
            "calibration_share": calibration_s / train_s}


if __name__ == "__main__":
    main()

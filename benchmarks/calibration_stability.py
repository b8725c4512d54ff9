"""How stable the recipe calibration's choice is over its held-out noises, and what it buys.

    python -m benchmarks.calibration_stability

On the CPU demo's shortcut LoRA (distilled first when outputs/demo has none): the calibration runs again from
`--seeds` different draws of 4 to 64 held-out noises; for each step count it prints the recipes chosen and their
RMSE to the teacher's 128-step samples and their FD to the real digits, measured on `--samples` other noises,
beside the LoRA's own recipe (strength 1 at its sampling shift). Figures only.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch

from shortcut_core import ShortcutTrainer, load_lora, lora_applied, save_lora
from shortcut_core.adapters import STUDENT

from .demo import DISTILL_STEPS, REFERENCE_STEPS, demo_config, distill
from .digits import frechet_distance, load_digits_images, load_or_pretrain_teacher, rmse_to, sample, velocity_of
from .report import machine_line, markdown_table

NOISE_COUNTS = (4, 8, 16, 32, 64)
STEP_COUNTS = (1, 2, 3, 4)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", type=Path, default=Path("outputs/demo/digits-shortcut.safetensors"))
    ap.add_argument("--seeds", type=int, default=5, help="calibrations per noise count, each from its own draw")
    ap.add_argument("--samples", type=int, default=2000, help="evaluation noises")
    args = ap.parse_args(argv)

    print(machine_line())
    real = load_digits_images()
    net, where = load_or_pretrain_teacher(real)
    print(f"teacher: {where}")
    config = demo_config(DISTILL_STEPS)
    if not args.lora.is_file():
        result, _ = distill(net, real, config)
        args.lora.parent.mkdir(parents=True, exist_ok=True)
        save_lora(args.lora, result.lora, metadata=result.metadata)
    lora = load_lora(args.lora).weights

    noise = torch.randn(args.samples, *real.shape[1:], generator=torch.Generator().manual_seed(2025))
    reference = sample(net, noise, REFERENCE_STEPS, config.sample_shift)
    measured: dict[tuple[int, float, float], tuple[float, float]] = {}

    def evaluate(steps: int, strength: float, shift: float) -> tuple[float, float]:
        if (steps, strength, shift) not in measured:
            with lora_applied(net, lora, strength):
                x = sample(net, noise, steps, shift)
            measured[steps, strength, shift] = (rmse_to(x, reference), frechet_distance(x, real))
        return measured[steps, strength, shift]

    rows = [[n, "own: strength 1, shift {:g}".format(config.sample_shift), "-",
             *(f"{v:.4f}" if i == 0 else f"{v:.3f}" for i, v in enumerate(evaluate(n, 1.0, config.sample_shift)))]
            for n in STEP_COUNTS]
    seconds = []
    for count in NOISE_COUNTS:
        chosen = collections.defaultdict(list)
        for seed in range(args.seeds):
            held_out = torch.randn(count, *real.shape[1:], generator=torch.Generator().manual_seed(1000 + seed))
            with ShortcutTrainer(net, velocity_of(net), real, config) as trainer:
                trainer.adapters.load_lora_state(STUDENT, lora)
                started = time.perf_counter()
                calibration = trainer.calibrate(held_out, step_counts=STEP_COUNTS)
                seconds.append(time.perf_counter() - started)
            for n in STEP_COUNTS:
                recipe, _ = calibration.best_for(n)
                chosen[n].append((recipe.strength, round(recipe.shift, 3)))
        for n in STEP_COUNTS:
            scores = [evaluate(n, strength, shift) for strength, shift in chosen[n]]
            picks = ", ".join(f"{k}: {v}x" for k, v in sorted(collections.Counter(chosen[n]).items()))
            rows.append([n, f"{count} noises: {picks}", f"{max(s[0] for s in scores):.4f}",
                         f"{sum(s[0] for s in scores) / len(scores):.4f}",
                         f"{sum(s[1] for s in scores) / len(scores):.3f}"])
    rows.sort(key=lambda row: row[0])
    print(f"\ncalibration: {sum(seconds) / len(seconds):.2f} s each on average ({len(seconds)} runs); RMSE to the "
          f"teacher's {REFERENCE_STEPS}-step samples and FD to the real digits on {args.samples} other noises\n")
    print(markdown_table(["steps", "recipes chosen, (strength, shift): times", "worst RMSE", "mean RMSE", "mean FD"],
                         rows))


if __name__ == "__main__":
    main()

"""Quality of the digits shortcut LoRA over step counts and LoRA strengths, against its teacher.

    python -m benchmarks.quality                # reuses outputs/demo/digits-shortcut.safetensors if present
    python -m benchmarks.quality --retrain      # distils a fresh LoRA first (as the demo does)

For 1, 2, 3, 4 and 8 Euler steps from the same noise: the teacher alone, and the teacher with
the shortcut LoRA at strengths 1.0 - 1.75. RMSE is to the teacher's 128-step samples from the
same noise; FD is the Fréchet distance to the real digits on pixels. Figures, no asserts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from shortcut_core import load_lora, lora_applied, save_lora

from .demo import DISTILL_STEPS, REFERENCE_STEPS, demo_config, distill
from .digits import frechet_distance, load_digits_images, load_or_pretrain_teacher, rmse_to, sample
from .report import machine_line, markdown_table

STEPS = (1, 2, 3, 4, 8)
STRENGTHS = (1.0, 1.25, 1.5, 1.75)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", type=Path, default=Path("outputs/demo/digits-shortcut.safetensors"))
    ap.add_argument("--retrain", action="store_true", help="distil a new LoRA (written to --lora)")
    ap.add_argument("--steps", type=int, default=DISTILL_STEPS, help="SCFM optimizer steps with --retrain")
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args(argv)

    print(machine_line())
    real = load_digits_images()
    net, where = load_or_pretrain_teacher(real)
    print(f"teacher: {where}")
    if args.retrain or not args.lora.is_file():
        result, _ = distill(net, real, demo_config(args.steps))
        args.lora.parent.mkdir(parents=True, exist_ok=True)
        save_lora(args.lora, result.lora, metadata=result.metadata)
    lora = load_lora(args.lora)
    shift = lora.metadata.shift or 3.25
    print(f"LoRA: {args.lora} (sampling shift {shift} from its metadata)\n")

    noise = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(2025))
    reference = sample(net, noise, REFERENCE_STEPS, shift)
    rmse_rows, fd_rows = [], []
    for steps in STEPS:
        teacher = sample(net, noise, steps, shift)
        rmse_row, fd_row = [steps, f"{rmse_to(teacher, reference):.4f}"], [steps, f"{frechet_distance(teacher, real):.3f}"]
        for strength in STRENGTHS:
            with lora_applied(net, lora.weights, strength):
                x = sample(net, noise, steps, shift)
            rmse_row.append(f"{rmse_to(x, reference):.4f}")
            fd_row.append(f"{frechet_distance(x, real):.3f}")
        rmse_rows.append(rmse_row)
        fd_rows.append(fd_row)
    headers = ["steps", "teacher"] + [f"shortcut x{s}" for s in STRENGTHS]
    print(f"RMSE to the teacher's {REFERENCE_STEPS}-step samples from the same noise (lower is better)")
    print(markdown_table(headers, rmse_rows))
    print(f"\nFréchet distance to the real digits, pixels (lower is better; teacher {REFERENCE_STEPS} steps: "
          f"{frechet_distance(reference, real):.3f})")
    print(markdown_table(headers, fd_rows))


if __name__ == "__main__":
    main()

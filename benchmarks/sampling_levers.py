"""Levers that cost no training: a LoRA strength per Euler jump, a multistep correction, one of the run's EMAs.

    python -m benchmarks.sampling_levers --threads 1 --out docs/convergence-sampling-levers

For each teacher (benchmarks/teachers.py) the paper's recipe trains once at the full budget. Then:

- **A strength per jump.** The calibration gives each step count one (strength, shift); a sampler could set the
  strength per jump instead (ComfyUI can, through hook keyframes). On the calibration's own 16 held-out noises
  and against its own 32-step reference, a coordinate search over per-jump strengths (0.25 to 4 in steps of
  0.25, three sweeps), with the shift refined beside them, starts from the calibrated recipe.
- **A multistep correction.** From the second jump on, Euler could step with v_i + c (v_i - v_i-1), the
  Adams-Bashforth idea at no extra forward (c = 0 is Euler); c (-0.5 to 1) and the shift beside it are searched
  per step count on the calibration's noises, at the calibrated strength.
- **The LoRA sampled.** A run ends with three LoRAs: the student (what Train Shortcut returns) and the fast
  (0.99) and slow (0.999) EMAs its targets come from. Each is calibrated on its own.

Everything is measured on the benchmark's 1000 evaluation noises: RMSE to the teacher's 128-step samples, and
FD. Figures only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from shortcut_core import ShortcutTrainer
from shortcut_core.adapters import EMA_FAST, EMA_SLOW, STUDENT
from shortcut_core.calibration import sample_distance

from .report import machine_line, markdown_table
from .teachers import TEACHERS, euler_samples

STEP_COUNTS = (1, 2, 3, 4)
PER_JUMP_STEP_COUNTS = (2, 3, 4)
STRENGTHS = tuple(0.25 * k for k in range(1, 17))
SHIFT_MOVES = (1 / 1.25, 1.25, 1 / 1.1, 1.1)
MULTISTEP_C = tuple(round(-0.5 + 0.1 * k, 1) for k in range(16))
SAMPLED = {"student": STUDENT, "fast EMA": EMA_FAST, "slow EMA": EMA_SLOW}


def student_sampler(trainer: ShortcutTrainer, strengths: list[float], c: float = 0.0):
    """A `sampler(noise, sigmas, args)` for euler_samples: Euler with the student at strengths[i] on jump i,
    stepping from the second jump on with v_i + c (v_i - v_i-1) (c = 0: plain Euler)."""
    @torch.no_grad()
    def run(x: torch.Tensor, sigmas: torch.Tensor, args: dict) -> torch.Tensor:
        s_in = x.new_ones([x.shape[0]])
        before = None
        with trainer.adapters.use(STUDENT):
            try:
                for i in range(len(sigmas) - 1):
                    trainer.adapters.set_strength(STUDENT, strengths[i])
                    v = trainer.velocity(x, sigmas[i] * s_in, **args)
                    step = v if before is None else v + c * (v - before)
                    x, before = x + (sigmas[i + 1] - sigmas[i]) * step, v
            finally:
                trainer.adapters.set_strength(STUDENT, 1.0)
        return x
    return run


def search_per_jump(score, strengths: list[float], shift: float, sweeps: int = 3) -> tuple[list[float], float, float]:
    """Coordinate descent from (strengths, shift) on `score(strengths, shift)`; the best found and its score."""
    best = score(strengths, shift)
    for _ in range(sweeps):
        moved = False
        for j in range(len(strengths)):
            for s in STRENGTHS:
                candidate = strengths[:j] + [s] + strengths[j + 1:]
                value = score(candidate, shift)
                if value < best - 1e-9:
                    strengths, best, moved = candidate, value, True
        for k in SHIFT_MOVES:
            value = score(strengths, shift * k)
            if value < best - 1e-9:
                shift, best, moved = shift * k, value, True
        if not moved:
            break
    return strengths, shift, best


def measure(name: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(per-jump rows, sampled-LoRA rows, multistep rows) of one teacher."""
    teacher = TEACHERS[name]()
    cfg = teacher.config.replace(recipe="paper")
    per_jump, sampled, multistep = [], [], []
    with ShortcutTrainer(teacher.module, teacher.velocity, teacher.latents, cfg, extra_args=teacher.extra_args,
                         blocks=teacher.blocks) as trainer:
        trainer.run(cfg.steps, progress=False)
        noise, args = teacher.calibration_noise(cfg.seed)
        reference = euler_samples(teacher.velocity, noise, args, teacher.config.reference_steps, cfg.sample_shift)

        def on_calibration_noises(n: int, shift: float, strengths: list[float], c: float = 0.0) -> float:
            samples = euler_samples(None, noise, args, n, shift, student_sampler(trainer, strengths, c))
            return sample_distance(samples, reference)

        def on_eval_noises(n: int, shift: float, strengths: list[float], c: float = 0.0) -> tuple[float, float]:
            samples = teacher.sample(n, shift, student_sampler(trainer, strengths, c))
            return teacher.rmse(samples), teacher.fd(samples)

        loras = {label: trainer.adapters.lora_state(role) for label, role in SAMPLED.items()}
        for label, lora in loras.items():
            trainer.adapters.load_lora_state(STUDENT, lora)
            calibration = trainer.calibrate(noise, args, reference_steps=teacher.config.reference_steps,
                                            step_counts=STEP_COUNTS)
            if label == "student":
                calibrated = {n: calibration.best_for(n)[0] for n in STEP_COUNTS}
            row = dict(teacher=name, lora=label, rmse={}, fd={}, strength={}, shift={})
            for n in STEP_COUNTS:
                recipe, _ = calibration.best_for(n)
                row["rmse"][n], row["fd"][n] = on_eval_noises(n, recipe.shift, [recipe.strength] * n)
                row["strength"][n], row["shift"][n] = recipe.strength, recipe.shift
            row["fd3"] = row["fd"][3]
            sampled.append(row)
            print(f"  {name} {label}: RMSE 1/2/3/4 " + " / ".join(f"{row['rmse'][n]:.4f}" for n in STEP_COUNTS)
                  + f", FD3 {row['fd3']:.3f}", flush=True)
        trainer.adapters.load_lora_state(STUDENT, loras["student"])  # the searches below sample the student
        student = next(row for row in sampled if row["lora"] == "student")
        for n in PER_JUMP_STEP_COUNTS:
            recipe = calibrated[n]
            strengths, shift, _ = search_per_jump(lambda st, sh: on_calibration_noises(n, sh, st),
                                                  [recipe.strength] * n, recipe.shift)
            rmse, fd = on_eval_noises(n, shift, strengths)
            per_jump.append(dict(teacher=name, steps=n, strength=recipe.strength, shift=recipe.shift,
                                 rmse=student["rmse"][n], fd=student["fd"][n], strengths=strengths,
                                 per_jump_shift=shift, per_jump_rmse=rmse, per_jump_fd=fd))
            print(f"  {name} {n} steps: one strength {student['rmse'][n]:.4f} (FD {student['fd'][n]:.3f}), per jump "
                  f"{rmse:.4f} (FD {fd:.3f}) at {strengths}", flush=True)
        for n in PER_JUMP_STEP_COUNTS:
            recipe = calibrated[n]
            _, c, shift = min((on_calibration_noises(n, recipe.shift * k, [recipe.strength] * n, c), c,
                               recipe.shift * k) for c in MULTISTEP_C for k in (1.0, 1 / 1.25, 1.25))
            rmse, fd = on_eval_noises(n, shift, [recipe.strength] * n, c)
            multistep.append(dict(teacher=name, steps=n, c=c, shift=shift, rmse=student["rmse"][n],
                                  fd=student["fd"][n], multistep_rmse=rmse, multistep_fd=fd))
            print(f"  {name} {n} steps: Euler {student['rmse'][n]:.4f} (FD {student['fd'][n]:.3f}), multistep c {c:g} "
                  f"shift {shift:.3g} {rmse:.4f} (FD {fd:.3f})", flush=True)
    return per_jump, sampled, multistep


def per_jump_table(rows: list[dict]) -> str:
    return markdown_table(
        ["teacher", "steps", "calibrated (strength, shift)", "RMSE / FD", "per jump (strengths; shift)", "RMSE / FD",
         "per jump / one, RMSE (FD)"],
        [[r["teacher"], r["steps"], f"{r['strength']:g}, {r['shift']:.3g}", f"{r['rmse']:.4f} / {r['fd']:.3f}",
          f"{', '.join(f'{s:g}' for s in r['strengths'])}; {r['per_jump_shift']:.3g}",
          f"{r['per_jump_rmse']:.4f} / {r['per_jump_fd']:.3f}",
          f"{r['per_jump_rmse'] / r['rmse']:.3f} ({r['per_jump_fd'] / r['fd']:.2f})"] for r in rows])


def multistep_table(rows: list[dict]) -> str:
    return markdown_table(
        ["teacher", "steps", "Euler RMSE / FD", "c; shift", "multistep RMSE / FD", "multistep / Euler, RMSE (FD)"],
        [[r["teacher"], r["steps"], f"{r['rmse']:.4f} / {r['fd']:.3f}", f"{r['c']:g}; {r['shift']:.3g}",
          f"{r['multistep_rmse']:.4f} / {r['multistep_fd']:.3f}",
          f"{r['multistep_rmse'] / r['rmse']:.3f} ({r['multistep_fd'] / r['fd']:.2f})"] for r in rows])


def sampled_table(rows: list[dict]) -> str:
    """Each LoRA's calibrated 1-4-step RMSE and 3-step FD, and its 3-step ratios to the student of its run."""
    student = {r["teacher"]: r for r in rows if r["lora"] == "student"}
    out = []
    for r in rows:
        s = student.get(r["teacher"])
        ratio = "" if s is None else f"{r['rmse'][3] / s['rmse'][3]:.3f} ({r['fd3'] / s['fd3']:.2f})"
        out.append([r["teacher"], r["lora"]] + [f"{r['rmse'][n]:.4f}" for n in STEP_COUNTS]
                   + [f"{r['fd3']:.3f}", ratio])
    return markdown_table(["teacher", "LoRA sampled", "RMSE 1 step", "2 steps", "3 steps", "4 steps", "FD 3 steps",
                           "3 steps / student's, RMSE (FD)"], out)


def main(argv: list[str] | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="*", default=list(TEACHERS), choices=list(TEACHERS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--load", nargs="*", type=Path, default=(), help="rows (json) of earlier runs to report with these")
    ap.add_argument("--out", type=Path, default=None, help="write the tables (markdown) and rows (json) here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    per_jump, sampled, multistep = [], [], []
    for path in args.load:
        earlier = json.loads(path.read_text())
        per_jump += earlier["per_jump"]
        sampled += [dict(r, rmse={int(n): v for n, v in r["rmse"].items()}) for r in earlier["sampled"]]
        multistep += earlier.get("multistep", [])
    for name in args.teachers:
        rows = measure(name)
        per_jump += rows[0]
        sampled += rows[1]
        multistep += rows[2]
    text = f"{per_jump_table(per_jump)}\n\n{sampled_table(sampled)}"
    if multistep:
        text += f"\n\n{multistep_table(multistep)}"
    print(text)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(f"{machine_line()}\n\n{text}\n")
        args.out.with_suffix(".json").write_text(json.dumps({"per_jump": per_jump, "sampled": sampled,
                                                             "multistep": multistep}, indent=1))
    return per_jump, sampled, multistep


if __name__ == "__main__":
    main()

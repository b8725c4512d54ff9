"""Levers that cost no training: a LoRA strength per Euler jump, a multistep correction, one of the run's EMAs,
the time the model is told.

    python -m benchmarks.sampling_levers --threads 1 --out docs/convergence-sampling-levers
    python -m benchmarks.sampling_levers --levers time-shift --seeds 0 1 2 --threads 1 --out docs/convergence-time-shift-calibrated
    python -m benchmarks.sampling_levers --levers walk --seeds 0 1 2 --threads 1 --out docs/convergence-walk-calibrated

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
- **The time the model is told** (the time-shift sampler of Li et al. 2024, "Alleviating exposure bias in
  diffusion models through sampling with shifted time steps"): a state reached by a long jump is not the
  state the model was trained on at that time, so each jump from t_i to t_i+1 queries the model at
  t_i - a (t_i - t_i+1) (a = 0 is Euler; capped at the schedule's first time: shortcut_core.sampling.told_times).
  The calibration now searches a itself (calibration.search_walk with TIME_SHIFT: told noisier only, at each step count's
  chosen strength and shift, the shift beside it; of the settings the 16 noises cannot tell from the closest,
  the nearest Euler): this lever scores its choice against the calibration at Euler's times alone, the recipe
  every other lever starts from. (docs/convergence-time-shift.json, before the build, searched a from -0.5 to
  0.5 with the shift beside it, x1 / x1.25 / x1.25^-1.)
- **The calibrated walk** ("walk"): the calibration as built (the time shift, then the multistep step at it:
  calibration.WALK_LEVERS) against the calibration with the time shift alone. The "multistep" lever above is the
  free search that measured the idea before it was built.

Everything is measured on the benchmark's 1000 evaluation noises: RMSE to the teacher's 128-step samples, and
FD. Figures only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from shortcut_core import ShortcutTrainer
from shortcut_core.adapters import EMA_FAST, EMA_SLOW, STUDENT, TEACHER
from shortcut_core.calibration import TIME_SHIFT, WALK_LEVERS, Recipe, rms, squared_errors
from shortcut_core.sampling import sample_euler

from .report import machine_line, markdown_table
from .teachers import TEACHERS, euler_samples

STEP_COUNTS = (1, 2, 3, 4)
PER_JUMP_STEP_COUNTS = (2, 3, 4)
STRENGTHS = tuple(0.25 * k for k in range(1, 17))
SHIFT_MOVES = (1 / 1.25, 1.25, 1 / 1.1, 1.1)
MULTISTEP_C = tuple(round(-0.5 + 0.1 * k, 1) for k in range(16))
SAMPLED = {"student": STUDENT, "fast EMA": EMA_FAST, "slow EMA": EMA_SLOW}
LEVERS = ("per-jump", "multistep", "sampled", "time-shift", "walk")
# each calibrated lever: the calibration's walk levers before and after it
CALIBRATED = {"time-shift": ((), (TIME_SHIFT,)), "walk": ((TIME_SHIFT,), WALK_LEVERS)}


def student_sampler(trainer: ShortcutTrainer, strengths: list[float], c: float = 0.0, time_shift: float = 0.0):
    """A `sampler(noise, sigmas, args)` for euler_samples: Euler with the student at strengths[i] on jump i,
    stepping from the second jump on with v_i + c (v_i - v_i-1) (c = 0: plain Euler), the model told the time
    t_i - time_shift (t_i - t_i+1), at most t_0, on the jump from t_i to t_i+1 (0: the jump's own start)."""
    @torch.no_grad()
    def run(x: torch.Tensor, sigmas: torch.Tensor, args: dict) -> torch.Tensor:
        jumps = iter(strengths)

        def velocity(x: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
            trainer.adapters.set_strength(STUDENT, next(jumps))
            return trainer.velocity(x, t, **extra)

        with trainer.adapters.use(STUDENT):
            try:
                return sample_euler(velocity, x, sigmas, args, disable=True, time_shift=time_shift, multistep=c)
            finally:
                trainer.adapters.set_strength(STUDENT, 1.0)
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


def measure(name: str, levers: Sequence[str] = LEVERS, seed: int | None = None,
            user_shifts: bool = False) -> dict[str, list[dict]]:
    """Rows of each lever in `levers`, of one teacher's full paper run (at `seed`, or the teacher's own; with
    `user_shifts`, at the shifts a user gets, centred as Train Shortcut's centre_shifts does)."""
    teacher = TEACHERS[name]()
    if user_shifts:
        teacher.config = teacher.config.replace(**teacher.user_schedule)
    cfg = teacher.config.replace(recipe="paper", **({} if seed is None else {"seed": seed}))
    rows: dict[str, list[dict]] = {lever: [] for lever in levers}
    with ShortcutTrainer(teacher.module, teacher.velocity, teacher.latents, cfg, extra_args=teacher.extra_args,
                         blocks=teacher.blocks) as trainer:
        noise, args = teacher.calibration_noise(cfg.seed)
        if user_shifts:
            trainer.centre_shifts(noise, args, reference_steps=teacher.config.reference_steps)
        trainer.run(cfg.steps, progress=False)
        # the teacher's walks: the module's own call runs whatever adapter is active (after run(), the student's)
        reference = euler_samples(None, noise, args, teacher.config.reference_steps, cfg.sample_shift,
                                  lambda noise, sigmas, args: trainer.sample_as(TEACHER, noise, sigmas, args))

        def on_calibration_noises(n: int, shift: float, strengths: list[float], c: float = 0.0) -> torch.Tensor:
            samples = euler_samples(None, noise, args, n, shift, student_sampler(trainer, strengths, c))
            return squared_errors(samples, reference)

        def on_eval_noises(n: int, shift: float, strengths: list[float], c: float = 0.0,
                           time_shift: float = 0.0) -> tuple[float, float]:
            samples = teacher.sample(n, shift, student_sampler(trainer, strengths, c, time_shift))
            return teacher.rmse(samples), teacher.fd(samples)

        calibrations = {}

        def calibrated(walk_levers: tuple) -> dict[int, Recipe]:
            if walk_levers not in calibrations:
                calibrations[walk_levers] = trainer.calibrate(
                    noise, args, reference_steps=teacher.config.reference_steps, step_counts=STEP_COUNTS,
                    walk_levers=walk_levers).recipes()
            return calibrations[walk_levers]

        scores = {}

        def scored(recipe: Recipe) -> tuple[float, float]:
            if recipe not in scores:
                scores[recipe] = on_eval_noises(recipe.steps, recipe.shift, [recipe.strength] * recipe.steps,
                                                recipe.multistep, recipe.time_shift)
            return scores[recipe]

        def calibrated_rows(label: str) -> dict:
            # on Euler's walk: every lever below starts from this recipe
            calibration = trainer.calibrate(noise, args, reference_steps=teacher.config.reference_steps,
                                            step_counts=STEP_COUNTS, walk_levers=())
            row = dict(teacher=name, seed=cfg.seed, lora=label, rmse={}, fd={}, strength={}, shift={})
            for n in STEP_COUNTS:
                recipe, _ = calibration.best_for(n)
                row["rmse"][n], row["fd"][n] = on_eval_noises(n, recipe.shift, [recipe.strength] * n)
                row["strength"][n], row["shift"][n] = recipe.strength, recipe.shift
            row["fd3"] = row["fd"][3]
            print(f"  {name} seed {cfg.seed} {label}: RMSE 1/2/3/4 "
                  + " / ".join(f"{row['rmse'][n]:.4f}" for n in STEP_COUNTS) + f", FD3 {row['fd3']:.3f}", flush=True)
            return row

        student = calibrated_rows("student")
        # the calibration on Euler's walk and its scores, as measured: the time-shift lever starts from them
        calibrations[()] = {n: Recipe(n, student["strength"][n], student["shift"][n]) for n in STEP_COUNTS}
        scores.update({calibrations[()][n]: (student["rmse"][n], student["fd"][n]) for n in STEP_COUNTS})
        if "sampled" in levers:
            loras = {label: trainer.adapters.lora_state(role) for label, role in SAMPLED.items()}
            rows["sampled"].append(student)
            for label in ("fast EMA", "slow EMA"):
                trainer.adapters.load_lora_state(STUDENT, loras[label])
                rows["sampled"].append(calibrated_rows(label))
            trainer.adapters.load_lora_state(STUDENT, loras["student"])  # the searches below sample the student
        run = dict(teacher=name, seed=cfg.seed)
        for n in PER_JUMP_STEP_COUNTS if "per-jump" in levers else ():
            strength, shift = student["strength"][n], student["shift"][n]
            strengths, best_shift, _ = search_per_jump(lambda st, sh: rms(on_calibration_noises(n, sh, st)),
                                                       [strength] * n, shift)
            rmse, fd = on_eval_noises(n, best_shift, strengths)
            rows["per-jump"].append(dict(run, steps=n, strength=strength, shift=shift, rmse=student["rmse"][n],
                                         fd=student["fd"][n], strengths=strengths, per_jump_shift=best_shift,
                                         per_jump_rmse=rmse, per_jump_fd=fd))
            print(f"  {name} {n} steps: one strength {student['rmse'][n]:.4f} (FD {student['fd'][n]:.3f}), per jump "
                  f"{rmse:.4f} (FD {fd:.3f}) at {strengths}", flush=True)
        for n in PER_JUMP_STEP_COUNTS if "multistep" in levers else ():
            strength, shift = student["strength"][n], student["shift"][n]
            _, c, best_shift = min((rms(on_calibration_noises(n, shift * k, [strength] * n, c)), c, shift * k)
                                   for c in MULTISTEP_C for k in (1.0, 1 / 1.25, 1.25))
            rmse, fd = on_eval_noises(n, best_shift, [strength] * n, c)
            rows["multistep"].append(dict(run, steps=n, c=c, shift=best_shift, rmse=student["rmse"][n],
                                          fd=student["fd"][n], multistep_rmse=rmse, multistep_fd=fd))
            print(f"  {name} {n} steps: Euler {student['rmse'][n]:.4f} (FD {student['fd'][n]:.3f}), multistep c {c:g} "
                  f"shift {best_shift:.3g} {rmse:.4f} (FD {fd:.3f})", flush=True)
        for lever in [lever for lever in CALIBRATED if lever in levers]:
            before, after = (calibrated(walk_levers) for walk_levers in CALIBRATED[lever])
            for n in STEP_COUNTS:
                (rmse, fd), (walk_rmse, walk_fd) = scored(before[n]), scored(after[n])
                rows[lever].append(dict(run, steps=n, a=after[n].time_shift, c=after[n].multistep,
                                        shift=after[n].shift, rmse=rmse, fd=fd, walk_rmse=walk_rmse, walk_fd=walk_fd))
                print(f"  {name} seed {cfg.seed} {lever} {n} steps: before {rmse:.4f} (FD {fd:.3f}), "
                      f"{after[n]} {walk_rmse:.4f} (FD {walk_fd:.3f})", flush=True)
    return rows


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


def walk_table(rows: list[dict]) -> str:
    return markdown_table(
        ["teacher", "seed", "steps", "before: RMSE / FD", "time shift, multistep; shift", "after: RMSE / FD",
         "after / before, RMSE (FD)"],
        [[r["teacher"], r["seed"], r["steps"], f"{r['rmse']:.4f} / {r['fd']:.3f}",
          f"{r['a']:g}, {r.get('c', 0.0):g}; {r['shift']:.3g}", f"{r['walk_rmse']:.4f} / {r['walk_fd']:.3f}",
          f"{r['walk_rmse'] / r['rmse']:.3f} ({r['walk_fd'] / r['fd']:.2f})"] for r in rows])


def walk_summary(rows: list[dict]) -> str:
    """Per teacher and step count: the mean over seeds of the after / before ratios, RMSE / FD, and the walks
    chosen (time shift a, multistep c)."""
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    out = []
    for n in steps:
        cells = []
        for name in teachers:
            mine = [r for r in rows if r["teacher"] == name and r["steps"] == n]
            if not mine:
                cells.append("")
                continue
            rmse = sum(r["walk_rmse"] / r["rmse"] for r in mine) / len(mine)
            fd = sum(r["walk_fd"] / r["fd"] for r in mine) / len(mine)
            chosen = "; ".join(f"{r['a']:g}, {r.get('c', 0.0):g}" for r in mine)
            cells.append(f"{rmse:.2f} / {fd:.2f} (a, c: {chosen})")
        out.append([n] + cells)
    return markdown_table(["steps"] + teachers, out)


def sampled_table(rows: list[dict]) -> str:
    """Each LoRA's calibrated 1-4-step RMSE and 3-step FD, and its 3-step ratios to the student of its run."""
    student = {(r["teacher"], r.get("seed")): r for r in rows if r["lora"] == "student"}
    out = []
    for r in rows:
        s = student.get((r["teacher"], r.get("seed")))
        ratio = "" if s is None else f"{r['rmse'][3] / s['rmse'][3]:.3f} ({r['fd3'] / s['fd3']:.2f})"
        out.append([r["teacher"], r["lora"]] + [f"{r['rmse'][n]:.4f}" for n in STEP_COUNTS]
                   + [f"{r['fd3']:.3f}", ratio])
    return markdown_table(["teacher", "LoRA sampled", "RMSE 1 step", "2 steps", "3 steps", "4 steps", "FD 3 steps",
                           "3 steps / student's, RMSE (FD)"], out)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="*", default=list(TEACHERS), choices=list(TEACHERS))
    ap.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    ap.add_argument("--seeds", nargs="*", type=int, default=None, help="train each teacher at these seeds "
                    "(default: its own)")
    ap.add_argument("--user-shifts", action="store_true", help="train at the shifts a user gets by default, centred "
                    "on the teacher's best 3-step shift (Train Shortcut's centre_shifts)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--load", nargs="*", type=Path, default=(), help="rows (json) of earlier runs to report with these")
    ap.add_argument("--out", type=Path, default=None, help="write the tables (markdown) and rows (json) here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    rows: dict[str, list[dict]] = {lever: [] for lever in LEVERS}
    for path in args.load:
        earlier = json.loads(path.read_text())
        for lever in LEVERS:
            rows[lever] += earlier.get(lever.replace("-", "_"), [])
    rows["sampled"] = [dict(r, rmse={int(n): v for n, v in r["rmse"].items()}) for r in rows["sampled"]]
    for name in args.teachers:
        for seed in args.seeds or [None]:
            for lever, found in measure(name, args.levers, seed, args.user_shifts).items():
                rows[lever] += found
    tables = {"per-jump": per_jump_table, "sampled": sampled_table, "multistep": multistep_table,
              **{lever: lambda found: f"{walk_summary(found)}\n\n{walk_table(found)}" for lever in CALIBRATED}}
    text = "\n\n".join(tables[lever](rows[lever]) for lever in LEVERS if rows[lever])
    print(text)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(f"{machine_line()}\n\n{text}\n")
        args.out.with_suffix(".json").write_text(json.dumps({lever.replace("-", "_"): found
                                                             for lever, found in rows.items()}, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""How SCFM's few-step quality grows with training, per teacher and training recipe.

    python -m benchmarks.convergence --recipes paper fast "fast, then paper from 1/2" \
        --out docs/convergence-curves --plot docs/convergence.png    # the curves on every teacher
    python -m benchmarks.convergence --ablate --out docs/convergence-levers   # each lever alone, equal compute
    python -m benchmarks.convergence --teachers digits scenes --budgets 0.111 0.333 1 --seeds 1 2

For each teacher (benchmarks/teachers.py) and recipe, SCFM runs for a share of the teacher's full budget; after
each run the calibration (16 held-out noises, shortcut_core.calibration) picks the recipe per step count, and the
LoRA is measured at the 1-, 2-, 3- and 4-step recipes it picked on 1000 other noises: RMSE to the teacher's
128-step samples from the same noises, and the Fréchet distance of the 3-step samples to the real data (beside
the teacher's own 32-step FD, so a recipe that wins on distance by blurring shows). Wall time counts training
only. The paper's recipe holds its learning rate, EMA decays and teacher share constant, so its shorter budgets
are measured along one run; a recipe whose schedule follows the run length gets one run per budget.

--out writes the tables (markdown; for ablations led by each lever's ratios to the paper's recipe on every
teacher) and the points (json, for --load); --plot the RMSE against training steps (PNG). docs/convergence.md
reads them.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from shortcut_core import ShortcutTrainer
from shortcut_core.adapters import STUDENT, TEACHER
from shortcut_core.calibration import sample_distance
from shortcut_core.training_recipe import TRAINING_RECIPES, TrainingRecipe

from .report import machine_line, markdown_table
from .teachers import TEACHERS, Teacher, euler_samples, with_walks

STEP_COUNTS = (1, 2, 3, 4)
BUDGETS = (1 / 9, 1 / 3, 1.0)


@dataclass
class Point:
    teacher: str
    recipe: str
    steps: int
    seconds: float
    rmse: dict[int, float]       # per step count, at the calibrated recipe for it
    fd3: float                   # FD of the calibrated 3-step samples to the real data
    teacher_fd32: float          # the teacher's own at 32 steps
    recipes: dict[int, tuple[float, float]]   # per step count: (strength, shift)
    # with --before: the RMSE per step count at the one recipe 0.4.0's calibration gave for every step count
    before: dict[int, float] = field(default_factory=dict)
    # the calibration's own 3-step distance on its held-out noises (what a run could keep its best LoRA by)
    calibrated3: float | None = None


# 0.4.0's calibration: at the LoRA's own step count only, strengths 1-1.75 x the LoRA's shift and its neighbours
BEFORE_STRENGTHS = (1.0, 1.25, 1.5, 1.75)
BEFORE_SHIFTS = (1 / 1.5, 1.0, 1.5)


def before_recipe(trainer: ShortcutTrainer, noise: torch.Tensor, args: dict, reference_steps: int
                  ) -> tuple[float, float]:
    """The (strength, shift) 0.4.0's calibration chose from the same held-out noises; a user then sampled every
    step count with it."""
    cfg = trainer.config

    def student(strength: float):
        return lambda noise, sigmas, args: trainer.sample_as(STUDENT, noise, sigmas, args, strength)

    reference = euler_samples(None, noise, args, reference_steps, cfg.sample_shift,
                              lambda noise, sigmas, args: trainer.sample_as(TEACHER, noise, sigmas, args))
    scored = [(sample_distance(euler_samples(None, noise, args, cfg.sample_steps, cfg.sample_shift * k,
                                             student(strength)), reference), strength, cfg.sample_shift * k)
              for strength in BEFORE_STRENGTHS for k in BEFORE_SHIFTS]
    return min(scored)[1:]


def measure(teacher: Teacher, trainer: ShortcutTrainer, recipe_name: str, seconds: float,
            before: bool = False) -> Point:
    noise, args = teacher.calibration_noise(trainer.config.seed)
    calibration = trainer.calibrate(noise, args, reference_steps=teacher.config.reference_steps,
                                    step_counts=STEP_COUNTS)
    rmse, recipes, fd3, was = {}, {}, float("nan"), {}
    for n in STEP_COUNTS:
        chosen, _ = calibration.best_for(n)
        samples = teacher.sample(n, chosen.shift, lambda noise, sigmas, args: trainer.sample_as(
            STUDENT, noise, sigmas, args, chosen.strength, **chosen.walk))
        rmse[n] = teacher.rmse(samples)
        recipes[n] = (chosen.strength, chosen.shift)
        if n == 3:
            fd3 = teacher.fd(samples)
    if before:
        strength, shift = before_recipe(trainer, noise, args, teacher.config.reference_steps)
        for n in STEP_COUNTS:
            was[n] = teacher.rmse(teacher.sample(n, shift, lambda noise, sigmas, args: trainer.sample_as(
                STUDENT, noise, sigmas, args, strength)))
    return Point(teacher.name, recipe_name, trainer.step_count, seconds, rmse, fd3, teacher.teacher_fd[32], recipes,
                 was, calibration.best_for(3)[1])


def train(teacher: Teacher, recipe_name: str, schedules: TrainingRecipe | None, total: int,
          eval_at: tuple[int, ...], trajectories: bool = False, before: bool = False, **overrides) -> list[Point]:
    """One SCFM run of `total` steps on the teacher, measured after each of `eval_at` steps. `schedules`: the
    per-step levers (None: those of the config's named recipe, overrides["recipe"]); `trajectories`: teacher
    items on the teacher's recorded walks (data-free teachers); `before`: also measure at 0.4.0's recipe."""
    centre = overrides.pop("_centre", False)
    config = teacher.config.replace(steps=total, **overrides)
    points, seconds = [], 0.0
    with ShortcutTrainer(teacher.module, teacher.velocity, teacher.latents, config, extra_args=teacher.extra_args,
                         blocks=teacher.blocks, training_recipe=schedules,
                         trajectories=teacher.trajectories if trajectories else None) as trainer:
        if centre:  # the shifts around the teacher's own best few-step shift; the time counts
            started = time.perf_counter()
            noise, args = teacher.calibration_noise(config.seed)
            best = trainer.centre_shifts(noise, args, reference_steps=config.reference_steps)
            seconds += time.perf_counter() - started
            print(f"  {teacher.name}: the teacher samples {config.sample_steps} steps best at shift {best.shift:.3g} "
                  f"(config: {config.sample_shift:.3g})", flush=True)
        for stop in eval_at:
            started = time.perf_counter()
            trainer.run(stop, progress=False)
            seconds += time.perf_counter() - started
            points.append(measure(teacher, trainer, recipe_name, seconds, before))
    return points


def length_free(recipe: TrainingRecipe) -> bool:
    """Whether nothing of the recipe depends on the run's length (no warm-up, decay, teacher ramp or coarse
    phase): its run of n steps is then the first n steps of any longer run."""
    return (recipe.warmup == 0 and recipe.decay == "constant" and recipe.coarse_share >= 1.0
            and (recipe.teacher_start is None or recipe.teacher_ramp <= 0))


def keep_best_table(points: list[Point]) -> str | None:
    """For each run measured at several lengths: its 3-step RMSE at the end, at the length whose calibration
    distance (held-out noises, what a run can see) was lowest, and at the best length (an oracle)."""
    runs: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        if p.calibrated3 is not None:
            runs.setdefault((p.teacher, p.recipe), []).append(p)
    rows = []
    for (t, recipe), run in runs.items():
        if len(run) < 3:
            continue
        run = sorted(run, key=lambda p: p.steps)
        kept = min(run, key=lambda p: p.calibrated3)
        best = min(run, key=lambda p: p.rmse[3])
        end = run[-1]
        rows.append([t, recipe, " / ".join(str(p.steps) for p in run), f"{end.rmse[3]:.4f}",
                     f"{kept.rmse[3]:.4f} at {kept.steps} ({kept.rmse[3] / end.rmse[3]:.2f}x)",
                     f"{best.rmse[3]:.4f} at {best.steps}", f"{end.fd3:.3f} -> {kept.fd3:.3f}"])
    if not rows:
        return None
    return markdown_table(["teacher", "recipe", "measured at steps", "3-step RMSE at the end",
                           "kept by the calibration's distance", "best (oracle)", "FD 3 steps: end -> kept"], rows)


def budget_steps(teacher: Teacher, budgets) -> tuple[int, ...]:
    return tuple(max(1, round(teacher.config.steps * b)) for b in budgets)


# The named recipes, and candidates measured beside them: (the config's recipe name, the per-step levers).
CANDIDATES = {
    **{name: (name, recipe) for name, recipe in TRAINING_RECIPES.items()},
    "fast, then paper from 1/2": ("fast", replace(TRAINING_RECIPES["fast"], coarse_share=0.5)),
}


def curves(teacher: Teacher, recipes: list[str], budgets, before: bool = False, **run) -> list[Point]:
    points = []
    steps = budget_steps(teacher, budgets)
    for name in recipes:
        base, recipe = CANDIDATES[name]
        if length_free(recipe):  # one run, measured on the way, is every shorter run of this recipe
            points += train(teacher, name, recipe, steps[-1], steps, before=before, recipe=base, **run)
        else:
            for n in steps:
                points += train(teacher, name, recipe, n, (n,), before=before, recipe=base, **run)
        print(f"  {teacher.name} {name}: " + ", ".join(f"{p.steps} steps 3-step {p.rmse[3]:.4f}" for p in points
                                                       if p.recipe == name), flush=True)
    return points


# ---------------------------------------------------------------------- the levers, one at a time
def ablations(teacher: Teacher) -> dict[str, tuple[TrainingRecipe, dict]]:
    """Each lever alone on the paper's recipe, and a few together, at equal compute (the same forwards)."""
    paper = TRAINING_RECIPES["paper"]
    cfg = teacher.config
    return {
        "paper": (paper, {}),
        "cosine decay": (replace(paper, decay="cosine", final_lr=0.0), {}),
        "warm-up 5% + cosine": (replace(paper, warmup=0.05, decay="cosine", final_lr=0.0), {}),
        "lr x2": (replace(paper, lr_scale=2.0), {}),
        "lr x0.5": (replace(paper, lr_scale=0.5), {}),
        # LoRA+ (Hayou et al. 2024): the up factors at 16x (its suggested ratio) and 4x the down factors' rate
        "LoRA+ 16": (replace(paper, up_lr_ratio=16.0), {}),
        "LoRA+ 4": (replace(paper, up_lr_ratio=4.0), {}),
        "lr x2 + cosine": (replace(paper, lr_scale=2.0, decay="cosine", final_lr=0.0), {}),
        "EMA warm-up 2/3": (replace(paper, fast_ema_power=2 / 3, slow_ema_power=2 / 3), {}),
        "EMA warm-up 1/2": (replace(paper, fast_ema_power=0.5, slow_ema_power=0.5), {}),
        "fast EMA warm-up 2/3": (replace(paper, fast_ema_power=2 / 3), {}),
        "slow EMA warm-up 2/3": (replace(paper, slow_ema_power=2 / 3), {}),
        "teacher 1 -> ratio over 50%": (replace(paper, teacher_start=1.0, teacher_ramp=0.5), {}),
        "teacher ratio 0.7": (paper, {"teacher_ratio": 0.7}),
        "batch x2, steps /2": (paper, {"batch_size": cfg.batch_size * 2, "_steps": 0.5}),
        "t_skip 4": (paper, {"t_skip": 4}),
        # 4 + 3 forwards a step instead of 2 + 3 (student forward and backward ~ 3): 5/7 of the steps
        "t_skip 4, equal compute": (paper, {"t_skip": 4, "_steps": 5 / 7}),
        "t_skip 4 + slow EMA warm-up, equal compute": (replace(paper, slow_ema_power=2 / 3),
                                                       {"t_skip": 4, "_steps": 5 / 7}),
        "t_skip 4 + lr x2, equal compute": (replace(paper, lr_scale=2.0), {"t_skip": 4, "_steps": 5 / 7}),
        "t_skip 4, teacher 64": (paper, {"t_skip": 4, "teacher_min_steps": 64, "teacher_max_steps": 64}),
        "t_skip 4, teacher 64, equal compute": (paper, {"t_skip": 4, "teacher_min_steps": 64,
                                                        "teacher_max_steps": 64, "_steps": 5 / 7}),
        "teacher 64": (paper, {"teacher_min_steps": 64, "teacher_max_steps": 64}),
        # data-free teachers only: teacher items start on the recorded walks and skip their teacher half (its
        # forward), 5 - 0.4 forwards an item a step against 5, so 5 / 4.6 of the steps at equal compute
        "teacher trajectories": (paper, {"_trajectories": True}),
        "teacher trajectories, equal compute": (paper, {"_trajectories": True, "_steps": 5 / 4.6}),
        "t_skip 4 for 1/3, then 2": (replace(TRAINING_RECIPES["fast"], coarse_share=1 / 3), {"recipe": "fast"}),
        "t_skip 4 for 1/2, then 2": (replace(TRAINING_RECIPES["fast"], coarse_share=1 / 2), {"recipe": "fast"}),
        # 1/2 of the steps at 7/5 of the forwards: 1.2x the paper's compute, so 1/1.2 of the steps
        "t_skip 4 for 1/2, then 2, equal compute": (replace(TRAINING_RECIPES["fast"], coarse_share=1 / 2),
                                                    {"recipe": "fast", "_steps": 1 / 1.2}),
        # iCT's c = 0.00054 sqrt(d) on the norm is 0.00054 on the per-element RMS
        "pseudo-Huber loss, c 5.4e-4": (replace(paper, huber_c=5.4e-4), {}),
        "pseudo-Huber loss, c 0.03": (replace(paper, huber_c=0.03), {}),
        # self items teach the sampler's own step counts (the paper's powers of two skip the 3-step walk); a
        # self item costs the same forwards at any schedule length, so these are at equal compute as they stand
        "self steps 1-4": (replace(paper, self_steps=(1, 2, 3, 4)), {}),
        "self steps 1-4 and 8": (replace(paper, self_steps=(1, 2, 3, 4, 8)), {}),
        "self steps 1-3": (replace(paper, self_steps=(1, 2, 3)), {}),
        "self steps 1-4, t_skip 4, equal compute": (replace(paper, self_steps=(1, 2, 3, 4)),
                                                    {"t_skip": 4, "_steps": 5 / 7}),
        "self steps 1-3, t_skip 4, equal compute": (replace(paper, self_steps=(1, 2, 3)),
                                                    {"t_skip": 4, "_steps": 5 / 7}),
        "self steps 1-2": (replace(paper, self_steps=(1, 2)), {}),
        "self steps 1-3 and 8": (replace(paper, self_steps=(1, 2, 3, 8)), {}),
        # capacity: does a larger LoRA (the same alpha / rank) learn the few-step maps better?
        "rank x4": (paper, {"rank": cfg.rank * 4, "alpha": cfg.alpha * 4}),
        # a LoRA for the fewest steps: self items teach only the walks the user will sample
        "self steps 1": (replace(paper, self_steps=(1,)), {}),
        "self steps 2": (replace(paper, self_steps=(2,)), {}),
        # EMAs that follow the student early move a LoRA towards the fewest steps (1-step error lower on every
        # teacher at a third of the budget); with self items on the 1-2-step walks, a LoRA for 1-2 steps
        "EMA warm-up 2/3, self steps 1-2": (replace(paper, fast_ema_power=2 / 3, slow_ema_power=2 / 3,
                                                    self_steps=(1, 2)), {}),
        # data-free teachers only: a share of the shortcut items taught the sampler's own 1-3-step jumps straight
        # from the recorded walks (exact targets, no forward; the teacher items on the walks as above)
        "walks 1-3, 50%": (replace(paper, walk_steps=(1, 2, 3), walk_ratio=0.5), {"_trajectories": True}),
        "walks 1-3, 80%": (replace(paper, walk_steps=(1, 2, 3), walk_ratio=0.8), {"_trajectories": True}),
        "walks 1, 50%": (replace(paper, walk_steps=(1,), walk_ratio=0.5), {"_trajectories": True}),
        # a bound, not a candidate: every item a 1-step jump with its exact target, three times the budget
        "walks 1 only, x3": (replace(paper, walk_steps=(1,), walk_ratio=1.0),
                             {"_trajectories": True, "teacher_ratio": 0.0, "_steps": 3}),
        # data-free teachers only: a share of the self items taught the straight line from a walk's noise to its
        # sample (reflow: a field that is straight takes any number of steps to the same sample)
        "reflow 50%": (replace(paper, reflow_ratio=0.5), {"_trajectories": True}),
        "reflow 100%": (replace(paper, reflow_ratio=1.0), {"_trajectories": True}),
        "walks 1-3 50%, reflow 50%": (replace(paper, walk_steps=(1, 2, 3), walk_ratio=0.5, reflow_ratio=0.5),
                                      {"_trajectories": True}),
        # a bound, not a candidate: rectified flow's reflow alone (every item on a line), three times the budget
        "reflow only, x3": (replace(paper, reflow_ratio=1.0), {"_trajectories": True, "teacher_ratio": 0.0, "_steps": 3}),
        # issue #24: the targets' no-grad passes in fp8 (on a CPU the numerics of the GPU path, at no gain)
        "fp8 targets": (paper, {"fp8_targets": True}),
        # the calibration picks shifts below the training draw on every tiny teacher: train where it samples
        "shift draw x2/3": (paper, {"shift_min": cfg.shift_min * 2 / 3, "shift_max": cfg.shift_max * 2 / 3}),
        "t_skip 4 + cosine decay": (replace(paper, decay="cosine", final_lr=0.0), {"t_skip": 4}),
        "t_skip 4 + lr x0.5": (replace(paper, lr_scale=0.5), {"t_skip": 4}),
        "EMA warm-up 2/3 + lr x2": (replace(paper, fast_ema_power=2 / 3, slow_ema_power=2 / 3, lr_scale=2.0), {}),
        "EMA warm-up 2/3 + t_skip 4": (replace(paper, fast_ema_power=2 / 3, slow_ema_power=2 / 3), {"t_skip": 4}),
    }


def run_ablations(teacher: Teacher, share: float, only: list[str] | None, **run) -> list[Point]:
    points = []
    steps = budget_steps(teacher, (share,))[0]
    for name, (recipe, overrides) in ablations(teacher).items():
        if only and name not in only:
            continue
        overrides = {"recipe": "paper", **overrides}
        n = max(1, round(steps * overrides.pop("_steps", 1.0)))
        trajectories = overrides.pop("_trajectories", False)
        if trajectories and teacher.trajectories is None:
            continue  # a lever of data-free mode: this teacher trains on data
        points += train(teacher, name, recipe, n, (n,), trajectories, **{**overrides, **run})
        p = points[-1]
        print(f"  {teacher.name} {name}: {p.steps} steps {p.seconds:.0f} s, RMSE 1/2/3/4 "
              + " / ".join(f"{p.rmse[k]:.4f}" for k in STEP_COUNTS) + f", FD3 {p.fd3:.3f}", flush=True)
    return points


def table(points: list[Point]) -> str:
    rows = []
    for p in points:
        rows.append([p.teacher, p.recipe, str(p.steps), f"{p.seconds:.0f}"]
                    + [f"{p.rmse[n]:.4f}" for n in STEP_COUNTS]
                    + [f"{p.fd3:.3f} ({p.fd3 / p.teacher_fd32:.2f}x)"])
    return markdown_table(["teacher", "recipe", "steps", "train s", "RMSE 1 step", "2 steps", "3 steps", "4 steps",
                           "FD 3 steps (/ teacher 32)"], rows)


SEED_LABEL = re.compile(r"^(.*) \(seed (\d+)\)$")


def recipe_and_seed(label: str) -> tuple[str, int | None]:
    """A point's recipe label without the " (seed N)" that --seeds adds, and N (None where there is none)."""
    m = SEED_LABEL.match(label)
    return (m[1], int(m[2])) if m else (label, None)


def versus_paper(points: list[Point]) -> str | None:
    """Each lever against the paper's recipe, per teacher: 3-step RMSE and FD as ratios to the paper's of the
    same seed (below 1 is better), averaged over the seeds, with the range of the RMSE ratio where there are
    several; for ablation points (one paper point per teacher and seed); None for other points."""
    names = list(dict.fromkeys(p.teacher for p in points))
    keyed = [(p.teacher, *recipe_and_seed(p.recipe), p) for p in points]
    paper: dict[tuple[str, int | None], list[Point]] = {}
    for t, recipe, seed, p in keyed:
        if recipe == "paper":
            paper.setdefault((t, seed), []).append(p)
    if not names or any(len(v) != 1 for v in paper.values()) or {t for t, _ in paper} != set(names):
        return None
    rows = []
    for recipe in dict.fromkeys(r for _, r, _, _ in keyed if r != "paper"):
        cells, wins = [], 0
        for t in names:
            ratios = [(p.rmse[3] / paper[t, seed][0].rmse[3], p.fd3 / paper[t, seed][0].fd3)
                      for pt, r, seed, p in keyed if pt == t and r == recipe and (t, seed) in paper]
            if not ratios:
                cells.append("")
                continue
            rmse = sum(r for r, _ in ratios) / len(ratios)
            fd = sum(f for _, f in ratios) / len(ratios)
            wins += rmse < 1 and fd < 1
            spread = f" ({min(r for r, _ in ratios):.2f}-{max(r for r, _ in ratios):.2f})" if len(ratios) > 1 else ""
            cells.append(f"{rmse:.2f} / {fd:.2f}{spread}")
        rows.append([recipe, *cells, f"{wins} of {len(names)}"])
    seeds = {seed for _, seed in paper}
    if len(seeds) > 1:
        spread = []
        for t in names:
            values = [paper[t, s][0].rmse[3] for s in sorted(seeds) if (t, s) in paper]
            mean = sum(values) / len(values)
            sd = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
            spread.append(f"{100 * sd / mean:.1f}%")
        rows.append([f"(the paper's 3-step RMSE over {len(seeds)} seeds: sd / mean)", *spread, ""])
    if not rows:
        return None  # the paper's points alone: nothing to set beside them
    head = "lever (3-step RMSE / FD, over the paper's" + (", mean over seeds (RMSE range))" if len(seeds) > 1 else ")")
    return markdown_table([head, *names, "better on both"], rows)


def goal_table(points: list[Point], lever: str, now: str = "paper") -> str:
    """Issue #23's goal per teacher, each a mean over the seeds measured: the paper's recipe at its full budget
    sampled as 0.4.0 did (one recipe from the old grid for every step count) and as today (a recipe per step
    count from the wide search), and `lever`'s points (e.g. at a third of the budget) at today's calibration."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    rows = []
    for t in dict.fromkeys(p.teacher for p in points):
        paper = [p for p in points if p.teacher == t and recipe_and_seed(p.recipe)[0] == "paper" and p.before]
        full = max((p.steps for p in paper), default=None)
        paper = [p for p in paper if p.steps == full]
        mine = [p for p in points if p.teacher == t and recipe_and_seed(p.recipe)[0] == lever]
        today = [p for p in points if p.teacher == t and recipe_and_seed(p.recipe)[0] == now and p.steps == full]
        if not paper or not today:
            continue
        was = {n: mean([p.before[n] for p in paper]) for n in STEP_COUNTS}
        rmse = {n: mean([p.rmse[n] for p in today]) for n in STEP_COUNTS}
        fd = mean([p.fd3 / p.teacher_fd32 for p in today])
        lever3 = mean([p.rmse[3] for p in mine])
        rows.append([t, f"{len(today)}", f"{was[3]:.4f}", f"{rmse[3]:.4f} ({rmse[3] / was[3]:.2f}x)",
                     f"{lever3:.4f} ({lever3 / rmse[3]:.2f}x)" if mine else "", f"{fd:.2f}x",
                     f"{rmse[2]:.4f} ({rmse[2] / was[3]:.2f}x)", f"{was[1]:.4f} -> {rmse[1]:.4f} ({rmse[1] / was[1]:.2f}x)"])
    return markdown_table(["teacher", "seeds", "paper, full budget: 3 steps at 0.4.0's recipe",
                           "3 steps, today's calibration" + ("" if now == "paper" else f" ({now})"), f"{lever}: 3 steps (/ paper full, today)",
                           "3-step FD / teacher's 32-step", "2 steps, today (/ 0.4.0's 3 steps)",
                           "1 step: 0.4.0 -> today"], rows)


COLOURS = {"paper": (90, 90, 90), "fast": (214, 96, 20)}
DASHES = {1: (2, 4), 2: (6, 4), 3: (1, 0), 4: (10, 3)}


def plot(points: list[Point], path: Path, panel: tuple[int, int] = (360, 260)) -> None:
    """One panel per teacher: calibrated RMSE (log) against training steps (log), a line per recipe and step
    count (1 to 4 steps: dots, short dashes, solid, long dashes). Needs Pillow (requirements-dev)."""
    import math

    from PIL import Image, ImageDraw

    names = list(dict.fromkeys(p.teacher for p in points))
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    w, h = panel
    image = Image.new("RGB", (cols * w, rows * h + 40), "white")
    draw = ImageDraw.Draw(image)
    x_label = "training steps (log); y: RMSE to the teacher's 128-step samples (log), calibrated recipe"
    draw.text((10, rows * h + 8), x_label, fill=(0, 0, 0))
    legend = "  ".join(f"{r}" for r in dict.fromkeys(p.recipe for p in points))
    draw.text((10, rows * h + 22), "grey: paper, orange: fast, blue: other; dotted 1 step, dashed 2, solid 3, long dash 4. "
              + legend, fill=(0, 0, 0))
    for i, name in enumerate(names):
        ox, oy = (i % cols) * w, (i // cols) * h
        mine = [p for p in points if p.teacher == name]
        xs = [math.log(p.steps) for p in mine]
        ys = [math.log(p.rmse[n]) for p in mine for n in STEP_COUNTS]
        x0, x1 = min(xs) - 0.1, max(xs) + 0.1
        y0, y1 = min(ys) - 0.05, max(ys) + 0.05
        left, top, right, bottom = ox + 46, oy + 22, ox + w - 12, oy + h - 28

        def at(steps: int, value: float) -> tuple[float, float]:
            return (left + (math.log(steps) - x0) / (x1 - x0) * (right - left),
                    bottom - (math.log(value) - y0) / (y1 - y0) * (bottom - top))

        draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
        draw.text((left, oy + 6), name, fill=(0, 0, 0))
        for steps in sorted({p.steps for p in mine}):
            x, _ = at(steps, math.exp(y0))
            draw.text((x - 8, bottom + 4), str(steps), fill=(80, 80, 80))
        for value in (math.exp(y0 + 0.05), math.exp((y0 + y1) / 2), math.exp(y1 - 0.05)):
            _, y = at(math.exp(x0), value)
            draw.text((ox + 4, y - 5), f"{value:.3f}", fill=(80, 80, 80))
        for recipe in dict.fromkeys(p.recipe for p in mine):
            line = sorted((p for p in mine if p.recipe == recipe), key=lambda p: p.steps)
            colour = COLOURS.get(recipe, (40, 110, 200))
            for n in STEP_COUNTS:
                xy = [at(p.steps, p.rmse[n]) for p in line]
                on, off = DASHES[n]
                for (ax, ay), (bx, by) in zip(xy, xy[1:]):
                    length = math.hypot(bx - ax, by - ay)
                    pos = 0.0
                    while pos < length:
                        end = min(length, pos + on) if off else length
                        f0, f1 = pos / length, end / length
                        draw.line((ax + f0 * (bx - ax), ay + f0 * (by - ay), ax + f1 * (bx - ax),
                                   ay + f1 * (by - ay)), fill=colour, width=2)
                        pos = end + off if off else length
                for x, y in xy:
                    draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> list[Point]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS) + ["none"])
    ap.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="shares of each full budget")
    ap.add_argument("--recipes", nargs="+", default=list(TRAINING_RECIPES), choices=list(CANDIDATES))
    ap.add_argument("--ablate", action="store_true", help="the levers one by one at --share of the budget")
    ap.add_argument("--share", type=float, default=1 / 3, help="the budget share of the ablation")
    ap.add_argument("--only", nargs="*", default=None, help="ablation names to run (default all)")
    ap.add_argument("--out", type=Path, default=None, help="write the table (markdown) and points (json) here")
    ap.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG; needs Pillow)")
    ap.add_argument("--load", nargs="*", type=Path, default=(),
                    help="points from earlier --out runs (json) to table and plot with this run's; with --teachers "
                         "none, only those")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--before", action="store_true",
                    help="also measure each curve point at the one recipe 0.4.0's calibration chose (for --goal)")
    ap.add_argument("--goal", default=None, metavar="LEVER",
                    help="the goal table: the paper's recipe at the full budget before (0.4.0's calibration) and "
                         "after (today's), beside LEVER's points (e.g. an ablation's, at a third of the budget)")
    ap.add_argument("--walks", type=int, default=None,
                    help="data-free teachers train on this many of their own walks (default 64); teachers on data "
                         "are left as they are")
    ap.add_argument("--user-shifts", action="store_true",
                    help="train and calibrate around the shifts a user gets by default (the config's; for the "
                         "ComfyUI families the host's family recipe) instead of each teacher's best")
    ap.add_argument("--centre-shifts", action="store_true",
                    help="before each run, move its shifts around the teacher's own best few-step shift (calibrated "
                         "on the untrained LoRA; the time counts)")
    ap.add_argument("--goal-now", default="paper", metavar="RECIPE",
                    help="with --goal: the full-budget points that stand for today (default the paper's recipe)")
    ap.add_argument("--label", default=None, help="append this to every recipe label of this run's points")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="training seeds (draws, LoRA init, calibration noises; default the teacher config's); with "
                         "more than one, each point's recipe is labelled with its seed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    teachers, points = {}, []
    for saved in args.load:
        for p in json.loads(saved.read_text()):
            p["rmse"] = {int(k): v for k, v in p["rmse"].items()}
            p["recipes"] = {int(k): tuple(v) for k, v in p["recipes"].items()}
            p.setdefault("teacher_fd32", float("nan"))
            p["before"] = {int(k): v for k, v in p.get("before", {}).items()}
            points.append(Point(**p))
    for name in (n for n in args.teachers if n != "none"):
        started = time.perf_counter()
        teacher = teachers[name] = TEACHERS[name]()
        if args.walks and teacher.trajectories is not None:
            with_walks(teacher, args.walks)
        if args.user_shifts:
            teacher.config = teacher.config.replace(**teacher.user_schedule)
        print(f"{name}: {teacher.kind}; full budget {teacher.config.steps} steps of batch "
              f"{teacher.config.batch_size}; teacher FD 1/2/3/4/32 steps "
              + " / ".join(f"{teacher.teacher_fd[n]:.3f}" for n in (1, 2, 3, 4, 32))
              + ", RMSE 1/2/3/4 steps " + " / ".join(f"{teacher.teacher_rmse[n]:.4f}" for n in STEP_COUNTS) + " "
              f"({time.perf_counter() - started:.0f} s to set up)", flush=True)
        for seed in args.seeds or (None,):
            run = {} if seed is None else {"seed": seed}
            if args.centre_shifts:
                run["_centre"] = True
            mine = (run_ablations(teacher, args.share, args.only, **run) if args.ablate
                    else curves(teacher, args.recipes, args.budgets, args.before, **run))
            if args.label:
                mine = [replace(p, recipe=f"{p.recipe}{args.label}") for p in mine]
            if args.seeds and len(args.seeds) > 1:
                mine = [replace(p, recipe=f"{p.recipe} (seed {seed})") for p in mine]
            points += mine
    text = table(points)
    summary = versus_paper(points)
    if summary:
        text = f"{summary}\n\n{text}"
    kept = keep_best_table(points)
    if kept:
        text = f"{kept}\n\n{text}"
    if args.goal:
        text = f"{goal_table(points, args.goal, args.goal_now)}\n\n{text}"
    print()
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        ran = [n for n in args.teachers if n != "none"]
        header = machine_line() if ran else "points measured by earlier runs: " + ", ".join(map(str, args.load))
        args.out.with_suffix(".md").write_text(f"{header}\n\n{text}\n")
        args.out.with_suffix(".json").write_text(json.dumps([p.__dict__ for p in points], indent=1))
    if args.plot:
        plot(points, args.plot)
    return points


if __name__ == "__main__":
    main()

"""How the knobs move over a run: the learning rate, the EMA decays and the teacher's share per step.

The paper holds all three constant (AdamW at 2e-5, EMAs at 0.999 / 0.99, 40% teacher items). That suits its
10k-step runs; a user's shorter run spends its first thousand steps with targets from EMAs that still remember
the untrained LoRA. The levers here change only values per step, never what is drawn (but `self_steps`, which
names the walks self items teach): a run with `PAPER` is the paper's run, step for step and bit for bit.

Each lever is a small pure function of (step, total steps, the config's value); `TrainingRecipe` holds their
settings, `TRAINING_RECIPES` the named ones a user picks with ShortcutConfig.recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingRecipe:
    # sub-steps each target walks where the config leaves t_skip at 0 (auto) ...
    t_skip: int = 2
    # ... for this share of the run; then the paper's 2
    coarse_share: float = 1.0
    # learning rate: linear warm-up over this share of the run, then `decay` to final_lr * learning_rate
    warmup: float = 0.0
    decay: str = "constant"          # "constant", "cosine" or "linear"
    final_lr: float = 1.0            # the end of the decay, as a share of the learning rate
    lr_scale: float = 1.0            # times the config's learning rate
    # LoRA+ (Hayou et al. 2024): the up factors (lora_B, zero at the start) learn this many times faster than
    # the down factors, which at one rate for both is the slow direction of a LoRA's first steps
    up_lr_ratio: float = 1.0
    # EMA warm-up: decay_k = min(decay, 1 - (1 + k) ** -power), for each EMA; 0: its decay from the first step
    fast_ema_power: float = 0.0
    slow_ema_power: float = 0.0
    # teacher share: from teacher_start at step 0 down to the config's teacher_ratio at teacher_ramp of the run
    teacher_start: float | None = None
    teacher_ramp: float = 0.0
    # the loss: 0 the paper's mean squared error; > 0 pseudo-Huber with this c (objective.shortcut_loss)
    huber_c: float = 0.0
    # the sampler step counts that self items teach (each one jump of t_skip sub-steps of an n * t_skip-step
    # schedule); None: the paper's powers of two below the teacher's (1, 2, 4, 8 steps), which never train the
    # 3-step walk a user samples
    self_steps: tuple[int, ...] | None = None
    # a share of the self items taught one jump of these sampler step counts straight from the teacher's
    # recorded walks (trajectories.place_walk_items: exact targets, no forward); needs the walks
    walk_steps: tuple[int, ...] | None = None
    walk_ratio: float = 0.0
    # a share of the self items taught the straight line from a recorded walk's noise to its sample (rectified
    # flow's reflow, Liu et al. 2022: targets noise - sample, no forward), which straightens the field the
    # fewest steps follow; needs the walks
    reflow_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"TrainingRecipe.decay must be one of {', '.join(DECAYS)} (got {self.decay!r})")
        for name, value, low, high in (("warmup", self.warmup, 0.0, 1.0), ("coarse_share", self.coarse_share, 0.0, 1.0), ("final_lr", self.final_lr, 0.0, 1.0),
                                       ("lr_scale", self.lr_scale, 1e-6, 1e6),
                                       ("up_lr_ratio", self.up_lr_ratio, 1e-3, 1e3), ("fast_ema_power", self.fast_ema_power, 0.0, 1.0),
                                       ("slow_ema_power", self.slow_ema_power, 0.0, 1.0),
                                       ("teacher_ramp", self.teacher_ramp, 0.0, 1.0), ("huber_c", self.huber_c, 0.0, 1e3),
                                       ("walk_ratio", self.walk_ratio, 0.0, 1.0),
                                       ("reflow_ratio", self.reflow_ratio, 0.0, 1.0)):
            if not (isinstance(value, (int, float)) and low <= value <= high):
                raise ValueError(f"TrainingRecipe.{name} must be a number from {low:g} to {high:g} (got {value!r})")
        if not (isinstance(self.t_skip, int) and self.t_skip >= 2 and self.t_skip % 2 == 0):
            raise ValueError(f"TrainingRecipe.t_skip must be an even integer >= 2 (got {self.t_skip!r})")
        if self.self_steps is not None and not (len(self.self_steps) > 0 and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.self_steps)):
            raise ValueError(f"TrainingRecipe.self_steps must be None or step counts >= 1 (got {self.self_steps!r})")
        if self.walk_steps is not None and not (len(self.walk_steps) > 0 and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.walk_steps)):
            raise ValueError(f"TrainingRecipe.walk_steps must be None or step counts >= 1 (got {self.walk_steps!r})")
        if self.teacher_start is not None and not 0.0 <= self.teacher_start <= 1.0:
            raise ValueError(f"TrainingRecipe.teacher_start must be None or from 0 to 1 (got {self.teacher_start!r})")


DECAYS = ("constant", "cosine", "linear")


def learning_rate_at(step: int, total: int, learning_rate: float, recipe: TrainingRecipe) -> float:
    """The learning rate of optimizer step `step` (0-based) of a `total`-step run."""
    lr = learning_rate * recipe.lr_scale
    warm = recipe.warmup * total
    if step < warm:
        return lr * (step + 1) / math.ceil(warm)
    if recipe.decay == "constant" or total <= warm:
        return lr
    progress = min(1.0, (step - warm) / max(1.0, total - warm))
    fall = 0.5 * (1 + math.cos(math.pi * progress)) if recipe.decay == "cosine" else 1.0 - progress
    return lr * (recipe.final_lr + (1.0 - recipe.final_lr) * fall)


def ema_decay_at(step: int, decay: float, power: float) -> float:
    """The EMA decay of the update after optimizer step `step` (1-based). With a warm-up (power > 0) the EMA first follows
    the student closely and averages over a horizon that grows with the run (Karras et al.'s power warm-up),
    so a short run's targets do not come from an EMA still near the untrained LoRA."""
    if power <= 0:
        return decay
    return min(decay, 1.0 - (1.0 + step) ** -power)


def teacher_ratio_at(step: int, total: int, teacher_ratio: float, recipe: TrainingRecipe) -> float:
    """The share of teacher items at optimizer step `step` (0-based): more teacher while the EMAs, which walk
    the self items' targets, know little."""
    if recipe.teacher_start is None or recipe.teacher_ramp <= 0:
        return teacher_ratio
    progress = min(1.0, step / (recipe.teacher_ramp * total))
    return recipe.teacher_start + (teacher_ratio - recipe.teacher_start) * progress


PAPER = TrainingRecipe()
# Targets that walk 4 sub-steps (two of the teacher or fast EMA, two of the slow EMA) teach longer jumps from the
# first step: at a third of the budget (equal compute) better few-step results on digits and the tiny Flux, mixed
# on Wan, but worse than the paper's at the full budget on digits, so the paper's stays the default
# (benchmarks/convergence.py). The learning-rate, EMA and teacher-share levers helped no teacher on every count.
FAST = TrainingRecipe(t_skip=4)
TRAINING_RECIPES = {"paper": PAPER, "fast": FAST}


__all__ = ["TrainingRecipe", "DECAYS", "learning_rate_at", "ema_decay_at", "teacher_ratio_at", "PAPER", "FAST",
           "TRAINING_RECIPES"]

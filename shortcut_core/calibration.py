"""Which few-step recipe (LoRA strength, shift) a trained shortcut LoRA samples best with, per step count.

The authors' advice is qualitative: fewer steps want a higher strength, within [1, 1.75]; a lower
shift sharpens but may add artifacts, a higher one keeps structure but blurs. Here it is measured:
the student's few-step samples from held-out noises are compared with the teacher's many-step
samples from the same noises (the trajectories the student should shortcut).

The best recipe often lies far from the training shift (on small teachers well below it), so the
search is wide and follows the optimum: for each step count, a line of shifts on a log scale from
well below to well above the LoRA's own (x1/8 to x3), extended while the best stays on an edge; then
the strengths at that shift (0.5 to 2.5, likewise extended); then a finer shift and strength around
the best. About 20 recipes per step count, each one few-step sampling of the held-out noises.

A few held-out noises cannot tell recipes apart whose distances differ by less than their own spread, and
chasing such differences picks a recipe by the noises drawn. So the recipe chosen for a step count is, of those
the measurement cannot tell from the closest (paired over the same noises: a mean difference within one
standard error, the classic one-standard-error rule), the one nearest the LoRA's own (shift and strength in
steps of the search's lines).

Last, at each step count's chosen recipe (two steps and more), two choices of the walk that cost no training and
no forward at sampling time (sampling.sample_euler), each searched on a line, refined around its best, and where
it moves, with the shift beside it (both change the path the way a shift does, so they move together):
- the time the model is told on each jump (sampling.told_times: Li et al.'s time-shift sampler): told noisier
  than the state's time by 0 to 0.5 of the jump. Only the noisier side: after a long jump the state is smoother
  than the teacher's at that time, and the error falls smoothly towards a best; a cleaner time tells the model a
  state it never saw (the first jump's pure noise as a part-clean state), and there the error jumps about with
  the time (docs/convergence.md);
- then, at that time shift, the multistep step v_i + c (v_i - v_i-1), c from 0 (Euler) to 1/2 (Adams-Bashforth's
  two-step rule at equal steps): the curvature the last two jumps show, followed.
Each helps some LoRAs and not others, so each is chosen by the calibration's rule: of the settings the noises
cannot tell from the closest, the one nearest Euler's walk at the chosen shift. A LoRA they do not help keeps
Euler.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

STEP_COUNTS = (1, 2, 3, 4)              # a recipe for each of these, and for the LoRA's own step count
SHIFT_RATIO = 1.5                       # neighbouring shifts on the line differ by this factor ...
SHIFT_LINE = (-5, 3)                    # ... from shift * 1.5^-5 (x0.13) to shift * 1.5^3 (x3.4)
STRENGTHS = (0.5, 1.0, 1.5, 2.0, 2.5)   # the strength line
STRENGTH_STEP = 0.5                     # an edge that stays the best is extended by this ...
STRENGTH_RANGE = (0.25, 4.0)            # ... within this range
WIDENINGS = 4                           # at most this many points beyond each edge of a line
TIE_SE = 1.0                            # mean paired differences within this many standard errors are ties (the "one standard error" rule)


@dataclass(frozen=True)
class Recipe:
    """How a LoRA is sampled: Euler `steps` on the schedule at `shift`, the LoRA at `strength`, the model told the
    times sampling.told_times gives for `time_shift` (0: Euler's own), stepping with `multistep` (0: Euler's)."""
    steps: int
    strength: float
    shift: float
    time_shift: float = 0.0
    multistep: float = 0.0

    @property
    def walk(self) -> dict[str, float]:
        """The keywords of sampling.sample_euler this recipe sets beyond its schedule."""
        return {"time_shift": self.time_shift, "multistep": self.multistep}


@dataclass(frozen=True)
class WalkLever:
    """A choice of the walk at a chosen recipe (a Recipe field, searched by search_walk): its line, the distance
    of the best's neighbours, and the range it stays in."""
    field: str
    line: tuple[float, ...]
    step: float
    bounds: tuple[float, float]


TIME_SHIFT = WalkLever("time_shift", (-0.4, -0.2, 0.0), 0.1, (-0.5, 0.0))  # told noisier only
MULTISTEP = WalkLever("multistep", (0.0, 0.2, 0.4), 0.1, (0.0, 0.5))       # Euler to Adams-Bashforth
WALK_LEVERS = (TIME_SHIFT, MULTISTEP)  # searched in this order, each at the one before's choice


def squared_errors(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The mean square difference of each sample (the first dimension) to its reference."""
    return (samples.double() - reference.double()).pow(2).flatten(1).mean(1)


def rms(errors: torch.Tensor) -> float:
    """The root mean square difference over all samples, from their squared_errors."""
    return float(errors.mean().sqrt())


def sample_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Root mean square difference over all elements."""
    return rms(squared_errors(samples, reference))


def indistinguishable_from_best(rows: Sequence[tuple[Any, torch.Tensor]]) -> list[Any]:
    """Of candidates measured on the same noises (their squared_errors), those the measurement cannot tell from
    the closest: a paired mean difference to it within TIE_SE standard errors (the closest among them)."""
    best_errors = min((errors for _, errors in rows), key=lambda errors: float(errors.mean()))

    def tied(errors: torch.Tensor) -> bool:
        difference = errors - best_errors
        spread = float(difference.std()) / math.sqrt(len(difference)) if len(difference) > 1 else 0.0
        return float(difference.mean()) <= TIE_SE * spread

    return [candidate for candidate, errors in rows if tied(errors)]


def choose(rows: Sequence[tuple[Recipe, torch.Tensor]], own: Recipe) -> Recipe:
    """Of recipes measured on the same noises (their squared_errors), the one nearest `own` among those the
    measurement cannot tell from the closest (indistinguishable_from_best)."""
    def away(recipe: Recipe) -> float:
        return (abs(math.log(recipe.shift / own.shift)) / math.log(SHIFT_RATIO)
                + abs(recipe.strength - own.strength) / STRENGTH_STEP)

    distance = {recipe: float(errors.mean()) for recipe, errors in rows}
    return min(indistinguishable_from_best(rows), key=lambda recipe: (away(recipe), distance[recipe]))


def search_recipes(measure: Callable[[Recipe], torch.Tensor], steps: int, shift: float,
                   step_counts: Sequence[int] = STEP_COUNTS) -> list[tuple[Recipe, torch.Tensor]]:
    """Every recipe measured (each once: its squared_errors over the held-out noises), the LoRA's own (steps,
    strength 1, shift) first: for each step count, the shift line at strength 1, extended while its best is on
    an edge; the strength line at the best shift, likewise; then the half-way shifts and quarter strengths
    around the best."""
    measured: dict[Recipe, torch.Tensor] = {}

    def at(n: int, strength: float, s: float) -> float:
        recipe = Recipe(n, round(float(strength), 6), round(float(s), 6))
        if recipe not in measured:
            measured[recipe] = measure(recipe)
        return rms(measured[recipe])

    def follow(values: list[float], score: Callable[[float], float], below: Callable[[float], float | None],
               above: Callable[[float], float | None]) -> float:
        """The best of a line, extending it while its best is at an end (at most WIDENINGS times each way;
        `below` / `above` give the next point past an end, or None where the range ends)."""
        line, widened = sorted(values), {"below": 0, "above": 0}
        while True:
            best = min(line, key=score)
            way = "below" if best == line[0] else "above" if best == line[-1] else None
            extra = None if way is None or widened[way] >= WIDENINGS else (below(line[0]) if way == "below"
                                                                          else above(line[-1]))
            if extra is None or extra in line:
                return best
            widened[way] += 1
            line = sorted(line + [extra])

    at(steps, 1.0, shift)  # the baseline every other recipe is measured against
    for n in sorted({steps, *step_counts}, key=lambda k: (k != steps, k)):
        lo, hi = SHIFT_LINE
        # one Euler step goes from t_max to 0 whatever the shift: only its strength is searched
        best_shift = shift if n == 1 else follow(
            [shift * SHIFT_RATIO ** k for k in range(lo, hi + 1)], lambda s: at(n, 1.0, s),
            lambda e: e / SHIFT_RATIO, lambda e: e * SHIFT_RATIO)
        best_strength = follow(
            list(STRENGTHS), lambda g: at(n, g, best_shift),
            lambda e: e - STRENGTH_STEP if e - STRENGTH_STEP >= STRENGTH_RANGE[0] else None,
            lambda e: e + STRENGTH_STEP if e + STRENGTH_STEP <= STRENGTH_RANGE[1] else None)
        half = math.sqrt(SHIFT_RATIO)
        if n > 1:
            best_shift = min((best_shift / half, best_shift, best_shift * half), key=lambda s: at(n, best_strength, s))
        quarter = STRENGTH_STEP / 2
        for strength in (best_strength - quarter, best_strength + quarter):  # measured into the table
            if STRENGTH_RANGE[0] <= strength <= STRENGTH_RANGE[1]:
                at(n, strength, best_shift)
    return list(measured.items())


def search_walk(measure: Callable[[Recipe], torch.Tensor], recipe: Recipe,
                lever: WalkLever) -> list[tuple[Recipe, torch.Tensor]]:
    """`recipe` (two steps or more) at each value of `lever`'s line, then the best's neighbours; where the best is
    not the recipe's own, the half-way shifts beside it (x/ 1.5^0.5) and the neighbours again at the better shift;
    each measured once (`measure(recipe)`: its squared_errors)."""
    if recipe.steps < 2:
        raise ValueError(f"{lever.field}: one jump has no earlier one, and starts at the schedule's first time")
    measured: dict[Recipe, torch.Tensor] = {}
    low, high = lever.bounds

    def at(value: float, shift: float = recipe.shift) -> float:
        candidate = dataclasses.replace(recipe, shift=round(float(shift), 6), **{lever.field: round(float(value), 6)})
        if candidate not in measured:
            measured[candidate] = measure(candidate)
        return rms(measured[candidate])

    def around(value: float, shift: float) -> float:
        """The best of `value` and its neighbours at `shift`."""
        near = (value - lever.step, value, value + lever.step)
        return min((x for x in near if low - 1e-9 <= x <= high + 1e-9), key=lambda x: at(x, shift))

    own = getattr(recipe, lever.field)
    best = round(around(min(lever.line, key=at), recipe.shift), 6)
    if best != own:
        half = math.sqrt(SHIFT_RATIO)
        shift = min((recipe.shift / half, recipe.shift, recipe.shift * half), key=lambda s: at(best, s))
        around(best, shift)
    return list(measured.items())


def choose_walk(rows: Sequence[tuple[Recipe, torch.Tensor]], chosen: Recipe) -> Recipe:
    """Of `chosen` at other walks and shifts (their squared_errors on the same noises), the one nearest `chosen`
    (in steps of the searches' lines) among those the measurement cannot tell from the closest
    (indistinguishable_from_best)."""
    def away(recipe: Recipe) -> float:
        return (sum(abs(getattr(recipe, lever.field) - getattr(chosen, lever.field)) / lever.step
                    for lever in WALK_LEVERS)
                + abs(math.log(recipe.shift / chosen.shift)) / math.log(math.sqrt(SHIFT_RATIO)))

    distance = {recipe: float(errors.mean()) for recipe, errors in rows}
    return min(indistinguishable_from_best(rows), key=lambda recipe: (away(recipe), distance[recipe]))


@dataclass
class Calibration:
    """Measured distance (rms) of every recipe tried; `best_for(n)` is the recipe chosen at n steps (`chosen`;
    in files written before it, the closest), `best` the one at the LoRA's own step count (its first row's)."""
    table: list[tuple[Recipe, float]]
    reference_steps: int
    samples: int
    chosen: dict[int, Recipe] | None = None

    @property
    def baseline(self) -> tuple[Recipe, float]:
        return self.table[0]

    def best_for(self, steps: int) -> tuple[Recipe, float]:
        rows = [(r, d) for r, d in self.table if r.steps == steps]
        if not rows:
            raise KeyError(f"no recipe was measured at {steps} steps (measured: {self.step_counts})")
        if self.chosen and steps in self.chosen:
            return self.chosen[steps], dict(rows)[self.chosen[steps]]
        return min(rows, key=lambda pair: pair[1])

    @property
    def best(self) -> tuple[Recipe, float]:
        return self.best_for(self.baseline[0].steps)

    @property
    def step_counts(self) -> list[int]:
        return sorted({r.steps for r, _ in self.table})

    def recipes(self) -> dict[int, Recipe]:
        """The best recipe for every step count measured."""
        return {n: self.best_for(n)[0] for n in self.step_counts}

    def to_dict(self) -> dict[str, Any]:
        # rows off Euler's walk in a table of their own: readers that predate them keep reading "table"
        return {"metric": "rms distance to the teacher's samples", "reference_steps": self.reference_steps,
                "samples": self.samples,
                "table": [[r.steps, r.strength, r.shift, d] for r, d in self.table if not any(r.walk.values())],
                "walk_table": [[r.steps, r.strength, r.shift, r.time_shift, r.multistep, d]
                               for r, d in self.table if any(r.walk.values())],
                "recipes": {str(n): {"strength": r.strength, "shift": r.shift, **r.walk}
                            for n, r in self.recipes().items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        """Also a file written before per-step recipes (its table holds the steps it measured) or before the walk's
        choices (Euler's)."""
        table = [(Recipe(int(n), float(s), float(h)), float(d)) for n, s, h, d in data["table"]]
        table += [(Recipe(int(n), float(s), float(h), float(a), float(c)), float(d))
                  for n, s, h, a, c, d in data.get("walk_table", [])]
        chosen = {int(n): Recipe(int(n), float(r["strength"]), float(r["shift"]), float(r.get("time_shift", 0.0)),
                                 float(r.get("multistep", 0.0)))
                  for n, r in data.get("recipes", {}).items()}
        return cls(table=table, reference_steps=int(data["reference_steps"]), samples=int(data["samples"]),
                   chosen=chosen or None)

    def text(self) -> str:
        """What a user reads in a narrow node: the recipe chosen, then the best recipe per step count."""
        best, best_distance = self.best
        base, base_distance = self.baseline
        shifts = [r.shift for r, _ in self.table]
        strengths = [r.strength for r, _ in self.table]
        lines = [f"calibrated: {best.steps} steps, strength {best.strength:g}, shift {best.shift:.3g}",
                 *([f"  {walk_text(best)}"] if walk_text(best) else []),
                 f"rms {best_distance:.4f} (strength 1, shift {base.shift:.3g}: {base_distance:.4f})",
                 "best per step count, rms to the teacher's",
                 f"{self.reference_steps}-step samples, {self.samples} held-out noises:"]
        for n in self.step_counts:
            recipe, distance = self.best_for(n)
            lines.append(f"{n:>2} step{'s' if n > 1 else ' '} strength {recipe.strength:<4g} shift "
                         f"{recipe.shift:<6.3g} rms {distance:.4f}")
            if walk_text(recipe):
                lines.append(f"         {walk_text(recipe)}")
        lines.append(f"{len(self.table)} recipes: shift {min(shifts):.3g}-{max(shifts):.3g}, "
                     f"strength {min(strengths):g}-{max(strengths):g}")
        ranges = [f"{name} {min(values):g} to {max(values):g}" for name, values in
                  (("time shift", [r.time_shift for r, _ in self.table]),
                   ("multistep", [r.multistep for r, _ in self.table])) if any(values)]
        if ranges:
            lines.append(", ".join(ranges) + " (0: Euler's)")
        return "\n".join(lines)


def walk_text(recipe: Recipe) -> str:
    """The recipe's walk where it is not Euler's, as the nodes say it ("" for Euler's)."""
    return ", ".join(([f"time shift {recipe.time_shift:+g}"] if recipe.time_shift else [])
                     + ([f"multistep {recipe.multistep:g}"] if recipe.multistep else []))


def calibrate_recipe(sample: Callable[[Recipe], torch.Tensor], reference: torch.Tensor, steps: int, shift: float,
                     reference_steps: int, step_counts: Sequence[int] = STEP_COUNTS,
                     walk_levers: Sequence[WalkLever] = WALK_LEVERS) -> Calibration:
    """Search the recipes (search_recipes) by `sample(recipe)`'s distance to `reference`, and choose one per step
    count (choose: the nearest the LoRA's own of those the noises cannot tell from the closest); then, at two
    steps and more, each of `walk_levers` in turn (search_walk, choose_walk: the nearest Euler's likewise; none:
    Euler's walk)."""
    def errors_of(recipe: Recipe) -> torch.Tensor:
        return squared_errors(sample(recipe), reference)

    measured = search_recipes(errors_of, steps, shift, step_counts)
    chosen = {n: choose([(r, e) for r, e in measured if r.steps == n], Recipe(n, 1.0, shift))
              for n in sorted({r.steps for r, _ in measured})}
    known = dict(measured)
    for lever in walk_levers:
        for n in [n for n in chosen if n > 1]:
            rows = search_walk(lambda r: known[r] if r in known else errors_of(r), chosen[n], lever)
            measured += [(r, e) for r, e in rows if r not in known]
            known.update(rows)
            chosen[n] = choose_walk(rows, chosen[n])
    return Calibration(table=[(r, rms(e)) for r, e in measured], reference_steps=reference_steps,
                       samples=int(reference.shape[0]), chosen=chosen)

"""Which few-step recipe (steps, LoRA strength, shift) a trained shortcut LoRA samples best with.

The authors' advice is qualitative: fewer steps want a higher strength, within [1, 1.75]; a lower
shift sharpens but may add artifacts, a higher one keeps structure but blurs. Here it is measured:
the student's few-step samples from held-out noises are compared with the teacher's many-step
samples from the same noises (the trajectories the student should shortcut), over a small grid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

STRENGTHS = (1.0, 1.25, 1.5, 1.75)  # the authors' safe range, in quarter steps
SHIFT_FACTOR = 1.5                  # the shift's neighbours: shift / 1.5 and shift * 1.5


@dataclass(frozen=True)
class Recipe:
    steps: int
    strength: float
    shift: float


def recipe_grid(steps: int, shift: float, strengths: Sequence[float] = STRENGTHS,
                shift_factor: float = SHIFT_FACTOR) -> list[Recipe]:
    """The LoRA's own step count and twice it, each strength, the shift and its two neighbours.
    The LoRA's own (steps, strength 1.0, shift) comes first: the baseline every other is measured against."""
    shifts = (shift, shift / shift_factor, shift * shift_factor)
    return [Recipe(n, float(s), float(h)) for n, s, h in itertools.product((steps, 2 * steps), strengths, shifts)]


def sample_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Root mean square difference over all elements."""
    return float((samples.double() - reference.double()).pow(2).mean().sqrt())


@dataclass
class Calibration:
    """Measured distance of every grid recipe; `best` is the closest at the LoRA's own step count
    (twice the steps is shown, not chosen: it would buy quality with the speed the LoRA is for)."""
    table: list[tuple[Recipe, float]]
    reference_steps: int
    samples: int

    @property
    def baseline(self) -> tuple[Recipe, float]:
        return self.table[0]

    @property
    def best(self) -> tuple[Recipe, float]:
        steps = self.baseline[0].steps
        return min(((r, d) for r, d in self.table if r.steps == steps), key=lambda pair: pair[1])

    def to_dict(self) -> dict[str, Any]:
        return {"metric": "rms distance to the teacher's samples", "reference_steps": self.reference_steps,
                "samples": self.samples,
                "table": [[r.steps, r.strength, r.shift, d] for r, d in self.table]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        table = [(Recipe(int(n), float(s), float(h)), float(d)) for n, s, h, d in data["table"]]
        return cls(table=table, reference_steps=int(data["reference_steps"]), samples=int(data["samples"]))

    def text(self) -> str:
        """The table as a user reads it in a narrow node: per step count, strength down and shift across."""
        best, best_distance = self.best
        base, base_distance = self.baseline
        lines = [f"calibrated: {best.steps} steps, strength {best.strength:g}, shift {best.shift:.3g}",
                 f"rms {best_distance:.4f} (strength 1, shift {base.shift:.3g}: {base_distance:.4f})",
                 f"rms to the teacher's {self.reference_steps}-step samples, {self.samples} held-out noises:"]
        for steps in sorted({r.steps for r, _ in self.table}):
            rows = [(r, d) for r, d in self.table if r.steps == steps]
            shifts = sorted({r.shift for r, _ in rows})
            lines.append(f"{steps} steps, shift " + " ".join(f"{h:>6.3g}" for h in shifts))
            for strength in sorted({r.strength for r, _ in rows}):
                cells = {r.shift: d for r, d in rows if r.strength == strength}
                lines.append(f"  strength {strength:<4g} " + " ".join(f"{cells[h]:>6.4f}" for h in shifts))
        return "\n".join(lines)


def calibrate_recipe(sample: Callable[[Recipe], torch.Tensor], reference: torch.Tensor, grid: Sequence[Recipe],
                     reference_steps: int) -> Calibration:
    """Measure `sample(recipe)` against `reference` for every recipe of the grid (baseline first)."""
    table = [(recipe, sample_distance(sample(recipe), reference)) for recipe in grid]
    return Calibration(table=table, reference_steps=reference_steps, samples=int(reference.shape[0]))

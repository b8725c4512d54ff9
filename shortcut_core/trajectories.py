"""Targets from the teacher's own trajectories, for data-free distillation.

In data-free mode the training latents are the teacher's own samples: Euler walks from noise over one schedule.
Keeping every state of those walks costs no forward. A TEACHER item can then be drawn on the recorded schedule
at a state the teacher really passed (x_t = states[start], not an interpolation of the sample with fresh
noise), and the teacher's half of its target is the recorded walk itself (states[start] -> states[start +
t_skip / 2]): the item needs only the slow EMA's half. Per step that saves teacher_ratio * t_skip / 2 forwards
of each shortcut item's t_skip; it costs (steps + 1) latents per sample instead of one, on disk and in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch

from .objective import ItemRole, ShortcutDraw, accumulation_dtype
from .sampling import VelocityFn, sample_euler


@dataclass(frozen=True)
class TeacherTrajectories:
    """Euler walks of the teacher: states[i, k] is walk i at times[k]; states[:, 0] the noise, states[:, -1] the
    sample (the training latent)."""
    states: torch.Tensor   # (n, steps + 1, *latent shape)
    times: torch.Tensor    # (steps + 1,) float64, from the noise's time down to 0

    def __post_init__(self) -> None:
        if self.states.dim() < 3 or self.times.dim() != 1 or self.states.shape[1] != self.times.shape[0]:
            raise ValueError(f"TeacherTrajectories: states must be (walks, steps + 1, *latent) and times (steps + 1,);"
                             f" got {tuple(self.states.shape)} and {tuple(self.times.shape)}")
        if self.times.shape[0] < 2 or not bool((self.times[1:] < self.times[:-1]).all()):
            raise ValueError("TeacherTrajectories.times must fall strictly from the noise's time to the sample's")

    @property
    def steps(self) -> int:
        return self.times.shape[0] - 1

    @property
    def latents(self) -> torch.Tensor:
        return self.states[:, -1]


def record_euler_trajectories(velocity: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor,
                              extra_args: Mapping[str, Any] | None = None) -> TeacherTrajectories:
    """Sample the teacher with sample_euler from `noise` over `sigmas`, keeping every state of the walk."""
    states = []
    last = sample_euler(velocity, noise, sigmas, dict(extra_args or {}),
                        callback=lambda info: states.append(info["x"]), disable=True)
    return TeacherTrajectories(torch.stack([*states, last], dim=1), sigmas.to(torch.float64))


def place_teacher_items(draw: ShortcutDraw, trajectories: TeacherTrajectories, substeps: int,
                        generator: torch.Generator) -> ShortcutDraw:
    """The draw with its TEACHER items moved onto the recorded schedule: a start uniform over 0, t_skip, ... <
    steps (drawn for every item, so the generator advances alike whatever the roles), the recorded times."""
    if trajectories.steps % substeps:
        raise ValueError(f"the teacher's trajectories have {trajectories.steps} steps: record a multiple of t_skip "
                         f"({substeps}) steps")
    teacher = draw.role == ItemRole.TEACHER
    jumps = trajectories.steps // substeps
    start = substeps * torch.floor(torch.rand(len(draw), generator=generator, dtype=torch.float64) * jumps).long()
    times = trajectories.times[start[:, None] + torch.arange(substeps + 1)]
    return replace(draw, start=torch.where(teacher, start, draw.start),
                   times=torch.where(teacher[:, None], times, draw.times),
                   schedule_length=torch.where(teacher, trajectories.steps, draw.schedule_length),
                   shift=torch.where(teacher, torch.nan, draw.shift))


def recorded_teacher_walk(trajectories: TeacherTrajectories, index: torch.Tensor, draw: ShortcutDraw,
                          device: torch.device | str | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the TEACHER items of a draw placed by place_teacher_items (in batch order), with `index` the latents
    of the batch's items: (x_t, the state half the sub-steps on, the displacement x_t - that state)."""
    which = torch.nonzero(draw.role == ItemRole.TEACHER).flatten()
    half = (draw.times.shape[1] - 1) // 2
    walks, start = index[which], draw.start[which]
    x_t = trajectories.states[walks, start].to(device)
    x_half = trajectories.states[walks, start + half].to(device)
    acc = accumulation_dtype(x_t.dtype)
    return x_t, x_half, x_t.to(acc) - x_half.to(acc)


__all__ = ["TeacherTrajectories", "record_euler_trajectories", "place_teacher_items", "recorded_teacher_walk"]

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
from .schedules import T_MAX, schedule_points


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


def state_at(trajectories: TeacherTrajectories, walks: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The states of `walks` at per-item times t: an Euler walk is straight between its recorded states, so
    this linear interpolation is the walk itself, not an approximation of it."""
    times = trajectories.times
    t = t.to(torch.float64).clamp(float(times[-1]), float(times[0]))
    # the recorded step whose segment holds t: times[j] >= t >= times[j + 1]
    j = (torch.searchsorted(-times, -t, right=True) - 1).clamp(0, trajectories.steps - 1)
    w = ((times[j] - t) / (times[j] - times[j + 1]))
    a, b = trajectories.states[walks, j], trajectories.states[walks, j + 1]
    acc = accumulation_dtype(a.dtype)
    w = w.to(acc).reshape(-1, *([1] * (a.dim() - 1)))
    return (a.to(acc) + w * (b.to(acc) - a.to(acc))).to(a.dtype)


def place_walk_items(draw: ShortcutDraw, step_counts: tuple[int, ...], ratio: float, substeps: int,
                     generator: torch.Generator, t_max: float = T_MAX) -> ShortcutDraw:
    """The draw with a share `ratio` of its SELF items made WALK items: one jump t_k -> t_k+1 of an n-step
    sampler schedule (n uniform over `step_counts`, k uniform below n, the item's drawn shift), taught from the
    teacher's recorded walk (walk_target) with no forward. Draws for every item, whatever its role."""
    n = len(draw)
    chosen = torch.rand(n, generator=generator, dtype=torch.float64) < ratio
    counts = torch.tensor(step_counts, dtype=torch.int64)[torch.randint(len(step_counts), (n,), generator=generator)]
    k = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * counts).long()
    walk = chosen & (draw.role == ItemRole.SELF)
    length, start = counts * substeps, k * substeps
    times = schedule_points(length, start, substeps, draw.shift, t_max=t_max)
    return replace(draw, role=torch.where(walk, int(ItemRole.WALK), draw.role),
                   schedule_length=torch.where(walk, length, draw.schedule_length),
                   start=torch.where(walk, start, draw.start),
                   times=torch.where(walk[:, None], times, draw.times))


def walk_target(trajectories: TeacherTrajectories, index: torch.Tensor, draw: ShortcutDraw,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For the WALK items of a draw (in batch order), with `index` the latents of the batch's items: (x_t on the
    teacher's walk at t_k, the walk's average velocity from t_k to t_k+1), at least float32."""
    which = torch.nonzero(draw.role == ItemRole.WALK).flatten()
    walks, times = index[which], draw.times[which]
    x_t = state_at(trajectories, walks, times[:, 0])
    x_next = state_at(trajectories, walks, times[:, -1])
    acc = accumulation_dtype(x_t.dtype)
    jump = (times[:, 0] - times[:, -1]).to(acc).reshape(-1, *([1] * (x_t.dim() - 1)))
    return x_t.to(device), ((x_t.to(acc) - x_next.to(acc)) / jump).to(device)


def place_reflow_items(draw: ShortcutDraw, ratio: float, generator: torch.Generator) -> ShortcutDraw:
    """The draw with a share `ratio` of its SELF items made REFLOW items, at their drawn t (reflow_noise gives
    their noise). Draws for every item, whatever its role."""
    chosen = torch.rand(len(draw), generator=generator, dtype=torch.float64) < ratio
    return replace(draw, role=torch.where(chosen & (draw.role == ItemRole.SELF), int(ItemRole.REFLOW), draw.role))


def reflow_noise(trajectories: TeacherTrajectories, walks: torch.Tensor) -> torch.Tensor:
    """The noise each of `walks` maps to its sample: the end at t = 1 of the straight line through the sample and
    the walk's first state (within rounding that state itself: walks start at T_MAX), at least float32."""
    first, sample = trajectories.states[walks, 0], trajectories.states[walks, -1]
    acc = accumulation_dtype(first.dtype)
    return sample.to(acc) + (first.to(acc) - sample.to(acc)) / float(trajectories.times[0])


__all__ = ["TeacherTrajectories", "record_euler_trajectories", "place_teacher_items", "recorded_teacher_walk",
           "state_at", "place_walk_items", "walk_target",
           "place_reflow_items", "reflow_noise"]

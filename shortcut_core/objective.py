"""The SCFM objective as pure functions over tensors and velocity callables.

One training item is drawn as follows (the authors' get_scfm_timesteps, per item):
  role:     FLOW for the first ceil(B * non_shortcut_ratio) items ("pre-training fusion");
            otherwise TEACHER with probability teacher_ratio, else SELF.
  schedule: N steps (TEACHER: teacher_schedule_lengths, SELF: self_schedule_lengths), shifted by
            exp(mu(tokens)) with probability resolution_shift_prob, else by s ~ U[shift_min, shift_max].
  start:    uniform over 0, t_skip, 2 t_skip, ... < N; the item lives at t = t[start].
The target of a shortcut item is the average velocity of the jump t[start] -> t[start + t_skip],
walked in t_skip Euler sub-steps: the first half by the teacher (TEACHER items) or the fast EMA
(SELF items), the second half by the slow EMA (every item).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .config import ShortcutConfig
from .sampling import VelocityFn
from .schedules import resolution_shift, schedule_points, shift_time


class ItemRole(enum.IntEnum):
    FLOW = 0     # plain flow-matching target noise - x0
    TEACHER = 1  # first half of the sub-steps from the teacher
    SELF = 2     # first half of the sub-steps from the fast EMA student
    WALK = 3     # one jump of a sampler schedule on the teacher's recorded walk (trajectories.walk_target)
    REFLOW = 4   # on the straight line from a recorded walk's noise to its sample: target noise - sample (reflow)


@dataclass(frozen=True)
class ShortcutDraw:
    """The random choices for one batch. All tensors are on the CPU; times are float64."""
    role: torch.Tensor             # (B,) int64, ItemRole
    schedule_length: torch.Tensor  # (B,) int64
    shift: torch.Tensor            # (B,) float64
    start: torch.Tensor            # (B,) int64
    times: torch.Tensor            # (B, t_skip + 1) float64: t[start], ..., t[start + t_skip]
    guidance: torch.Tensor | None  # (B,) float32 or None

    @property
    def t(self) -> torch.Tensor:
        """The items' flow time t[start] (float32)."""
        return self.times[:, 0].to(torch.float32)

    def __len__(self) -> int:
        return int(self.role.shape[0])

    def shard(self, part: slice) -> "ShortcutDraw":
        """The items of one data-parallel shard of the batch."""
        return ShortcutDraw(role=self.role[part], schedule_length=self.schedule_length[part], shift=self.shift[part],
                            start=self.start[part], times=self.times[part],
                            guidance=None if self.guidance is None else self.guidance[part])


def _choice(options: tuple[int, ...], n: int, generator: torch.Generator) -> torch.Tensor:
    table = torch.tensor(options, dtype=torch.int64) if options else torch.zeros(1, dtype=torch.int64)
    return table[torch.randint(len(table), (n,), generator=generator)]


def draw_shortcut_items(batch_size: int, config: ShortcutConfig, generator: torch.Generator,
                        token_count: int | None = None, teacher_ratio: float | None = None,
                        self_lengths: tuple[int, ...] | None = None) -> ShortcutDraw:
    """Draw role, schedule, shift and start index for each of batch_size items (CPU generator). `teacher_ratio`
    overrides the config's for this draw (a schedule of it: training_recipe.teacher_ratio_at), `self_lengths`
    the self items' schedule lengths (multiples of the config's sub-steps; TrainingRecipe.self_steps)."""
    if config.resolution_shift_prob > 0 and token_count is None:
        raise ValueError("token_count is needed for the resolution shift; pass the packed token count of the "
                         "latents, or set ShortcutConfig.resolution_shift_prob = 0")
    n = batch_size
    ratio = config.teacher_ratio if teacher_ratio is None else teacher_ratio
    teacher = torch.rand(n, generator=generator, dtype=torch.float64) < ratio
    length = torch.where(teacher, _choice(config.teacher_schedule_lengths, n, generator),
                         _choice(config.self_schedule_lengths if self_lengths is None else self_lengths, n,
                                 generator))
    fixed = config.shift_min + (config.shift_max - config.shift_min) * torch.rand(n, generator=generator,
                                                                                 dtype=torch.float64)
    by_resolution = torch.rand(n, generator=generator, dtype=torch.float64) < config.resolution_shift_prob
    shift = torch.where(by_resolution, resolution_shift(token_count) if token_count is not None else 1.0, fixed)
    jumps = length // config.substeps
    start = config.substeps * torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * jumps).long()
    times = schedule_points(length, start, config.substeps, shift, t_max=config.t_max)

    role = torch.where(teacher, int(ItemRole.TEACHER), int(ItemRole.SELF))
    role[: math.ceil(n * config.non_shortcut_ratio)] = int(ItemRole.FLOW)

    guidance = None
    if config.guidance_range is not None:
        lo, hi = config.guidance_range
        guidance = lo + (hi - lo) * torch.rand(n, generator=generator)
    return ShortcutDraw(role=role, schedule_length=length, shift=shift, start=start, times=times, guidance=guidance)


def _per_item(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The flow-matching path x_t = (1 - t) * x0 + t * noise, t per item."""
    t = _per_item(t.to(x0.dtype), x0)
    return (1 - t) * x0 + t * noise


def flow_velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The plain flow-matching target: the straight-line velocity noise - x0 (at least float32)."""
    acc = accumulation_dtype(x0.dtype, noise.dtype)
    return noise.to(acc) - x0.to(acc)


def select_items(extra_args: Mapping[str, Any], index: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Select items of per-item extra arguments.

    Tensors are per-item and must lead with the batch dimension; anything else (None, numbers,
    dicts of options) is shared by all items and passed through unchanged.
    """
    out = {}
    for key, value in extra_args.items():
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] != batch_size:
                raise ValueError(f"extra argument {key!r} has shape {tuple(value.shape)}: per-item tensors must "
                                 f"lead with the batch size {batch_size}; close over shared tensors in the "
                                 f"velocity function instead")
            out[key] = value[index.to(value.device)]
        else:
            out[key] = value
    return out


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Sums of velocities run in at least float32 (bf16 models) and in float64 for float64 models."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


@torch.no_grad()
def euler_walk(velocity: VelocityFn, x: torch.Tensor, times: torch.Tensor, extra_args: Mapping[str, Any] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk Euler sub-steps through per-item times (B, k + 1), from times[:, 0] towards times[:, k].

    Returns (x at times[:, k], displacement = sum_i dt_i * v_i) with dt_i = times[:, i] - times[:, i + 1].
    Step sizes come from the float64 schedule points, never from differences of rounded times.
    """
    extra_args = {} if extra_args is None else extra_args
    times = times.to(x.device)
    displacement = torch.zeros((), dtype=accumulation_dtype(x.dtype), device=x.device)
    for i in range(times.shape[1] - 1):
        v = velocity(x, times[:, i].to(torch.float32), **extra_args)
        acc = accumulation_dtype(x.dtype, v.dtype)
        step = _per_item((times[:, i] - times[:, i + 1]).to(acc), v) * v.to(acc)
        displacement = displacement + step
        x = x - step.to(x.dtype)
    return x, displacement


@torch.no_grad()
def average_velocity_target(x_t: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, draw: ShortcutDraw, *,
                            teacher: VelocityFn, fast_ema: VelocityFn, slow_ema: VelocityFn,
                            extra_args: Mapping[str, Any] | None = None,
                            first_half: Callable[[torch.Tensor], VelocityFn] | None = None,
                            teacher_walk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """SCFM regression target for every item of the batch (at least float32, shaped like x_t).

    FLOW and REFLOW items get noise - x0 (and WALK items, whose target the caller sets: trajectories.walk_target). A shortcut item at t = t[start] gets
        (sum_i dt_i * v_i) / (t[start] - t[start + t_skip])
    over t_skip Euler sub-steps: the first half walked by `teacher` (TEACHER items) or `fast_ema`
    (SELF items), the second half by `slow_ema`. Items of one role share each forward; with
    `first_half(roles)` (a velocity running item i as roles[i]) the whole first half is one walk.
    `teacher_walk`: the TEACHER items' first half already walked (x at the half, displacement; in batch order,
    e.g. recorded while the teacher sampled: trajectories.py); those items then run no forward in it.
    """
    extra_args = {} if extra_args is None else extra_args
    batch = x_t.shape[0]
    half = (draw.times.shape[1] - 1) // 2
    role = draw.role
    target = flow_velocity_target(x0, noise)
    shortcut = torch.nonzero((role == ItemRole.TEACHER) | (role == ItemRole.SELF)).flatten()
    if shortcut.numel() == 0:
        return target

    x_mid = x_t.clone()
    displacement = torch.zeros(x_t.shape, dtype=target.dtype, device=x_t.device)
    pairs = ((ItemRole.TEACHER, teacher), (ItemRole.SELF, fast_ema))
    if teacher_walk is not None:
        idx = torch.nonzero(role == ItemRole.TEACHER).flatten().to(x_t.device)
        x_mid[idx] = teacher_walk[0].to(x_t.dtype)
        displacement[idx] = teacher_walk[1].to(target.dtype)
        pairs = ((ItemRole.SELF, fast_ema),)
    elif first_half is not None:  # every shortcut item in one walk, each with its own role
        pairs = ((None, first_half(role[shortcut])),)
    for item_role, velocity in pairs:
        idx = shortcut if item_role is None else torch.nonzero(role == item_role).flatten()
        if idx.numel() == 0:
            continue
        dev_idx = idx.to(x_t.device)
        x_half, d_half = euler_walk(velocity, x_t[dev_idx], draw.times[idx, : half + 1],
                                    select_items(extra_args, idx, batch))
        x_mid[dev_idx] = x_half
        displacement[dev_idx] = d_half.to(target.dtype)

    dev_idx = shortcut.to(x_t.device)
    _, d_second = euler_walk(slow_ema, x_mid[dev_idx], draw.times[shortcut, half:],
                             select_items(extra_args, shortcut, batch))
    jump = (draw.times[shortcut, 0] - draw.times[shortcut, -1]).to(target.dtype).to(x_t.device)
    target[dev_idx] = (displacement[dev_idx] + d_second.to(target.dtype)) / _per_item(jump, target)
    return target


def shortcut_loss(prediction: torch.Tensor, target: torch.Tensor, huber_c: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to minimise, the per-item mean squared error in float32). The loss is the batch mean of the
    per-item MSE (the paper's), or with huber_c > 0 of the pseudo-Huber sqrt(mse + c^2) - c (Song & Dhariwal's
    improved consistency training; c in units of the per-element RMS error), which weighs an item's gradient
    by 1 / its error: no item with a large error (a long jump, an early EMA) dominates the batch."""
    per_item = (prediction.float() - target.float()).pow(2).reshape(prediction.shape[0], -1).mean(dim=1)
    if huber_c > 0:
        return ((per_item + huber_c ** 2).sqrt() - huber_c).mean(), per_item
    return per_item.mean(), per_item


__all__ = ["ItemRole", "ShortcutDraw", "draw_shortcut_items", "interpolate", "flow_velocity_target",
           "select_items", "accumulation_dtype", "euler_walk", "average_velocity_target", "shortcut_loss", "shift_time"]

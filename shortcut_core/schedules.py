"""Flow-time schedules shared by SCFM training and few-step sampling.

Convention (rectified flow, as Flux and SD3): x_t = (1 - t) * x0 + t * noise, t = 1 is pure
noise, t = 0 is data, and a sampler walks t from ~1 down to 0.

The paper's two warps of uniform time u are one family:
    fixed shift s:         t = s * u / (1 + (s - 1) * u)
    resolution shift mu:   t = e^mu / (e^mu + (1 / u - 1))   ==  fixed shift with s = e^mu
so a schedule is always `shift_time(u, s)` and the resolution shift only chooses s.
"""

from __future__ import annotations

import math

import torch

T_MAX = 1.0 - 1e-5  # the paper's first schedule point


def shift_time(u: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """Warp uniform time u in [0, 1] towards the noise end: t = s * u / (1 + (s - 1) * u)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def resolution_mu(token_count: float, *, base_tokens: float = 256.0, base_mu: float = 0.5,
                  max_tokens: float = 4096.0, max_mu: float = 1.15) -> float:
    """Flux's resolution-dependent mu: the line through (256 tokens, 0.5) and (4096 tokens, 1.15)."""
    slope = (max_mu - base_mu) / (max_tokens - base_tokens)
    return base_mu + slope * (token_count - base_tokens)


def resolution_shift(token_count: float) -> float:
    """The fixed shift equivalent to Flux's resolution shift at this packed token count: e^mu."""
    return math.exp(resolution_mu(token_count))


def packed_token_count(latent_shape: tuple[int, ...] | torch.Size, patch_size: int = 2) -> int:
    """Tokens a patchifying transformer sees for one latent (C, H, W): (H // p) * (W // p).

    For latents that are not images (C, H, W) the count is the number of elements per channel.
    """
    shape = tuple(latent_shape)
    if len(shape) == 3:
        return (shape[1] // patch_size) * (shape[2] // patch_size)
    return max(1, math.prod(shape[1:]) if len(shape) > 1 else shape[0])


def shifted_schedule(steps: int, shift: float = 3.25, *, t_max: float = T_MAX,
                     dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The SCFM sampling schedule: steps + 1 times from t_max down to 0.

    u = linspace(1, 0, steps + 1), t = shift_time(u, shift), t[0] = t_max. Computed in float64
    and cast once, so training and sampling see the same values.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (got {steps!r})")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0 (got {shift!r}); the paper's default is 3.25")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift_time(u, float(shift))
    t[0] = t_max
    return t.to(dtype=dtype, device=device)


def schedule_points(schedule_length: torch.Tensor, start: torch.Tensor, count: int, shift: torch.Tensor,
                    *, t_max: float = T_MAX) -> torch.Tensor:
    """Points start .. start + count of per-item shifted schedules, without materialising them.

    Item b's schedule is shifted_schedule(schedule_length[b], shift[b]); returns a (B, count + 1)
    float64 tensor of its points at indices start[b] + j, j = 0 .. count. Point i of an N-step
    schedule is shift_time(1 - i / N, s), which is what linspace(1, 0, N + 1) gives up to rounding.
    """
    j = torch.arange(count + 1, dtype=torch.float64)
    index = start.to(torch.float64)[:, None] + j[None, :]
    u = 1.0 - index / schedule_length.to(torch.float64)[:, None]
    t = shift_time(u, shift.to(torch.float64)[:, None])
    return torch.where(index == 0, torch.full_like(t, t_max), t)

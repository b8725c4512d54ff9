"""Few-step Euler sampling over a velocity callable, in the style of k-diffusion's sampling.py.

A velocity callable is `v = velocity(x, t, **extra_args)` with t a (batch,) tensor of flow
times. A shortcut LoRA needs no other sampler: it changes what v means (the average velocity
of the jump the schedule takes), not how it is integrated. The one choice left is the time the
model is told on each jump (told_times): a state reached by a long jump is not quite the state
the model met at its time in training (Li et al., ICLR 2024, "Alleviating exposure bias in
diffusion models through sampling with shifted time steps"). The other is a multistep step: a
few long jumps leave a curvature that the last two velocities show, and stepping with
v_i + c (v_i - v_i-1) follows it at no extra forward (c = 0 is Euler, 1/2 Adams-Bashforth's
two-step rule at equal steps). The calibration measures whether either helps a LoRA.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from tqdm.auto import trange


class VelocityFn(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **extra_args: Any) -> torch.Tensor: ...


StepCallback = Callable[[dict[str, Any]], None]


def told_times(sigmas: torch.Tensor, time_shift: float = 0.0) -> torch.Tensor:
    """The time the model is told on each jump from sigmas[i] to sigmas[i+1]: sigmas[i] - time_shift * (sigmas[i] -
    sigmas[i+1]), at most sigmas[0] (no state is noisier than the walk's start). 0 is Euler's own (the jump's
    start); a negative shift tells a noisier time, a positive one a cleaner time."""
    start, end = sigmas[:-1], sigmas[1:]
    if time_shift == 0.0:
        return start
    return (start - time_shift * (start - end)).clamp(max=float(sigmas[0]))


@torch.no_grad()
def sample_euler(velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
                 callback: StepCallback | None = None, disable: bool | None = None,
                 time_shift: float = 0.0, multistep: float = 0.0) -> torch.Tensor:
    """Integrate dx/dt = v from sigmas[0] down to sigmas[-1] with Euler steps, the model told the times
    told_times(sigmas, time_shift) (0: Euler's), each jump after the first stepping with v_i + multistep
    (v_i - v_i-1) (0: Euler's v_i).

    `callback` is called after each velocity evaluation with {"x", "i", "sigma", "sigma_next",
    "velocity", "denoised"} (denoised = x - sigma * v, the x0 estimate previews show); it may raise
    to interrupt. Returns x at sigmas[-1].
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    told = told_times(sigmas, time_shift)
    before = None
    for i in trange(len(sigmas) - 1, disable=disable, desc="shortcut sampling"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, told[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "velocity": v,
                      "denoised": x - sigma * v})
        step = v if before is None or multistep == 0.0 else v + multistep * (v - before)
        x, before = x + (sigma_next - sigma) * step, v
    return x

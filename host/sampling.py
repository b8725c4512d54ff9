"""Few-step sampling through the host: the SCFM schedule as SIGMAS and the engine's Euler as a KSAMPLER over
the host's denoiser, with KSampler's noise, previews, progress and interruption."""

from __future__ import annotations

import math
from typing import Any

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..shortcut_core.sampling import sample_euler
from ..shortcut_core.schedules import resolution_shift, shifted_schedule
from .checks import HostInputError, require_flow_model


def shortcut_sigmas(steps: int, shift: float, *, denoise: float = 1.0, use_resolution_shift: bool = False,
                    tokens: int | None = None) -> torch.Tensor:
    """The SCFM schedule as SIGMAS; denoise < 1 keeps the last steps of a longer schedule, as KSampler does.
    With use_resolution_shift the shift is the resolution shift of `tokens` image tokens (token_count)."""
    if use_resolution_shift:
        if tokens is None:
            raise HostInputError("resolution_shift: needs the latent's size")
        shift = resolution_shift(tokens)
    if denoise <= 0.0:
        return torch.zeros(0)
    total = max(steps, int(steps / denoise))
    return shifted_schedule(total, float(shift))[-(steps + 1):]


def shortcut_euler(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None, disable=None,
                   time_shift: float = 0.0, multistep: float = 0.0):
    """A KSAMPLER function: the engine's Euler over the host's denoiser (v = (x - denoised) / sigma), walking with
    `time_shift` and `multistep` as sampling.sample_euler does.

    Given the same sigmas and Euler's walk (both 0) this is the host's own "euler" sampler step for step.
    """
    def velocity(x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
        denoised = model(x, t, **extra)
        return (x - denoised) / t.reshape(-1, *([1] * (x.ndim - 1)))

    def step_callback(state: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(state)

    return sample_euler(velocity, x, sigmas, extra_args, step_callback, disable, time_shift=time_shift,
                        multistep=multistep)


def make_guider(model, positive, negative, cfg: float) -> comfy.samplers.CFGGuider:
    """The host's CFG guider; without a negative it runs the positive alone (cfg must then be 1)."""
    if negative is None and not math.isclose(cfg, 1.0):
        raise HostInputError(f"cfg: is {cfg} but no negative conditioning is connected; connect one for true CFG "
                             f"or set cfg to 1.0 (Flux dev uses its distilled guidance instead)")
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive} if negative is None else {"positive": positive, "negative": negative})
    guider.set_cfg(cfg)
    return guider


def sample_shortcut(model, positive, negative, latent: dict, *, seed: int, sigmas: torch.Tensor, cfg: float = 1.0,
                    time_shift: float = 0.0, multistep: float = 0.0) -> dict:
    """Sample a LATENT with the shortcut Euler sampler on the given sigmas (walking with `time_shift` and
    `multistep`: sampling.sample_euler); progress, previews and interruption as KSampler (common_ksampler) does
    them."""
    require_flow_model(model)
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    guider = make_guider(model, positive, negative, cfg)
    steps = max(len(sigmas) - 1, 0)
    callback = latent_preview.prepare_callback(model, steps)
    sampler = comfy.samplers.KSAMPLER(shortcut_euler, {"time_shift": time_shift, "multistep": multistep})
    samples = guider.sample(noise, latent_image, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    # newer hosts also hand latents between nodes in an intermediate dtype (fp16 with --fp16-intermediates)
    dtype = getattr(comfy.model_management, "intermediate_dtype", lambda: samples.dtype)()
    out["samples"] = samples.to(device=comfy.model_management.intermediate_device(), dtype=dtype)
    return out

"""ShortcutSampler and ShortcutScheduler: few-step Euler on the SCFM schedule."""

from __future__ import annotations

import math

from ..shortcut_core.schedules import packed_token_count
from ..host.checks import require_single_model, upstream_files
from ..host.families import token_count
from ..host.recipes import carried_recipe
from ..host.sampling import sample_shortcut, shortcut_sigmas
from .inputs import checked_inputs

DEFAULT_SHIFT = 3.25  # the authors' sampling default for Flux at 1024 px

_SHIFT = ("FLOAT", {"default": DEFAULT_SHIFT, "min": 0.01, "max": 100.0, "step": 0.01,
                    "tooltip": "Warps the schedule towards the noise end: t = s*u / (1 + (s-1)*u). Lower is sharper with "
                               "more artifacts, higher keeps structure but is softer. 3.25 is the authors' default."})
# Shortcut Sampler's: 0 takes the recipe of the MODEL's shortcut LoRA for the steps set.
_AUTO_SHIFT = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                         "tooltip": "Warps the schedule towards the noise end: t = s*u / (1 + (s-1)*u). 0 (auto): the "
                                    "shift the model's shortcut LoRA recommends for these steps (Shortcut LoRA "
                                    "Loader or Train Shortcut put it on the model), else the shift the model samples "
                                    "at. At that shift (auto, or the loader's shift output) a full denoise also "
                                    "walks as the LoRA's calibration chose (its time shift and multistep). Lower "
                                    "is sharper with more artifacts, higher keeps structure but is softer."})
_RESOLUTION_SHIFT = ("BOOLEAN", {"default": False,
                                 "tooltip": "Use Flux's resolution-dependent shift e^mu (mu from the latent's token "
                                            "count) instead of the shift above."})
_STEPS = ("INT", {"default": 3, "min": 1, "max": 1000,
                  "tooltip": "Euler steps. Shortcut LoRAs are trained for 3-8; the loader outputs what the LoRA recommends."})
_DENOISE = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                      "tooltip": "Below 1, only the last steps of a longer schedule run (image to image)."})


class ShortcutSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A flow-matching model (Flux, SD3.5, ...) with a shortcut LoRA applied, "
                                               "e.g. from Shortcut LoRA Loader or TrainShortcut."}),
                "positive": ("CONDITIONING", {"tooltip": "What the image should show (for Flux dev, set its guidance "
                                                         "with FluxGuidance)."}),
                "latent_image": ("LATENT", {"tooltip": "The latent to denoise: an empty latent for text to image."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "The noise seed."}),
                "steps": _STEPS,
                "shift": _AUTO_SHIFT,
                "resolution_shift": _RESOLUTION_SHIFT,
                "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "True classifier-free guidance; needs a negative. 1.0 runs the positive "
                                             "alone (Flux dev uses its distilled guidance instead). Use the cfg the "
                                             "LoRA was trained with (the loader and Train Shortcut say it)."}),
                "denoise": _DENOISE,
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Optional negative conditioning, used when cfg > 1."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = "sampling/shortcut"
    DESCRIPTION = "Few-step Euler sampling on the SCFM schedule, for models with a shortcut LoRA."

    @checked_inputs
    def sample(self, model, positive, latent_image, seed, steps, shift, resolution_shift, cfg, denoise, negative=None,
               unique_id=None, prompt=None):
        require_single_model(model, upstream_files(prompt, unique_id))
        recipe = carried_recipe(model, steps)
        shift = shift or recipe.shift
        walk = recipe.walk
        if resolution_shift or denoise < 1.0 or not math.isclose(shift, recipe.shift, rel_tol=1e-6):
            walk = {}  # measured on the whole walk at the recipe's shift, not on another schedule's jumps
        sigmas = shortcut_sigmas(steps, shift, denoise=denoise, use_resolution_shift=resolution_shift,
                                 tokens=token_count(model, tuple(latent_image["samples"].shape[1:])))
        return (sample_shortcut(model, positive, negative, latent_image, seed=seed, sigmas=sigmas, cfg=cfg,
                                **walk),)


class ShortcutScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": _STEPS,
                "shift": _SHIFT,
                "denoise": _DENOISE,
                "resolution_shift": _RESOLUTION_SHIFT,
                "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 8,
                                  "tooltip": "Image width in pixels; only used by resolution_shift."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 8,
                                   "tooltip": "Image height in pixels; only used by resolution_shift."}),
            }
        }

    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The SCFM schedule, for SamplerCustomAdvanced with the euler sampler.",)
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/schedulers"
    DESCRIPTION = "The shortcut schedule as SIGMAS: with the stock euler sampler it samples as Shortcut Sampler does."

    @checked_inputs
    def get_sigmas(self, steps, shift, denoise, resolution_shift, width, height):
        # An 8x VAE latent of this image size in 2 x 2 patches (Flux, SD3): only its token count matters.
        return (shortcut_sigmas(steps, shift, denoise=denoise, use_resolution_shift=resolution_shift,
                                tokens=packed_token_count((16, height // 8, width // 8))),)

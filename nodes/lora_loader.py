"""ShortcutLoRALoader: a shortcut LoRA from models/loras onto the loaded model, with its sampling recipe."""

from __future__ import annotations

import logging

from ..host.checks import require_flow_model, require_single_model, upstream_files
from ..host.families import family_recipe
from ..host.files import lora_names, lora_path
from ..host.lora import load_lora_onto
from .inputs import checked_inputs

log = logging.getLogger("shortcut-flow")

# What a LoRA without our metadata (e.g. the authors' released files) is sampled with: the paper's defaults, at the
# shift the model samples at (the paper's 3.25 for Flux: host/families.py family_recipe).
PAPER_STEPS, PAPER_STRENGTH = 3, 1.0


class ShortcutLoRALoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The flow-matching model the LoRA was made for (Flux, SD3.5, ...)."}),
                "lora_name": (lora_names(), {"tooltip": "A shortcut LoRA in models/loras: the authors' diffusers "
                                                             "files, this pack's files, kohya or ComfyUI-style files."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.01,
                                       "tooltip": "LoRA strength. 1.0-1.75 is usual; fewer steps want more "
                                                  "(the authors' UI uses 1.6)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    RETURN_TYPES = ("MODEL", "INT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("model", "steps", "shift", "recommended_strength")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied (the input model is unchanged).",
                       "Steps the LoRA was trained for (3 when the file does not say).",
                       "Schedule shift the LoRA recommends (when the file does not say: 3.25 for Flux, else the shift the "
                       "model samples at).",
                       "Strength the LoRA recommends, calibrated when it was trained with calibrate on (1.0 when "
                       "the file does not say).")
    FUNCTION = "load"
    CATEGORY = "loaders"
    DESCRIPTION = ("Loads a shortcut LoRA onto the model through ComfyUI's own key mapping, reports file keys "
                   "that matched nothing, and outputs the sampling recipe stored in the file.")

    @checked_inputs
    def load(self, model, lora_name, strength, unique_id=None, prompt=None):
        require_flow_model(model)
        require_single_model(model, upstream_files(prompt, unique_id))
        patched, report = load_lora_onto(model, lora_path(lora_name), strength)
        meta = report.metadata
        steps = meta.steps if meta.steps is not None else PAPER_STEPS
        shift = meta.shift if meta.shift is not None else family_recipe(model).schedule["sample_shift"]
        cfg = (meta.config or {}).get("extra", {}).get("cfg")
        recommended = meta.strength if meta.strength is not None else PAPER_STRENGTH
        text = (f"{lora_name}: {report.patched_weights} weights patched from {report.matched_keys} keys; "
                f"{len(report.unmatched_keys)} keys matched nothing"
                + (f" ({', '.join(report.unmatched_keys[:5])}{', ...' if len(report.unmatched_keys) > 5 else ''})"
                   if report.unmatched_keys else "")
                + f". Recipe: {steps} steps, shift {shift:.3g}, strength {recommended:g}"
                + (f", cfg {cfg:g} with the negative it was trained with" if cfg not in (None, 1.0) else "")
                + (f" (calibrated against the teacher's {meta.calibration['reference_steps']}-step samples)."
                   if meta.calibration else "."))
        log.info(text)
        return {"ui": {"text": [text]}, "result": (patched, steps, float(shift), float(recommended))}

"""ShortcutLoRALoader: a shortcut LoRA from models/loras onto the loaded model, with its sampling recipe."""

from __future__ import annotations

import logging

from ..host.checks import require_flow_model, require_single_model, upstream_files
from ..host.files import lora_names, lora_path
from ..host.lora import load_lora_onto
from ..host.recipes import lora_recipes, recipe_for, with_recipes
from ..shortcut_core.calibration import walk_text
from .inputs import checked_inputs

log = logging.getLogger("shortcut-flow")


class ShortcutLoRALoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The flow-matching model the LoRA was made for (Flux, SD3.5, ...)."}),
                "lora_name": (lora_names(), {"tooltip": "A shortcut LoRA in models/loras: the authors' diffusers "
                                                             "files, this pack's files, kohya or ComfyUI-style files."}),
                "strength": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4.0, "step": 0.01,
                                       "tooltip": "LoRA strength. 0 (auto): the strength the LoRA's file recommends "
                                                  "for the steps below (calibrated when it was trained with "
                                                  "calibrate on; 1.0 when the file does not say). 1.0-1.75 is usual; "
                                                  "fewer steps want more."}),
                # last, so saved workflows keep their widget order (they load with it at auto)
                "steps": ("INT", {"default": 0, "min": 0, "max": 100,
                                  "tooltip": "Steps you will sample with. 0 (auto): the LoRA's own. Its file keeps a "
                                             "recipe (shift, strength) for each step count calibrated (1-4 and its "
                                             "own); the outputs give the one for these steps."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    RETURN_TYPES = ("MODEL", "INT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("model", "steps", "shift", "recommended_strength")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied (the input model is unchanged); it carries the LoRA's "
                       "recipes, for Shortcut Sampler's auto shift.",
                       "The steps input, or the LoRA's own steps (3 when the file does not say).",
                       "Schedule shift the LoRA recommends for these steps (when the file does not say: 3.25 for "
                       "Flux, else the shift the model samples at).",
                       "Strength the LoRA recommends for these steps, calibrated when it was trained with calibrate "
                       "on (1.0 when the file does not say).")
    FUNCTION = "load"
    CATEGORY = "loaders"
    DESCRIPTION = ("Loads a shortcut LoRA onto the model through ComfyUI's own key mapping, reports file keys "
                   "that matched nothing, and outputs the sampling recipe stored in the file for the steps you set.")

    @checked_inputs
    def load(self, model, lora_name, strength, steps=0, unique_id=None, prompt=None):
        require_flow_model(model)
        require_single_model(model, upstream_files(prompt, unique_id))
        chosen: dict = {}

        def strength_for(metadata) -> float:
            chosen["recipes"] = recipes = lora_recipes(metadata, model)
            chosen["recipe"], chosen["measured"] = recipe_for(recipes, steps)
            return strength if strength > 0 else chosen["recipe"].strength

        patched, report = load_lora_onto(model, lora_path(lora_name), strength_for)
        recipe, meta = chosen["recipe"], report.metadata
        patched = with_recipes(patched, chosen["recipes"])
        cfg = (meta.config or {}).get("extra", {}).get("cfg")
        text = (f"{lora_name}: {report.patched_weights} weights patched from {report.matched_keys} keys; "
                f"{len(report.unmatched_keys)} keys matched nothing"
                + (f" ({', '.join(report.unmatched_keys[:5])}{', ...' if len(report.unmatched_keys) > 5 else ''})"
                   if report.unmatched_keys else "")
                + f". Recipe: {recipe.steps} steps, shift {recipe.shift:.3g}, strength {recipe.strength:g}"
                + (f", cfg {cfg:g} with the negative it was trained with" if cfg not in (None, 1.0) else "")
                + (f" (calibrated against the teacher's {meta.calibration['reference_steps']}-step samples)."
                   if meta.calibration and chosen["measured"] else ".")
                + ("" if chosen["measured"] else f" No recipe was measured at {recipe.steps} steps: the nearest "
                   f"step count's shift and strength.")
                + (f" Shortcut Sampler at this shift walks with {walk_text(recipe)} (its calibration's choice; "
                   f"other samplers take Euler's walk)." if walk_text(recipe) else "")
                + (f" Applied at strength {strength:g}, as set." if strength > 0 else "")
                + (f" Calibrated step counts: {', '.join(str(n) for n in sorted(chosen['recipes']))}."
                   if len(chosen["recipes"]) > 1 else ""))
        log.info(text)
        return {"ui": {"text": [text]}, "result": (patched, recipe.steps, float(recipe.shift), float(recipe.strength))}

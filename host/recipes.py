"""The few-step recipe (steps, shift, strength, time shift) a shortcut LoRA is sampled with, per step count: read
from its file's calibration, carried on the MODEL it patches (Shortcut LoRA Loader, Train Shortcut), and read back
by Shortcut Sampler: its shift when the sampler's is left at "auto", its time shift when the sampler runs at it."""

from __future__ import annotations

from ..shortcut_core.calibration import Calibration, Recipe
from ..shortcut_core.lora_file import LoraMetadata
from .families import family_recipe

# What a LoRA without our metadata (e.g. the authors' released files) is sampled with: the paper's steps and
# strength, at the shift the model samples at (the paper's 3.25 for Flux: families.family_recipe).
PAPER_STEPS, PAPER_STRENGTH = 3, 1.0
MODEL_OPTION = "shortcut_flow_recipes"  # on the patched MODEL's model_options: {steps: (strength, shift, time shift)}


def lora_recipes(metadata: LoraMetadata, model) -> dict[int, Recipe]:
    """The best recipe the file has for each step count, its own step count's first: its calibration's per step count, else its one recipe
    (files calibrated before per-step recipes, or not calibrated), else the paper's at the model's shift."""
    own = Recipe(metadata.steps if metadata.steps is not None else PAPER_STEPS,
                 metadata.strength if metadata.strength is not None else PAPER_STRENGTH,
                 metadata.shift if metadata.shift is not None else family_recipe(model).schedule["sample_shift"])
    recipes = Calibration.from_dict(metadata.calibration).recipes() if metadata.calibration else {}
    if own.steps in recipes:  # the file's recipe fields say no time shift: its calibration does
        own = Recipe(own.steps, own.strength, own.shift, recipes[own.steps].time_shift)
    return {own.steps: own, **{n: r for n, r in sorted(recipes.items()) if n != own.steps}}  # its own first


def recipe_for(recipes: dict[int, Recipe], steps: int) -> tuple[Recipe, bool]:
    """The recipe for `steps` (0: the LoRA's own, the first), and whether it was measured at that step count
    (else the nearest step count's shift and strength, at Euler's times: a time shift is measured for the jumps
    of its own step count)."""
    if steps in recipes:
        return recipes[steps], True
    own = next(iter(recipes.values()))
    if steps == 0:
        return own, True
    nearest = min(recipes, key=lambda n: (abs(n - steps), n))
    return Recipe(steps, recipes[nearest].strength, recipes[nearest].shift), False


def with_recipes(model, recipes: dict[int, Recipe]):
    """The MODEL carrying its LoRA's recipes (lora_recipes: its own step count's first), for Shortcut Sampler."""
    model.model_options[MODEL_OPTION] = {n: (r.strength, r.shift, r.time_shift) for n, r in recipes.items()}
    return model


def carried_recipe(model, steps: int) -> tuple[float, float]:
    """The (shift, time shift) Shortcut Sampler's "auto" takes: the recipe the MODEL's shortcut LoRA has for
    `steps` (recipe_for: the nearest step count's shift where it has none), or the shift the model samples at,
    at Euler's times, when it carries none."""
    carried = model.model_options.get(MODEL_OPTION)
    if not carried:
        return float(family_recipe(model).schedule["sample_shift"]), 0.0
    recipe, _ = recipe_for({n: Recipe(n, *values) for n, values in carried.items()}, steps)
    return float(recipe.shift), float(recipe.time_shift)

"""The few-step recipe (steps, shift, strength, and the walk: time shift, multistep) a shortcut LoRA is sampled
with, per step count: read from its file's calibration, carried on the MODEL it patches (Shortcut LoRA Loader, Train
Shortcut), and read back by Shortcut Sampler: its shift when the sampler's is left at "auto", its walk when the
sampler runs at that shift."""

from __future__ import annotations

from ..shortcut_core.calibration import Calibration, Recipe
from ..shortcut_core.lora_file import LoraMetadata
from .families import family_recipe

# What a LoRA without our metadata (e.g. the authors' released files) is sampled with: the paper's steps and
# strength, at the shift the model samples at (the paper's 3.25 for Flux: families.family_recipe).
PAPER_STEPS, PAPER_STRENGTH = 3, 1.0
# on the patched MODEL's model_options: {steps: (strength, shift, time shift, multistep)}
MODEL_OPTION = "shortcut_flow_recipes"


def lora_recipes(metadata: LoraMetadata, model) -> dict[int, Recipe]:
    """The best recipe the file has for each step count, its own step count's first: its calibration's per step count, else its one recipe
    (files calibrated before per-step recipes, or not calibrated), else the paper's at the model's shift."""
    own = Recipe(metadata.steps if metadata.steps is not None else PAPER_STEPS,
                 metadata.strength if metadata.strength is not None else PAPER_STRENGTH,
                 metadata.shift if metadata.shift is not None else family_recipe(model).schedule["sample_shift"])
    recipes = Calibration.from_dict(metadata.calibration).recipes() if metadata.calibration else {}
    if own.steps in recipes:  # the file's recipe fields say nothing of the walk: its calibration does
        own = Recipe(own.steps, own.strength, own.shift, **recipes[own.steps].walk)
    return {own.steps: own, **{n: r for n, r in sorted(recipes.items()) if n != own.steps}}  # its own first


def recipe_for(recipes: dict[int, Recipe], steps: int) -> tuple[Recipe, bool]:
    """The recipe for `steps` (0: the LoRA's own, the first), and whether it was measured at that step count
    (else the nearest step count's shift and strength, on Euler's walk: a walk is measured for the jumps of its
    own step count)."""
    if steps in recipes:
        return recipes[steps], True
    own = next(iter(recipes.values()))
    if steps == 0:
        return own, True
    nearest = min(recipes, key=lambda n: (abs(n - steps), n))
    return Recipe(steps, recipes[nearest].strength, recipes[nearest].shift), False


def with_recipes(model, recipes: dict[int, Recipe]):
    """The MODEL carrying its LoRA's recipes (lora_recipes: its own step count's first), for Shortcut Sampler."""
    model.model_options[MODEL_OPTION] = {n: (r.strength, r.shift, r.time_shift, r.multistep)
                                          for n, r in recipes.items()}
    return model


def carried_recipe(model, steps: int) -> Recipe:
    """The recipe Shortcut Sampler's "auto" takes: the one the MODEL's shortcut LoRA has for `steps` (recipe_for:
    the nearest step count's shift and strength where it has none), or, when it carries none, the shift the model
    samples at, on Euler's walk."""
    carried = model.model_options.get(MODEL_OPTION)
    if not carried:
        return Recipe(steps, PAPER_STRENGTH, float(family_recipe(model).schedule["sample_shift"]))
    recipe, _ = recipe_for({n: Recipe(n, *values) for n, values in carried.items()}, steps)
    return recipe

"""What a user watches while TrainShortcut runs: few-step previews in the node, the final comparison, and
the calibrated recipe the LoRA file then carries (on a real ComfyUI with a tiny Flux)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_host_nodes import node, train_node
from test_host_reliability import latents


@pytest.fixture()
def progress_hook():
    """Everything the nodes send through the host's progress bars: (value, total, preview, node_id)."""
    import comfy.utils
    calls = []
    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             calls.append((value, total, preview, node_id)))
    try:
        yield calls
    finally:
        comfy.utils.set_progress_bar_global_hook(before)


def _pixels(picture) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=np.int16)


def test_previews_reach_the_node_through_the_hosts_progress_bar(flux, lora_dir, progress_hook):
    patcher, positive = flux
    train_node(patcher, positive, latents(), steps=4, preview_every=2, unique_id="7")
    shown = [(value, preview) for value, _, preview, node_id in progress_hook if preview is not None and node_id == "7"]
    assert [value for value, _ in shown] == [0, 2, 4]
    for _, (kind, picture, max_size) in shown:
        assert kind == "JPEG" and picture.height >= 128 and picture.width > 3 * picture.height * 0.9
    first, last = _pixels(shown[0][1][1]), _pixels(shown[-1][1][1])
    third = first.shape[1] // 3
    assert np.array_equal(first[:, :third - 8], last[:, :third - 8])   # the teacher's few steps: made once
    assert not np.array_equal(first[:, third + 8:2 * third - 8], last[:, third + 8:2 * third - 8])  # the student moved


def test_previews_never_change_the_training_result(flux, lora_dir):
    patcher, positive = flux
    _, watched, loss_watched, _, _, _, _, _ = train_node(patcher, positive, latents(), steps=3, preview_every=1,
                                                   save_name="watched")
    _, plain, loss_plain, _, _, _, _, _ = train_node(patcher, positive, latents(), steps=3, preview_every=0,
                                               save_name="plain")
    assert loss_watched == loss_plain
    assert watched.keys() == plain.keys() and all(torch.equal(watched[k], plain[k]) for k in plain)


def test_the_preview_output_is_the_final_comparison(flux, lora_dir):
    patcher, positive = flux
    _, _, _, preview, _, plot, _, _ = train_node(patcher, positive, latents(), steps=2, preview_every=0)
    assert preview.dtype == torch.float32 and preview.shape[0] == 1 and preview.shape[-1] == 3
    assert preview.shape[1] >= 128 and preview.shape[2] > 3 * (preview.shape[1] - 20)  # three labelled panels
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0 and float(preview.std()) > 0.01
    assert plot.shape[-1] == 3 and plot.shape != preview.shape   # the loss curve has its own output


def test_calibration_writes_the_recipe_the_loader_outputs_and_the_node_shows(flux, lora_dir):
    from shortcut_core import load_lora
    from shortcut_core.calibration import Calibration, Recipe
    patcher, positive = flux
    out = type(node("TrainShortcut"))
    _, lora, _, _, _, _, recipe_steps, recipe_shift = train_node(patcher, positive, latents(), steps=2, calibrate=True,
                                                                 save_name="calibrated", sample_shift=2.0)
    metadata = load_lora(lora_dir / "calibrated.safetensors").metadata
    calibration = Calibration.from_dict(metadata.calibration)
    best, distance = calibration.best
    assert (metadata.steps, metadata.strength, metadata.shift) == (best.steps, best.strength, best.shift)
    assert (recipe_steps, recipe_shift) == (best.steps, best.shift)  # the node's outputs, for Shortcut Sampler
    # the closest at its time shift (a time shift the 4 noises cannot tell from Euler's gives way to Euler)
    assert distance == min(d for r, d in calibration.table if r.steps == 3 and r.walk == best.walk)
    assert calibration.samples == 4 and calibration.reference_steps == 32 and calibration.step_counts == [1, 2, 3, 4]
    assert calibration.baseline[0] == Recipe(3, 1.0, 2.0)  # searched around the sample_shift set
    assert metadata.calibration["recipes"].keys() == {"1", "2", "3", "4"}
    _, steps, shift, strength = node("ShortcutLoRALoader").load(patcher, "calibrated.safetensors", 1.0)["result"]
    assert (steps, shift, strength) == (best.steps, best.shift, best.strength)
    text = node("ShortcutLoRALoader").load(patcher, "calibrated.safetensors", 1.0)["ui"]["text"][0]
    assert f"shift {best.shift:.3g}, strength {best.strength:g} (calibrated against the teacher's 32-step" in text
    shown = out().train(model=patcher, latents=latents(), positive=positive, steps=1, batch_size=2, learning_rate=1e-3,
                        rank=4, seed=0, save_name="shown", checkpoint_every=0, resume_lora="(none)", cfg=1.0,
                        preview_every=0, calibrate=True)
    assert shown["ui"]["text"][0].startswith("calibrated: 3 steps")
    assert "32-step samples, 4 held-out noises" in shown["ui"]["text"][0]


def test_the_loader_and_the_sampler_take_the_recipe_for_the_steps_set(flux, lora_dir):
    """The file keeps a recipe per step count: the loader outputs and applies (strength 0: auto) the one for its
    steps input, the MODEL carries them, and Shortcut Sampler's shift 0 (auto) takes the one for its steps."""
    from shortcut_core import load_lora
    from shortcut_core.calibration import Calibration
    sampling = __import__("test_host_nodes").comfy_host.pack_module("host.sampling")
    patcher, positive = flux
    train_node(patcher, positive, latents(), steps=2, calibrate=True, save_name="per_step", sample_shift=2.0)
    calibration = Calibration.from_dict(load_lora(lora_dir / "per_step.safetensors").metadata.calibration)
    loader = node("ShortcutLoRALoader")
    for steps in (1, 2, 4):
        best, _ = calibration.best_for(steps)
        model, out_steps, shift, strength = loader.load(patcher, "per_step.safetensors", 0.0, steps)["result"]
        assert (out_steps, shift, strength) == (steps, best.shift, best.strength)
        assert {p[0] for patches in model.patches.values() for p in patches} == {best.strength}  # applied
        typed, *_ = loader.load(patcher, "per_step.safetensors", 1.5, steps)["result"]
        assert {p[0] for patches in typed.patches.values() for p in patches} == {1.5}  # a typed strength as typed
        empty = {"samples": torch.zeros(1, 16, 8, 8)}
        sampler = node("ShortcutSampler")
        auto = sampler.sample(model, positive, empty, 3, steps, 0.0, False, 1.0, 1.0)[0]["samples"]
        as_set = sampling.sample_shortcut(model, positive, None, empty, seed=3, **best.walk,
                                          sigmas=sampling.shortcut_sigmas(steps, best.shift))["samples"]
        other = sampler.sample(model, positive, empty, 3, steps, best.shift * 2, False, 1.0, 1.0)[0]["samples"]
        assert torch.equal(auto, as_set) and (steps == 1 or not torch.equal(auto, other))  # 1 step: no shift
    # steps 0: the LoRA's own recipe, as before per-step recipes
    _, own_steps, own_shift, own_strength = loader.load(patcher, "per_step.safetensors", 0.0, 0)["result"]
    assert (own_steps, own_shift, own_strength) == (calibration.best[0].steps, calibration.best[0].shift,
                                                    calibration.best[0].strength)


def test_a_file_without_per_step_recipes_gives_its_own_for_any_steps_and_says_so(flux, lora_dir):
    patcher, positive = flux
    train_node(patcher, positive, latents(), steps=1, calibrate=False, save_name="plain", sample_shift=2.0)
    out = node("ShortcutLoRALoader").load(patcher, "plain.safetensors", 0.0, 1)
    _, steps, shift, strength = out["result"]
    assert (steps, shift, strength) == (1, 2.0, 1.0)
    assert "No recipe was measured at 1 steps: the nearest step count's shift and strength." in out["ui"]["text"][0]
    # a model with no shortcut LoRA: the sampler's auto shift is the one the model samples at (Flux: 3.25)
    recipes = __import__("test_host_nodes").comfy_host.pack_module("host.recipes")
    carried = recipes.carried_recipe(patcher, 3)
    assert (carried.shift, carried.walk) == (3.25, {"time_shift": 0.0, "multistep": 0.0})


def _rewritten(lora_dir, source: str, name: str, edit) -> str:
    """A copy of a LoRA file in lora_dir with its calibration edited (edit(calibration dict) changes it in place)."""
    import dataclasses
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from shortcut_core import LoraMetadata
    with safe_open(str(lora_dir / source), "pt") as f:
        strings = f.metadata()
    metadata = LoraMetadata.from_strings(strings)
    edit(metadata.calibration)
    save_file(load_file(str(lora_dir / source)), str(lora_dir / name),
              metadata={**strings, **dataclasses.replace(metadata).to_strings()})
    return name


def test_the_sampler_walks_as_the_recipe_says_only_on_the_whole_walk(flux, lora_dir):
    """A recipe with a time shift and a multistep step (the calibration's choice): Shortcut Sampler at the recipe's
    shift (0, auto, or the loader's shift output, as the workflows wire it) tells the diffusion model the times
    sampling.told_times gives and steps as sampling.sample_euler does; another shift, a partial denoise or the
    resolution shift sample on Euler's walk, and a file calibrated before the walk's choices does too."""
    sampling = __import__("test_host_nodes").comfy_host.pack_module("host.sampling")
    patcher, positive = flux
    train_node(patcher, positive, latents(), steps=1, calibrate=True, save_name="timed", sample_shift=2.0)

    def told_at(edit_two_steps):
        def edit(calibration):
            two = calibration["recipes"]["2"]
            edit_two_steps(calibration, two)
        return edit

    def noisier(calibration, two):  # as if the calibration had chosen time shift -0.3, multistep 0.3 at 2 steps
        calibration["walk_table"].append([2, two["strength"], two["shift"], -0.3, 0.3, 0.01])
        two["time_shift"], two["multistep"] = -0.3, 0.3

    def before_time_shifts(calibration, two):  # as a 0.5 file: no walk at all
        calibration.pop("walk_table")
        for recipe in calibration["recipes"].values():
            recipe.pop("time_shift"), recipe.pop("multistep")

    loader, sampler = node("ShortcutLoRALoader"), node("ShortcutSampler")
    told_file = _rewritten(lora_dir, "timed.safetensors", "told.safetensors", told_at(noisier))
    old_file = _rewritten(lora_dir, "timed.safetensors", "old.safetensors", told_at(before_time_shifts))
    out = loader.load(patcher, told_file, 0.0, 2)
    model, steps, shift, strength = out["result"]
    assert "Shortcut Sampler at this shift walks with time shift -0.3, multistep 0.3" in out["ui"]["text"][0]

    told = []

    def record(apply_model, args):
        told.append(float(args["timestep"].flatten()[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched = model.clone()
    watched.set_model_unet_function_wrapper(record)
    timestep = model.get_model_object("model_sampling").timestep
    empty = {"samples": torch.zeros(1, 16, 8, 8)}
    t = sampling.shortcut_sigmas(2, shift).tolist()

    def run(*widgets):
        told.clear()
        return sampler.sample(watched, positive, empty, 3, 2, *widgets)[0]["samples"]

    auto = run(0.0, False, 1.0, 1.0)
    assert told == pytest.approx([float(timestep(torch.tensor(t[0]))),
                                  float(timestep(torch.tensor(t[1] + 0.3 * t[1])))])
    auto_told = list(told)
    assert torch.equal(run(shift, False, 1.0, 1.0), auto) and told == auto_told  # the loader's shift output
    walked = sampling.sample_shortcut(model, positive, None, empty, seed=3, sigmas=sampling.shortcut_sigmas(2, shift),
                                      time_shift=-0.3, multistep=0.3)["samples"]
    told_only = sampling.sample_shortcut(model, positive, None, empty, seed=3, sigmas=sampling.shortcut_sigmas(2, shift),
                                         time_shift=-0.3)["samples"]
    assert torch.equal(auto, walked) and not torch.equal(auto, told_only)  # the multistep step taken too
    other = sampling.shortcut_sigmas(2, shift * 1.5).tolist()
    run(shift * 1.5, False, 1.0, 1.0)
    assert told == pytest.approx([float(timestep(torch.tensor(x))) for x in other[:2]])
    run(0.0, False, 1.0, 0.5)
    assert told == pytest.approx([float(timestep(x)) for x in sampling.shortcut_sigmas(2, shift, denoise=0.5)[:2]])
    run(0.0, True, 1.0, 1.0)
    euler = sampling.shortcut_sigmas(2, shift, use_resolution_shift=True, tokens=16)
    assert told == pytest.approx([float(timestep(x)) for x in euler[:2]])

    old, _, old_shift, _ = loader.load(patcher, old_file, 0.0, 2)["result"]
    assert old_shift == shift
    assert torch.equal(sampler.sample(old, positive, empty, 3, 2, 0.0, False, 1.0, 1.0)[0]["samples"],
                       sampler.sample(old, positive, empty, 3, 2, shift, False, 1.0, 1.0)[0]["samples"])

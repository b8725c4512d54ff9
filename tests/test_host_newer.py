"""What newer ComfyUI does differently (read in 0.38.1's source), exercised through our side of the interface.

This host (0.3.64) has none of these: each test builds the newer host's object from its documented shape on
top of the real host's classes (a CONST subclass that is not a velocity, a dynamic-VRAM patcher with its
non-dynamic delegate, the in_training flag, MultiGPU clones, a noise scale) and checks what the pack does
with it. What stays unverified until a newer ComfyUI or a GPU is at hand is said in each docstring.
"""

from __future__ import annotations

import copy

import pytest
import torch

import comfy_host
from hashing import module_hash
from test_host_nodes import node, train_node
from test_host_reliability import latents


def _with_sampling(patcher, prediction):
    """The model with its sampling object replaced, as the host's ModelSampling* nodes patch one in."""
    import comfy.model_sampling

    class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingFlux, prediction):
        pass

    sampling = ModelSamplingAdvanced(patcher.model.model_config)
    out = patcher.clone()
    out.add_object_patch("model_sampling", sampling)
    return out, sampling


def _newer_prediction_classes():
    """comfy.model_sampling.IMG_TO_IMG_FLOW and IMG_TO_IMG_VELOCITY of 0.38.1: CONST subclasses whose
    denoised is the network output (x0) and x minus it (a whole jump), not x - sigma * v."""
    import comfy.model_sampling

    class IMG_TO_IMG_FLOW(comfy.model_sampling.CONST):
        def calculate_denoised(self, sigma, model_output, model_input):
            return model_output

    class IMG_TO_IMG_VELOCITY(comfy.model_sampling.CONST):
        def calculate_denoised(self, sigma, model_output, model_input):
            return model_input - model_output

    for cls in (IMG_TO_IMG_FLOW, IMG_TO_IMG_VELOCITY):
        cls.__module__ = comfy.model_sampling.__name__  # where the newer host defines them
    return IMG_TO_IMG_FLOW, IMG_TO_IMG_VELOCITY


@pytest.mark.parametrize("index", [0, 1], ids=["IMG_TO_IMG_FLOW", "IMG_TO_IMG_VELOCITY"])
def test_const_subclasses_that_are_not_a_velocity_are_refused_by_name(flux, lora_dir, index):
    patcher, positive = flux
    prediction = _newer_prediction_classes()[index]
    model, _ = _with_sampling(patcher, prediction)
    message = f"model: .*predicts {prediction.__name__}, not a flow velocity"
    with pytest.raises(ValueError, match=message):
        node("ShortcutSampler").sample(model, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 0, 3, 3.25, False,
                                       1.0, 1.0)
    with pytest.raises(ValueError, match=message):
        train_node(model, positive, latents(), steps=1)
    import comfy.model_sampling
    plain, _ = _with_sampling(patcher, comfy.model_sampling.CONST)  # the velocity rule itself still passes
    node("ShortcutSampler").sample(plain, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 0, 1, 3.25, False, 1.0, 1.0)


def test_a_noise_scale_other_than_one_is_refused_for_training(flux, lora_dir):
    """0.38.1's ModelNoiseScale node sets model_sampling.noise_scale; its samplers scale the noise by it."""
    import comfy.model_sampling
    patcher, positive = flux
    model, sampling = _with_sampling(patcher, comfy.model_sampling.CONST)
    sampling.noise_scale = 8.0
    with pytest.raises(ValueError, match="model: its noise scale is 8.0"):
        train_node(model, positive, latents(), steps=1)
    sampling.noise_scale = 1.0
    train_node(model, positive, latents(), steps=1)


def test_multigpu_clones_are_refused_for_training(flux, lora_dir):
    """0.38.1 runs the forwards of a model with 'multigpu_clones' in its options under no_grad."""
    patcher, positive = flux
    model = patcher.clone()
    model.model_options["multigpu_clones"] = {}
    with pytest.raises(ValueError, match="model: has MultiGPU clones"):
        train_node(model, positive, latents(), steps=1)


def _dynamic_patcher_class(delegate):
    """ModelPatcherDynamic's interface in 0.38.1: is_dynamic(); load() asserts it is never asked for a full
    load (or forced weight patching); get_non_dynamic_delegate() gives a plain patcher over a model the
    host builds again from the file (here: a copy, or whatever `delegate` does)."""
    import comfy.model_patcher

    class ModelPatcherDynamic(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self):
            return True

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kw):
            assert not force_patch_weights
            assert not full_load
            return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load, **kw)

        def get_non_dynamic_delegate(self):
            return delegate(self)

    return ModelPatcherDynamic


def _plain_copy(patcher):
    import comfy.model_patcher
    out = comfy.model_patcher.ModelPatcher(copy.deepcopy(patcher.model), patcher.load_device, patcher.offload_device)
    for key, patches in patcher.patches.items():
        out.patches[key] = patches[:]
    return out


def test_a_dynamic_vram_model_trains_through_its_non_dynamic_delegate(flux, lora_dir):
    """Unverified here: that 0.38.1's real delegate (a second load of the checkpoint) fits in the user's RAM,
    and the GPU path itself; what is checked is that the pack never asks the dynamic patcher for a full
    load, trains on the delegate, and gets the same LoRA as on a plain patcher."""
    patcher, positive = flux
    delegates = []

    def delegate(dynamic):
        delegates.append(_plain_copy(dynamic))
        return delegates[-1]

    dynamic_class = _dynamic_patcher_class(delegate)
    dynamic = dynamic_class(patcher.model, patcher.load_device, patcher.offload_device)
    before = module_hash(patcher.model.diffusion_model)
    model, lora, _, _, steps, _, _, _ = train_node(dynamic, positive, latents(), steps=2, save_name="dynamic")
    _, plain_lora, _, _, _, _, _, _ = train_node(patcher, positive, latents(), steps=2, save_name="plain")
    assert steps == 2 and len(delegates) == 1
    assert lora.keys() == plain_lora.keys() and all(torch.equal(lora[k], plain_lora[k]) for k in lora)
    # the MODEL output is the user's dynamic model with the LoRA as patches; its network is untouched
    assert type(model) is dynamic_class and model.model is patcher.model and model.patches
    assert module_hash(patcher.model.diffusion_model) == before


def test_a_dynamic_vram_model_without_a_delegate_gets_an_error_naming_the_setting(flux, lora_dir):
    patcher, positive = flux

    def no_delegate(dynamic):  # 0.38.1 raises this for a patcher no core loader made
        raise RuntimeError("cannot make a non-dynamic clone of this model")

    dynamic = _dynamic_patcher_class(no_delegate)(patcher.model, patcher.load_device, patcher.offload_device)
    with pytest.raises(ValueError, match="model: .*dynamic VRAM.*--disable-dynamic-vram"):
        train_node(dynamic, positive, latents(), steps=1)
    assert not list(lora_dir.iterdir())  # refused before anything was written


def test_training_sets_the_hosts_in_training_flag_and_restores_it(flux, lora_dir, monkeypatch):
    """0.38.1's ops take autograd-safe paths while comfy.model_management.in_training is set."""
    import comfy.model_management
    patcher, positive = flux
    monkeypatch.setattr(comfy.model_management, "in_training", False, raising=False)
    seen = []

    def wrapper(apply_model, args):
        seen.append(comfy.model_management.in_training)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = patcher.clone()
    model.set_model_unet_function_wrapper(wrapper)
    train_node(model, positive, latents(), steps=1)
    assert seen and all(seen)
    assert comfy.model_management.in_training is False
    seen.clear()
    node("ShortcutSampler").sample(model, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 0, 1, 3.25, False, 1.0, 1.0)
    assert seen == [False]  # sampling is not training


def test_a_cancel_inside_a_forward_keeps_the_last_whole_step(flux, lora_dir, monkeypatch):
    """0.38.1 checks the Cancel button inside every op, so the interrupt can come in the middle of a step's
    forwards: the checkpoint holds the last completed step, and resuming from it gives the uncancelled LoRA."""
    import comfy.model_management
    from shortcut_core import load_lora
    patcher, positive = flux
    progress = comfy_host.pack_module("host.progress").Progress
    report_step = progress.step
    armed = []

    def after_step(self, report):
        report_step(self, report)
        if report.step == 2:
            armed.append(True)

    def wrapper(apply_model, args):
        if armed:
            raise comfy.model_management.InterruptProcessingException()
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = patcher.clone()
    model.set_model_unet_function_wrapper(wrapper)
    with monkeypatch.context() as patch, pytest.raises(comfy.model_management.InterruptProcessingException):
        patch.setattr(progress, "step", after_step)
        train_node(model, positive, latents(), steps=5, checkpoint_every=0, save_name="cut")
    assert load_lora(lora_dir / "cut.safetensors").metadata.config["trained_steps"] == 2
    _, resumed, _, _, _, _, _, _ = train_node(patcher, positive, latents(), steps=4, save_name="cut",
                                     resume_lora="cut.safetensors")
    _, straight, _, _, _, _, _, _ = train_node(patcher, positive, latents(), steps=4, save_name="straight")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_sampled_latents_take_the_hosts_intermediate_dtype(flux, monkeypatch):
    """0.38.1 returns sampled latents in intermediate_dtype() (fp16 with --fp16-intermediates), as stock KSampler."""
    import comfy.model_management
    patcher, positive = flux
    monkeypatch.setattr(comfy.model_management, "intermediate_dtype", lambda: torch.float16, raising=False)
    (out,) = node("ShortcutSampler").sample(patcher, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 0, 2, 3.25,
                                            False, 1.0, 1.0)
    assert out["samples"].dtype == torch.float16


def test_the_host_reads_our_comfyui_range_and_its_own_version_is_in_it(comfyui):
    """The Registry's requires-comfyui, as the host's own pyproject parser reads it; the tested host satisfies it."""
    from packaging.specifiers import SpecifierSet

    import comfyui_version
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(comfy_host.PROJECT_ROOT))
    declared = config.project.supported_comfyui_version
    assert declared.startswith(">=")
    assert comfyui_version.__version__ in SpecifierSet(declared), (comfyui_version.__version__, declared)

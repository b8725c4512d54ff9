"""Per-family recipes on a real ComfyUI: the schedule, guidance draw and true CFG follow the model a user connects,
and one expert of Wan 2.2 A14B is refused, through the host's own executor (its hidden PROMPT input)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

import comfy_host
from test_host_nodes import node, train_node


@pytest.fixture()
def host(pack):
    comfy_host.pack_module("host.families"), comfy_host.pack_module("host.checks")
    return comfy_host.pack_module("host")


def _built(builder, **kwargs):
    with torch.inference_mode():  # as ComfyUI's loaders build every model
        return builder(**kwargs)[1]


def test_flux_keeps_the_papers_recipe_and_other_families_get_it_scaled_to_their_own_shift(host):
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux, ModelSamplingSD3

    flux = host.families.family_recipe(_built(comfy_host.tiny_flux))
    assert flux.family == "Flux" and flux.guidance_draw and flux.cfg == 1.0
    assert flux.schedule == {"shift_min": 2.5, "shift_max": 4.5, "resolution_shift_prob": 0.1, "sample_shift": 3.25}

    wan = _built(comfy_host.tiny_wan)
    recipe = host.families.family_recipe(wan)
    assert recipe.family == "WAN21" and not recipe.guidance_draw and recipe.cfg == 5.0
    assert recipe.schedule == {"shift_min": 6.1538, "shift_max": 11.0769, "resolution_shift_prob": 0.0,
                               "sample_shift": 8.0}  # the paper's U[2.5, 4.5] around 3.25, scaled to 8
    # a ModelSampling node before ours counts: the recipe follows the shift the model now samples at
    (shifted,) = ModelSamplingSD3().patch(wan, shift=5.0)
    assert host.families.family_recipe(shifted).schedule["sample_shift"] == 5.0 and host.families.family_recipe(wan).model_shift == 8.0

    sd3 = host.families.family_recipe(_built(comfy_host.tiny_sd3))
    assert (sd3.family, sd3.cfg, sd3.schedule["sample_shift"], sd3.schedule["resolution_shift_prob"]) == ("SD3", 3.5,
                                                                                                          3.0, 0.0)
    # Flux at 512 px through ModelSamplingFlux samples at e^mu with a smaller mu: the draw moves with it
    (small,) = ModelSamplingFlux().patch(_built(comfy_host.tiny_flux), 1.15, 0.5, 512, 512)
    recipe = host.families.family_recipe(small)
    assert recipe.schedule["sample_shift"] < 3.0 and math.isclose(recipe.model_shift, recipe.schedule["sample_shift"],
                                                                   rel_tol=1e-3)


def test_train_shortcut_uses_the_family_recipe_for_knobs_left_at_the_papers_values(host, lora_dir):
    from shortcut_core import load_lora

    wan = _built(comfy_host.tiny_wan, seed=1)
    g = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 16, 32, generator=g), {}]]
    negative = [[torch.zeros(1, 16, 32), {}]]
    latents = {"samples": torch.randn(2, 16, 2, 4, 4, generator=g)}

    def trained_with(name, **overrides):
        train_node(wan, positive, latents, steps=1, checkpoint_every=0, save_name=name, **overrides)
        meta = load_lora(lora_dir / f"{name}.safetensors").metadata
        return meta.config, meta.shift

    config, shift = trained_with("auto", cfg=0.0, negative=negative)
    assert (config["shift_min"], config["shift_max"], config["resolution_shift_prob"], shift) == (6.1538, 11.0769,
                                                                                                 0.0, 8.0)
    assert config["extra"] == {"family": "WAN21", "cfg": 5.0}  # cfg 0 with a negative: Wan's true CFG
    config, _ = trained_with("no_negative", cfg=0.0)
    assert config["extra"]["cfg"] == 1.0  # nothing to guide against: the positive alone
    config, shift = trained_with("explicit", cfg=2.0, negative=negative, shift_min=7.0, sample_shift=9.0)
    assert (config["shift_min"], config["shift_max"], shift, config["extra"]["cfg"]) == (7.0, 11.0769, 9.0, 2.0)
    # refused before training, not after it: the diffusers export is Flux's alone
    with pytest.raises(ValueError, match="export_diffusers: the authors' diffusers format is for Flux; this is a "
                                         "WAN21 model"):
        trained_with("diffusers", export_diffusers=True)
    assert not list(lora_dir.glob("diffusers*"))


def test_auto_is_an_explicit_value_and_a_0_4_0_workflow_keeps_the_family_recipe(host, lora_dir):
    """The schedule knobs default to "auto" (the family's); a typed value is used as typed, also the paper's
    Flux values; a workflow saved by 0.4.0, whose widgets hold the old defaults in all four, still gets the
    family's recipe, as it did then."""
    from shortcut_core import load_lora

    wan = _built(comfy_host.tiny_wan, seed=1)
    g = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 16, 32, generator=g), {}]]
    latents = {"samples": torch.randn(2, 16, 2, 4, 4, generator=g)}

    def schedule(name, **overrides):
        train_node(wan, positive, latents, steps=1, checkpoint_every=0, save_name=name, **overrides)
        meta = load_lora(lora_dir / f"{name}.safetensors").metadata
        return meta.config["shift_min"], meta.config["shift_max"], meta.config["resolution_shift_prob"], meta.shift

    family = (6.1538, 11.0769, 0.0, 8.0)
    assert schedule("auto") == family
    assert schedule("saved_by_0_4_0", shift_min=2.5, shift_max=4.5, resolution_shift_prob=0.1,
                    sample_shift=3.25) == family
    assert schedule("typed", shift_min=2.5) == (2.5, 11.0769, 0.0, 8.0)
    assert schedule("typed_prob", resolution_shift_prob=0.1) == (6.1538, 11.0769, 0.1, 8.0)
    assert schedule("typed_all_but_one", shift_min=2.5, shift_max=4.5, resolution_shift_prob=0.1,
                    sample_shift=3.0) == (2.5, 4.5, 0.1, 3.0)


def test_one_expert_of_wan_2_2_a14b_is_refused_by_the_files_the_graph_loads(host):
    wan = _built(comfy_host.tiny_wan)
    for name in ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_i2v_low_noise_14B_fp16.safetensors",
                 "Wan2.2-T2V-A14B-HighNoise-Q4_K_M.gguf", "sub/wan2_2_t2v_low_noise_14B.safetensors"):
        with pytest.raises(ValueError, match="model: .* is one of Wan 2.2 A14B's two experts"):
            host.checks.require_single_model(wan, ["clip.safetensors", name])
    for name in ("wan2.1_t2v_14B_fp16.safetensors", "wan2.2_ti2v_5B_fp16.safetensors", "wan2.1_t2v_1.3B_fp16.safetensors"):
        host.checks.require_single_model(wan, [name])
    # the name alone is not enough: a Flux file called so is not a Wan expert
    host.checks.require_single_model(_built(comfy_host.tiny_flux), ["wan2.2_t2v_high_noise_14B.safetensors"])

    # the files up the MODEL chain only: not the text encoder's, not a prompt that happens to end so
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_t2v_low_noise_14B.safetensors"}},
              "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "x.safetensors",
                                                                    "strength_model": 1.0}},
              "6": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 8.0}},
              "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5.safetensors", "type": "wan"}},
              "4": {"class_type": "TrainShortcut", "inputs": {"model": ["6", 0], "positive": ["5", 0]}},
              "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "a.safetensors"}}}
    assert host.checks.upstream_files(prompt, "4") == ["x.safetensors", "wan2.2_t2v_low_noise_14B.safetensors"]
    assert host.checks.upstream_files(prompt, "1") == [] and host.checks.upstream_files(prompt, "6") == ["x.safetensors",
                                                                                           "wan2.2_t2v_low_noise_14B.safetensors"]
    assert host.checks.upstream_files(None, "4") == [] and host.checks.upstream_files(prompt, None) == []


TINY_WAN_FILE = dict(comfy_host.TINY_WAN, dim=128, num_heads=1, ffn_dim=128, freq_dim=256, text_dim=4096, num_layers=1)


class TinyWanText:
    """Conditioning of the width Wan's text embedder takes (4096), as its text encoder would give."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "tests"

    def encode(self):
        return ([[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(0)), {}]],)


@pytest.mark.parametrize("file_name, refused", [("wan2.2_t2v_high_noise_14B_fp16.safetensors", True),
                                                ("wan2.1_t2v_1.3B_fp16.safetensors", False)])
def test_the_hosts_executor_hands_the_graph_to_the_nodes_which_refuse_an_expert(host, tmp_path, file_name, refused):
    """A tiny Wan saved under an expert's file name, loaded by the stock UNETLoader: Shortcut Sampler refuses it
    with the reason; under a Wan 2.1 name the same prompt runs."""
    import comfy.supported_models
    import execution
    import nodes
    from safetensors.torch import save_file

    models = tmp_path / "diffusion_models"
    models.mkdir()
    mc = comfy.supported_models.WAN21_T2V(dict(TINY_WAN_FILE))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, device="cpu")
    comfy_host._random_patcher(model, 0, 0.05)
    save_file({k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}, str(models / file_name))

    def n(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}
    prompt = {"1": n("UNETLoader", unet_name=file_name, weight_dtype="default"),
              "2": n("TinyWanText"),
              "3": n("EmptyHunyuanLatentVideo", width=32, height=32, length=1, batch_size=1),
              "4": n("ShortcutSampler", model=["1", 0], positive=["2", 0], latent_image=["3", 0], seed=0, steps=2,
                     shift=8.0, resolution_shift=False, cfg=1.0, denoise=1.0),
              "5": n("SaveLatent", samples=["4", 0], filename_prefix="wan")}
    nodes.NODE_CLASS_MAPPINGS["TinyWanText"] = TinyWanText
    try:
        with comfy_host.host_folders(models={"diffusion_models": models}, output_dir=tmp_path / "output",
                                     temp_dir=tmp_path / "temp"):
            valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("family-test", prompt, None))
            assert valid and not node_errors, (error, node_errors)
            executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)
            executor.execute(prompt, "family-test", {}, outputs)
    finally:
        del nodes.NODE_CLASS_MAPPINGS["TinyWanText"]
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    if refused:
        assert not executor.success and errors and errors[0]["node_id"] == "4"
        assert "is one of Wan 2.2 A14B's two experts" in errors[0]["exception_message"]
    else:
        assert executor.success, errors
        assert any((tmp_path / "output").glob("wan*.latent"))


class _Server:
    client_id, last_node_id = None, None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass

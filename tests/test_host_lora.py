"""LoRA files between the engine and ComfyUI, on a real ComfyUI Flux (tiny widths, CPU, float32).

Every file we write must make ComfyUI's own patching compute what the engine computes with the
LoRA attached through peft: the authors' diffusers format (fused layers split, norm_out's
scale/shift swapped, alpha folded) as much as the host's own key style.
"""

from __future__ import annotations

import os

import pytest
import torch

from shortcut_core import lora_applied
from shortcut_core.adapters import LoraWeights, linear_module_names
from shortcut_core.lora_file import LoraMetadata
from shortcut_core.safetensors_io import write_safetensors_atomic

import comfy_host
from hashing import module_hash

RANK, ALPHA = 4, 2.0  # alpha != rank: a format that drops alpha must fold it, or outputs differ
STRENGTHS = (1.0, 1.5)
RTOL = 1e-5


@pytest.fixture(scope="module")
def host(comfyui):
    return comfy_host.pack_module("host.lora")


@pytest.fixture(scope="module")
def pack_errors(comfyui):
    """The pack's own error classes: ComfyUI loads the engine a second time, as a subpackage of the
    pack, so `shortcut_core.LoraFileError` imported here is a different class from the one raised."""
    return (comfy_host.pack_module("shortcut_core.lora_file").LoraFileError,
            comfy_host.pack_module("shortcut_core.safetensors_io").SafetensorsFileError)


@pytest.fixture(scope="module")
def flux(comfyui):
    model, patcher = comfy_host.tiny_flux(seed=2)
    g = torch.Generator().manual_seed(11)
    inputs = dict(x=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([0.7]),
                  context=torch.randn(1, 6, 32, generator=g), y=torch.randn(1, 16, generator=g),
                  guidance=torch.tensor([3.5]))
    return model, patcher, inputs


@pytest.fixture(scope="module")
def lora(flux):
    """Random, non-zero up and down on every linear of the diffusion model."""
    model, _, _ = flux
    g = torch.Generator().manual_seed(5)
    out = {}
    for name in linear_module_names(model.diffusion_model):
        layer = model.diffusion_model.get_submodule(name)
        out[name] = LoraWeights(torch.randn(RANK, layer.in_features, generator=g) * 0.1,
                                torch.randn(layer.out_features, RANK, generator=g) * 0.1, ALPHA)
    return out


@pytest.fixture(scope="module")
def base_hash(flux):
    return module_hash(flux[0].diffusion_model)


def _output(net, inputs):
    with torch.no_grad():
        return net(inputs["x"], inputs["timestep"], inputs["context"], y=inputs["y"], guidance=inputs["guidance"])


def _patched_output(patcher, inputs):
    """The network output with the patcher's weight patches applied by ComfyUI, then removed again."""
    patcher.patch_model()
    try:
        return _output(patcher.model.diffusion_model, inputs)
    finally:
        patcher.unpatch_model()


def _native_output(model, lora, strength, inputs):
    with lora_applied(model.diffusion_model, lora, strength):
        return _output(model.diffusion_model, inputs)


def _assert_close(got, want):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < RTOL, f"relative error {err:.3g}"


def test_diffusers_flux_file_loads_through_the_host_as_the_engine_applies_it(host, flux, lora, base_hash, tmp_path):
    model, patcher, inputs = flux
    path = tmp_path / "pytorch_lora_weights.safetensors"
    host.save_diffusers_flux(path, lora, model, LoraMetadata(steps=4))

    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
                 "transformer_blocks.0.attn.add_q_proj", "single_transformer_blocks.0.attn.to_q",
                 "single_transformer_blocks.0.proj_mlp", "norm_out.linear"):
        assert f"transformer.{name}.lora_A.weight" in keys and f"transformer.{name}.lora_B.weight" in keys
    assert not [k for k in keys if "alpha" in k]

    base = _output(model.diffusion_model, inputs)
    for strength in STRENGTHS:
        patched, report = host.load_lora_onto(patcher, path, strength)
        assert report.unmatched_keys == [] and report.matched_keys == len(keys)
        assert report.patched_weights == len(lora)
        assert report.metadata.steps == 4
        want = _native_output(model, lora, strength, inputs)
        assert not torch.allclose(want, base, rtol=1e-2)  # the LoRA really changes the output
        _assert_close(_patched_output(patched, inputs), want)
    assert module_hash(model.diffusion_model) == base_hash
    assert not patcher.patches  # the original patcher got nothing: load_lora_onto patches a clone


def test_host_file_and_lora_model_match_the_engine_through_our_loader_and_the_stock_ones(host, flux, lora, base_hash,
                                                                                     tmp_path):
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_train import LoraModelLoader

    model, patcher, inputs = flux
    path = tmp_path / "host.safetensors"
    host.save_host_lora(path, lora, LoraMetadata(steps=3, shift=2.5, strength=1.25))
    lora_model = host.to_lora_model(lora)
    for strength in STRENGTHS:
        want = _native_output(model, lora, strength, inputs)
        ours, report = host.load_lora_onto(patcher, path, strength)
        assert report.unmatched_keys == [] and report.patched_weights == len(lora)
        _assert_close(_patched_output(ours, inputs), want)

        stock, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                                 strength, 0)
        _assert_close(_patched_output(stock, inputs), want)

        (node,) = LoraModelLoader().load_lora_model(patcher, lora_model, strength)
        _assert_close(_patched_output(node, inputs), want)

    meta = report.metadata
    assert (meta.steps, meta.shift, meta.strength) == (3, 2.5, 1.25)
    assert module_hash(model.diffusion_model) == base_hash


def test_lora_model_round_trips_exactly(host, lora):
    sd = host.to_lora_model(lora)
    assert set(sd) == {f"diffusion_model.{p}.{s}" for p in lora for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    alpha = sd["diffusion_model.img_in.alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float32
    back = host.from_lora_model(sd)
    assert set(back) == set(lora)
    for path, w in lora.items():
        assert torch.equal(back[path].down, w.down) and torch.equal(back[path].up, w.up)
        assert back[path].alpha == w.alpha


def test_from_lora_model_names_what_it_cannot_convert(host, lora):
    sd = host.to_lora_model(lora)
    del sd["diffusion_model.img_in.lora_up.weight"]
    with pytest.raises(ValueError, match=r"diffusion_model\.img_in\.lora_up\.weight"):
        host.from_lora_model(sd)
    sd = host.to_lora_model(lora)
    sd["diffusion_model.img_in.diff_b"] = torch.zeros(64)  # TrainLoraNode's bias diffs
    with pytest.raises(ValueError, match=r"diff_b"):
        host.from_lora_model(sd)


def test_junk_keys_are_reported_and_the_rest_loads(host, flux, lora, base_hash, tmp_path):
    model, patcher, inputs = flux
    good = tmp_path / "good.safetensors"
    host.save_host_lora(good, lora)
    from safetensors.torch import load_file
    tensors = load_file(str(good))
    junk = {"text_encoders.clip_l.whatever.lora_up.weight": torch.ones(2, 2),
            "diffusion_model.no_such_layer.lora_down.weight": torch.ones(2, 2),
            "random_junk": torch.zeros(3)}
    path = tmp_path / "junk.safetensors"
    write_safetensors_atomic(path, {**tensors, **junk})

    patched, report = host.load_lora_onto(patcher, path, 1.0)
    assert report.unmatched_keys == sorted(junk)
    assert report.matched_keys == len(tensors) and report.patched_weights == len(lora)
    _assert_close(_patched_output(patched, inputs), _native_output(model, lora, 1.0, inputs))
    assert module_hash(model.diffusion_model) == base_hash


def test_a_file_for_another_architecture_is_refused(host, flux, pack_errors, tmp_path):
    LoraFileError, _ = pack_errors
    _, patcher, _ = flux
    path = tmp_path / "sd15_style.safetensors"
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    write_safetensors_atomic(path, {f"{prefix}.lora_down.weight": torch.ones(4, 320),
                                    f"{prefix}.lora_up.weight": torch.ones(320, 4),
                                    f"{prefix}.alpha": torch.tensor(4.0)})
    with pytest.raises(LoraFileError, match=r"matched nothing.*another architecture") as info:
        host.load_lora_onto(patcher, path, 1.0)
    assert "sd15_style.safetensors" in str(info.value) and prefix in str(info.value)


class _Trap:
    """Unpickling this creates the marker directory: proof that a loader ran pickle code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_renamed_safetensors_is_refused_and_never_unpickled(host, flux, pack_errors, tmp_path, zip_format):
    _, SafetensorsFileError = pack_errors
    _, patcher, _ = flux
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    torch.save({"diffusion_model.img_in.lora_up.weight": _Trap(str(marker))}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(SafetensorsFileError, match="not safetensors"):
        host.load_lora_onto(patcher, path, 1.0)
    assert not marker.exists()
    with open(path, "rb") as f:  # the trap is live: an unpickling loader would have sprung it
        torch.load(f, weights_only=False)  # (a file object: torch reads a *.safetensors path as safetensors)
    assert marker.exists()


def test_bad_strength_and_bad_export_inputs_are_refused(host, flux, lora, tmp_path):
    model, patcher, _ = flux
    path = tmp_path / "host.safetensors"
    host.save_host_lora(path, lora)
    for strength in (float("nan"), float("inf"), "1.0", None, True):
        with pytest.raises(ValueError, match="finite number"):
            host.load_lora_onto(patcher, path, strength)
    with pytest.raises(ValueError, match="Flux"):
        host.flux_diffusers_export_map(patcher)  # a MODEL (patcher), not the Flux BaseModel
    extra = dict(lora, **{"not.a.layer": lora["img_in"]})
    with pytest.raises(ValueError, match=r"not\.a\.layer"):
        host.save_diffusers_flux(tmp_path / "x.safetensors", extra, model)
    assert not (tmp_path / "x.safetensors").exists()


def test_host_key_map_and_export_map_come_from_the_host(host, flux, lora):
    import comfy.utils

    model, _, _ = flux
    assert host.host_key_map({"img_in": lora["img_in"]}) == {"img_in": "diffusion_model.img_in"}
    export = host.flux_diffusers_export_map(model)
    assert set(linear_module_names(model.diffusion_model)) <= set(export)
    qkv = export["double_blocks.0.img_attn.qkv"]
    assert [(n, o) for n, o, _ in qkv] == [("transformer_blocks.0.attn.to_q", (0, 0, 64)),
                                           ("transformer_blocks.0.attn.to_k", (0, 64, 64)),
                                           ("transformer_blocks.0.attn.to_v", (0, 128, 64))]
    ((name, offset, function),) = export["final_layer.adaLN_modulation.1"]
    assert (name, offset, function) == ("norm_out.linear", None, comfy.utils.swap_scale_shift)


# Names newer ComfyUI's flux_to_diffusers (0.38.1) also reads, each listed after the name it repeats: LyCoris
# LoKr names for the MLPs of double blocks and Flux 2 names for a single block's linear1 (whole) and linear2.
NEWER_HOST_ALIASES = {
    "ff.net.0.proj.weight": "ff.linear_in.weight", "ff.net.0.proj.bias": "ff.linear_in.bias",
    "ff.net.2.weight": "ff.linear_out.weight", "ff.net.2.bias": "ff.linear_out.bias",
    "ff_context.net.0.proj.weight": "ff_context.linear_in.weight",
    "ff_context.net.0.proj.bias": "ff_context.linear_in.bias",
    "ff_context.net.2.weight": "ff_context.linear_out.weight", "ff_context.net.2.bias": "ff_context.linear_out.bias",
    "attn.to_q.weight": "attn.to_qkv_mlp_proj.weight",  # in the middle of linear1's four parts
    "proj_out.weight": "attn.to_out.weight",
}


def _with_newer_aliases(flux_to_diffusers):
    def table(mmdit_config, output_prefix=""):
        out = {}
        for key, target in flux_to_diffusers(mmdit_config, output_prefix=output_prefix).items():
            out[key] = target
            block, name = key.split(".")[0], key.split(".", 2)[-1]
            if block in ("transformer_blocks", "single_transformer_blocks") and name in NEWER_HOST_ALIASES:
                whole = target if isinstance(target, str) else target[0]
                out[key[: -len(name)] + NEWER_HOST_ALIASES[name]] = whole
        return out
    return table


def test_diffusers_export_ignores_the_alias_names_of_newer_hosts(host, flux, lora, tmp_path, monkeypatch):
    import comfy.utils
    from safetensors.torch import load_file

    model, _, _ = flux
    plain = host.flux_diffusers_export_map(model)
    host.save_diffusers_flux(tmp_path / "plain.safetensors", lora, model)
    monkeypatch.setattr(comfy.utils, "flux_to_diffusers", _with_newer_aliases(comfy.utils.flux_to_diffusers))
    table = comfy.utils.flux_to_diffusers(model.model_config.unet_config, output_prefix="diffusion_model.")
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight" in table  # the aliases are there
    assert "transformer_blocks.0.ff_context.linear_out.weight" in table

    assert host.flux_diffusers_export_map(model) == plain
    host.save_diffusers_flux(tmp_path / "newer.safetensors", lora, model)
    a, b = load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "newer.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [k for k in b if "linear_in" in k or "to_qkv_mlp_proj" in k or ".attn.to_out.lora_" in k]

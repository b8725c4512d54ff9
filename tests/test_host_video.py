"""Video latents [B, C, T, H, W] on a real ComfyUI: a tiny Wan 2.1 text-to-video model from its own classes."""

from __future__ import annotations

import pytest
import torch

import comfy_host
from hashing import module_hash
from test_host_nodes import node, train_node


@pytest.fixture()
def wan(pack):
    with torch.inference_mode():  # as ComfyUI's executor builds every model
        _, patcher = comfy_host.tiny_wan(seed=1)
    g = torch.Generator().manual_seed(2)
    return patcher, [[torch.randn(1, 16, 32, generator=g), {}]]


def _output(patcher, x, t, context):
    """The network's output with the patcher's weight patches applied by ComfyUI, then removed again."""
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context)
    finally:
        patcher.unpatch_model()


def test_the_token_count_follows_each_networks_own_patch(wan, flux):
    host = comfy_host.pack_module("nodes.host")
    patcher, _ = wan
    assert host.token_count(patcher, (16, 3, 8, 8)) == 3 * 4 * 4  # Wan: (1, 2, 2) over T, H, W
    assert host.token_count(patcher, (16, 3, 9, 9)) == 3 * 5 * 5  # padded to the patch, as its patchify pads
    assert host.token_count(flux[0], (16, 8, 8)) == 16  # Flux: 2 x 2 over H, W


def test_train_shortcut_trains_and_samples_video_and_its_lora_loads_everywhere_alike(wan, lora_dir):
    import comfy.sd
    import comfy.utils
    patcher, positive = wan
    net = patcher.model.diffusion_model
    before = module_hash(net)
    latents = {"samples": torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(3))}
    trained, _, loss, preview, steps, _, _, _ = train_node(patcher, positive, latents, steps=2, preview_every=1,
                                                           save_name="wan_shortcut")
    assert steps == 2 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert module_hash(net) == before  # the shared network is as it was
    assert preview.dim() == 4 and preview.shape[-1] == 3 and preview.shape[1] > 0  # a frame per panel

    (video,) = node("ShortcutSampler").sample(trained, positive, {"samples": torch.zeros(1, 16, 3, 8, 8)}, 0, 3, 3.25,
                                              True, 1.0, 1.0)
    assert video["samples"].shape == (1, 16, 3, 8, 8) and torch.isfinite(video["samples"]).all()

    path = lora_dir / "wan_shortcut.safetensors"
    ours = node("ShortcutLoRALoader").load(patcher, "wan_shortcut.safetensors", 1.0)["result"][0]
    stock, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                             1.0, 0)
    x, t, context = torch.randn(1, 16, 3, 8, 8), torch.tensor([0.7]), positive[0][0]
    want = _output(trained, x, t, context)
    assert not torch.allclose(want, _output(patcher, x, t, context))  # the LoRA does something
    for other in (ours, stock):
        torch.testing.assert_close(_output(other, x, t, context), want, rtol=1e-5, atol=1e-6)
    assert module_hash(net) == before


def test_an_image_into_a_video_model_is_one_frame_and_video_into_an_image_model_is_refused(wan, flux, lora_dir):
    """As the host's own samplers do (fix_empty_latent_channels): [B, C, H, W] into Wan trains as [B, C, 1, H, W]."""
    host = comfy_host.pack_module("nodes.host")
    patcher, positive = wan
    assert host.token_count(patcher, (16, 8, 8)) == 16  # one frame of 4 x 4 patches
    _, _, loss, _, _, _, _, _ = train_node(patcher, positive, {"samples": torch.randn(2, 16, 8, 8)}, steps=1,
                                           save_name="one_frame")
    assert torch.isfinite(torch.tensor(loss["loss"])).all()
    with pytest.raises(ValueError, match=r"latents: this Flux model takes images \[B, C, H, W\], got shape "
                                         r"\(2, 16, 3, 8, 8\)"):
        train_node(flux[0], flux[1], {"samples": torch.randn(2, 16, 3, 8, 8)}, steps=1, save_name="refused")
    with pytest.raises(ValueError, match="latents: the latents have 2 sizes"):
        train_node(patcher, positive, {"samples": [torch.randn(1, 16, 3, 8, 8), torch.randn(1, 16, 2, 8, 8)]}, steps=1,
                   save_name="refused")
    assert not list(lora_dir.glob("refused*"))  # refused before anything was written

"""Video latents [B, C, T, H, W] on a real ComfyUI: a tiny Wan 2.1 text-to-video model from its own classes.

Training, sampling, previews and the saved LoRA through our and the stock loader, for Wan 2.1 and every other
family (Wan 2.2, HunyuanVideo, LTX-Video, ...), are in test_host_families.py."""

from __future__ import annotations

import pytest
import torch

import comfy_host
from test_host_nodes import train_node


@pytest.fixture()
def wan(pack):
    with torch.inference_mode():  # as ComfyUI's executor builds every model
        _, patcher = comfy_host.tiny_wan(seed=1)
    g = torch.Generator().manual_seed(2)
    return patcher, [[torch.randn(1, 16, 32, generator=g), {}]]


def test_the_token_count_follows_each_networks_own_patch(wan, flux):
    families = comfy_host.pack_module("host.families")
    patcher, _ = wan
    assert families.token_count(patcher, (16, 3, 8, 8)) == 3 * 4 * 4  # Wan: (1, 2, 2) over T, H, W
    assert families.token_count(patcher, (16, 3, 9, 9)) == 3 * 5 * 5  # padded to the patch, as its patchify pads
    assert families.token_count(flux[0], (16, 8, 8)) == 16  # Flux: 2 x 2 over H, W


def test_an_image_into_a_video_model_is_one_frame_and_video_into_an_image_model_is_refused(wan, flux, lora_dir):
    """As the host's own samplers do (fix_empty_latent_channels): [B, C, H, W] into Wan trains as [B, C, 1, H, W]."""
    families = comfy_host.pack_module("host.families")
    patcher, positive = wan
    assert families.token_count(patcher, (16, 8, 8)) == 16  # one frame of 4 x 4 patches
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

"""TrainShortcut's gradients through ComfyUI's flow models equal those of an out-of-place reference.

Some of ComfyUI's networks add residuals in place (Flux and HunyuanVideo blocks: `txt += ...`, `x += ...`;
Chroma: `img.addcmul_(...)`; LTX-Video: `x += ...`): plain autograd refuses them and naive block checkpointing
silently gets them wrong. The reference is plain autograd (no checkpointing, no block wrapping) with every tensor
autograd saves copied at the moment it is saved (a saved-tensor hook), so a later in-place add cannot change what
backward reads: the gradients of the same program written out of place, whatever the host's blocks do, with no
host code rewritten. It is valid for every family; for the out-of-place ones (SD3, Wan, Qwen-Image, Lumina 2)
plain autograd must give it too. TrainShortcut's path must give the same gradients with and without gradient
checkpointing, on a model built under inference_mode as ComfyUI builds it.
"""

from __future__ import annotations

import pytest
import torch

import comfy_host
from hashing import module_hash

# Families whose blocks add residuals in place into tensors autograd saved (comfy/ldm/flux/layers.py
# DoubleStreamBlock / SingleStreamBlock, also HunyuanVideo's; chroma/layers.py addcmul_; lightricks/model.py
# BasicTransformerBlock): plain autograd fails on them.
IN_PLACE = {"flux", "hunyuan_video", "chroma", "ltxv"}
# LoRA tensors the loss cannot reach: Qwen-Image's last block's text stream ends there (its text queries,
# attention output and MLP: add_q_proj, to_add_out, txt_mlp.net.0.proj, txt_mlp.net.2; down and up each).
UNREACHED = {"qwen_image": 8}
@pytest.fixture(params=list(comfy_host.FAMILIES))
def setup(request, comfyui):
    comfy_host.load_pack()
    host = comfy_host.pack_module("host.training")
    from shortcut_core import LoraWeights, ShortcutConfig
    from shortcut_core.adapters import linear_module_names

    name = request.param
    family = comfy_host.FAMILIES[name]
    with torch.inference_mode():
        model, patcher = family.build(seed=2, std=0.1)
    positive = family.positive(tokens=6, seed=3)
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(4, *family.latent, generator=g)
    # a student that already moved (B != 0), so that both LoRA factors get gradients
    init = {name: LoraWeights(torch.randn(4, m.in_features, generator=g) * 0.1,
                              torch.randn(m.out_features, 4, generator=g) * 0.1, 4.0)
            for name in linear_module_names(model.diffusion_model)
            for m in [model.diffusion_model.get_submodule(name)]}
    # the guidance draw where the model takes guidance (its conditioning's model inputs, as the trainer decides)
    inputs = model.extra_conds(noise=latents[:1], device=latents.device, cross_attn=positive[0][0], **positive[0][1])
    config = ShortcutConfig(rank=4, alpha=4.0, batch_size=4, steps=1, checkpoint_every=0, max_grad_norm=1e12,
                            learning_rate=1e-3, seed=5, guidance_range=(0.0, 7.5) if "guidance" in inputs else None,
                            t_skip=2, teacher_min_steps=8, teacher_max_steps=8)
    return name, host, patcher, positive, latents, init, config


def _gradients(host, patcher, positive, latents, init, config) -> list[torch.Tensor]:
    """The gradients TrainShortcut's single optimizer step applies, in parameter order (zeros for a parameter
    the loss does not reach, such as the text stream's last MLP in Qwen-Image's last block)."""
    seen: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        seen.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                     for group in optimizer.param_groups for p in group["params"]])

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(record)
    try:
        host.train_in_graph(patcher, latents, positive, None, host.TrainingRun(config=config, init_lora=init))
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def _worst(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest error relative to each reference gradient's own scale; a gradient the reference has none of
    must be none here too."""
    assert len(grads) == len(reference)
    worst = 0.0
    for a, b in zip(grads, reference):
        scale = float(b.abs().max())
        if scale == 0.0:
            assert not a.abs().any()
            continue
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def test_gradients_through_the_host_model_equal_an_out_of_place_reference(setup, monkeypatch):
    name, host, patcher, positive, latents, init, config = setup
    net = patcher.model.diffusion_model
    before = module_hash(net)
    ours = {flag: _gradients(host, patcher, positive, latents, init, config.replace(gradient_checkpointing=flag))
            for flag in (False, True)}

    # The reference: the same step under plain autograd, every saved tensor copied when saved.
    with monkeypatch.context() as m, torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        m.setattr(host, "repeated_blocks", lambda network: [])
        reference = _gradients(host, patcher, positive, latents, init, config.replace(gradient_checkpointing=False))

    # Plain autograd (no clones, no checkpointing): the trap where blocks add in place, the reference elsewhere.
    with monkeypatch.context() as m:
        m.setattr(host, "repeated_blocks", lambda network: [])
        if name in IN_PLACE:
            with pytest.raises(RuntimeError, match="inplace"):
                _gradients(host, patcher, positive, latents, init, config.replace(gradient_checkpointing=False))
        else:
            plain = _gradients(host, patcher, positive, latents, init, config.replace(gradient_checkpointing=False))
            assert _worst(plain, reference) < 1e-5

    unreached = sum(int(not g.abs().any()) for g in reference)
    assert unreached == UNREACHED.get(name, 0), f"{unreached} of {len(reference)} LoRA tensors got no gradient"
    for flag, grads in ours.items():
        worst = _worst(grads, reference)
        print(f"\n{name} gradient_checkpointing={flag}: worst relative error {worst:.2e}")
        assert worst < 1e-5, f"{name} gradient_checkpointing={flag}: worst relative error {worst:.2e}"
    assert module_hash(net) == before

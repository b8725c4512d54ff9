"""TrainShortcut's gradients through ComfyUI's Flux equal those of an out-of-place reference.

ComfyUI's Flux blocks add residuals in place (`txt += ...`, `x += ...`): plain autograd refuses
them and naive block checkpointing silently gets them wrong. The reference is plain autograd (no
checkpointing, no block wrapping) with every tensor autograd saves copied at the moment it is saved
(a saved-tensor hook), so a later in-place add cannot change what backward reads: the gradients of
the same program written out of place, whatever the host's blocks do, with no host code rewritten.
TrainShortcut's path must give the same gradients with and without gradient checkpointing, on a
model built under inference_mode as ComfyUI builds it.
"""

from __future__ import annotations

import pytest
import torch

import comfy_host
from hashing import module_hash


@pytest.fixture()
def setup(comfyui):
    comfy_host.load_pack()
    host = comfy_host.pack_module("nodes.host")
    from shortcut_core import LoraWeights, ShortcutConfig
    from shortcut_core.adapters import linear_module_names

    with torch.inference_mode():
        model, patcher = comfy_host.tiny_flux(seed=2, std=0.1)
    g = torch.Generator().manual_seed(4)
    positive = [[torch.randn(1, 6, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g),
                                                         "guidance": 3.5}]]
    latents = torch.randn(4, 16, 8, 8, generator=g)
    # a student that already moved (B != 0), so that both LoRA factors get gradients
    init = {name: LoraWeights(torch.randn(4, m.in_features, generator=g) * 0.1,
                              torch.randn(m.out_features, 4, generator=g) * 0.1, 4.0)
            for name in linear_module_names(model.diffusion_model)
            for m in [model.diffusion_model.get_submodule(name)]}
    config = ShortcutConfig(rank=4, alpha=4.0, batch_size=4, steps=1, checkpoint_every=0, max_grad_norm=1e12,
                            learning_rate=1e-3, seed=5, guidance_range=(0.0, 7.5), t_skip=2, teacher_min_steps=8,
                            teacher_max_steps=8)
    return host, patcher, positive, latents, init, config


def _gradients(host, patcher, positive, latents, init, config) -> list[torch.Tensor]:
    """The gradients TrainShortcut's single optimizer step applies, in parameter order."""
    seen: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        seen.append([p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]])

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(record)
    try:
        host.train(patcher, latents, positive, None, host.TrainingRun(config=config, init_lora=init))
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_gradients_through_host_flux_equal_an_out_of_place_reference(setup, monkeypatch):
    host, patcher, positive, latents, init, config = setup
    net = patcher.model.diffusion_model
    before = module_hash(net)
    ours = {flag: _gradients(host, patcher, positive, latents, init, config.replace(gradient_checkpointing=flag))
            for flag in (False, True)}

    # The trap: the host's blocks under plain autograd (no clones, no checkpointing) fail outright.
    with monkeypatch.context() as m:
        m.setattr(host, "repeated_blocks", lambda network: [])
        with pytest.raises(RuntimeError, match="inplace"):
            _gradients(host, patcher, positive, latents, init, config.replace(gradient_checkpointing=False))

    # The reference: the same step under plain autograd, every saved tensor copied when saved.
    with monkeypatch.context() as m, torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        m.setattr(host, "repeated_blocks", lambda network: [])
        reference = _gradients(host, patcher, positive, latents, init, config.replace(gradient_checkpointing=False))

    assert len(reference) == len(ours[False]) and sum(int(g.abs().sum() > 0) for g in reference) == len(reference)
    for flag, grads in ours.items():
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads, reference))
        print(f"\ngradient_checkpointing={flag}: worst relative error {worst:.2e}")
        assert worst < 1e-5, f"gradient_checkpointing={flag}: worst relative error {worst:.2e}"
    assert module_hash(net) == before

"""The engine on a real ComfyUI Flux (ComfyUI's own classes, tiny widths), in-process on the CPU.

These prove that shortcut_core needs nothing ComfyUI-specific: peft adapters inject into
ComfyUI's ops.Linear layers, the teacher role is the base network bit for bit, a training run
with per-item guidance changes only the adapters, and ComfyUI's stock sampler gives the same
samples afterwards as before.
"""

from __future__ import annotations

import pytest
import torch

from shortcut_core import ShortcutConfig, ShortcutTrainer, lora_applied
from shortcut_core.adapters import EMA_FAST, EMA_SLOW, STUDENT, TEACHER, ShortcutAdapters

import comfy_host
from hashing import module_hash


def _flux_velocity(model, context: torch.Tensor, pooled: torch.Tensor):
    """v = f(x, t, guidance=...) straight from the network output (ComfyUI's sampler sees x - t v)."""
    def velocity(x, t, guidance=None, **_):
        n = x.shape[0]
        g = guidance if guidance is not None else torch.full((n,), 3.5)
        return model.diffusion_model(x, model.model_sampling.timestep(t), context.expand(n, -1, -1),
                                     y=pooled.expand(n, -1), guidance=g)
    return velocity


@pytest.fixture()
def flux(comfyui):
    model, patcher = comfy_host.tiny_flux(seed=1)
    g = torch.Generator().manual_seed(7)
    context = torch.randn(1, 6, 32, generator=g)
    pooled = torch.randn(1, 16, generator=g)
    return model, patcher, context, pooled


def _stock_sample(patcher, context, pooled, seed=3):
    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    pos = [[context, {"pooled_output": pooled, "guidance": 3.5}]]
    neg = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled)}]]
    return comfy.sample.sample(patcher, noise, 4, 1.0, "euler", "simple", pos, neg, latent, disable_pbar=True, seed=seed)


def test_adapters_inject_into_comfy_flux_and_teacher_is_the_base_exactly(flux):
    model, _, context, pooled = flux
    velocity = _flux_velocity(model, context, pooled)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        before = velocity(x, t)
    net = model.diffusion_model
    with ShortcutAdapters(net, rank=4, alpha=4, generator=torch.Generator().manual_seed(0)) as adapters:
        wrapped = [n for n, m in net.named_modules() if hasattr(m, "lora_A")]
        assert any("img_attn.qkv" in n for n in wrapped) and any("linear1" in n for n in wrapped)
        with torch.no_grad():
            for p in adapters.parameters(STUDENT):  # make the student differ from the base
                p.add_(0.1)
            with adapters.use(TEACHER):
                teacher = velocity(x, t)
            with adapters.use(STUDENT):
                student = velocity(x, t)
            for role in (EMA_SLOW, EMA_FAST):  # zero-initialised EMAs start as the base model
                with adapters.use(role):
                    assert torch.equal(velocity(x, t), before)
    assert torch.equal(teacher, before)
    assert not torch.allclose(student, before)


def test_training_on_comfy_flux_leaves_the_model_and_stock_sampling_unchanged(flux):
    model, patcher, context, pooled = flux
    net = model.diffusion_model
    before_hash = module_hash(net)
    before_samples = _stock_sample(patcher, context, pooled)
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    cfg = ShortcutConfig(rank=4, alpha=4, batch_size=2, steps=3, learning_rate=1e-3, checkpoint_every=0,
                         gradient_checkpointing=True, guidance_range=(0.0, 7.5))
    calls: list[tuple[bool, torch.Tensor]] = []  # (is the student's pass, guidance)
    inner = _flux_velocity(model, context, pooled)

    def velocity(x, t, guidance=None, **extra):
        calls.append((torch.is_grad_enabled(), guidance.detach().clone()))
        return inner(x, t, guidance=guidance, **extra)

    with ShortcutTrainer(net, velocity, latents, cfg, blocks=list(net.double_blocks) + list(net.single_blocks)) as trainer:
        result = trainer.run(progress=False)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    # guidance is drawn per item in [0, 7.5); each step's target passes (no grad, run first, on
    # subsets of the batch) see only the values its student pass (with grad, whole batch) sees
    student_calls = [i for i, (grad, _) in enumerate(calls) if grad]
    assert len(student_calls) == 3
    start = 0
    for i in student_calls:
        student_g = calls[i][1]
        assert student_g.shape == (2,) and bool(((student_g >= 0) & (student_g < 7.5)).all())
        assert i > start  # at least one target pass before the student's
        for _, g in calls[start:i]:
            assert all(bool((student_g == v).any()) for v in g)
        start = i + 1
    assert len({tuple(calls[i][1].tolist()) for i in student_calls}) == 3  # a fresh draw every step
    moved = [w for w in result.lora.values() if w.up.abs().sum() > 0]
    assert moved, "the student LoRA did not train"

    assert module_hash(net) == before_hash
    assert not any(hasattr(m, "lora_A") for m in net.modules())
    assert torch.equal(_stock_sample(patcher, context, pooled), before_samples)

    with lora_applied(net, result.lora, strength=1.0):
        x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            shortcut = inner(x, torch.tensor([0.5]))
    with torch.no_grad():
        base = inner(x, torch.tensor([0.5]))
    assert not torch.equal(shortcut, base)
    assert module_hash(net) == before_hash

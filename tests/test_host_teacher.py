"""TrainShortcut on a tiny pre-trained Flux teacher lowers its 3-step error (the must-show figure).

The teacher is ComfyUI's own Flux class at tiny widths, pre-trained here with plain flow
matching on a four-mode latent distribution (a few seconds on a CPU). Its error is the RMSE of
3-step samples to its own 64-step samples from the same noise, both through ShortcutSampler.
"""

from __future__ import annotations

import pytest
import torch

import comfy_host
from hashing import module_hash
from test_host_nodes import train_node

SHIFT = 1.0  # 16 tokens: the uniform schedule (Flux's 3.25 is for 4096)


def _pretrain(model, steps: int = 300, batch: int = 32) -> None:
    from shortcut_core.activation_checkpointing import checkpoint_blocks

    net = model.diffusion_model
    g = torch.Generator().manual_seed(0)
    modes = torch.randn(4, 16, 8, 8, generator=g)
    context, pooled = torch.zeros(1, 6, 32), torch.zeros(1, 16)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(steps):
        x0 = modes[torch.randint(4, (batch,), generator=g)] + 0.1 * torch.randn(batch, 16, 8, 8, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.rand(batch, generator=g)
        x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        with checkpoint_blocks(list(net.double_blocks) + list(net.single_blocks), recompute=False):
            v = net(x_t, t, context.expand(batch, -1, -1), y=pooled.expand(batch, -1), guidance=torch.full((batch,), 3.5))
            loss = torch.nn.functional.mse_loss(v, noise - x0)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    for p in net.parameters():
        p.requires_grad_(False)


@pytest.fixture(scope="module")
def teacher(comfyui):
    comfy_host.load_builtin_nodes()
    comfy_host.load_pack()
    model, patcher = comfy_host.tiny_flux(seed=0, std=0.02)
    _pretrain(model)
    positive = [[torch.zeros(1, 6, 32), {"pooled_output": torch.zeros(1, 16), "guidance": 3.5}]]
    return patcher, positive


def _samples(patcher, positive, steps: int, seed: int = 100, count: int = 32, shift: float = SHIFT) -> torch.Tensor:
    import nodes
    sampler = nodes.NODE_CLASS_MAPPINGS["ShortcutSampler"]()
    (out,) = sampler.sample(patcher, positive, {"samples": torch.zeros(count, 16, 8, 8)}, seed, steps, shift, False,
                            1.0, 1.0)
    return out["samples"]


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def test_train_shortcut_lowers_the_teachers_three_step_error(teacher, tmp_path):
    patcher, positive = teacher
    net = patcher.model.diffusion_model
    before_hash = module_hash(net)
    reference = _samples(patcher, positive, 64)
    before = _rmse(_samples(patcher, positive, 3), reference)

    # data-free, as workflow (c): the teacher's own samples are the training latents
    data = {"samples": _samples(patcher, positive, 32, seed=7, count=64)}
    # tiny-model settings (rank, lr, faster EMAs, more teacher items) for a 300-step run; the rest are defaults
    with comfy_host.host_folders(loras=tmp_path):
        model, lora, loss, _, steps, _, _, _ = train_node(
            patcher, positive, data, steps=300, batch_size=32, learning_rate=1e-3, rank=16, alpha=16.0,
            teacher_ratio=0.7, checkpoint_every=0, save_name="teacher_test", shift_min=SHIFT, shift_max=SHIFT,
            resolution_shift_prob=0.0, guidance_min=3.5, guidance_max=3.5, ema_slow_decay=0.99,
            ema_fast_decay=0.9, gradient_checkpointing=False, sample_shift=SHIFT, calibrate=True)
        from shortcut_core import load_lora
        from shortcut_core.calibration import Calibration
        calibration = Calibration.from_dict(load_lora(tmp_path / "teacher_test.safetensors").metadata.calibration)
    assert module_hash(net) == before_hash  # training left the teacher's weights bit for bit
    # The node's MODEL carries the LoRA at the calibrated strength; ShortcutSampler at the calibrated shift.
    chosen, _ = calibration.best
    after = _rmse(_samples(model, positive, 3, shift=chosen.shift), reference)
    print(f"\n3-step RMSE to the teacher's 64-step samples: teacher {before:.4f}, shortcut {after:.4f} "
          f"({before / after:.2f}x); loss {loss['loss'][0]:.4f} -> {loss['loss'][-1]:.4f}\n{calibration.text()}")
    assert after < 0.8 * before

    # A poorer recipe is never chosen over a better one: the chosen one against its neighbours (strength 1 and
    # +-0.5 at its shift, the shift x/1.5 and x1.5 at its strength), measured again through the nodes.
    host_lora = comfy_host.pack_module("host.lora")
    recipes = {(s, chosen.shift) for s in (1.0, chosen.strength - 0.5, chosen.strength, chosen.strength + 0.5) if s > 0}
    recipes |= {(chosen.strength, chosen.shift * f) for f in (1 / 1.5, 1.5)}
    by_recipe = {(s, h): _rmse(_samples(host_lora.with_lora(patcher, lora, s), positive, 3, shift=h), reference)
                 for s, h in sorted(recipes)}
    print("independent 3-step RMSE by (strength, shift):", by_recipe)
    assert by_recipe[(chosen.strength, chosen.shift)] <= 1.05 * min(by_recipe.values())
    # Sampling the LoRA model made the host write patched weights into the shared network, as it
    # does for any LoRA; unloading it puts the teacher's weights back.
    import comfy.model_management
    comfy.model_management.unload_all_models()
    assert module_hash(net) == before_hash

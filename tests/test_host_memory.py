"""TrainShortcut's memory plan on a real ComfyUI: predicted before any weight moves, checked against the bytes
a real training run allocates, shown in the node, and a run that cannot fit refused with settings that would."""

from __future__ import annotations

import pytest
import torch

import comfy_host
from test_host_nodes import node, train_node

SMALL = dict(hidden_size=256, num_heads=4, axes_dim=[16, 24, 24], depth=1, depth_single_blocks=2, context_in_dim=128,
             vec_in_dim=64)


def _small_flux_bf16():
    """A small Flux (width 256) computing in bf16, as Flux runs on a GPU (the plan's coefficients are for that)."""
    with torch.inference_mode():
        _, patcher = comfy_host.tiny_flux(seed=0, std=0.02, weight_dtype=torch.bfloat16, compute_dtype=torch.bfloat16,
                                          **SMALL)
    return patcher


@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_plan_is_within_ten_percent_of_a_real_runs_allocations(pack, lora_dir, monkeypatch, checkpointing):
    from benchmarks.flux_memory import LiveBytes, gpu_attention
    host = comfy_host.pack_module("nodes.host")
    patcher = _small_flux_bf16()
    positive = comfy_host.flux_positive(patcher, tokens=32)
    latents = {"samples": torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(1))}
    plans = []
    check = host.check_memory
    monkeypatch.setattr(host, "check_memory", lambda *a, **k: plans.append(check(*a, **k)) or plans[-1])
    counter = LiveBytes()
    with gpu_attention(), counter:
        train_node(patcher, positive, latents, steps=1, batch_size=2, rank=8, gradient_checkpointing=checkpointing,
                   checkpoint_every=0)
    [plan] = plans
    predicted = plan.lora_state + plan.activations + plan.casts  # the weights predate the run
    print(f"\ncheckpointing={checkpointing}: planned {predicted / 2**20:.1f} MiB, allocated {counter.peak / 2**20:.1f} MiB")
    assert abs(predicted / counter.peak - 1) < 0.10


def test_a_run_that_cannot_fit_is_refused_before_loading_with_settings_that_would(flux, lora_dir, monkeypatch):
    import comfy.model_management
    host = comfy_host.pack_module("nodes.host")
    patcher, positive = flux
    latents = {"samples": torch.randn(4, 16, 32, 32)}
    plans = []
    check = host.check_memory
    monkeypatch.setattr(host, "check_memory", lambda *a, **k: plans.append(check(*a, **k)) or plans[-1])
    train_node(patcher, positive, latents, steps=1, batch_size=8, rank=16)  # a CPU: shown, not enforced
    needed = plans[-1].total
    loads = []
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(host, "available_memory", lambda device: int(needed * 0.9))  # a GPU with less free
    with pytest.raises(ValueError, match=r"training needs about .* GB on .* but .* GB are free \(plan: .*\)\. Change "
                                         r"batch_size 8 -> \d+ \(grad_accum_steps 1 -> \d+\): .* GB; or rank 16 -> "):
        train_node(patcher, positive, latents, steps=1, batch_size=8, rank=16, save_name="refused")
    assert not loads and not list(lora_dir.glob("refused*"))  # nothing loaded, nothing written
    monkeypatch.setattr(host, "available_memory", lambda device: needed * 2)
    train_node(patcher, positive, latents, steps=1, batch_size=8, rank=16, save_name="fits")
    assert (lora_dir / "fits.safetensors").is_file()

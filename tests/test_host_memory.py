"""TrainShortcut's memory plan on a real ComfyUI: predicted before any weight moves, checked against the bytes
a real training run allocates, shown in the node, and a run that cannot fit refused with settings that would."""

from __future__ import annotations

import pytest
import torch

import comfy_host
from hashing import module_hash
from test_host_nodes import train_node

SMALL = dict(hidden_size=256, num_heads=4, axes_dim=[16, 24, 24], depth=1, depth_single_blocks=2, context_in_dim=128,
             vec_in_dim=64)


@pytest.fixture()
def plans(pack, monkeypatch):
    """Every memory plan TrainShortcut makes, in order."""
    training = comfy_host.pack_module("host.training")
    made = []
    check = training.check_memory
    monkeypatch.setattr(training, "check_memory", lambda *a, **k: made.append(check(*a, **k)) or made[-1])
    return made


def _small_flux_bf16():
    """A small Flux (width 256) computing in bf16, as Flux runs on a GPU (the plan's coefficients are for that)."""
    with torch.inference_mode():
        _, patcher = comfy_host.tiny_flux(seed=0, std=0.02, weight_dtype=torch.bfloat16, compute_dtype=torch.bfloat16,
                                          **SMALL)
    return patcher


@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_plan_is_within_ten_percent_of_a_real_runs_allocations(pack, lora_dir, plans, checkpointing):
    from benchmarks.flux_memory import LiveBytes, gpu_attention
    patcher = _small_flux_bf16()
    positive = comfy_host.flux_positive(patcher, tokens=32)
    latents = {"samples": torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(1))}
    counter = LiveBytes()
    with gpu_attention(), counter:
        train_node(patcher, positive, latents, steps=1, batch_size=2, rank=8, gradient_checkpointing=checkpointing,
                   checkpoint_every=0)
    [plan] = plans
    predicted = plan.lora_state + plan.activations + plan.casts  # the weights predate the run
    print(f"\ncheckpointing={checkpointing}: planned {predicted / 2**20:.1f} MiB, allocated {counter.peak / 2**20:.1f} MiB")
    assert abs(predicted / counter.peak - 1) < 0.10


def test_a_run_that_cannot_fit_is_refused_before_loading_with_settings_that_would(flux, lora_dir, plans, monkeypatch):
    import comfy.model_management
    memory = comfy_host.pack_module("host.memory")
    patcher, positive = flux
    latents = {"samples": torch.randn(4, 16, 32, 32)}
    train_node(patcher, positive, latents, steps=1, batch_size=8, rank=16)  # a CPU: shown, not enforced
    needed = plans[-1].needed
    loads = []
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(memory, "available_memory", lambda device: int(needed * 0.9))  # a GPU with less free
    with pytest.raises(ValueError, match=r"training needs about .* GB on .* but .* GB are free \(plan: .*\)\. Change "
                                         r"batch_size 8 -> \d+ \(grad_accum_steps 1 -> \d+\): .* GB; or rank 16 -> "):
        train_node(patcher, positive, latents, steps=1, batch_size=8, rank=16, save_name="refused")
    assert not loads and not list(lora_dir.glob("refused*"))  # nothing loaded, nothing written
    monkeypatch.setattr(memory, "available_memory", lambda device: needed * 2)
    train_node(patcher, positive, latents, steps=1, batch_size=8, rank=16, save_name="fits")
    assert (lora_dir / "fits.safetensors").is_file()


def test_a_refusal_names_the_memory_modes_and_the_modes_fit(flux, lora_dir, plans, monkeypatch):
    import comfy.model_management
    memory = comfy_host.pack_module("host.memory")
    patcher, positive = flux
    latents = {"samples": torch.randn(4, 16, 32, 32)}
    train_node(patcher, positive, latents, steps=1, batch_size=2, rank=16, save_name="sized")
    plan = plans[-1]
    loads = []
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda *a, **k: loads.append(k))
    # less than the model needs, more than two blocks in flight take (the tiny model's
    # double-stream block holds 40% of its weights)
    monkeypatch.setattr(memory, "available_memory", lambda device: int(plan.needed - plan.weights // 10))
    with pytest.raises(ValueError) as refused:
        train_node(patcher, positive, latents, steps=1, batch_size=2, rank=16, save_name="refused")
    message = str(refused.value)
    for mode in ("offload_optimizer on", "lora_layers blocks", "stream_weights on ("):
        assert mode in message
    assert not loads
    # streaming fits where the full model does not, and says how much it streams
    said = []
    monkeypatch.setattr(comfy_host.pack_module("host.progress").Progress, "say", lambda self, text: said.append(text))
    monkeypatch.setattr(memory, "stream_headroom", lambda: 0)
    # ComfyUI keeps at least 128 MiB of a partially loaded model: more than this whole tiny model
    monkeypatch.setattr(comfy_host.pack_module("shortcut_core.memory_plan"), "STREAM_MIN_RESIDENT", 0)
    train_node(patcher, positive, latents, steps=1, batch_size=2, rank=16, save_name="streamed", stream_weights=True)
    assert {"force_full_load": False} in loads  # the host places what fits (then its sampler loads as usual)
    assert any("streamed from RAM" in text for text in said) and plans[-1].streamed > 0
    assert plans[-1].fits(plan.needed - plan.weights // 10)


def test_lora_layers_blocks_trains_no_modulation_and_the_plan_counts_less(flux, lora_dir, plans):
    patcher, positive = flux
    latents = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    _, every, _, _, _, _, _, _ = train_node(patcher, positive, latents, steps=1)
    _, blocks, _, _, _, _, _, _ = train_node(patcher, positive, latents, steps=1, lora_layers="blocks")
    layers = {k.rsplit(".lora_", 1)[0] for k in blocks if ".lora_" in k}
    assert layers and all(k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks."))
                          for k in layers)
    assert not any("_mod." in k or "modulation" in k for k in layers)
    assert layers < {k.rsplit(".lora_", 1)[0] for k in every if ".lora_" in k}
    fan = {name: sum(v.shape[1] + lora[k.replace("lora_down", "lora_up")].shape[0] for k, v in lora.items()
                     if k.endswith(".lora_down.weight")) for name, lora in (("all", every), ("blocks", blocks))}
    assert plans[1].lora_state * fan["all"] == plans[0].lora_state * fan["blocks"]


def test_streamed_weights_train_the_same_lora(pack, lora_dir, monkeypatch):
    """What ComfyUI does on a GPU with too little free memory, done here with its own API on a CPU: half of the
    weights are partially unloaded (comfy_cast_weights: copied in at every forward). The LoRA is bit-identical
    to a fully loaded run's, the host reserved the run's memory while placing weights, and the model is
    left as it was."""
    import comfy.model_management
    latents = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    results, streamed, reserved = [], [], []
    load = comfy.model_management.load_models_gpu

    def load_partially(models, *args, force_full_load=False, **kwargs):
        load(models, *args, force_full_load=force_full_load, **kwargs)
        reserved.append(comfy.model_management.EXTRA_RESERVED_VRAM)
        if not force_full_load:
            for m in models:
                m.partially_unload(m.offload_device, memory_to_free=m.model_size() // 2)
                streamed.append(sum(getattr(x, "comfy_cast_weights", False) for x in m.model.modules()))

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", load_partially)
    said = []
    monkeypatch.setattr(comfy_host.pack_module("host.progress").Progress, "say", lambda self, text: said.append(text))
    copied = []
    streamer = comfy_host.pack_module("shortcut_core.block_streaming").BlockStreamer
    close = streamer.close
    monkeypatch.setattr(streamer, "close", lambda self: (copied.append(self.copied_bytes), close(self)))
    before = comfy.model_management.EXTRA_RESERVED_VRAM
    for stream in (False, True):
        with torch.inference_mode():
            _, patcher = comfy_host.tiny_flux(seed=1)
        net = patcher.model.diffusion_model
        original = module_hash(net)
        positive = comfy_host.flux_positive(patcher, tokens=6, seed=7)
        _, lora, _, _, _, _, _, _ = train_node(patcher, positive, latents, steps=3, stream_weights=stream,
                                               save_name=f"stream_{stream}")
        results.append(lora)
        assert module_hash(net) == original
    assert streamed and min(streamed) > 0  # the host left layers in RAM ...
    # ... and the trainer streamed their blocks whole, a block ahead, instead of the host's copies per op
    assert any(text.startswith("streaming ") and " blocks from RAM" in text for text in said)
    assert copied and copied[-1] > 0
    assert max(reserved) > before == comfy.model_management.EXTRA_RESERVED_VRAM  # raised while placing, restored
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k

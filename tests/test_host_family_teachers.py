"""TrainShortcut lowers a tiny pre-trained teacher's few-step error beyond Flux: on a video model (Wan 2.1
text-to-video, latents [B, 16, T, H, W]) and on non-Flux image models (Qwen-Image, Lumina 2).

test_host_teacher.py shows the must-show figure for Flux; this is the same measurement for other families. Each
teacher is ComfyUI's own model class at tiny widths (comfy_host.FAMILIES), pre-trained here with plain flow
matching on a four-mode latent distribution through the host's own BaseModel.apply_model, its inputs made by
the host's conditioning pipeline (encode_model_conds, each COND's process_cond) as its samplers make them, so any
family's extra inputs (pooled vectors, masks, guidance) reach the network as in sampling. Its error is the RMSE
of few-step samples to its own 64-step samples from the same noise, both through ShortcutSampler; TrainShortcut
then trains data-free on the teacher's own 32-step samples and the LoRA, at the node's calibrated strength and
shift, must cut that error to under 0.8x.

The families' own sampling shifts (Wan 8, Qwen-Image 1.15, Lumina 2 6) are for thousands of tokens; with 16-48
tokens teacher and student both use the uniform schedule (shift 1), as test_host_teacher.py does. SHORTCUT_FLOW_TEACHER_SEED=<n> reruns everything (teacher init, modes,
pre-training draws, noises, training seed) with other seeds, to check that the margin is not luck.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import pytest
import torch

import comfy_host
from hashing import module_hash
from test_host_nodes import train_node

SEED = int(os.environ.get("SHORTCUT_FLOW_TEACHER_SEED", "0"))
SHIFT = 1.0  # 16-48 tokens: the uniform schedule, for teacher and student alike
STEPS = 3  # the few-step count measured (and the LoRA's sample_steps)


class Case(NamedTuple):
    family: str                    # a key of comfy_host.FAMILIES
    latent: tuple[int, ...]        # one item [C, (T,) H, W]
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    train: dict                    # TrainShortcut inputs and knobs for a tiny model; the rest are defaults


# Settings sized for under a minute per family on a 2-core CPU (see the figures the test prints).
TRAIN = dict(steps=200, batch_size=16, learning_rate=2e-3, rank=16, alpha=16.0)
CASES = [
    # video: 3 latent frames (9 video frames) of 8 x 8, (1, 2, 2) patches: 48 tokens
    Case("wan2.1", (16, 3, 8, 8), 300, 16, 3e-3, TRAIN),
    # image: Qwen-Image takes one-frame video latents [B, 16, 1, H, W]: 16 tokens
    Case("qwen_image", (16, 1, 8, 8), 300, 16, 3e-3, TRAIN),
    # image: Lumina 2 (NextDiT with its noise and caption refiners) on image latents [B, 16, H, W]: 16 tokens
    Case("lumina2", (16, 8, 8), 300, 16, 3e-3, TRAIN),
]


def model_inputs(model, positive, batch: int, latent: tuple[int, ...]) -> dict:
    """apply_model's keyword inputs (c_crossattn, y, attention_mask, ...) for `batch` items of `latent` under one
    conditioning, made as the host's samplers make them (convert_cond, encode_model_conds, process_cond)."""
    import comfy.sampler_helpers
    import comfy.samplers

    device = torch.device("cpu")
    conds = comfy.sampler_helpers.convert_cond(positive)
    conds = comfy.samplers.encode_model_conds(model.extra_conds, conds, torch.zeros(batch, *latent), device, "positive")
    return {name: cond.process_cond(batch_size=batch, device=device, area=None).cond
            for name, cond in conds[0]["model_conds"].items()}


def norms_at_their_usual_init(network: torch.nn.Module) -> None:
    """Norm layers' scales 1 and shifts 0, as torch initialises them (the tiny builders fill every weight with
    small random numbers, as a checkpoint would fill ComfyUI's empty ones): q/k norms of scale ~0.02 flatten
    attention, and pre-training from there gave a teacher that trained its shortcut less reliably across seeds."""
    with torch.no_grad():
        for module in network.modules():
            if "norm" in type(module).__name__.lower():
                for name, p in module.named_parameters(recurse=False):
                    p.fill_(1.0 if name == "weight" else 0.0)


def pretrain(model, positive, latent: tuple[int, ...], *, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    """Plain flow matching of any ComfyUI flow model on four random modes (+ 0.1 noise) of `latent`: the velocity
    (x_t - denoised) / sigma of BaseModel.apply_model against noise - x0. The network's repeated blocks run on
    copies of their inputs (some ComfyUI blocks add residuals in place, which autograd refuses). Returns the
    losses; leaves the weights frozen."""
    from shortcut_core.activation_checkpointing import checkpoint_blocks

    families = comfy_host.pack_module("host.families")
    net = model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    modes = torch.randn(4, *latent, generator=g)
    inputs = model_inputs(model, positive, batch, latent)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    each = (-1,) + (1,) * len(latent)
    losses = []
    for _ in range(steps):
        x0 = modes[torch.randint(4, (batch,), generator=g)] + 0.1 * torch.randn(batch, *latent, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        sigma = (torch.rand(batch, generator=g) * 0.999 + 0.001).view(each)  # not 0: the velocity divides by it
        x_t = (1 - sigma) * x0 + sigma * noise
        with checkpoint_blocks(families.repeated_blocks(net), recompute=False):
            denoised = model.apply_model(x_t, sigma.flatten(), **inputs)
            loss = torch.nn.functional.mse_loss((x_t - denoised) / sigma, noise - x0)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for p in net.parameters():
        p.requires_grad_(False)
    return losses


def _samples(patcher, positive, latent, steps: int, *, seed: int, count: int = 32,
             shift: float = SHIFT) -> torch.Tensor:
    import nodes
    sampler = nodes.NODE_CLASS_MAPPINGS["ShortcutSampler"]()
    (out,) = sampler.sample(patcher, positive, {"samples": torch.zeros(count, *latent)}, seed, steps, shift, False,
                            1.0, 1.0)
    return out["samples"]


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def _mean(values) -> float:
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.family for c in CASES])
def test_train_shortcut_lowers_a_pretrained_teachers_few_step_error(case, pack, tmp_path, monkeypatch):
    import comfy.model_management
    import comfy.utils

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_ENABLED", False)  # no bars for hundreds of steps in -s output
    family = comfy_host.FAMILIES[case.family]
    model, patcher = family.build(seed=SEED, std=0.02)
    norms_at_their_usual_init(model.diffusion_model)
    # a fixed conditioning: zeros of the family's context width, with its other entries (a mask, ...)
    positive = [[torch.zeros_like(context), options] for context, options in family.positive(6, SEED)]
    started = time.perf_counter()
    pretrain_losses = pretrain(model, positive, case.latent, steps=case.pretrain_steps, batch=case.pretrain_batch,
                               lr=case.pretrain_lr, seed=SEED)
    pretrain_s = time.perf_counter() - started

    net = model.diffusion_model
    before_hash = module_hash(net)
    reference = _samples(patcher, positive, case.latent, 64, seed=100 + SEED)
    assert reference.shape == (32, *case.latent)
    before = _rmse(_samples(patcher, positive, case.latent, STEPS, seed=100 + SEED), reference)
    # data-free, as workflow (c): the teacher's own samples are the training latents
    data = {"samples": _samples(patcher, positive, case.latent, 32, seed=7 + SEED, count=64)}
    started = time.perf_counter()
    with comfy_host.host_folders(loras=tmp_path):
        trained, _, loss, _, steps, _, sample_steps, sample_shift = train_node(
            patcher, positive, data, **case.train, seed=SEED, teacher_ratio=0.7, checkpoint_every=0,
            save_name=f"{case.family}_teacher_test", shift_min=SHIFT, shift_max=SHIFT, resolution_shift_prob=0.0,
            sample_shift=SHIFT, sample_steps=STEPS, ema_slow_decay=0.99, ema_fast_decay=0.9,
            gradient_checkpointing=False, calibrate=True)
        train_s = time.perf_counter() - started
        from shortcut_core import load_lora
        from shortcut_core.calibration import Calibration
        written = load_lora(tmp_path / f"{case.family}_teacher_test.safetensors").metadata
        calibration = Calibration.from_dict(written.calibration)
    assert steps == case.train["steps"] and sample_steps == STEPS
    assert module_hash(net) == before_hash  # training left the teacher's weights bit for bit
    chosen, _ = calibration.best
    assert sample_shift == pytest.approx(chosen.shift)  # the node's sample_shift output is the file's recipe

    # The node's MODEL carries the LoRA at the calibrated strength; ShortcutSampler at its calibrated shift.
    after = _rmse(_samples(trained, positive, case.latent, STEPS, shift=sample_shift, seed=100 + SEED), reference)
    print(f"\n{case.family} {list(case.latent)} seed {SEED}: {STEPS}-step RMSE to the teacher's 64-step samples: "
          f"teacher {before:.4f}, shortcut {after:.4f} (ratio {after / before:.3f}, at shift {sample_shift:.3g}); "
          f"pre-training loss {_mean(pretrain_losses[:10]):.3f} -> {_mean(pretrain_losses[-10:]):.3f} "
          f"({pretrain_s:.1f} s), TrainShortcut loss {_mean(loss['loss'][:10]):.4f} -> "
          f"{_mean(loss['loss'][-10:]):.4f} ({train_s:.1f} s)\n{calibration.text().splitlines()[0]}")
    assert after < 0.8 * before

    # Sampling the LoRA model made the host write patched weights into the shared network, as it does for any
    # LoRA; unloading it puts the teacher's weights back.
    comfy.model_management.unload_all_models()
    assert module_hash(net) == before_hash

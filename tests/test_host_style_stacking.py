"""A shortcut LoRA stacked with a style LoRA: which of two ways to train the shortcut follows the styled model.

Users put speed LoRAs on top of style LoRAs. On a tiny pre-trained Flux teacher (ComfyUI's own class at tiny
widths, pre-trained with plain flow matching on four modes, as test_host_family_teachers.py does), this test
makes a *style* LoRA: a plain flow-matching LoRA (TrainShortcut with non_shortcut_ratio 1: every item gets the
target noise - x0, no shortcut items, calibrate off) on the teacher's own samples moved by a fixed per-channel
offset, as a colour grade moves an image's latents. The file is loaded by ComfyUI's stock LoraLoaderModelOnly:
the styled model. Its 64-step samples are the reference; then, at 3 steps from the same noises:

- the styled model itself (the plain teacher at 3 steps);
- way A: a shortcut LoRA trained data-free on the BASE model, stacked on the styled model (LoraLoaderModelOnly,
  then Shortcut LoRA Loader, as workflows/flux_style_lora_stacking.json wires them);
- way B: a shortcut LoRA trained data-free on the STYLED model (TrainShortcut's model input is
  LoraLoaderModelOnly's output, its latents the styled model's own samples), stacked the same way.

Each shortcut is sampled at the recipe its file holds (Shortcut LoRA Loader at strength 0 = auto, its shift
output into Shortcut Sampler), and the RMSE of each to the styled model's 64-step samples is printed. The
asserted ratios held with a margin for SHORTCUT_FLOW_TEACHER_SEED=0, 1 and 2 (figures beside the asserts);
SHORTCUT_FLOW_TEACHER_SEED=<n> reruns everything (teacher, style, noises, training) with other seeds.

Measured once, not tested: a style LoRA trained on the pre-training modes + the offset (sharper than this tiny
teacher's samples, so the LoRA also changes its trajectories) gave, for seeds 0-2, way B 0.70-0.71x the styled
model's 3-step error, way A 0.70-0.92x, A/B 0.98-1.31: B was never clearly worse, but not always better.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import comfy_host
from hashing import module_hash
from test_host_family_teachers import _mean, _rmse, norms_at_their_usual_init, pretrain
from test_host_nodes import train_node
from workflow_files import load, to_prompt

SEED = int(os.environ.get("SHORTCUT_FLOW_TEACHER_SEED", "0"))
FAMILY = "flux"
LATENT = comfy_host.FAMILIES[FAMILY].latent  # [16, 8, 8]: 16 tokens
SHIFT = 1.0  # 16 tokens: the uniform schedule for teacher and student alike (Flux's 3.25 is for 4096)
STEPS = 3
STYLE_OFFSET = 1.0  # the style: every latent channel moved by a fixed N(0, 1) offset (a colour grade)
# TrainShortcut inputs for the tiny model (as test_host_family_teachers.py); Flux's guidance held at 3.5
COMMON = dict(batch_size=16, learning_rate=2e-3, rank=16, alpha=16.0, checkpoint_every=0, shift_min=SHIFT,
              shift_max=SHIFT, resolution_shift_prob=0.0, guidance_min=3.5, guidance_max=3.5,
              gradient_checkpointing=False, sample_shift=SHIFT, sample_steps=STEPS)
# the style LoRA: plain flow matching only; a teacher share of 1 with schedules of 2-128 steps spreads the
# items' times (a FLOW item is put at its schedule's start point; nothing walks it)
STYLE = dict(COMMON, steps=200, non_shortcut_ratio=1.0, teacher_ratio=1.0, teacher_min_steps=2,
             teacher_max_steps=128, calibrate=False)
SHORTCUT = dict(COMMON, steps=200, teacher_ratio=0.7, ema_slow_decay=0.99, ema_fast_decay=0.9, calibrate=True)
WORKFLOW = comfy_host.PROJECT_ROOT / "workflows" / "flux_style_lora_stacking.json"


def _node(name: str):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]()


def _samples(model, positive, steps: int, *, seed: int, count: int = 32, shift: float = SHIFT) -> torch.Tensor:
    (out,) = _node("ShortcutSampler").sample(model, positive, {"samples": torch.zeros(count, *LATENT)}, seed, steps,
                                             shift, False, 1.0, 1.0)
    return out["samples"]


def _stacked(styled, lora_name: str):
    """Shortcut LoRA Loader on the styled model at the file's recipe: (model, steps, shift, strength)."""
    out = _node("ShortcutLoRALoader").load(styled, lora_name, 0.0, STEPS)
    return out["result"]


@pytest.mark.slow
def test_a_shortcut_trained_on_the_styled_model_follows_it_stacked_with_the_style_lora(pack, tmp_path, monkeypatch):
    import comfy.model_management
    import comfy.utils
    from shortcut_core import load_lora

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_ENABLED", False)
    family = comfy_host.FAMILIES[FAMILY]
    model, base = family.build(seed=SEED, std=0.02)
    norms_at_their_usual_init(model.diffusion_model)
    positive = [[torch.zeros_like(context), options] for context, options in family.positive(6, SEED)]
    started = time.perf_counter()
    pretrain_losses = pretrain(model, positive, LATENT, steps=300, batch=16, lr=3e-3, seed=SEED)
    timings = {"pre-training": time.perf_counter() - started}
    net = model.diffusion_model
    teacher_hash = module_hash(net)

    # (b) the style: the teacher's own samples with each latent channel moved by one fixed offset, in the model's
    # space (TrainShortcut takes latents in the VAE's space, as samplers hand them on). The style LoRA so changes
    # where the samples lie, not how well the tiny teacher was trained.
    latent_format = model.latent_format
    g = torch.Generator().manual_seed(1000 + SEED)
    offset = STYLE_OFFSET * torch.randn(LATENT[0], 1, 1, generator=g)
    own = latent_format.process_in(_samples(base, positive, 32, seed=500 + SEED, count=256))
    styled_data = latent_format.process_out(own + offset)

    with comfy_host.host_folders(loras=tmp_path):
        started = time.perf_counter()
        train_node(base, positive, {"samples": styled_data}, **STYLE, seed=SEED, save_name="my_style_lora")
        timings["style LoRA"] = time.perf_counter() - started
        # (c) the styled model: ComfyUI's stock loader reads the file, every layer of it
        (styled,) = _node("LoraLoaderModelOnly").load_lora_model_only(base, "my_style_lora.safetensors", 1.0)
        style_layers = {f"{key}.weight" for key in load_lora(tmp_path / "my_style_lora.safetensors").weights}
        assert style_layers and set(styled.patches) == style_layers

        base_reference = _samples(base, positive, 64, seed=100 + SEED)
        reference = _samples(styled, positive, 64, seed=100 + SEED)
        styled_3 = _rmse(_samples(styled, positive, STEPS, seed=100 + SEED), reference)

        # (d) way A: the shortcut of the BASE model, data-free on its own samples
        started = time.perf_counter()
        base_data = {"samples": _samples(base, positive, 32, seed=7 + SEED, count=64)}
        train_node(base, positive, base_data, **SHORTCUT, seed=SEED, save_name="shortcut_of_base")
        timings["way A"] = time.perf_counter() - started
        # way B: the shortcut of the STYLED model (LoraLoaderModelOnly's output into TrainShortcut), data-free on
        # the styled model's own samples from the same noises
        started = time.perf_counter()
        styled_data_free = {"samples": _samples(styled, positive, 32, seed=7 + SEED, count=64)}
        train_node(styled, positive, styled_data_free, **SHORTCUT, seed=SEED, save_name="shortcut_of_styled")
        timings["way B"] = time.perf_counter() - started
        # Sampling the styled model made the host write its patched weights into the shared network, as it does
        # for any LoRA; unloading puts the teacher's back: no training changed them.
        comfy.model_management.unload_all_models()
        assert module_hash(net) == teacher_hash

        # both stacked as the workflow stacks them: base -> style LoRA -> Shortcut LoRA Loader -> Shortcut Sampler
        a_model, a_steps, a_shift, a_strength = _stacked(styled, "shortcut_of_base.safetensors")
        b_model, b_steps, b_shift, b_strength = _stacked(styled, "shortcut_of_styled.safetensors")
        assert a_steps == b_steps == STEPS
        a_samples = _samples(a_model, positive, STEPS, shift=a_shift, seed=100 + SEED)
        b_samples = _samples(b_model, positive, STEPS, shift=b_shift, seed=100 + SEED)
        # way A's shortcut on the model it was trained for, as a check that it is a working shortcut
        own_model, _, own_shift, _ = _node("ShortcutLoRALoader").load(base, "shortcut_of_base.safetensors", 0.0,
                                                                      STEPS)["result"]
        base_3 = _rmse(_samples(base, positive, STEPS, seed=100 + SEED), base_reference)
        a_own = _rmse(_samples(own_model, positive, STEPS, shift=own_shift, seed=100 + SEED), base_reference)

    way_a, way_b = _rmse(a_samples, reference), _rmse(b_samples, reference)
    style_moved = _rmse(reference, base_reference)
    print(f"\nstyle stacking, tiny Flux {list(LATENT)}, seed {SEED}: RMSE to the styled model's 64-step samples "
          f"(style moved them {style_moved:.4f} from the base model's): styled model {STEPS} steps {styled_3:.4f}; "
          f"way A (shortcut of the base, stacked) {way_a:.4f} (strength {a_strength:.3g}, shift {a_shift:.3g}); "
          f"way B (shortcut of the styled model) {way_b:.4f} (strength {b_strength:.3g}, shift {b_shift:.3g}); "
          f"B/teacher {way_b / styled_3:.3f}, A/teacher {way_a / styled_3:.3f}, A/B {way_a / way_b:.3f}\n"
          f"  to the base model's 64-step samples: way A {_rmse(a_samples, base_reference):.4f}, way B "
          f"{_rmse(b_samples, base_reference):.4f}; way A's shortcut on the base model: {a_own:.4f} against the base "
          f"model's {STEPS}-step {base_3:.4f}\n  pre-training loss {_mean(pretrain_losses[:10]):.3f} -> "
          f"{_mean(pretrain_losses[-10:]):.3f}; " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))

    # The style LoRA really moved the model, and its effect survives stacking either shortcut on it.
    assert style_moved > 2 * styled_3
    for samples in (a_samples, b_samples):
        assert _rmse(samples, reference) < 0.5 * _rmse(samples, base_reference)
    # Seeds 0, 1, 2 measured B/teacher 0.50, 0.46, 0.44; A/teacher 0.68, 0.91, 0.63; A/B 1.35, 2.00, 1.44.
    # Way B: the shortcut trained on the styled model follows it at 3 steps far better than its plain 3 steps ...
    assert way_b < 0.7 * styled_3
    # ... and clearly better than the plain model's shortcut stacked on the style LoRA (way A) ...
    assert way_b < 0.85 * way_a
    # ... which still beats the styled model's plain 3 steps.
    assert way_a < styled_3

    comfy.model_management.unload_all_models()
    assert module_hash(net) == teacher_hash


def test_the_stacking_workflow_puts_the_shortcut_lora_on_top_of_the_style_lora(mappings):
    """workflows/flux_style_lora_stacking.json: the diffusion model, then the style LoRA (stock LoraLoaderModelOnly),
    then Shortcut LoRA Loader, whose model, steps and shift drive Shortcut Sampler."""
    prompt = to_prompt(load(WORKFLOW), mappings)

    def one(class_type):
        [(node_id, node)] = [(k, v) for k, v in prompt.items() if v["class_type"] == class_type]
        return node_id, node["inputs"]

    unet_id, _ = one("UNETLoader")
    style_id, style = one("LoraLoaderModelOnly")
    loader_id, loader = one("ShortcutLoRALoader")
    _, sampler = one("ShortcutSampler")
    assert style["model"] == [unet_id, 0] and loader["model"] == [style_id, 0]
    assert sampler["model"] == [loader_id, 0] and sampler["steps"] == [loader_id, 1] and sampler["shift"] == [loader_id, 2]
    assert style["lora_name"] == "my_style_lora.safetensors" and style["strength_model"] == 1.0
    assert (loader["strength"], loader["steps"]) == (0.0, 0)  # the recipe stored in the shortcut LoRA's file

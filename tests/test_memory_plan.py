"""The memory plan's arithmetic (engine only; its coefficients are measured by benchmarks.flux_memory)."""

from __future__ import annotations

from dataclasses import replace

from shortcut_core.memory_plan import ModelShape, TrainingShape, plan_training, suggestions

FLUX_DEV = ModelShape(weight_bytes=23_800_000_000, block_kinds=("DoubleStreamBlock",) * 19 + ("SingleStreamBlock",) * 38,
                      block_params=(339_000_000,) * 19 + (141_000_000,) * 38, hidden=3072, compute_bytes=2,
                      stored_bytes=2, lora_params=4_837_760)
RUN = TrainingShape(rank=64, forward_batch=8, tokens=4096 + 512, checkpointing=True)


def test_lora_state_is_six_float32_copies_of_the_lora():
    plan = plan_training(FLUX_DEV, RUN)
    assert plan.lora_state == 6 * 4 * 64 * 4_837_760
    assert plan_training(FLUX_DEV, replace(RUN, rank=16)).lora_state * 4 == plan.lora_state


def test_activations_scale_with_batch_and_tokens_and_checkpointing_saves_most():
    one = plan_training(FLUX_DEV, replace(RUN, forward_batch=1))
    assert abs(plan_training(FLUX_DEV, RUN).activations - 8 * one.activations) <= 8  # (rounding)
    fewer = plan_training(FLUX_DEV, replace(RUN, forward_batch=1, tokens=1024 + 512))
    assert abs(fewer.activations / one.activations - 1536 / 4608) < 1e-6
    full = plan_training(FLUX_DEV, replace(RUN, checkpointing=False))
    assert full.activations > 10 * plan_training(FLUX_DEV, RUN).activations


def test_weights_stored_narrower_than_computed_add_their_casts():
    fp8 = replace(FLUX_DEV, weight_bytes=FLUX_DEV.weight_bytes // 2, stored_bytes=1)
    assert plan_training(FLUX_DEV, RUN).casts == 0
    assert plan_training(fp8, RUN).casts == 339_000_000 * 2  # the block being recomputed
    assert plan_training(fp8, replace(RUN, checkpointing=False)).casts == (19 * 339_000_000 + 38 * 141_000_000) * 2


def test_suggestions_name_settings_that_fit_and_keep_the_items_per_step():
    plan = plan_training(FLUX_DEV, RUN)
    free = int(plan.total * 0.8)
    fp8 = replace(FLUX_DEV, weight_bytes=FLUX_DEV.weight_bytes // 2, stored_bytes=1)
    found = {s.change: s.plan for s in suggestions(FLUX_DEV, RUN, 8, 1, 1, free, fp8)}
    batch = next(c for c in found if c.startswith("batch_size 8 -> "))
    smaller = int(batch.split("-> ")[1].split()[0])
    assert f"grad_accum_steps 1 -> {8 // smaller}" in batch and found[batch].fits(free)
    rank = next(c for c in found if c.startswith("rank 64 -> "))
    assert found[rank].total < plan.total
    assert any("fp8" in c for c in found)
    assert "gradient_checkpointing on" not in found  # it is on already
    text = plan.text(free, "bfloat16")
    assert text.startswith(f"plan: {plan.needed / 1e9:.1f} GB of {free / 1e9:.1f} GB free: weights 23.8 bfloat16")
    assert text.endswith(f"allocator slack {(plan.needed - plan.total) / 1e9:.1f}")
    assert plan.fits(plan.needed) and not plan.fits(plan.total)  # the slack is asked for

"""The time to a LoRA: the prediction from the model's FLOPs, the clock a run measures with, and what a run reports."""

from __future__ import annotations

import pytest
import torch

from shortcut_core.config import ShortcutConfig
from shortcut_core.memory_plan import ModelShape, TrainingShape
from shortcut_core.run_time import (OFFLOAD_OPTIMIZER_COST, PREFETCH_BYTES_PER_SECOND, STREAM_BYTES_PER_SECOND, StepClock, card_peak_flops,
                                    duration_text, forward_flops, plan_time_text, predicted_step_seconds,
                                    step_forwards, time_text)
from shortcut_core.trainer import ShortcutTrainer

from test_trainer import SHAPE, TinyVelocityNet

# Flux.1-dev as the plan sees it: 11.9B weights, 19 double- and 38 single-stream blocks of width 3072
FLUX_DEV = ModelShape(weight_bytes=2 * 11_900_000_000, block_kinds=("DoubleStreamBlock",) * 19 + ("SingleStreamBlock",) * 38,
                      block_params=(339_000_000,) * 19 + (141_000_000,) * 38, hidden=3072, compute_bytes=2,
                      stored_bytes=2, lora_params=1)
AT_1024 = TrainingShape(rank=64, forward_batch=1, tokens=64 * 64 + 512, checkpointing=True)


def test_a_forward_counts_every_weight_per_token_and_attention_per_block():
    shape = ModelShape(weight_bytes=4 * 1000, block_kinds=("A", "B"), block_params=(400, 400), hidden=8,
                       compute_bytes=4, stored_bytes=4, lora_params=1)
    assert forward_flops(shape, tokens=10, batch=3) == 3 * (2 * 10 * 1000 + 4 * 100 * 8 * 2)
    assert step_forwards(2, checkpointing=True) == 6  # the paper's: 2 sub-steps, student, backward (2), recompute
    assert step_forwards(4, checkpointing=False) == 7


def test_the_prediction_reproduces_the_h200_steps_it_was_calibrated_on():
    """docs/memory.md: 1.57 s a step in bf16 and 1.70 s with fp8-stored weights, Flux.1-dev at 1024 px."""
    h200 = card_peak_flops("NVIDIA H200")
    assert predicted_step_seconds(FLUX_DEV, AT_1024, 2, h200) == pytest.approx(1.57, rel=0.05)
    fp8 = ModelShape(**{**FLUX_DEV.__dict__, "weight_bytes": 11_900_000_000, "stored_bytes": 1})
    assert predicted_step_seconds(fp8, AT_1024, 2, h200) == pytest.approx(1.70, rel=0.05)
    # a slower card, a bigger batch and more sub-steps all take longer, in proportion
    rtx4090 = card_peak_flops("NVIDIA GeForce RTX 4090")
    assert predicted_step_seconds(FLUX_DEV, AT_1024, 2, rtx4090) == pytest.approx(
        predicted_step_seconds(FLUX_DEV, AT_1024, 2, h200) * 989 / 165)
    batch2 = TrainingShape(**{**AT_1024.__dict__, "forward_batch": 2})
    assert predicted_step_seconds(FLUX_DEV, batch2, 2, h200) == pytest.approx(
        2 * predicted_step_seconds(FLUX_DEV, AT_1024, 2, h200))
    assert predicted_step_seconds(FLUX_DEV, AT_1024, 4, h200) == pytest.approx(
        8 / 6 * predicted_step_seconds(FLUX_DEV, AT_1024, 2, h200))


def test_streaming_and_offloading_add_their_measured_costs():
    h200 = card_peak_flops("NVIDIA H200")
    loaded = predicted_step_seconds(FLUX_DEV, AT_1024, 2, h200)
    per_op = TrainingShape(**{**AT_1024.__dict__, "prefetch_blocks": False})  # ComfyUI's lowvram copies, measured
    assert predicted_step_seconds(FLUX_DEV, per_op, 2, h200, streamed=6_800_000_000) == pytest.approx(
        loaded + 6 * 6.8e9 / STREAM_BYTES_PER_SECOND)
    # a block ahead, the copies hide behind the compute until they take longer than it
    assert AT_1024.checkpointing and AT_1024.prefetch_blocks
    assert predicted_step_seconds(FLUX_DEV, AT_1024, 2, h200, streamed=3_000_000_000) == pytest.approx(loaded)
    assert predicted_step_seconds(FLUX_DEV, AT_1024, 2, h200, streamed=60_000_000_000) == pytest.approx(
        6 * 60e9 / PREFETCH_BYTES_PER_SECOND)
    offloaded = TrainingShape(**{**AT_1024.__dict__, "offload_optimizer": True})
    assert predicted_step_seconds(FLUX_DEV, offloaded, 2, h200) == pytest.approx(loaded * (1 + OFFLOAD_OPTIMIZER_COST))


def test_cards_are_known_by_the_name_torch_reports():
    assert card_peak_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM card's peak
    assert card_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert card_peak_flops("NVIDIA GeForce RTX 3090") == 71e12
    assert card_peak_flops("cpu") is None


def test_durations_and_the_time_line_read_as_a_user_writes_them():
    assert duration_text(45.2) == "45 s"
    assert duration_text(720) == "12 min"
    assert duration_text(5 * 3600 + 10) == "5 h 0 min"
    assert duration_text(-3) == "0 s"
    assert time_text(1.8, 10_000, 3 * 3600 + 12 * 60) == "about 1.80 s/step, 5 h 0 min for 10000 steps; ETA 3 h 12 min"
    assert plan_time_text(1.8, 10_000, "NVIDIA H200") == ("time: about 1.80 s/step, 5 h 0 min for 10000 steps "
                                                          "(predicted for NVIDIA H200)")
    assert plan_time_text(None, 10_000, "cpu") == "time: measured from the first steps (cpu)"


class FakeClock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def test_the_clock_leaves_out_the_warm_up_steps():
    # a slow first step (allocation, compile), then 2 s a step
    clock = StepClock(total=10, warmup=2, clock=FakeClock([30.0, 32.0, 34.0, 36.0]))
    clock.tick(1)
    clock.tick(2)
    assert clock.seconds_per_step is None and clock.text() is None
    clock.tick(3)
    clock.tick(4)
    assert clock.seconds_per_step == 2.0
    assert clock.seconds_left() == 12.0
    assert clock.text() == "about 2.00 s/step, 20 s for 10 steps; ETA 12 s"


def test_a_resumed_run_measures_from_where_it_resumed():
    clock = StepClock(total=100, start=50, warmup=0, clock=FakeClock([0.0, 1.5, 3.0]))
    clock.tick(51)
    clock.tick(52)
    assert clock.seconds_per_step == 1.5 and clock.seconds_left() == 1.5 * 48


def test_a_run_reports_its_measured_time_after_the_warm_up():
    torch.manual_seed(0)
    net = TinyVelocityNet()
    config = ShortcutConfig(rank=4, alpha=4.0, batch_size=2, steps=5, guidance_range=None, resolution_shift_prob=0.0,
                            gradient_checkpointing=False, checkpoint_every=0)
    reports = []
    with ShortcutTrainer(net, lambda x, t, **_: net(x, t), torch.randn(4, *SHAPE), config) as trainer:
        trainer.run(callback=reports.append, progress=False)
    assert [r.seconds_per_step is None for r in reports] == [True, True, False, False, False]
    assert all(r.seconds_per_step > 0 for r in reports[2:])
    left = [r.seconds_left for r in reports[2:]]
    assert left[-1] == 0 and left[0] > 0

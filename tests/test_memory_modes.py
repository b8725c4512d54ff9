"""The opt-in memory modes of the engine: AdamW state in CPU RAM, LoRA on the blocks only, EMAs that keep
a 0.999 update. Each either changes nothing in the result or changes exactly what it says."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from shortcut_core.adapters import EMA_SLOW, STUDENT, lora_target_names
from shortcut_core.config import ConfigError
from shortcut_core.memory_plan import ALLOCATOR_SLACK, TrainingShape, plan_training, suggestions
from shortcut_core.trainer import ShortcutTrainer

from test_memory_plan import FLUX_DEV, RUN
from test_trainer import assert_same_state, cfg, make_latents, make_net, run_straight, snapshot, velocity_of


# ---------------------------------------------------------------------------------------------- offload_optimizer
@pytest.mark.parametrize("accum", [1, 2])
def test_offloaded_adamw_trains_bit_identically(accum):
    """On a CPU the offloaded step is torch's AdamW on a master copy of the same values: nothing may differ."""
    plain, plain_losses, _ = run_straight(cfg(grad_accum_steps=accum), 5)
    offloaded, offloaded_losses, _ = run_straight(cfg(grad_accum_steps=accum, offload_optimizer=True), 5)
    assert_same_state(plain, offloaded)
    assert plain_losses == offloaded_losses


def test_offloaded_adamw_keeps_its_state_off_the_parameters_and_in_checkpoints(tmp_path):
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(offload_optimizer=True)) as tr:
        tr.run(2, progress=False)
        student = tr.adapters.parameters(STUDENT)
        master = tr.optimizer.master
        assert all(m.data_ptr() != p.data_ptr() and torch.equal(m, p) for m, p in zip(master, student))
        assert not any(p in tr.optimizer.inner.state for p in student)  # no moments beside the LoRA ...
        assert all(tr.optimizer.inner.state[m]["exp_avg_sq"].device.type == "cpu" for m in master)  # ... but here
        tr.save_checkpoint(str(tmp_path / "offloaded.ckpt"))
    # A checkpoint resumes with the offload switched either way, and the run goes on exactly.
    reference, _, _ = run_straight(cfg(), 4)
    for offload in (False, True):
        net = make_net()
        with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(offload_optimizer=offload)) as tr:
            tr.load_checkpoint(str(tmp_path / "offloaded.ckpt"))
            tr.run(4, progress=False)
            assert_same_state(snapshot(tr), reference)


# ---------------------------------------------------------------------------------------------- lora_layers
class Modulated(nn.Module):
    """A block with an adaLN modulation layer, named as Flux names it."""

    def __init__(self, width: int):
        super().__init__()
        self.img_mod = nn.ModuleDict({"lin": nn.Linear(width, 2 * width)})
        self.fc = nn.Linear(width, width)

    def forward(self, h):
        scale, shift = self.img_mod["lin"](h).chunk(2, dim=-1)
        return h + self.fc(h * (1 + scale) + shift)


def test_blocks_preset_keeps_the_blocks_linear_layers_without_modulation():
    net = make_net()
    net.blocks.append(Modulated(32))
    names = lora_target_names(net, None, "blocks", list(net.blocks))
    assert names == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "blocks.2.fc"]
    assert lora_target_names(net, ("fc1",), "blocks", list(net.blocks)) == ["blocks.0.fc1", "blocks.1.fc1"]
    assert "blocks.2.img_mod.lin" in lora_target_names(net, None) and "inp" in lora_target_names(net, None)
    with pytest.raises(ValueError, match="repeated blocks"):
        lora_target_names(net, None, "blocks", [])
    with pytest.raises(ConfigError, match="lora_layers"):
        cfg(lora_layers="attention")


def test_trainer_adapts_only_the_preset_layers_and_a_checkpoint_keeps_the_layout(tmp_path):
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(lora_layers="blocks"), blocks=net.blocks) as tr:
        tr.run(2, progress=False)
        assert sorted(tr.adapters.layers) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
        assert tr.lora_metadata().config["lora_layers"] == "blocks"
        tr.save_checkpoint(str(tmp_path / "blocks.ckpt"))
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(), blocks=net.blocks) as tr:
        with pytest.raises(Exception, match="lora_layers 'blocks'"):
            tr.load_checkpoint(str(tmp_path / "blocks.ckpt"))


# ---------------------------------------------------------------------------------------------- EMA precision
def test_emas_of_a_bf16_model_keep_a_0999_update():
    """A 0.999 EMA moves by 1e-3 of the gap per step: in bf16 (8 bits of mantissa) such a step to a value near 1
    rounds away entirely; the trainer keeps its EMAs in float32 whatever the base dtype."""
    ema_bf16 = torch.ones(4, dtype=torch.bfloat16)
    ema_bf16.lerp_(torch.full((4,), 1.5, dtype=torch.bfloat16), 1e-3)
    assert torch.equal(ema_bf16, torch.ones(4, dtype=torch.bfloat16))  # what a bf16 EMA would do: nothing

    net = make_net().to(torch.bfloat16)
    config = cfg(ema_slow_decay=0.999, steps=3)

    def velocity(x, t, **kw):
        return net(x.to(torch.bfloat16), t.to(torch.bfloat16), **kw).float()

    history = []
    with ShortcutTrainer(net, velocity, make_latents(), config) as tr:
        assert {p.dtype for p in tr.adapters.parameters(EMA_SLOW)} == {torch.float32}
        tr.run(callback=lambda r: history.append(snapshot(tr)), progress=False)
    expected = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in history[0].items() if k.startswith(STUDENT)}
    for state in history:
        for k in expected:
            expected[k] = 0.999 * expected[k] + 0.001 * state[k].double()
    for k, value in expected.items():
        got = history[-1][f"{EMA_SLOW}/{k.split('/', 1)[1]}"].double()
        assert value.abs().max() > 0
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------- the plan
def test_the_plan_counts_each_mode():
    base = plan_training(FLUX_DEV, RUN)
    offloaded = plan_training(FLUX_DEV, replace(RUN, offload_optimizer=True))
    assert offloaded.lora_state * 6 == base.lora_state * 4 and offloaded.activations == base.activations
    # streaming: the weights that fit beside everything else and the host's headroom stay; the rest streams
    free, headroom = 20_000_000_000, 1_000_000_000
    one = replace(RUN, forward_batch=1)
    assert one.checkpointing and one.prefetch_blocks
    per_op = plan_training(FLUX_DEV, replace(one, stream_headroom=headroom, prefetch_blocks=False), free)
    assert per_op.casts == 339_000_000 * 2  # the recomputed block's copies, made op by op
    streamed = plan_training(FLUX_DEV, replace(one, stream_headroom=headroom), free)
    assert streamed.casts == 339_000_000 * 2 * 2  # the block computing and the one arriving
    assert streamed.streamed > per_op.streamed
    largest = sorted(FLUX_DEV.block_params, reverse=True)
    n = streamed.streamed_blocks
    assert sum(largest[:n]) * 2 >= streamed.streamed > sum(largest[:n - 1]) * 2 and n < streamed.blocks
    assert f"{n} of {len(largest)} blocks" in streamed.text(free)
    rest = streamed.lora_state + streamed.activations + streamed.casts
    usable = int(free / (1 + ALLOCATOR_SLACK))  # the allocator's slack stays free too
    assert streamed.weights == usable - rest - headroom and streamed.weights + streamed.streamed == FLUX_DEV.weight_bytes
    assert streamed.fits(free) and "streamed from RAM" in streamed.text(free)
    roomy = plan_training(FLUX_DEV, replace(one, stream_headroom=headroom), 10 ** 12)
    assert roomy.streamed == 0 and roomy.weights == FLUX_DEV.weight_bytes
    found = {s.change.split(" (")[0]: s.plan for s in suggestions(FLUX_DEV, RUN, 8, 1, 1, int(base.total * 0.8),
                                                                  blocks_alternative=replace(FLUX_DEV, lora_params=3_500_000),
                                                                  stream_headroom=headroom)}
    assert found["offload_optimizer on"].total < base.total and found["lora_layers blocks"].total < base.total
    assert found["stream_weights on"].streamed > 0 and found["stream_weights on"].fits(int(base.total * 0.8))
    assert TrainingShape(rank=1, forward_batch=1, tokens=1, checkpointing=True).stream_headroom is None

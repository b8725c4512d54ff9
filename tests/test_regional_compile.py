"""compiled_blocks: training with compiled blocks gives the eager result (blocks with in-place residuals too, with
and without the pack's checkpointing), the blocks are restored, and role switches do not push dynamo to eager."""

from __future__ import annotations

import contextlib
import gc as gc_module
import warnings
import weakref

import pytest
import torch

from shortcut_core.activation_checkpointing import checkpoint_blocks
from shortcut_core.regional_compile import compiled_blocks
from shortcut_core.trainer import ShortcutTrainer

from test_trainer import Block, cfg, make_latents, make_net, snapshot, velocity_of

REFUSED = "changes a tensor in place after autograd saved it"


def train(compiled: bool, steps: int = 3, *, inplace: bool, gc: bool, batch_size: int = 2, per_item: bool = False,
          **compile_options):
    net = make_net(inplace=inplace)
    velocity = velocity_of(net)
    velocity.keeps_batch_whole = per_item
    config = cfg(steps=steps, batch_size=batch_size, gradient_checkpointing=gc)
    with ShortcutTrainer(net, velocity, make_latents(), config, blocks=list(net.blocks)) as tr:
        with compiled_blocks(net.blocks, **compile_options) if compiled else contextlib.nullcontext():
            losses = [tr.step().loss for _ in range(steps)]
        return snapshot(tr), losses


def assert_close_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Inductor may reorder float ops: agreement to 1e-5 of the state's magnitude (here they are even equal)."""
    assert got.keys() == want.keys()
    scale = max(float(t.abs().max()) for t in want.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5 * scale, msg=k)


# ---------------------------------------------------------------------------------------------- (a) same training
@pytest.mark.parametrize("gc", [True, False], ids=["checkpointing", "no-checkpointing"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace-residual", "residual"])
def test_compiled_training_gives_the_eager_lora(inplace, gc):
    want, want_losses = train(False, inplace=inplace, gc=gc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, losses = train(True, inplace=inplace, gc=gc)
    assert_close_state(got, want)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    # A residual added into the block's own (saved) input keeps autograd's recorded calls eager; others compile them.
    assert any(REFUSED in str(w.message) for w in caught) == inplace
    assert not any("Error detected in" in str(w.message) for w in caught)  # no compile was tried and refused


def test_per_item_adapter_batches_run_eagerly_and_stay_exact():
    """use_per_item picks adapters by forward pre-hooks, which dynamo guards by number only: compiled, later
    calls would reuse the first call's roles."""
    want, _ = train(False, 4, inplace=False, gc=True, batch_size=4, per_item=True)
    got, _ = train(True, 4, inplace=False, gc=True, batch_size=4, per_item=True, backend="aot_eager")
    assert_close_state(got, want)


# ---------------------------------------------------------------------------------------------- (b) restored
def test_blocks_are_restored_on_exit_and_on_errors():
    net = make_net(inplace=False)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    before = [b(x).detach() for b in net.blocks]
    own = net.blocks[1].forward  # a forward of this block alone: compiled for it and put back as it was
    net.blocks[1].forward = own
    limit = torch._dynamo.config.recompile_limit
    with compiled_blocks(net.blocks, backend="aot_eager"):
        assert all("forward" in b.__dict__ and b.__dict__["forward"] is not own for b in net.blocks)
        with torch.no_grad():
            inside = [b(x) for b in net.blocks]
        compiled = [b.__dict__["forward"] for b in net.blocks]
        with checkpoint_blocks(net.blocks):  # wraps the compiled forwards and puts them back
            assert all(b.__dict__["forward"]._checkpointed for b in net.blocks)
        assert [b.__dict__["forward"] for b in net.blocks] == compiled
    assert "forward" not in net.blocks[0].__dict__ and net.blocks[1].__dict__["forward"] is own
    assert torch._dynamo.config.recompile_limit == limit
    for a, b in zip(inside, before):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(b(x), y) for b, y in zip(net.blocks, before))

    with pytest.raises(KeyError):
        with compiled_blocks(net.blocks, backend="aot_eager"):
            with pytest.raises(ValueError, match="already compiled"):
                with compiled_blocks(net.blocks[:1], backend="aot_eager"):
                    pass
            raise KeyError("interrupted")
    assert "forward" not in net.blocks[0].__dict__ and net.blocks[1].__dict__["forward"] is own
    del net.blocks[1].forward

    with checkpoint_blocks(net.blocks):
        with pytest.raises(ValueError, match="before checkpointing"):
            with compiled_blocks(net.blocks, backend="aot_eager"):
                pass
        assert all(getattr(b.__dict__["forward"], "_checkpointed", False) for b in net.blocks)
    assert all("forward" not in b.__dict__ for b in net.blocks)


@pytest.mark.parametrize("inplace, gc", [(True, True), (False, False)])
def test_nothing_of_a_run_outlives_it(inplace, gc):
    """Neither the compiled code nor torch keeps the model, its LoRA or the step's activations: a compile refused
    inside the checkpoint's backward would keep them (from torch's C++ side), so would the probe's saved tensors."""
    def run():
        net = make_net(inplace=inplace)
        config = cfg(steps=2, batch_size=2, gradient_checkpointing=gc)
        with ShortcutTrainer(net, velocity_of(net), make_latents(), config, blocks=list(net.blocks)) as tr:
            with compiled_blocks(net.blocks, backend="aot_eager"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tr.run(progress=False)
            lora = tr.adapters.parameters()
        return [weakref.ref(t) for t in (net, *net.parameters(), *lora)]

    refs = run()
    gc_module.collect()
    assert not [r for r in refs if r() is not None]


# ---------------------------------------------------------------------------------------------- (c) no eager fallback
EAGER_CALLS = {False: 0, True: 0}  # block calls that ran the Python forward, by grad mode


class CountingBlock(Block):
    def forward(self, h):
        if not torch.compiler.is_compiling():  # never true in compiled code: a call here ran eagerly
            EAGER_CALLS[torch.is_grad_enabled()] += 1
        return super().forward(h)


def compiles_and_eager_calls(steps: int, batch_size: int, **compile_options) -> tuple[list[int], dict[bool, int]]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled variants stay on the code for later runs
    net = make_net(inplace=False)
    for block in net.blocks:
        block.__class__ = CountingBlock
    config = cfg(steps=steps, batch_size=batch_size, gradient_checkpointing=True)
    per_step = []
    with ShortcutTrainer(net, velocity_of(net), make_latents(), config, blocks=list(net.blocks)) as tr:
        with compiled_blocks(net.blocks, **compile_options):
            EAGER_CALLS.update({False: 0, True: 0})
            for _ in range(steps):
                before = counters["frames"]["ok"]
                tr.step()
                per_step.append(counters["frames"]["ok"] - before)
    return per_step, dict(EAGER_CALLS)


def test_hooks_inside_a_block_added_after_compiling_run_it_eagerly_and_its_own_hooks_do_not():
    torch.manual_seed(0)
    block = CountingBlock(8)
    x = torch.randn(2, 8)
    with compiled_blocks([block], backend="aot_eager"), torch.no_grad():
        EAGER_CALLS.update({False: 0, True: 0})
        plain = block(x)
        handle = block.register_forward_pre_hook(lambda m, args: None)  # runs outside the block's forward
        assert torch.equal(block(x), plain) and EAGER_CALLS[False] == 0
        handle.remove()
        for scale in (2.0, 3.0):  # two hooks of one count: dynamo would reuse the first one's compiled code
            handle = block.fc1.register_forward_pre_hook(lambda m, args, s=scale: (args[0] * s,))
            want = block.fc2(torch.nn.functional.silu(block.fc1.forward(x * scale))) + x
            assert torch.equal(block(x), want)
            handle.remove()
        assert EAGER_CALLS[False] == 2
        assert torch.equal(block(x), plain) and EAGER_CALLS[False] == 2


def test_role_switches_recompile_past_dynamos_default_limit_without_falling_back_to_eager():
    """Teacher (LoRA off), fast and slow EMA on 1..B items each, the student with and without grad: each a
    compiled variant of the block class, up to 3 B + 2. Dynamo's default limit (8) would run the rest eagerly."""
    batch_size, steps = 4, 8
    per_step, eager = compiles_and_eager_calls(steps, batch_size, backend="aot_eager")
    assert 8 < sum(per_step) <= 3 * batch_size + 2, per_step
    # every call ran compiled, with grad too (out-of-place residuals), but for one eager probe per block: does it
    # change a tensor autograd saved?
    assert eager == {False: 0, True: 2}, eager
    _, eager_at_default = compiles_and_eager_calls(steps, batch_size, backend="aot_eager", recompile_limit=8)
    assert eager_at_default[False] > 0  # the check sees a fallback


# ---------------------------------------------------------------------------------------------- the config knob
def test_the_compile_blocks_knob_compiles_inside_the_trainer_and_gives_the_eager_lora():
    def run(compile_blocks: bool):
        net = make_net(inplace=False)
        velocity = velocity_of(net)
        velocity.keeps_batch_whole = True  # compiling turns the per-item first half into per-role passes
        config = cfg(steps=3, batch_size=2, compile_blocks=compile_blocks)
        with ShortcutTrainer(net, velocity, make_latents(), config, blocks=list(net.blocks)) as tr:
            assert all(getattr(b.__dict__.get("forward"), "_compiled", False) == compile_blocks for b in net.blocks)
            assert (tr._first_half is None) == compile_blocks
            result = tr.run(progress=False)
            state = snapshot(tr)
        assert not any("forward" in b.__dict__ for b in net.blocks)  # restored on close
        return state, list(result.losses)

    want, want_losses = run(False)
    got, losses = run(True)
    assert_close_state(got, want)
    assert losses == pytest.approx(want_losses, rel=1e-5)


@pytest.mark.parametrize("other", ["fp8_targets", "stream_weights"])
def test_compile_blocks_refuses_the_modes_it_cannot_run_with_yet(other):
    from shortcut_core.config import ConfigError
    net = make_net()
    changes = {"fp8_targets": True} if other == "fp8_targets" else {}
    with pytest.raises(ConfigError, match=f"compile_blocks: cannot run together with {other}"):
        ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(compile_blocks=True, **changes),
                        blocks=list(net.blocks), streamed_blocks=(0,) if other == "stream_weights" else None)
    assert not any("forward" in m.__dict__ for m in net.modules())

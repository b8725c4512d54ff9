"""Block streaming (shortcut_core/block_streaming.py) on the CPU: the copies are clones and the streams no-ops,
so a streamed run must be the plain run bit for bit, with at most two blocks' copies alive, and leave the base
as it was."""

import gc
import weakref

import pytest
import torch

from shortcut_core import ShortcutTrainer
from shortcut_core.block_streaming import BlockStreamer
from shortcut_core.config import ConfigError

from test_trainer import assert_same_state, cfg, make_latents, make_net, snapshot, velocity_of


def make_deep_net(blocks: int = 4):
    net = make_net(inplace=True)  # blocks add their residual in place, as Flux's do
    while len(net.blocks) < blocks:
        net.blocks.append(type(net.blocks[0])(32, inplace=True))
    return net


def train(streamed, steps: int = 3, **changes):
    net = make_deep_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(**changes), blocks=list(net.blocks),
                         streamed_blocks=streamed) as tr:
        result = tr.run(steps, progress=False)
        state = snapshot(tr)
        noise = torch.randn((2, 2, 4, 4), generator=torch.Generator().manual_seed(5))
        sample = tr.sample_as("student", noise, torch.linspace(1, 0, 4))
        copied = tr.streamer.copied_bytes if tr.streamer is not None else 0
    return state, list(result.losses), sample, net, before, copied


@pytest.mark.parametrize("streamed", [(), (2,), (0, 1, 2, 3)], ids=["none off the device", "one block", "all blocks"])
@pytest.mark.parametrize("accum", [1, 2])
def test_a_streamed_run_is_the_plain_run_bit_for_bit(streamed, accum):
    plain, plain_losses, plain_sample, _, _, _ = train(None, grad_accum_steps=accum)
    state, losses, sample, net, before, copied = train(streamed, grad_accum_steps=accum)
    assert_same_state(plain, state)
    assert losses == plain_losses
    assert torch.equal(sample, plain_sample)
    # the base as it was: same values, no hooks, no instance forwards left
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(not b._forward_hooks and not b._forward_pre_hooks and "forward" not in b.__dict__ for b in net.blocks)
    assert (copied > 0) == bool(streamed)


def test_blocks_compute_on_their_copies_and_at_most_two_are_resident():
    net = make_deep_net()
    seen = []

    def watch(i):
        def hook(module, args, output):
            streamer = trainer.streamer
            host = streamer.streamed[i].host[0] if i in streamer.streamed else None
            seen.append((i, len(streamer._resident), host is not None and module.fc1.weight.data_ptr() == host.data_ptr()))
        return hook

    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(), blocks=list(net.blocks),
                         streamed_blocks=(0, 1, 2, 3)) as trainer:
        for i, block in enumerate(net.blocks):
            # runs after the streamer's pre-hook and before its post-hook: the block is computing
            block.register_forward_hook(watch(i), prepend=True)
        trainer.run(2, progress=False)
        # between forwards every streamed block points at its RAM copy
        parked = all(b.fc1.weight.data_ptr() == trainer.streamer.streamed[i].host[0].data_ptr()
                     for i, b in enumerate(net.blocks) if i != len(net.blocks) - 1)
    assert seen and parked
    assert max(r for _, r, _ in seen) <= 2
    assert not any(on_host for _, _, on_host in seen), "a block computed on its RAM copy, not a device copy"


def test_the_device_copies_are_freed_when_the_run_ends():
    net = make_deep_net()
    refs = []
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(), blocks=list(net.blocks),
                         streamed_blocks=(1, 2)) as trainer:
        net.blocks[1].register_forward_hook(lambda m, a, o: refs.append(weakref.ref(m.fc1.weight)), prepend=True)
        trainer.run(1, progress=False)
        streamer = trainer.streamer
    gc.collect()
    assert refs and all(r() is None for r in refs)
    assert not streamer.streamed and not streamer._resident


def test_streaming_needs_gradient_checkpointing():
    net = make_deep_net()
    layout = [n for n, _ in net.named_modules()]
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(gradient_checkpointing=False),
                        blocks=list(net.blocks), streamed_blocks=(0,))
    assert [n for n, _ in net.named_modules()] == layout  # adapters removed again


def test_a_block_that_does_not_exist_is_named():
    net = make_deep_net()
    with pytest.raises(ValueError, match="block 7 does not exist"):
        BlockStreamer(list(net.blocks), "cpu", offload=(7,))

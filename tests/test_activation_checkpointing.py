"""checkpoint_blocks: blocks that add their residual in place (as ComfyUI's Flux blocks do) train correctly."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from shortcut_core.activation_checkpointing import checkpoint_blocks


class PreNormBlock(nn.Module):
    """x += fc2(silu(fc1(norm(x)))): the norm saves x for backward, then x is changed in place."""

    def __init__(self, width: int, inplace: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.inplace = inplace

    def forward(self, x, scale=None):
        update = self.fc2(torch.nn.functional.silu(self.fc1(self.norm(x))))
        if scale is not None:
            update = update * scale
        if self.inplace:
            x += update
            return x
        return x + update


def make(inplace: bool) -> nn.ModuleList:
    torch.manual_seed(0)  # module construction only
    return nn.ModuleList([PreNormBlock(8, inplace) for _ in range(3)])


def run(blocks, x_in, scale):
    h = x_in * 1.0  # a non-leaf input, as the output of a previous layer
    for block in blocks:
        h = block(h, scale=scale)
    return h


def grads(blocks, x_in, scale, **wrap):
    for p in blocks.parameters():
        p.grad = None
    x = x_in.clone().requires_grad_(True)
    if wrap:
        with checkpoint_blocks(blocks, **wrap):
            out = run(blocks, x, scale)
            out.pow(2).sum().backward()
    else:
        out = run(blocks, x, scale)
        out.pow(2).sum().backward()
    return out.detach(), [p.grad.clone() for p in blocks.parameters()] + [x.grad.clone()]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 8, generator=g), torch.rand(4, 1, generator=g) + 0.5


def test_plain_autograd_fails_on_inplace_blocks(data):
    x, scale = data
    with pytest.raises(RuntimeError, match="inplace"):
        grads(make(inplace=True), x, scale)


@pytest.mark.parametrize("recompute", [True, False])
def test_inplace_blocks_get_the_out_of_place_gradients(data, recompute):
    x, scale = data
    out_ref, ref = grads(make(inplace=False), x, scale)
    out, got = grads(make(inplace=True), x, scale, recompute=recompute, clone_inputs=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_without_cloning_would_be_wrong(data):
    """Guards the clone: recomputing from an input the block mutated gives wrong gradients or fails."""
    x, scale = data
    _, ref = grads(make(inplace=False), x, scale)
    try:
        _, got = grads(make(inplace=True), x, scale, recompute=True, clone_inputs=False)
    except RuntimeError:
        return
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, ref))


def test_callers_tensors_are_not_mutated(data):
    x, scale = data
    blocks = make(inplace=True)
    for recompute in (True, False):
        h = x.clone().requires_grad_(True) * 1.0
        h_before = h.detach().clone()
        with checkpoint_blocks(blocks, recompute=recompute):
            blocks[0](h, scale=scale).sum().backward()
        assert torch.equal(h.detach(), h_before)


def test_no_grad_runs_the_block_as_usual(data):
    x, scale = data
    blocks = make(inplace=True)
    with torch.no_grad():
        ref_in = x.clone()
        ref = blocks[0](ref_in, scale=scale).clone()
        with checkpoint_blocks(blocks):
            y_in = x.clone()
            y = blocks[0](y_in, scale=scale)
    assert torch.equal(y, ref)


def test_forwards_are_restored_also_on_error():
    blocks = make(inplace=False)
    originals = [b.forward for b in blocks]
    with pytest.raises(KeyError):
        with checkpoint_blocks(blocks):
            assert all("forward" in b.__dict__ for b in blocks)
            raise KeyError("boom")
    assert all("forward" not in b.__dict__ for b in blocks)
    assert [b.forward for b in blocks] == originals
    # wrapping one block twice is refused, and what was wrapped is unwrapped again
    with pytest.raises(ValueError, match="once"):
        with checkpoint_blocks([blocks[0], blocks[1], blocks[0]]):
            pass
    assert all("forward" not in b.__dict__ for b in blocks)


class TwoResidualBlock(nn.Module):
    """As ComfyUI's DoubleStreamBlock: norm, `x += ...`, norm again, `x += ...` on the same tensor."""

    def __init__(self, width: int, inplace: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.inplace = inplace

    def forward(self, x, scale=None):
        if self.inplace:
            x += self.fc1(self.norm1(x))
            x += self.fc2(self.norm2(x))
            return x
        x = x + self.fc1(self.norm1(x))
        return x + self.fc2(self.norm2(x))


def make_two(inplace: bool) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList([TwoResidualBlock(8, inplace) for _ in range(3)])


@pytest.mark.parametrize("recompute", [True, False])
def test_blocks_that_mutate_their_input_twice_get_the_out_of_place_gradients(data, recompute):
    x, scale = data
    _, want = grads(make_two(inplace=False), x, scale)
    _, got = grads(make_two(inplace=True), x, scale, recompute=recompute, clone_inputs=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_torch_checkpoint_with_cloned_inputs_is_wrong_on_such_blocks(data):
    """Why checkpoint_blocks recomputes on its own: torch's non-reentrant checkpoint returns
    wrong gradients here although every block runs on a clone of its input."""
    from torch.utils.checkpoint import checkpoint

    x_in, scale = data
    _, want = grads(make_two(inplace=False), x_in, scale)
    blocks = make_two(inplace=True)
    x = x_in.clone().requires_grad_(True)
    h = x * 1.0
    for block in blocks:
        h = checkpoint(lambda t, b=block: b(t.clone()), h, use_reentrant=False)
    h.pow(2).sum().backward()
    got = [p.grad for p in blocks.parameters()] + [x.grad]
    assert not all(torch.allclose(g, w, rtol=1e-4, atol=1e-6) for g, w in zip(got, want))


def test_parameters_inside_blocks_learn_when_no_block_input_requires_grad(data):
    x, scale = data  # x does not require grad: nothing trainable upstream of the blocks
    blocks = make(inplace=True)
    with checkpoint_blocks(blocks, recompute=True):
        run(blocks, x, scale).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks.parameters())


@pytest.mark.parametrize("recompute", [True, False])
def test_tensors_packed_in_tuples_and_dataclasses_get_their_gradients(recompute):
    """Chroma's blocks take their modulation as tuples of dataclasses of tensors made upstream (its approximator):
    those tensors are the block's inputs too, or the upstream layer loses the blocks' share of its gradient."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Modulation:
        shift: torch.Tensor
        scale: torch.Tensor

    class ModulatedBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, vec):
            (mod,), extra = vec
            x = x + self.fc(x * (1 + mod.scale) + mod.shift) * extra["gate"]
            return x

    torch.manual_seed(0)
    upstream, blocks = nn.Linear(8, 24), nn.ModuleList([ModulatedBlock() for _ in range(2)])
    x_in = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))

    def gradients(wrap: bool):
        for p in [*upstream.parameters(), *blocks.parameters()]:
            p.grad = None
        with checkpoint_blocks(blocks, recompute=recompute) if wrap else contextlib.nullcontext():
            shift, scale, gate = upstream(x_in).chunk(3, dim=-1)
            h = x_in
            for block in blocks:
                h = block(h, vec=((Modulation(shift, scale),), {"gate": gate}))
            h.pow(2).sum().backward()
        return [p.grad.clone() for p in [*upstream.parameters(), *blocks.parameters()]]

    for got, want in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(got, want)

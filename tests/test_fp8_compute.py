"""fp8 matmuls for the no-grad passes (fp8_compute.py), on the CPU: the emulation runs _scaled_mm's arithmetic, and
torch's CPU _scaled_mm stands in for the GPU kernel's call.

Tolerance: e4m3 keeps 3 mantissa bits, so each quantized input and weight entry is off by at most 1/16 relative (half
an ulp), about 1/16/sqrt(3) ~ 3.6 % RMS for entries spread over the binades; an output sums many such products, whose
errors partly cancel: a relative Frobenius error of 3-4 % per layer on Gaussian data (measured 3.4-3.8 %; a whole
tiny net 3.5-3.8 %). The bound asserted is 0.08, and the result must not be bit-identical (the fp8 path did run).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from shortcut_core.activation_checkpointing import checkpoint_blocks
from shortcut_core.adapters import STUDENT, ShortcutAdapters
from shortcut_core.fp8_compute import (E4M3_MAX, Fp8NoGradLinears, fp8_compute_supported, fp8_matmul,
                                       fp8_no_grad_linears, frozen_linears, quantize_e4m3)
from shortcut_core.trainer import ShortcutTrainer

from test_trainer import cfg, make_latents, make_net, velocity_of

FP8_REL_ERROR = 0.08


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def frozen_linear(n_in: int = 64, n_out: int = 48, dtype=torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, dtype=dtype).requires_grad_(False)


def inputs(*shape, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_output_is_fp8_close_but_not_identical(dtype):
    layer = frozen_linear(dtype=dtype)
    x = inputs(3, 5, 64, dtype=dtype)  # [..., in]: flattened to 2-D and back
    with torch.no_grad():
        plain = layer(x)
        with fp8_no_grad_linears(layer) as fp8:
            out = layer(x)
    assert fp8.fp8_calls == 1 and out.shape == plain.shape and out.dtype == dtype
    assert not torch.equal(out, plain)
    assert rel_error(out, plain) < FP8_REL_ERROR


def test_emulation_is_the_quantized_product():
    """The CPU path is (x/sx)_e4m3 @ (W/sw)_e4m3^T * sx * sw + b: exactly, with the scales amax / 448."""
    layer = frozen_linear()
    x = inputs(7, 64)
    xq, sx = quantize_e4m3(x)
    wq, sw = quantize_e4m3(layer.weight)
    assert float(sx) == pytest.approx(float(x.abs().max()) / E4M3_MAX)
    assert float(xq.float().abs().max()) == E4M3_MAX
    expected = ((xq.double() @ wq.double().t()) * (float(sx) * float(sw)) + layer.bias.double()).float()
    with torch.no_grad(), fp8_no_grad_linears(layer, kernel=False):
        out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_call_matches_the_emulation_and_meets_cudas_layout(monkeypatch, dtype):
    """kernel=True calls torch._scaled_mm as the GPU path does (run here by torch's CPU kernel): operands laid out
    as CUDA's requires (row-major fp8 A, column-major fp8 B, sides multiples of 16, float32 scalar scales, a bias
    only for half-precision outputs), and results equal to the emulation's."""
    real, calls = torch._scaled_mm, []

    def checked(a, b, *, scale_a, scale_b, bias=None, out_dtype=None, **kw):
        assert a.dtype == b.dtype == torch.float8_e4m3fn
        assert a.stride(1) == 1 and a.stride(0) == a.shape[1]          # row-major
        assert b.stride(0) == 1 and b.stride(1) == b.shape[0]          # column-major
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.numel() == scale_b.numel() == 1
        assert bias is None or (out_dtype in (torch.float16, torch.bfloat16) and bias.dtype == out_dtype)
        calls.append(bias is not None)
        return real(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype, **kw)

    layer = frozen_linear(dtype=dtype)
    x = inputs(2, 9, 64, dtype=dtype)
    with torch.no_grad():
        with fp8_no_grad_linears(layer, kernel=False):
            emulated = layer(x)
        monkeypatch.setattr(torch, "_scaled_mm", checked)
        try:
            with fp8_no_grad_linears(layer, kernel=True):
                kernel = layer(x)
        except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - a torch without CPU _scaled_mm
            pytest.skip(f"no CPU _scaled_mm here: {e}")
    assert calls == [dtype == torch.bfloat16]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kernel, emulated, **tol)


def test_stored_e4m3_weights_are_used_as_they_are_with_their_scale():
    """ComfyUI's fp8 checkpoints: the stored e4m3 weight and its scale_weight enter the product unquantized again."""

    class CastingLinear(nn.Linear):  # as ComfyUI's manual_cast Linear: the weight is cast to the input's dtype
        def forward(self, x):
            return nn.functional.linear(x, self.weight.to(x.dtype) * self.scale_weight.to(x.dtype), self.bias)

    layer = CastingLinear(32, 16)
    layer.weight = nn.Parameter(inputs(16, 32, seed=4).mul(100).clamp(-448, 448).to(torch.float8_e4m3fn),
                                requires_grad=False)
    layer.bias.requires_grad_(False)
    layer.scale_weight = torch.tensor(0.01)
    x = inputs(6, 32)
    xq, sx = quantize_e4m3(x)
    with torch.no_grad():
        plain = layer(x)
        with fp8_no_grad_linears(layer) as fp8:
            out = layer(x)
    assert fp8.cached_bytes == 0  # nothing copied
    expected = fp8_matmul(xq, sx, layer.weight, torch.tensor(0.01), layer.bias, torch.float32, kernel=False)
    assert torch.equal(out, expected)
    assert 0 < rel_error(out, plain) < FP8_REL_ERROR


# ---------------------------------------------------------------------------------------------- grad passes exact

def test_with_grad_outputs_and_gradients_are_bit_identical():
    layer = frozen_linear()
    x = inputs(4, 64).requires_grad_(True)
    plain = layer(x)
    (gx_plain,) = torch.autograd.grad(plain.square().sum(), x)
    with fp8_no_grad_linears(layer) as fp8:
        out = layer(x)
        (gx,) = torch.autograd.grad(out.square().sum(), x)
    assert fp8.fp8_calls == 0
    assert torch.equal(out, plain) and torch.equal(gx, gx_plain)


def test_a_checkpointed_students_forward_stays_exact():
    """checkpoint_blocks runs each block's forward inside an autograd Function, without grad: the forward and
    gradients must still be the exact ones (the grad mode is read where the model is called)."""
    net = make_net()
    for p in net.parameters():
        p.requires_grad_(False)
    net.out.weight.requires_grad_(True)  # a trainable tensor after the blocks
    x, t = make_latents(4, seed=2), torch.rand(4, generator=torch.Generator().manual_seed(3))

    def loss_and_grad():
        with checkpoint_blocks(net.blocks, recompute=True):
            y = net(x, t)
            return y, torch.autograd.grad(y.square().sum(), net.out.weight)[0]

    y_plain, g_plain = loss_and_grad()
    with fp8_no_grad_linears(net) as fp8:
        y, g = loss_and_grad()
        assert fp8.fp8_calls == 0
        with torch.no_grad():
            net(x, t)  # the same model without grad does run fp8
        assert fp8.fp8_calls == 4  # the blocks' four 32x32 layers; inp (34 in) is not a multiple of 16 and out trains
    assert torch.equal(y, y_plain) and torch.equal(g, g_plain)


# ---------------------------------------------------------------------------------------------- restored on exit

def _patched_state(net: nn.Module):
    return ([("forward" in m.__dict__) for m in net.modules()], [len(m._forward_hooks) + len(m._forward_pre_hooks)
                                                                 for m in net.modules()])


def test_modules_are_restored_on_exit_also_when_the_body_raises():
    net = make_net().requires_grad_(False)
    x, t = make_latents(3, seed=5), torch.full((3,), 0.4)
    own_forward = net.blocks[0].fc1.forward  # a layer with an instance forward of its own keeps it
    net.blocks[0].fc1.forward = own_forward
    before = _patched_state(net)
    with torch.no_grad():
        y0 = net(x, t)
        with pytest.raises(KeyError):
            with fp8_no_grad_linears(net) as fp8:
                assert len(fp8.patched) == 5 and not torch.equal(net(x, t), y0)
                raise KeyError("boom")
        assert _patched_state(net) == before and net.blocks[0].fc1.__dict__["forward"] is own_forward
        assert fp8.cached_bytes == 0
        assert torch.equal(net(x, t), y0)
        with fp8_no_grad_linears(net, enabled=False) as off:
            assert off.patched == [] and torch.equal(net(x, t), y0)


def test_cached_weights_follow_in_place_changes_and_replaced_tensors():
    layer = frozen_linear()
    x = inputs(5, 64)
    with torch.no_grad(), fp8_no_grad_linears(layer) as fp8:
        first = layer(x)
        assert fp8.cached_bytes == 64 * 48  # one fp8 byte per weight
        layer.weight.mul_(2)  # in place: the _version moves
        torch.testing.assert_close(layer(x) - layer.bias, 2 * (first - layer.bias), rtol=1e-6, atol=1e-5)
        old = weakref.ref(layer.weight)
        layer.weight = nn.Parameter(torch.zeros(48, 64), requires_grad=False)  # a new tensor (as block streaming puts)
        assert old() is None and fp8.cached_bytes == 0  # the copy went with the weight it was made from
        assert torch.equal(layer(x), layer.bias.expand(5, 48))
    assert fp8.cached_bytes == 0


# ---------------------------------------------------------------------------------------------- LoRA left alone

def test_lora_layers_stay_in_full_precision():
    net = make_net()
    adapters = ShortcutAdapters(net, rank=4, alpha=4.0, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            for name, p in adapters.named_parameters(STUDENT):
                if name.endswith("lora_up"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        x, t = make_latents(3, seed=6), torch.full((3,), 0.7)
        layer = net.blocks[1].fc2  # peft's wrapper around the base linear
        h = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            lora_plain = layer(h) - layer.base_layer(h)
            with fp8_no_grad_linears(net) as fp8:
                assert all("lora_" not in n for n in fp8.patched) and all(n.endswith("base_layer") for n in fp8.patched)
                assert all("forward" not in m.__dict__ for n, m in net.named_modules() if "lora_" in n)
                assert not any("forward" in m.__dict__ for m in adapters.layers.values())  # the wrappers
                lora_fp8 = layer(h) - layer.base_layer(h)
                assert fp8.fp8_calls == 2 and torch.isfinite(net(x, t)).all()
                assert fp8.fp8_calls == 2 + 5  # a whole forward: the five 16-aligned base layers
        # the LoRA's term is the same exact one; only its sum with the fp8 base output is rounded
        torch.testing.assert_close(lora_fp8, lora_plain, rtol=1e-5, atol=1e-5)
        assert [n for n, _ in frozen_linears([net])] == fp8.patched
    finally:
        adapters.detach()


# ---------------------------------------------------------------------------------------------- training

def _train(fp8: bool, seed: int = 3, gradient_checkpointing: bool = True):
    net = make_net()
    config = cfg(steps=6, seed=seed, learning_rate=1e-3, gradient_checkpointing=gradient_checkpointing,
                 fp8_targets=fp8)
    with ShortcutTrainer(net, velocity_of(net), make_latents(), config, blocks=list(net.blocks)) as tr:
        result = tr.run(progress=False)
        calls = tr._fp8.fp8_calls if tr._fp8 is not None else 0
        # outside the targets (previews, calibration, this) the model runs exactly
        x, t = make_latents(8, seed=11), torch.linspace(0.1, 0.9, 8)
        with torch.no_grad():
            student = net(x, t)
            with tr.adapters.use("base"):
                base = net(x, t)
        assert (tr._fp8.fp8_calls if tr._fp8 is not None else 0) == calls
    assert not any("forward" in m.__dict__ for m in net.modules())  # every layer restored
    return result, student - base, calls


def test_training_with_fp8_targets_stays_close_to_the_plain_run():
    """The targets' no-grad passes run fp8; the student's (checkpointed) forward and backward do not.

    Bound: fp8 moves every target by its ~3.5 % velocity error, while the SCFM signal (target minus the student's
    velocity) is only ~8 % of |v| in this tiny model (measured: the fp8 target error is ~40 % of the residual
    trained on). So a short run's LoRA moves noticeably: measured on the student's learned change of output
    (student minus base) 0.49 relative, and 0.61 on the up factors. The bound compares with the run's own
    randomness: fp8 must change the learned function less than 0.7x what another seed's noise and draws change it
    (measured 1.12 relative, so a ratio of 0.44), and stay under 0.75 relative in absolute terms."""
    plain, delta_plain, calls_plain = _train(False)
    fp8, delta_fp8, calls = _train(True)
    other_seed, delta_seed, _ = _train(False, seed=4)
    assert calls_plain == 0 and calls > 0
    assert all(torch.isfinite(torch.tensor(fp8.losses)))
    assert fp8.losses != plain.losses  # the targets did change
    fp8_change = rel_error(delta_fp8, delta_plain)
    seed_change = rel_error(delta_seed, delta_plain)
    assert fp8_change < 0.75 and fp8_change < 0.7 * seed_change, (fp8_change, seed_change)
    # the losses stay of the plain run's size (fp8's target noise adds to the residual, never explodes it)
    assert max(fp8.losses) < 3 * max(plain.losses)
    # the student's pass is exact: checkpointed (its forward runs without grad inside an autograd Function) or not,
    # the fp8 run is the same run
    unchecked, delta_unchecked, _ = _train(True, gradient_checkpointing=False)
    assert unchecked.losses == pytest.approx(fp8.losses, rel=1e-5)
    torch.testing.assert_close(delta_unchecked, delta_fp8, rtol=1e-4, atol=1e-6)


def test_fp8_compute_supported_is_false_without_an_fp8_cuda_card():
    assert fp8_compute_supported("cpu") is False
    if not torch.cuda.is_available():
        assert fp8_compute_supported() is False
    assert isinstance(Fp8NoGradLinears(nn.Linear(16, 16)), Fp8NoGradLinears)

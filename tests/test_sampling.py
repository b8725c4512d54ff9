"""sample_euler on analytic velocity fields, against Euler walks computed by hand."""

from __future__ import annotations

import pytest
import torch

from shortcut_core.sampling import sample_euler
from shortcut_core.schedules import shifted_schedule

SIGMAS = [0.99999, 0.8, 0.55, 0.2, 0.0]


def _x(gen_seed=0, shape=(3, 2, 4), dtype=torch.float64):
    g = torch.Generator().manual_seed(gen_seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def test_constant_field_moves_by_total_time():
    x = _x()
    c = torch.linspace(-1.0, 2.0, 8, dtype=torch.float64).reshape(1, 2, 4)
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    out = sample_euler(lambda x, t: c.expand_as(x), x, sigmas, disable=True)
    # Euler is exact for a constant field: x_end = x + (s_end - s_0) * c
    torch.testing.assert_close(out, x + (SIGMAS[-1] - SIGMAS[0]) * c, rtol=0, atol=1e-14)


@pytest.mark.parametrize("c", [0.7, -1.3])
def test_linear_field_matches_hand_walk(c):
    x = _x(1)
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    out = sample_euler(lambda x, t: c * x, x, sigmas, disable=True)
    factor = 1.0
    for s, s_next in zip(SIGMAS[:-1], SIGMAS[1:]):
        factor *= 1.0 + c * (s_next - s)
    torch.testing.assert_close(out, x * factor, rtol=1e-13, atol=1e-14)
    # and it is not the exact ODE solution (Euler, not exponential integration)
    import math
    assert abs(factor - math.exp(c * (SIGMAS[-1] - SIGMAS[0]))) > 1e-3


def test_time_dependent_field_uses_the_left_time_of_each_step():
    # v = t * w: Euler takes t at the start of each step
    x = _x(2)
    w = torch.full_like(x, 2.0)
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    out = sample_euler(lambda x, t: t.reshape(-1, 1, 1) * w, x, sigmas, disable=True)
    expected = x.clone()
    for s, s_next in zip(SIGMAS[:-1], SIGMAS[1:]):
        expected = expected + (s_next - s) * s * w
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-14)


def test_velocity_receives_per_item_times_and_the_current_x():
    x = _x(3, shape=(5, 3))
    sigmas = shifted_schedule(3, 3.25, dtype=torch.float64)
    seen = []

    def velocity(x_in, t):
        seen.append((x_in.clone(), t.clone()))
        return torch.ones_like(x_in)

    sample_euler(velocity, x, sigmas, disable=True)
    assert len(seen) == 3
    expected_x = x.clone()
    for i, (x_in, t) in enumerate(seen):
        assert t.shape == (5,)
        assert torch.equal(t, torch.full((5,), sigmas[i].item(), dtype=torch.float64))
        torch.testing.assert_close(x_in, expected_x, rtol=0, atol=1e-14)
        expected_x = expected_x + (sigmas[i + 1] - sigmas[i])


def test_callback_gets_step_information():
    x = _x(4)
    c = 0.5
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    calls = []
    sample_euler(lambda x, t: c * x + 1.0, x, sigmas, callback=lambda d: calls.append(dict(d)), disable=True)
    assert [d["i"] for d in calls] == [0, 1, 2, 3]
    expected_x = x.clone()
    for i, d in enumerate(calls):
        assert set(d) >= {"x", "i", "sigma", "sigma_next", "velocity", "denoised"}
        assert float(d["sigma"]) == SIGMAS[i]
        assert float(d["sigma_next"]) == SIGMAS[i + 1]
        v = c * expected_x + 1.0
        torch.testing.assert_close(d["x"], expected_x, rtol=0, atol=1e-14)
        torch.testing.assert_close(d["velocity"], v, rtol=0, atol=1e-14)
        torch.testing.assert_close(d["denoised"], expected_x - SIGMAS[i] * v, rtol=0, atol=1e-14)
        expected_x = expected_x + (SIGMAS[i + 1] - SIGMAS[i]) * v


def test_callback_exception_interrupts_sampling():
    x = _x(5)
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    n_calls = []

    class Stop(Exception):
        pass

    def velocity(x, t):
        n_calls.append(1)
        return x

    def callback(d):
        if d["i"] == 1:
            raise Stop

    with pytest.raises(Stop):
        sample_euler(velocity, x, sigmas, callback=callback, disable=True)
    assert len(n_calls) == 2  # no step after the interrupting callback


def test_extra_args_are_passed_through():
    x = _x(6, shape=(2, 3))
    cond = torch.randn(2, 7, generator=torch.Generator().manual_seed(0))
    received = []

    def velocity(x, t, cond=None, guidance=None, options=None):
        received.append((cond, guidance, options))
        return torch.zeros_like(x)

    opts = {"a": 1}
    out = sample_euler(velocity, x, torch.tensor([1.0, 0.5, 0.0]), extra_args={"cond": cond, "guidance": 3.5,
                                                                                "options": opts}, disable=True)
    assert torch.equal(out, x)
    assert len(received) == 2
    for c, g, o in received:
        assert c is cond and g == 3.5 and o is opts


def test_no_grad_and_input_untouched():
    x = _x(7)
    x_before = x.clone()
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    out = sample_euler(lambda x, t: x * w, x, torch.tensor(SIGMAS, dtype=torch.float64), disable=True)
    assert not out.requires_grad
    assert torch.equal(x, x_before)

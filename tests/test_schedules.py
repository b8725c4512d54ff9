"""Schedules against the closed forms of SCFM.md, computed independently in float64 Python."""

from __future__ import annotations

import math
import random

import pytest
import torch

from shortcut_core.schedules import (T_MAX, packed_token_count, resolution_mu, resolution_shift, schedule_points,
                                     shift_time, shifted_schedule)


def fixed_shift_ref(u: float, s: float) -> float:
    return s * u / (1.0 + (s - 1.0) * u)


def mu_ref(tokens: float) -> float:
    # the line through (256, 0.5) and (4096, 1.15)
    return 0.5 + (1.15 - 0.5) * (tokens - 256.0) / (4096.0 - 256.0)


def resolution_shift_ref(u: float, mu: float) -> float:
    # Flux's time shift: e^mu / (e^mu + (1/u - 1)^sigma) with sigma = 1
    if u == 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


U_GRID = [0.0, 1e-6, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("s", [1.0, 0.5, 2.5, 3.25, 4.5, 10.0])
def test_shift_time_matches_closed_form(s):
    u = torch.tensor(U_GRID, dtype=torch.float64)
    got = shift_time(u, s)
    want = torch.tensor([fixed_shift_ref(x, s) for x in U_GRID], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    assert got[0] == 0.0 and got[-1] == 1.0  # endpoints are fixed by every shift


def test_shift_time_with_per_item_tensor_shift():
    u = torch.tensor([[0.3], [0.3], [0.7]], dtype=torch.float64)
    s = torch.tensor([[1.0], [3.0], [4.5]], dtype=torch.float64)
    got = shift_time(u, s).flatten().tolist()
    want = [fixed_shift_ref(0.3, 1.0), fixed_shift_ref(0.3, 3.0), fixed_shift_ref(0.7, 4.5)]
    assert got == pytest.approx(want, rel=1e-14)


def test_resolution_mu_line():
    assert resolution_mu(256) == pytest.approx(0.5, abs=1e-15)
    assert resolution_mu(4096) == pytest.approx(1.15, abs=1e-15)
    for tokens in (64, 1024, 2000, 4096, 8192):
        assert resolution_mu(tokens) == pytest.approx(mu_ref(tokens), rel=1e-13)


@pytest.mark.parametrize("tokens", [256, 1024, 2304, 4096, 100])
def test_resolution_shift_is_the_e_mu_warp(tokens):
    s = resolution_shift(tokens)
    assert s == pytest.approx(math.exp(mu_ref(tokens)), rel=1e-13)
    mu = mu_ref(tokens)
    u = torch.tensor(U_GRID, dtype=torch.float64)
    got = shift_time(u, s)
    want = torch.tensor([resolution_shift_ref(x, mu) for x in U_GRID], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape, patch, expected", [
    ((16, 64, 64), 2, 1024),   # Flux 512 px latent
    ((16, 128, 128), 2, 4096),
    ((4, 65, 33), 2, 32 * 16),  # odd sizes are floored like a patchifier does
    ((16, 64, 64), 1, 4096),
    ((2, 10), 2, 10),          # not an image: elements per channel
    ((7,), 2, 7),
])
def test_packed_token_count(shape, patch, expected):
    assert packed_token_count(shape, patch_size=patch) == expected
    assert packed_token_count(torch.Size(shape), patch_size=patch) == expected


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 32, 50])
@pytest.mark.parametrize("shift", [1.0, 3.25, 2.5, 4.5])
def test_shifted_schedule_closed_form(steps, shift):
    t = shifted_schedule(steps, shift, dtype=torch.float64)
    assert t.shape == (steps + 1,)
    assert t.dtype == torch.float64
    assert t[0].item() == T_MAX
    assert t[-1].item() == 0.0
    assert bool((t[1:] < t[:-1]).all()), "schedule must decrease strictly"
    for i in range(1, steps + 1):
        u = 1.0 - i / steps
        assert t[i].item() == pytest.approx(fixed_shift_ref(u, shift), rel=1e-12, abs=1e-15)


def test_shifted_schedule_float32_is_the_rounded_float64_schedule():
    t64 = shifted_schedule(5, 3.25, dtype=torch.float64)
    t32 = shifted_schedule(5, 3.25)
    assert t32.dtype == torch.float32
    assert torch.equal(t32, t64.to(torch.float32))


def test_shifted_schedule_custom_t_max():
    t = shifted_schedule(4, 3.0, t_max=0.9, dtype=torch.float64)
    assert t[0].item() == 0.9
    assert t[1].item() == pytest.approx(fixed_shift_ref(0.75, 3.0), rel=1e-13)


@pytest.mark.parametrize("steps", [0, -1, 2.0, True, "3", None])
def test_shifted_schedule_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        shifted_schedule(steps, 3.0)


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf"), "3"])
def test_shifted_schedule_rejects_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        shifted_schedule(3, shift)


def test_schedule_points_equal_indexing_the_built_schedule():
    rng = random.Random(1234)
    lengths, starts, shifts, counts = [], [], [], []
    for _ in range(300):
        n = rng.choice([2, 4, 6, 8, 16, 32, 48])
        count = rng.choice([1, 2, 4])
        if count > n:
            count = 1
        start = rng.randrange(0, n - count + 1)
        if rng.random() < 0.2:
            start = 0  # the t_max replacement must happen
        lengths.append(n)
        starts.append(start)
        shifts.append(rng.uniform(0.5, 6.0))
        counts.append(count)
    for count in (1, 2, 4):
        idx = [i for i, c in enumerate(counts) if c == count]
        pts = schedule_points(torch.tensor([lengths[i] for i in idx]), torch.tensor([starts[i] for i in idx]), count,
                              torch.tensor([shifts[i] for i in idx], dtype=torch.float64))
        assert pts.dtype == torch.float64
        assert pts.shape == (len(idx), count + 1)
        for row, i in enumerate(idx):
            full = shifted_schedule(lengths[i], shifts[i], dtype=torch.float64)
            want = full[starts[i]: starts[i] + count + 1]
            assert (pts[row] - want).abs().max().item() <= 1e-12, (lengths[i], starts[i], shifts[i])
            if starts[i] == 0:
                assert pts[row, 0].item() == T_MAX


def test_schedule_points_t_max_only_at_index_zero_and_custom_t_max():
    pts = schedule_points(torch.tensor([4, 4]), torch.tensor([0, 2]), 2, torch.tensor([3.0, 3.0], dtype=torch.float64),
                          t_max=0.95)
    assert pts[0, 0].item() == 0.95
    assert pts[0, 1].item() == pytest.approx(fixed_shift_ref(0.75, 3.0), rel=1e-13)
    assert pts[1, 0].item() == pytest.approx(fixed_shift_ref(0.5, 3.0), rel=1e-13)
    assert pts[1, 2].item() == 0.0

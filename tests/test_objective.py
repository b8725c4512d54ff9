"""The SCFM objective: item draws, the average-velocity target, and the small helpers around it.

The central tests use analytic velocity fields whose Euler sub-step walk can be done by hand,
with a DIFFERENT field for the teacher, the fast EMA and the slow EMA, so that a target built
from the wrong model, the wrong half or the wrong step sizes cannot pass.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from shortcut_core.config import ShortcutConfig
from shortcut_core.objective import (ItemRole, ShortcutDraw, accumulation_dtype, average_velocity_target,
                                     draw_shortcut_items, euler_walk, flow_velocity_target, interpolate, select_items,
                                     shortcut_loss)
from shortcut_core.schedules import resolution_shift, shifted_schedule

FLOW, TEACHER, SELF = int(ItemRole.FLOW), int(ItemRole.TEACHER), int(ItemRole.SELF)


def f32(t: float) -> float:
    """A flow time as the velocity callable sees it (float32)."""
    return float(torch.tensor(t, dtype=torch.float64).to(torch.float32))


def make_draw(roles, times, guidance=None) -> ShortcutDraw:
    times = torch.tensor(times, dtype=torch.float64)
    b = times.shape[0]
    return ShortcutDraw(role=torch.tensor(roles, dtype=torch.int64),
                        schedule_length=torch.full((b,), 32, dtype=torch.int64),
                        shift=torch.full((b,), 3.0, dtype=torch.float64),
                        start=torch.zeros(b, dtype=torch.int64), times=times, guidance=guidance)


def data(b, shape=(3, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((b, *shape), generator=g, dtype=dtype)
    noise = torch.randn((b, *shape), generator=g, dtype=dtype)
    return x0, noise


# ---------------------------------------------------------------------------------------------- target by hand

TIMES2 = [
    [0.99999, 0.93, 0.81],
    [0.7, 0.55, 0.3],
    [0.42, 0.2, 0.0],
    [0.99999, 0.96, 0.9],
    [0.6, 0.31, 0.05],
    [0.25, 0.125, 0.0],
]
ROLES2 = [TEACHER, SELF, FLOW, SELF, TEACHER, SELF]


def test_average_velocity_target_by_hand_t_skip_2():
    """teacher v = 1, fast EMA v = 2, slow EMA v = x: every item's target in closed form."""
    b = len(ROLES2)
    x0, noise = data(b)
    draw = make_draw(ROLES2, TIMES2)
    x_t = interpolate(x0, noise, draw.times[:, 0])

    target = average_velocity_target(
        x_t, x0, noise, draw,
        teacher=lambda x, t: torch.ones_like(x),
        fast_ema=lambda x, t: torch.full_like(x, 2.0),
        slow_ema=lambda x, t: x.clone())

    assert target.shape == x_t.shape and target.dtype == torch.float64
    for i, (role, (t0, t1, t2)) in enumerate(zip(ROLES2, TIMES2)):
        if role == FLOW:
            assert torch.equal(target[i], noise[i] - x0[i])
            continue
        first = 1.0 if role == TEACHER else 2.0
        dt0, dt1 = t0 - t1, t1 - t2
        x_mid = x_t[i] - dt0 * first             # first half: teacher / fast EMA, one sub-step
        expected = (dt0 * first + dt1 * x_mid) / (t0 - t2)  # second half: slow EMA v = x
        torch.testing.assert_close(target[i], expected, rtol=1e-13, atol=1e-13)


def test_average_velocity_target_distinguishes_all_three_models():
    """Swapping any two of teacher / fast / slow changes the target of the affected items."""
    b = len(ROLES2)
    x0, noise = data(b, seed=1)
    draw = make_draw(ROLES2, TIMES2)
    x_t = interpolate(x0, noise, draw.times[:, 0])
    fields = {"a": lambda x, t: torch.ones_like(x), "b": lambda x, t: torch.full_like(x, 2.0),
              "c": lambda x, t: x.clone()}
    ref = average_velocity_target(x_t, x0, noise, draw, teacher=fields["a"], fast_ema=fields["b"], slow_ema=fields["c"])
    swapped_tf = average_velocity_target(x_t, x0, noise, draw, teacher=fields["b"], fast_ema=fields["a"],
                                         slow_ema=fields["c"])
    swapped_fs = average_velocity_target(x_t, x0, noise, draw, teacher=fields["a"], fast_ema=fields["c"],
                                         slow_ema=fields["b"])
    role = torch.tensor(ROLES2)
    shortcut = role != FLOW
    assert not torch.allclose(ref[shortcut], swapped_tf[shortcut])
    assert not torch.allclose(ref[role == SELF], swapped_fs[role == SELF])
    # FLOW items never depend on the models
    assert torch.equal(ref[~shortcut], swapped_tf[~shortcut])


def reference_walk(x_t, times, first, slow):
    """Plain-Python sub-step walk for one item (float64); fields see float32 times, steps use float64."""
    k = len(times) - 1
    half = k // 2
    x = x_t.clone()
    displacement = torch.zeros_like(x)
    for i in range(k):
        field = first if i < half else slow
        v = field(x, f32(times[i]))
        dt = times[i] - times[i + 1]
        displacement = displacement + dt * v
        x = x - dt * v
    return displacement / (times[0] - times[k])


def test_average_velocity_target_by_hand_t_skip_4_time_dependent_fields():
    """t_skip = 4: two sub-steps by teacher / fast EMA, two by the slow EMA; fields depend on x and t."""
    times = [
        [0.99999, 0.97, 0.92, 0.85, 0.74],
        [0.8, 0.7, 0.6, 0.5, 0.4],
        [0.5, 0.4, 0.3, 0.2, 0.1],
        [0.3, 0.2, 0.12, 0.05, 0.0],
        [0.66, 0.6, 0.5, 0.33, 0.2],
    ]
    roles = [SELF, TEACHER, FLOW, TEACHER, SELF]
    x0, noise = data(len(roles), shape=(2, 5), seed=2)
    draw = make_draw(roles, times)
    x_t = interpolate(x0, noise, draw.times[:, 0])

    def teacher_v(x, t):  # v = 1 + t
        return torch.ones_like(x) + t

    def fast_v(x, t):     # v = 2 - x
        return 2.0 - x

    def slow_v(x, t):     # v = 0.5 x + t^2
        return 0.5 * x + t * t

    def batched(field):
        def velocity(x, t):
            assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
            return field(x, t.to(x.dtype).reshape(-1, 1, 1))
        return velocity

    target = average_velocity_target(x_t, x0, noise, draw, teacher=batched(teacher_v), fast_ema=batched(fast_v),
                                     slow_ema=batched(slow_v))
    for i, role in enumerate(roles):
        if role == FLOW:
            assert torch.equal(target[i], noise[i] - x0[i])
            continue
        first = teacher_v if role == TEACHER else fast_v
        expected = reference_walk(x_t[i], times[i], first, slow_v)
        torch.testing.assert_close(target[i], expected, rtol=1e-12, atol=1e-12)

    # and in closed form for the TEACHER item 1 (v = 1 + t, then v = 0.5 x + t^2)
    t = times[1]
    dts = [t[j] - t[j + 1] for j in range(4)]
    x = x_t[1].clone()
    total = torch.zeros_like(x)
    for j in range(2):
        v = 1.0 + f32(t[j])
        total += dts[j] * v
        x = x - dts[j] * v
    for j in range(2, 4):
        v = 0.5 * x + f32(t[j]) ** 2
        total += dts[j] * v
        x = x - dts[j] * v
    torch.testing.assert_close(target[1], total / (t[0] - t[4]), rtol=1e-12, atol=1e-12)


def test_constant_field_everywhere_gives_that_constant():
    """If teacher, fast and slow EMA all predict the same constant velocity, the average velocity is it."""
    roles = [TEACHER, SELF, SELF, TEACHER]
    times = [[0.99999, 0.9, 0.7], [0.5, 0.45, 0.4], [0.2, 0.1, 0.0], [0.8, 0.3, 0.1]]
    x0, noise = data(4, seed=3)
    c = torch.randn(3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    draw = make_draw(roles, times)
    x_t = interpolate(x0, noise, draw.times[:, 0])
    v = lambda x, t: c.expand_as(x).clone()  # noqa: E731
    target = average_velocity_target(x_t, x0, noise, draw, teacher=v, fast_ema=v, slow_ema=v)
    torch.testing.assert_close(target, c.expand_as(target), rtol=1e-13, atol=1e-13)


def test_all_flow_items_need_no_model_call():
    x0, noise = data(3, seed=4)
    draw = make_draw([FLOW] * 3, [[0.9, 0.8, 0.7]] * 3)
    x_t = interpolate(x0, noise, draw.times[:, 0])

    def boom(x, t):
        raise AssertionError("no velocity call is needed for FLOW items")

    target = average_velocity_target(x_t, x0, noise, draw, teacher=boom, fast_ema=boom, slow_ema=boom)
    assert torch.equal(target, noise - x0)


def test_bf16_latents_give_float32_target():
    roles = [TEACHER, SELF, FLOW]
    times = [[0.99999, 0.9, 0.7], [0.5, 0.45, 0.4], [0.2, 0.1, 0.0]]
    x0, noise = data(3, seed=5, dtype=torch.bfloat16)
    draw = make_draw(roles, times)
    x_t = interpolate(x0, noise, draw.times[:, 0])
    target = average_velocity_target(x_t, x0, noise, draw, teacher=lambda x, t: torch.ones_like(x),
                                     fast_ema=lambda x, t: torch.full_like(x, 2.0), slow_ema=lambda x, t: x.clone())
    assert target.dtype == torch.float32
    assert torch.equal(target[2], noise[2].float() - x0[2].float())
    # teacher item: (dt0 * 1 + dt1 * x_mid) / jump, with x_mid held in bf16 like the model would see it
    t0, t1, t2 = times[0]
    x_mid = (x_t[0] - torch.tensor(t0 - t1, dtype=torch.float32).to(torch.bfloat16)).float()
    expected = ((t0 - t1) * 1.0 + (t1 - t2) * x_mid) / (t0 - t2)
    torch.testing.assert_close(target[0], expected, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------- batching of calls

class Recorder:
    def __init__(self, name, value, log):
        self.name, self.value, self.log = name, value, log

    def __call__(self, x, t, *, ident, shared):
        self.log.append({"who": self.name, "n": x.shape[0], "ident": ident.tolist(), "t": t.clone(), "shared": shared})
        assert ident.shape[0] == x.shape[0] == t.shape[0]
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("t_skip", [2, 4])
def test_items_of_one_role_share_each_forward(t_skip):
    roles = [FLOW, TEACHER, SELF, SELF, TEACHER, SELF, FLOW, TEACHER]
    b = len(roles)
    times = [[1.0 - 0.1 * j - 0.01 * i for j in range(t_skip + 1)] for i in range(b)]
    x0, noise = data(b, seed=6)
    draw = make_draw(roles, times)
    x_t = interpolate(x0, noise, draw.times[:, 0])
    log = []
    shared = object()
    ident = torch.arange(b, dtype=torch.float32) * 10
    average_velocity_target(x_t, x0, noise, draw, teacher=Recorder("teacher", 1.0, log),
                            fast_ema=Recorder("fast", 2.0, log), slow_ema=Recorder("slow", 3.0, log),
                            extra_args={"ident": ident, "shared": shared})
    half = t_skip // 2
    counts = Counter(call["who"] for call in log)
    assert counts == {"teacher": half, "fast": half, "slow": t_skip - half}
    teacher_items = [i for i, r in enumerate(roles) if r == TEACHER]
    self_items = [i for i, r in enumerate(roles) if r == SELF]
    shortcut_items = sorted(teacher_items + self_items)
    step = Counter()
    for call in log:
        items = {"teacher": teacher_items, "fast": self_items, "slow": shortcut_items}[call["who"]]
        assert call["n"] == len(items)
        # per-item extra arguments follow the items; shared ones pass through as the same object
        assert call["ident"] == [10.0 * i for i in items]
        assert call["shared"] is shared
        # the sub-step's time of each item, as float32
        j = step[call["who"]] + (half if call["who"] == "slow" else 0)
        step[call["who"]] += 1
        assert torch.equal(call["t"], torch.tensor([times[i][j] for i in items], dtype=torch.float64).float())


def test_role_without_items_is_not_called():
    roles = [SELF, SELF, FLOW]
    x0, noise = data(3, seed=7)
    draw = make_draw(roles, [[0.9, 0.8, 0.7]] * 3)
    log = []

    def teacher(x, t, **kw):
        raise AssertionError("no TEACHER item in the batch")

    average_velocity_target(interpolate(x0, noise, draw.times[:, 0]), x0, noise, draw, teacher=teacher,
                            fast_ema=lambda x, t: log.append(("fast", x.shape[0])) or x,
                            slow_ema=lambda x, t: log.append(("slow", x.shape[0])) or x)
    assert log == [("fast", 2), ("slow", 2)]


# ---------------------------------------------------------------------------------------------- euler_walk

def test_euler_walk_steps_come_from_float64_times():
    # times 1e-7 apart round to the same float32 value; the step size must still be their float64 difference
    times = torch.tensor([[0.99999, 0.9999899, 0.9999898]], dtype=torch.float64)
    x = torch.zeros(1, 3)
    x_end, displacement = euler_walk(lambda x, t: torch.ones_like(x), x, times)
    assert displacement.dtype == torch.float32
    expected = torch.tensor(0.99999 - 0.9999898, dtype=torch.float64).float()
    torch.testing.assert_close(displacement, expected.expand(1, 3), rtol=1e-6, atol=0)
    torch.testing.assert_close(x_end, -expected.expand(1, 3), rtol=1e-6, atol=0)


def test_euler_walk_bf16_accumulates_in_float32():
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    times = torch.tensor([[1.0, 0.999, 0.998], [0.5, 0.499, 0.498]], dtype=torch.float64)
    x_end, displacement = euler_walk(lambda x, t: torch.full_like(x, 3.0), x, times)
    assert x_end.dtype == torch.bfloat16 and displacement.dtype == torch.float32
    torch.testing.assert_close(displacement, torch.full((2, 4), 0.006), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- draws

def test_draw_shortcut_items_statistics():
    cfg = ShortcutConfig(teacher_ratio=0.4, resolution_shift_prob=0.1, recipe="paper")
    g = torch.Generator().manual_seed(123)
    tokens = 1024
    n = 20000
    d = draw_shortcut_items(n, cfg, g, token_count=tokens)
    assert len(d) == n
    assert d.role.dtype == torch.int64 and d.start.dtype == torch.int64 and d.schedule_length.dtype == torch.int64
    assert d.times.dtype == torch.float64 and d.times.shape == (n, cfg.substeps + 1)
    assert d.shift.dtype == torch.float64
    assert (d.role == FLOW).sum() == 0  # non_shortcut_ratio 0

    teacher = d.role == TEACHER
    share = teacher.double().mean().item()
    assert abs(share - 0.4) < 0.02, share  # ~6 sigma
    assert set(d.schedule_length[teacher].tolist()) == set(cfg.teacher_schedule_lengths)
    self_lengths = Counter(d.schedule_length[~teacher].tolist())
    assert set(self_lengths) == set(cfg.self_schedule_lengths)
    for length in cfg.self_schedule_lengths:  # uniform over {2, 4, 8, 16}
        assert abs(self_lengths[length] / (~teacher).sum().item() - 0.25) < 0.03

    # start: a multiple of t_skip, strictly before the end, every start reachable
    assert bool((d.start % cfg.substeps == 0).all())
    assert bool((d.start + cfg.substeps <= d.schedule_length).all())
    starts_32 = set(d.start[d.schedule_length == 32].tolist())
    assert starts_32 == set(range(0, 32, 2))

    # shift: U[2.5, 4.5] or the resolution shift
    by_res = d.shift == resolution_shift(tokens)
    assert abs(by_res.double().mean().item() - 0.1) < 0.015
    fixed = d.shift[~by_res]
    assert bool(((fixed >= 2.5) & (fixed <= 4.5)).all())
    assert fixed.min().item() < 2.55 and fixed.max().item() > 4.45  # spans the interval
    assert abs(fixed.mean().item() - 3.5) < 0.03

    # guidance: U[0, 7.5)
    assert d.guidance is not None and d.guidance.shape == (n,)
    assert bool(((d.guidance >= 0) & (d.guidance < 7.5)).all())
    assert abs(d.guidance.double().mean().item() - 3.75) < 0.1

    # t is times[:, 0] as float32
    assert d.t.dtype == torch.float32 and torch.equal(d.t, d.times[:, 0].float())


def test_draw_times_are_the_schedule_points():
    cfg = ShortcutConfig(resolution_shift_prob=0.3, t_skip=4, teacher_min_steps=16, teacher_max_steps=24)
    g = torch.Generator().manual_seed(5)
    tokens = 4096
    d = draw_shortcut_items(400, cfg, g, token_count=tokens)
    assert d.times.shape == (400, 5)
    for i in range(400):
        n, s, start = int(d.schedule_length[i]), float(d.shift[i]), int(d.start[i])
        full = shifted_schedule(n, s, t_max=cfg.t_max, dtype=torch.float64)
        assert (d.times[i] - full[start:start + 5]).abs().max().item() <= 1e-12
        if start == 0:
            assert d.times[i, 0].item() == cfg.t_max
        if d.role[i] == TEACHER:
            assert n in (16, 20, 24)
        else:
            assert n in (4, 8)
        assert s == resolution_shift(tokens) or 2.5 <= s <= 4.5


@pytest.mark.parametrize("batch, ratio", [(8, 0.6), (8, 0.3), (5, 0.5), (3, 1.0), (8, 0.01)])
def test_flow_items_are_the_first_ceil_b_ratio(batch, ratio):
    cfg = ShortcutConfig(non_shortcut_ratio=ratio, resolution_shift_prob=0.0)
    g = torch.Generator().manual_seed(0)
    k = math.ceil(batch * ratio)
    teacher = 0
    total = 0
    for _ in range(300):
        d = draw_shortcut_items(batch, cfg, g)
        assert (d.role[:k] == FLOW).all()
        assert (d.role[k:] != FLOW).all()
        teacher += int((d.role[k:] == TEACHER).sum())
        total += batch - k
    if total:
        assert abs(teacher / total - cfg.teacher_ratio) < 0.06


def test_draw_is_reproducible_with_a_seeded_generator():
    cfg = ShortcutConfig()
    a = draw_shortcut_items(16, cfg, torch.Generator().manual_seed(7), token_count=256)
    b = draw_shortcut_items(16, cfg, torch.Generator().manual_seed(7), token_count=256)
    c = draw_shortcut_items(16, cfg, torch.Generator().manual_seed(8), token_count=256)
    for field in ("role", "schedule_length", "shift", "start", "times", "guidance"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.times, c.times)


def test_draw_without_guidance_range():
    cfg = ShortcutConfig(guidance_range=None, resolution_shift_prob=0.0)
    d = draw_shortcut_items(8, cfg, torch.Generator().manual_seed(0))
    assert d.guidance is None


def test_draw_guidance_custom_range():
    cfg = ShortcutConfig(guidance_range=(2.0, 3.0), resolution_shift_prob=0.0)
    d = draw_shortcut_items(2000, cfg, torch.Generator().manual_seed(0))
    assert bool(((d.guidance >= 2.0) & (d.guidance < 3.0)).all())


def test_draw_needs_token_count_for_resolution_shift():
    cfg = ShortcutConfig(resolution_shift_prob=0.1)
    with pytest.raises(ValueError, match="token_count"):
        draw_shortcut_items(8, cfg, torch.Generator().manual_seed(0))
    # without the resolution shift no token count is needed
    draw_shortcut_items(8, cfg.replace(resolution_shift_prob=0.0), torch.Generator().manual_seed(0))


def test_draw_resolution_shift_always():
    cfg = ShortcutConfig(resolution_shift_prob=1.0)
    d = draw_shortcut_items(64, cfg, torch.Generator().manual_seed(0), token_count=2304)
    assert bool((d.shift == resolution_shift(2304)).all())


def test_draw_teacher_only():
    cfg = ShortcutConfig(teacher_ratio=1.0, teacher_min_steps=4, teacher_max_steps=8, resolution_shift_prob=0.0,
                         t_skip=2)
    d = draw_shortcut_items(500, cfg, torch.Generator().manual_seed(0))
    assert bool((d.role == TEACHER).all())
    assert set(d.schedule_length.tolist()) == {4, 6, 8}


# ---------------------------------------------------------------------------------------------- small helpers

def test_interpolate_closed_form():
    x0, noise = data(4, shape=(2, 3, 3), seed=8)
    t = torch.tensor([0.0, 0.25, 0.99999, 1.0], dtype=torch.float64)
    x_t = interpolate(x0, noise, t)
    assert x_t.shape == x0.shape
    for i in range(4):
        torch.testing.assert_close(x_t[i], (1 - t[i]) * x0[i] + t[i] * noise[i], rtol=0, atol=1e-15)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[3], noise[3])


def test_interpolate_keeps_latent_dtype():
    x0, noise = data(2, seed=9, dtype=torch.bfloat16)
    x_t = interpolate(x0, noise, torch.tensor([0.3, 0.6], dtype=torch.float64))
    assert x_t.dtype == torch.bfloat16


def test_flow_velocity_target_closed_form():
    x0, noise = data(3, seed=10, dtype=torch.float32)
    assert torch.equal(flow_velocity_target(x0, noise), noise - x0)
    xb, nb = x0.bfloat16(), noise.bfloat16()
    out = flow_velocity_target(xb, nb)
    assert out.dtype == torch.float32
    assert torch.equal(out, nb.float() - xb.float())
    assert flow_velocity_target(x0.double(), noise.double()).dtype == torch.float64
    # the path's velocity: d/dt ((1 - t) x0 + t noise) = noise - x0
    t1, t2 = torch.full((3,), 0.3), torch.full((3,), 0.7)
    torch.testing.assert_close((interpolate(x0, noise, t2) - interpolate(x0, noise, t1)) / 0.4,
                               flow_velocity_target(x0, noise), rtol=1e-5, atol=1e-5)


def test_accumulation_dtype():
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float16, torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float32) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64


def test_select_items_indexes_tensors_and_passes_the_rest():
    b = 5
    cond = torch.arange(b * 3, dtype=torch.float32).reshape(b, 3)
    pooled = torch.arange(b)
    opts = {"x": 1}
    index = torch.tensor([4, 0, 2])
    out = select_items({"cond": cond, "pooled": pooled, "opts": opts, "scale": 2.5, "none": None}, index, b)
    assert torch.equal(out["cond"], cond[[4, 0, 2]])
    assert torch.equal(out["pooled"], torch.tensor([4, 0, 2]))
    assert out["opts"] is opts and out["scale"] == 2.5 and out["none"] is None
    assert select_items({}, index, b) == {}


@pytest.mark.parametrize("bad", [torch.zeros(4, 3), torch.zeros(6), torch.tensor(1.0)])
def test_select_items_rejects_tensors_not_leading_with_batch(bad):
    with pytest.raises(ValueError) as info:
        select_items({"context": bad}, torch.tensor([0, 1]), 5)
    message = str(info.value)
    assert "'context'" in message and "5" in message


def test_shortcut_loss_is_per_item_mse():
    g = torch.Generator().manual_seed(11)
    pred = torch.randn(4, 2, 3, generator=g, requires_grad=True)
    target = torch.randn(4, 2, 3, generator=g)
    loss, per_item = shortcut_loss(pred, target)
    assert per_item.shape == (4,)
    for i in range(4):
        expected = sum((float(pred.detach()[i].flatten()[j]) - float(target[i].flatten()[j])) ** 2 for j in range(6)) / 6
        assert per_item[i].item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(per_item.mean().item(), rel=1e-7)
    loss.backward()
    torch.testing.assert_close(pred.grad, 2 * (pred.detach() - target) / 24, rtol=1e-6, atol=1e-7)


def test_shortcut_loss_bf16_prediction_float32_loss():
    pred = torch.full((2, 4), 1.5, dtype=torch.bfloat16)
    target = torch.zeros(2, 4, dtype=torch.float32)
    loss, per_item = shortcut_loss(pred, target)
    assert loss.dtype == torch.float32 and per_item.dtype == torch.float32
    assert torch.equal(per_item, torch.full((2,), 2.25))

"""ShortcutTrainer on tiny models: the module is left as it was, runs resume exactly, failures are clean."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from shortcut_core.adapters import EMA_FAST, EMA_SLOW, STUDENT, TEACHER, LoraWeights, linear_module_names
from shortcut_core.config import ShortcutConfig
from shortcut_core.safetensors_io import SafetensorsFileError
from shortcut_core.trainer import NonFiniteLossError, ShortcutTrainer, TrainingDataError, lora_applied

from hashing import module_hash

SHAPE = (2, 4, 4)

DIM = 32


class Block(nn.Module):
    def __init__(self, width: int, inplace: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.inplace = inplace

    def forward(self, h):
        update = self.fc2(torch.nn.functional.silu(self.fc1(h)))
        if self.inplace:
            h += update  # a residual added in place to the block's own input
            return h
        return h + update


class TinyVelocityNet(nn.Module):
    """v(x, t, guidance) for latents shaped SHAPE."""

    def __init__(self, width: int = 32, inplace: bool = False, cond_dim: int = 0):
        super().__init__()
        self.inp = nn.Linear(DIM + 2 + cond_dim, width)
        self.blocks = nn.ModuleList([Block(width, inplace) for _ in range(2)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, DIM)

    def forward(self, x, t, guidance=None, cond=None):
        b = x.shape[0]
        g = guidance if guidance is not None else torch.zeros(b)
        parts = [x.reshape(b, -1), t.reshape(b, 1).to(x.dtype), g.reshape(b, 1).to(x.dtype)]
        if cond is not None:
            parts.append(cond)
        h = self.inp(torch.cat(parts, dim=1))
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h)).reshape(x.shape)


def make_net(seed: int = 0, **kw) -> TinyVelocityNet:
    torch.manual_seed(seed)  # module construction only
    return TinyVelocityNet(**kw)


def make_latents(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def cfg(**changes) -> ShortcutConfig:
    base = dict(rank=4, alpha=4.0, batch_size=4, grad_accum_steps=1, steps=6, learning_rate=1e-2,
                checkpoint_every=0, teacher_min_steps=8, teacher_max_steps=8, resolution_shift_prob=0.1, seed=3,
                ema_slow_decay=0.9, ema_fast_decay=0.5)
    base.update(changes)
    return ShortcutConfig(**base)


def module_layout(module: nn.Module):
    return ([(n, type(m)) for n, m in module.named_modules()], [sorted(m.__dict__) for m in module.modules()],
            [(n, p.requires_grad) for n, p in module.named_parameters()], list(module.state_dict()))


def has_peft_layers(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer
    return any(isinstance(m, LoraLayer) for m in module.modules())


def velocity_of(net):
    return lambda x, t, **kw: net(x, t, **kw)


def checkpoint_step(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["shortcut_flow.checkpoint"])["step"]


def snapshot(trainer: ShortcutTrainer) -> dict[str, torch.Tensor]:
    return {f"{role}/{n}": p.detach().clone() for role in (STUDENT, EMA_SLOW, EMA_FAST)
            for n, p in trainer.adapters.named_parameters(role)}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run_straight(config: ShortcutConfig, steps: int):
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), config) as tr:
        result = tr.run(steps, progress=False)
        return snapshot(tr), list(result.losses), result


# ---------------------------------------------------------------------------------------------- module restored

def test_training_leaves_the_base_module_bit_identical():
    net = make_net()
    x = make_latents(3, seed=9)
    t = torch.full((3,), 0.5)
    y0 = net(x, t, guidance=torch.ones(3)).detach()
    before, layout = module_hash(net), module_layout(net)
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=3)) as tr:
        result = tr.run(progress=False)
        assert has_peft_layers(net)
        with torch.no_grad():
            y_student = net(x, t, guidance=torch.ones(3))
    assert not torch.allclose(y_student, y0)  # training did change the student ...
    assert module_hash(net) == before           # ... and never the base weights
    assert module_layout(net) == layout
    assert not has_peft_layers(net) and "peft_config" not in net.__dict__
    assert torch.equal(net(x, t, guidance=torch.ones(3)), y0)
    assert result.steps == 3 and len(result.losses) == 3


def test_close_is_idempotent_and_restores():
    net = make_net()
    layout, before = module_layout(net), module_hash(net)
    tr = ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=1))
    tr.run(progress=False)
    tr.close()
    tr.close()
    assert not has_peft_layers(net)
    assert module_layout(net) == layout and module_hash(net) == before


def test_exception_from_callback_leaves_the_module_identical(tmp_path):
    net = make_net()
    before, layout = module_hash(net), module_layout(net)

    class Stop(Exception):
        pass

    def callback(report):
        if report.step == 2:
            raise Stop

    with pytest.raises(Stop):
        with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg()) as tr:
            tr.run(callback=callback, progress=False)
    assert tr.step_count == 2
    assert not has_peft_layers(net)
    assert module_hash(net) == before and module_layout(net) == layout


# ---------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_exact(tmp_path, accum):
    config = cfg(grad_accum_steps=accum)
    state_a, losses_a, _ = run_straight(config, 6)

    ckpt = tmp_path / "run.ckpt.safetensors"
    net_b = make_net()
    with ShortcutTrainer(net_b, velocity_of(net_b), make_latents(), config) as tr:
        tr.run(3, progress=False)
        tr.save_checkpoint(str(ckpt))
    assert checkpoint_step(ckpt) == 3

    net_c = make_net()  # a fresh copy of the same module and data
    with ShortcutTrainer(net_c, velocity_of(net_c), make_latents(), config) as tr:
        tr.load_checkpoint(str(ckpt))
        assert tr.step_count == 3 and tr.losses == losses_a[:3]
        result = tr.run(6, progress=False)
        state_b = snapshot(tr)
    assert_same_state(state_a, state_b)
    assert result.losses == losses_a
    assert result.steps == 6


def test_resume_differs_without_the_checkpoint(tmp_path):
    """Guards the test above: a run that does not load the state does not match."""
    config = cfg()
    state_a, losses_a, _ = run_straight(config, 6)
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), config) as tr:
        tr.run(3, progress=False)
        tr.step_count = 0
        result = tr.run(3, progress=False)
    assert result.losses[:3] != losses_a[3:]


def test_interrupt_from_callback_checkpoints_that_step_and_resumes_exactly(tmp_path):
    config = cfg()
    state_a, losses_a, _ = run_straight(config, 6)
    ckpt = tmp_path / "interrupted.safetensors"

    def callback(report):
        if report.step == 4:
            raise KeyboardInterrupt

    net = make_net()
    with pytest.raises(KeyboardInterrupt):
        with ShortcutTrainer(net, velocity_of(net), make_latents(), config) as tr:
            tr.run(callback=callback, checkpoint_path=str(ckpt), progress=False)
    assert checkpoint_step(ckpt) == 4

    net2 = make_net()
    with ShortcutTrainer(net2, velocity_of(net2), make_latents(), config) as tr:
        tr.load_checkpoint(str(ckpt))
        result = tr.run(progress=False)
        assert_same_state(state_a, snapshot(tr))
    assert result.losses == losses_a


def test_interrupt_inside_a_step_rewinds_it(tmp_path):
    """An exception from the velocity mid-step leaves the run as after the last full step."""
    config = cfg()
    state_a, losses_a, _ = run_straight(config, 6)
    ckpt = tmp_path / "mid.safetensors"
    net = make_net()
    calls = {"n": 0, "fail": True}

    def velocity(x, t, **kw):
        calls["n"] += 1
        if tr.step_count == 3 and calls["fail"] and calls["n"] > 2:
            calls["fail"] = False
            raise KeyboardInterrupt
        return net(x, t, **kw)

    with ShortcutTrainer(net, velocity, make_latents(), config) as tr:
        with pytest.raises(KeyboardInterrupt):
            tr.run(checkpoint_path=str(ckpt), progress=False)
        assert tr.step_count == 3
        assert checkpoint_step(ckpt) == 3
        assert all(p.grad is None for p in tr.adapters.parameters(STUDENT))
        assert tr.adapters.active == STUDENT
        result = tr.run(progress=False)  # carry on in the same trainer
        assert_same_state(state_a, snapshot(tr))
    assert result.losses == losses_a


def test_checkpoint_of_another_layout_is_refused(tmp_path):
    ckpt = tmp_path / "r4.safetensors"
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=1)) as tr:
        tr.run(checkpoint_path=str(ckpt), progress=False)
    net2 = make_net()
    with ShortcutTrainer(net2, velocity_of(net2), make_latents(), cfg(rank=2, alpha=2.0)) as tr:
        with pytest.raises(SafetensorsFileError, match=r"made with rank 4 \(this run: 2\), alpha 4.0 \(this run: 2.0\)"):
            tr.load_checkpoint(str(ckpt))


def test_resuming_with_other_training_settings_warns_and_names_them(tmp_path):
    ckpt = tmp_path / "run.safetensors"
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=1)) as tr:
        tr.run(checkpoint_path=str(ckpt), progress=False)
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=3, learning_rate=5e-4)) as tr:
        with pytest.warns(UserWarning, match="learning_rate") as record:
            tr.load_checkpoint(str(ckpt))
        assert "steps" not in str(record[0].message).replace("_steps", "")  # a longer run is no change of recipe
        assert record[0].filename == __file__  # the warning points at the caller of load_checkpoint
        assert tr.step_count == 1


@pytest.mark.parametrize("damage", ["shape", "missing"])
def test_a_refused_checkpoint_loads_nothing(tmp_path, damage):
    """A checkpoint that fails validation part-way must not leave the run half-loaded."""
    from shortcut_core.safetensors_io import read_safetensors, write_safetensors_atomic
    ckpt = tmp_path / "ok.safetensors"
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=2)) as tr:
        tr.run(checkpoint_path=str(ckpt), progress=False)
    tensors, meta = read_safetensors(ckpt)
    last = [k for k in tensors if k.startswith(EMA_FAST + "/")][-1]  # validated last
    if damage == "shape":
        tensors[last] = torch.zeros(3, 3)
    else:
        del tensors[last]
    bad = tmp_path / "bad.safetensors"
    write_safetensors_atomic(bad, tensors, meta)

    net2 = make_net()
    with ShortcutTrainer(net2, velocity_of(net2), make_latents(), cfg(steps=2)) as tr:
        before = snapshot(tr)
        rng = tr.generator.get_state()
        with pytest.raises(SafetensorsFileError) as info:
            tr.load_checkpoint(str(bad))
        assert str(bad) in str(info.value)
        assert_same_state(before, snapshot(tr))
        assert torch.equal(tr.generator.get_state(), rng)
        assert tr.step_count == 0 and tr.losses == []


def test_checkpoint_every_writes_periodically(tmp_path):
    ckpt = tmp_path / "periodic.safetensors"
    seen = []

    def callback(report):
        seen.append((report.step, checkpoint_step(ckpt) if ckpt.exists() else None))

    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=5, checkpoint_every=2)) as tr:
        tr.run(callback=callback, checkpoint_path=str(ckpt), progress=False)
    assert seen == [(1, None), (2, 2), (3, 2), (4, 4), (5, 4)]
    assert checkpoint_step(ckpt) == 5  # and the final state at the end
    assert [n for n in ckpt.parent.iterdir() if n.name.startswith(".tmp-")] == []


# ---------------------------------------------------------------------------------------------- failures

def _nan_at_step(net, trainer_box, bad_step):
    def velocity(x, t, **kw):
        v = net(x, t, **kw)
        if trainer_box[0].step_count == bad_step:
            return v * float("nan")
        return v
    return velocity


@pytest.mark.parametrize("every", [0, 1])
def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(tmp_path, every):
    ckpt = tmp_path / "nan.safetensors"
    net = make_net()
    box = []
    recorded = {}

    def callback(report):
        if ckpt.exists():
            recorded[report.step] = ckpt.read_bytes()

    tr = ShortcutTrainer(net, _nan_at_step(net, box, 2), make_latents(), cfg(checkpoint_every=every))
    box.append(tr)
    with tr:
        with pytest.raises(NonFiniteLossError) as info:
            tr.run(callback=callback, checkpoint_path=str(ckpt), progress=False)
        assert "step 3" in str(info.value)
        assert info.value.step == 3
        assert tr.step_count == 2 and len(tr.losses) == 2
    if every == 0:
        assert not ckpt.exists()
    else:
        assert ckpt.read_bytes() == recorded[2]
        assert checkpoint_step(ckpt) == 2
    assert not has_peft_layers(net)


def test_training_data_errors():
    net = make_net()
    layout = module_layout(net)
    v = velocity_of(net)
    with pytest.raises(TrainingDataError, match="empty"):
        ShortcutTrainer(net, v, [], cfg())
    with pytest.raises(TrainingDataError, match="shapes"):
        ShortcutTrainer(net, v, [torch.zeros(SHAPE), torch.zeros(2, 4, 6)], cfg())
    bad = make_latents()
    bad[3, 0, 1, 1] = float("nan")
    with pytest.raises(TrainingDataError, match="NaN"):
        ShortcutTrainer(net, v, bad, cfg())
    bad[3, 0, 1, 1] = float("inf")
    with pytest.raises(TrainingDataError):
        ShortcutTrainer(net, v, list(bad), cfg())
    with pytest.raises(TrainingDataError, match="floating"):
        ShortcutTrainer(net, v, torch.zeros((4, *SHAPE), dtype=torch.int64), cfg())
    with pytest.raises(TrainingDataError, match="'cond'"):
        ShortcutTrainer(net, v, make_latents(16), cfg(), extra_args={"cond": torch.zeros(15, 3)})
    with pytest.raises(TrainingDataError, match="'cond'"):
        ShortcutTrainer(net, v, make_latents(16), cfg(), extra_args={"cond": torch.tensor(1.0)})
    with pytest.raises(TrainingDataError, match="guidance"):
        ShortcutTrainer(net, v, make_latents(16), cfg(), extra_args={"guidance": torch.zeros(16)})
    assert module_layout(net) == layout and not has_peft_layers(net)


def test_list_of_latents_is_accepted():
    net = make_net()
    latents = list(make_latents(5))
    with ShortcutTrainer(net, velocity_of(net), latents, cfg(steps=1)) as tr:
        assert tr.latents.shape == (5, *SHAPE)
        assert tr.token_count == 4  # (4 // 2) * (4 // 2) packed tokens, for the resolution shift
        tr.run(progress=False)


# ---------------------------------------------------------------------------------------------- what the model sees

def test_guidance_reaches_every_pass_of_an_item():
    net = make_net()
    calls = []

    def velocity(x, t, guidance=None, **kw):
        calls.append({"role": tr.adapters.active, "x": x.detach().clone(), "t": t.clone(),
                      "g": None if guidance is None else guidance.clone(), "grad": torch.is_grad_enabled()})
        return net(x, t, guidance=guidance, **kw)

    config = cfg(batch_size=6, steps=4, guidance_range=(0.0, 7.5), t_skip=2)  # one pass per half
    with ShortcutTrainer(net, velocity, make_latents(), config) as tr:
        for _ in range(config.steps):
            calls.clear()
            tr.step()
            student = [c for c in calls if c["role"] == STUDENT]
            assert len(student) == 1 and calls[-1] is student[0]
            s = student[0]
            assert s["grad"] and s["g"] is not None
            assert s["g"].shape == (6,) and s["g"].dtype == torch.float32
            assert bool(((s["g"] >= 0) & (s["g"] < 7.5)).all())
            targets = calls[:-1]
            assert all(not c["grad"] for c in targets)
            roles = [c["role"] for c in targets]
            assert roles.count(EMA_SLOW) == 1 and set(roles) <= {TEACHER, EMA_FAST, EMA_SLOW}
            # slow EMA sees every (shortcut) item in batch order: the same guidance as the student
            slow = next(c for c in targets if c["role"] == EMA_SLOW)
            assert torch.equal(slow["g"], s["g"])
            # first-half passes start at the student's x_t and t: match items by their x_t
            first = [c for c in targets if c["role"] in (TEACHER, EMA_FAST)]
            assert sum(c["x"].shape[0] for c in first) == 6
            for c in first:
                for row in range(c["x"].shape[0]):
                    match = [j for j in range(6) if torch.equal(s["x"][j], c["x"][row])]
                    assert len(match) == 1
                    j = match[0]
                    assert c["g"][row] == s["g"][j] and c["t"][row] == s["t"][j]


def test_no_guidance_argument_without_guidance_range():
    net = make_net()
    seen = []

    def velocity(x, t, **kw):
        seen.append(set(kw))
        return net(x, t, **kw)

    with ShortcutTrainer(net, velocity, make_latents(), cfg(steps=2, guidance_range=None)) as tr:
        tr.run(progress=False)
    assert seen and all(k == set() for k in seen)


def test_per_item_extra_arguments_follow_their_latents():
    net = make_net(cond_dim=3)
    latents = make_latents(10)
    cond = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    with ShortcutTrainer(net, velocity_of(net), latents, cfg(steps=2), extra_args={"cond": cond}) as tr:
        for _ in range(3):
            x0, noise, extra, _, _ = tr._micro_batch()
            for row in range(x0.shape[0]):
                index = [k for k in range(10) if torch.equal(latents[k], x0[row])]
                assert len(index) == 1
                assert torch.equal(extra["cond"][row], cond[index[0]])
        tr.run(progress=False)


def test_ema_restart_every_k_steps_copies_the_student():
    net = make_net()
    states = []
    config = cfg(steps=5, ema_restart_every=2, ema_slow_decay=0.9, ema_fast_decay=0.5)

    def callback(report):
        states.append(snapshot(tr))

    with ShortcutTrainer(net, velocity_of(net), make_latents(), config) as tr:
        tr.run(callback=callback, progress=False)

    def role(state, r):
        return [v for k, v in state.items() if k.startswith(r + "/")]

    for step, state in enumerate(states, start=1):
        student = role(state, STUDENT)
        if step % 2 == 0:
            for r in (EMA_SLOW, EMA_FAST):
                assert all(torch.equal(a, b) for a, b in zip(role(state, r), student)), (step, r)
        else:
            prev_ema = role(states[step - 2], EMA_SLOW) if step > 1 else [torch.zeros_like(p) for p in student]
            for ema, s, p in zip(role(state, EMA_SLOW), student, prev_ema):
                torch.testing.assert_close(ema, 0.9 * p + 0.1 * s, rtol=1e-5, atol=1e-7)
            assert not all(torch.equal(a, b) for a, b in zip(role(state, EMA_SLOW), student))


def test_emas_follow_the_student_with_their_decays():
    net = make_net()
    states = []
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=3)) as tr:
        tr.run(callback=lambda r: states.append(snapshot(tr)), progress=False)
    ema_s = {k: torch.zeros_like(v) for k, v in states[0].items() if k.startswith(STUDENT)}
    ema_f = {k: torch.zeros_like(v) for k, v in ema_s.items()}
    for state in states:
        for k in ema_s:
            ema_s[k] = 0.9 * ema_s[k] + 0.1 * state[k]
            ema_f[k] = 0.5 * ema_f[k] + 0.5 * state[k]
            name = k.split("/", 1)[1]
            torch.testing.assert_close(state[f"{EMA_SLOW}/{name}"], ema_s[k], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(state[f"{EMA_FAST}/{name}"], ema_f[k], rtol=1e-5, atol=1e-7)


def test_step_report_splits_shortcut_and_flow_losses():
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(batch_size=8, non_shortcut_ratio=0.5)) as tr:
        report = tr.step()
    assert report.step == 1 and report.total == 6
    assert report.loss_shortcut is not None and report.loss_flow is not None
    assert report.loss == pytest.approx(0.5 * report.loss_shortcut + 0.5 * report.loss_flow, rel=1e-5)
    assert report.grad_norm > 0
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg()) as tr:
        report = tr.step()
    assert report.loss_flow is None and report.loss_shortcut == pytest.approx(report.loss, rel=1e-5)


def _teacher_lora(net, rank, alpha, seed=5):
    g = torch.Generator().manual_seed(seed)
    teacher = {}
    for name in linear_module_names(net):
        lin = net.get_submodule(name)
        teacher[name] = LoraWeights(torch.randn(rank, lin.in_features, generator=g) * 0.1,
                                    torch.randn(lin.out_features, rank, generator=g) * 0.1, float(alpha))
    return teacher


@pytest.mark.parametrize("accum", [1, 2, 3])
def test_a_step_averages_its_micro_batches(accum):
    """Rebuild one step from the public objective functions: loss and gradient are micro-batch means."""
    from shortcut_core.objective import average_velocity_target, interpolate, shortcut_loss
    net = make_net()
    config = cfg(grad_accum_steps=accum, max_grad_norm=1e6)
    with ShortcutTrainer(net, velocity_of(net), make_latents(), config) as tr:
        params = tr.adapters.parameters(STUDENT)
        rng = tr.generator.get_state()
        losses, grads = [], [torch.zeros_like(p) for p in params]
        for _ in range(accum):
            x0, noise, extra, draw, _ = tr._micro_batch()
            extra["guidance"] = draw.guidance
            x_t = interpolate(x0, noise, draw.t)
            target = average_velocity_target(x_t, x0, noise, draw, teacher=tr.velocity_as(TEACHER),
                                             fast_ema=tr.velocity_as(EMA_FAST), slow_ema=tr.velocity_as(EMA_SLOW),
                                             extra_args=extra)
            loss, _ = shortcut_loss(net(x_t, draw.t, **extra), target)
            losses.append(loss.item())
            for acc, g in zip(grads, torch.autograd.grad(loss, params)):
                acc += g / accum
        tr.generator.set_state(rng)
        report = tr.step()
    assert report.loss == pytest.approx(sum(losses) / accum, rel=1e-6)
    expected_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
    assert report.grad_norm == pytest.approx(expected_norm, rel=1e-5)


def test_teacher_lora_initialises_the_emas_and_is_the_teacher():
    """As the authors' --teacher_path: both EMAs start as the teacher LoRA, the student fresh."""
    net = make_net()
    teacher = _teacher_lora(net, rank=4, alpha=2.0)  # the run's rank; a different alpha is folded
    x, t = make_latents(3, seed=8), torch.full((3,), 0.4)
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=1), teacher_lora=teacher) as tr:
        with torch.no_grad():
            outputs = {}
            for role in (TEACHER, EMA_SLOW, EMA_FAST, STUDENT):
                with tr.adapters.use(role):
                    outputs[role] = net(x, t)
        for role in (EMA_SLOW, EMA_FAST, TEACHER):
            state = tr.adapters.lora_state(role)
            for name, w in teacher.items():
                got = state[name].up @ state[name].down * (state[name].alpha / state[name].rank)
                torch.testing.assert_close(got, w.up @ w.down * (w.alpha / w.rank), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(outputs[EMA_SLOW], outputs[TEACHER], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outputs[EMA_FAST], outputs[TEACHER], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(outputs[STUDENT], outputs[TEACHER], atol=1e-4)
        tr.run(progress=False)
        # training never touches the teacher
        for name, w in tr.adapters.lora_state(TEACHER).items():
            assert torch.equal(w.down, teacher[name].down) and torch.equal(w.up, teacher[name].up)
    assert not has_peft_layers(net)


def test_teacher_lora_of_another_rank_is_an_error_and_leaves_the_module():
    net = make_net()
    layout, before = module_layout(net), module_hash(net)
    with pytest.raises(ValueError, match="rank"):
        ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=1), teacher_lora=_teacher_lora(net, 2, 2.0))
    assert not has_peft_layers(net)
    assert module_layout(net) == layout and module_hash(net) == before


def test_gradient_checkpointing_and_inplace_blocks_give_the_same_training():
    """Blocks that add residuals in place train (inputs cloned) and match the out-of-place model."""
    config_plain = cfg(steps=3, gradient_checkpointing=False)
    state_ref, losses_ref, _ = run_straight(config_plain, 3)
    for recompute in (True, False):
        net = make_net(inplace=True)
        with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=3, gradient_checkpointing=recompute),
                             blocks=list(net.blocks)) as tr:
            result = tr.run(progress=False)
            state = snapshot(tr)
        for k in state_ref:
            torch.testing.assert_close(state[k], state_ref[k], rtol=1e-5, atol=1e-6)
        assert result.losses == pytest.approx(losses_ref, rel=1e-5)
        assert all("forward" not in b.__dict__ for b in net.blocks)  # blocks unwrapped again


def test_lora_applied_gives_the_students_outputs_and_restores():
    net = make_net()
    x = make_latents(5, seed=7)
    t = torch.linspace(0.1, 0.9, 5)
    g = torch.full((5,), 3.5)
    y0 = net(x, t, guidance=g).detach()
    before, layout = module_hash(net), module_layout(net)
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=4)) as tr:
        result = tr.run(progress=False)
        with torch.no_grad():
            y_student = net(x, t, guidance=g)
    assert not torch.allclose(y_student, y0)
    with lora_applied(net, result.lora) as adapters:
        assert all(not p.requires_grad for p in net.parameters())
        with torch.no_grad():
            torch.testing.assert_close(net(x, t, guidance=g), y_student, rtol=1e-6, atol=1e-6)
        adapters.set_strength(STUDENT, 0.0)
        with torch.no_grad():
            assert torch.equal(net(x, t, guidance=g), y0)
    assert module_hash(net) == before and module_layout(net) == layout
    with lora_applied(net, result.lora, strength=0.0):
        with torch.no_grad():
            assert torch.equal(net(x, t, guidance=g), y0)
    with pytest.raises(RuntimeError):
        with lora_applied(net, result.lora, strength=2.0):
            with torch.no_grad():
                y2 = net(x, t, guidance=g)
            raise RuntimeError("boom")
    assert not torch.allclose(y2, y_student)
    assert module_hash(net) == before and module_layout(net) == layout and not has_peft_layers(net)


def test_result_metadata_records_the_run():
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(steps=2, sample_steps=4, sample_shift=3.0)) as tr:
        result = tr.run(progress=False)
    assert (result.metadata.steps, result.metadata.shift) == (4, 3.0)
    assert result.metadata.config["trained_steps"] == 2
    assert ShortcutConfig.from_dict({k: v for k, v in result.metadata.config.items() if k != "trained_steps"}) == \
        cfg(steps=2, sample_steps=4, sample_shift=3.0)
    assert set(result.lora) == set(linear_module_names(make_net()))
    assert copy.deepcopy(result.lora).keys() == result.ema_slow.keys() == result.ema_fast.keys()


def test_per_item_first_half_trains_like_one_forward_per_role():
    """A velocity that keeps its batch whole lets teacher and fast-EMA items share a forward; the run is the same."""
    def run(keeps_whole: bool):
        net = make_net()
        velocity = velocity_of(net)
        if keeps_whole:
            velocity = lambda x, t, **kw: net(x, t, **kw)  # noqa: E731
            velocity.keeps_batch_whole = True
        with ShortcutTrainer(net, velocity, make_latents(), cfg(steps=4, teacher_ratio=0.5)) as tr:
            assert (tr._first_half is not None) == keeps_whole
            return tr.run(progress=False)
    split, mixed = run(False), run(True)
    for name in split.lora:
        torch.testing.assert_close(mixed.lora[name].up, split.lora[name].up, rtol=1e-4, atol=1e-6)
    assert mixed.losses == pytest.approx(split.losses, rel=1e-5)

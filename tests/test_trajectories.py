"""Targets from the teacher's recorded walks (data-free mode): the same targets the teacher would give, from
states it really passed, without its forwards."""

from __future__ import annotations

import pytest
import torch

from shortcut_core import ShortcutConfig, sample_euler, shifted_schedule
from shortcut_core.objective import ItemRole, average_velocity_target, draw_shortcut_items
from shortcut_core.trainer import ShortcutTrainer, TrainingDataError
from shortcut_core.trajectories import (TeacherTrajectories, place_teacher_items, record_euler_trajectories,
                                        recorded_teacher_walk)

from test_trainer import SHAPE, TinyVelocityNet

CONFIG = ShortcutConfig(rank=4, alpha=4.0, batch_size=8, steps=4, learning_rate=1e-2, guidance_range=None,
                        resolution_shift_prob=0.0, gradient_checkpointing=False, checkpoint_every=0, seed=3,
                        teacher_min_steps=8, teacher_max_steps=8, teacher_ratio=0.5, shift_min=1.0, shift_max=1.0)


def _teacher():
    torch.manual_seed(0)
    net = TinyVelocityNet()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _walks(net, n=6, steps=8):
    noise = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(5))
    return record_euler_trajectories(lambda x, t: net(x, t), noise, shifted_schedule(steps, 1.0))


def test_recorded_walks_are_the_samplers_from_noise_to_sample():
    net = _teacher()
    walks = _walks(net)
    sigmas = shifted_schedule(8, 1.0)
    assert walks.states.shape == (6, 9, *SHAPE) and walks.steps == 8
    assert torch.equal(walks.states[:, 0], torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(walks.latents, sample_euler(lambda x, t: net(x, t), walks.states[:, 0], sigmas, disable=True))
    with pytest.raises(ValueError, match="fall"):
        TeacherTrajectories(walks.states, walks.times.flip(0))


def test_a_teacher_item_on_a_recorded_walk_gets_the_teachers_target_without_its_forward():
    net = _teacher()
    walks = _walks(net)
    g = torch.Generator().manual_seed(0)
    draw = place_teacher_items(draw_shortcut_items(8, CONFIG, g), walks, CONFIG.substeps, g)
    teacher = draw.role == ItemRole.TEACHER
    assert teacher.any() and (draw.role == ItemRole.SELF).any()
    # teacher items now sit on the recorded schedule, at a start that is a multiple of t_skip
    assert torch.equal(draw.times[teacher], walks.times[draw.start[teacher][:, None] + torch.arange(3)])
    assert bool((draw.start[teacher] % CONFIG.substeps == 0).all())
    index = torch.arange(8) % 6
    on_walk, x_half, moved = recorded_teacher_walk(walks, index, draw)
    x0, noise = walks.latents[index], walks.states[index, 0]
    x_t = (1 - draw.t.view(-1, 1, 1, 1)) * x0 + draw.t.view(-1, 1, 1, 1) * noise
    x_t[teacher] = on_walk

    calls = {"teacher": 0}

    def as_teacher(x, t, **_):
        calls["teacher"] += 1
        return net(x, t)

    ema = TinyVelocityNet(width=16)  # any other field for the EMAs: both targets use the same

    def as_ema(x, t, **_):
        return ema(x, t)

    walked = average_velocity_target(x_t, x0, noise, draw, teacher=as_teacher, fast_ema=as_ema, slow_ema=as_ema)
    assert calls["teacher"] == 1  # the half of a 2-sub-step target
    replayed = average_velocity_target(x_t, x0, noise, draw, teacher=as_teacher, fast_ema=as_ema, slow_ema=as_ema,
                                       teacher_walk=(x_half, moved))
    assert calls["teacher"] == 1  # none more
    torch.testing.assert_close(replayed, walked, rtol=1e-5, atol=1e-5)


def _train(trajectories, latents, config=CONFIG):
    net = _teacher()
    forwards = {"items": 0}

    def velocity(x, t, **_):
        forwards["items"] += x.shape[0]
        return net(x, t)

    with ShortcutTrainer(net, velocity, latents, config, trajectories=trajectories) as trainer:
        trainer.run(progress=False)
        return trainer.result(), forwards["items"], trainer.generator.get_state()


def test_a_run_on_recorded_walks_spends_fewer_forwards_and_learns():
    net = _teacher()
    walks = _walks(net)
    plain, plain_forwards, _ = _train(None, walks.latents)
    replayed, replayed_forwards, _ = _train(walks, walks.latents)
    assert replayed_forwards < plain_forwards
    assert all(torch.isfinite(torch.tensor(replayed.losses)))
    assert replayed.losses != plain.losses


def test_walks_that_do_not_match_the_latents_are_refused_by_name():
    net = _teacher()
    walks = _walks(net)
    with pytest.raises(TrainingDataError, match="trajectories: 6 walks"):
        _train(walks, walks.latents[:4])
    odd = _walks(net, steps=7)
    with pytest.raises(TrainingDataError, match="multiple of t_skip"):
        _train(odd, odd.latents)

"""Targets from the teacher's recorded walks (data-free mode): the same targets the teacher would give, from
states it really passed, without its forwards."""

from __future__ import annotations

import pytest
import torch

from shortcut_core import ShortcutConfig, sample_euler, shifted_schedule
from shortcut_core.objective import ItemRole, average_velocity_target, draw_shortcut_items
from shortcut_core.trainer import ShortcutTrainer, TrainingDataError
from shortcut_core.training_recipe import TrainingRecipe
from shortcut_core.trajectories import (TeacherTrajectories, place_reflow_items, place_teacher_items,
                                        place_walk_items, record_euler_trajectories, recorded_teacher_walk,
                                        reflow_noise, state_at, walk_target)

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


# ---------------------------------------------------------------------- WALK items: the sampler's own jumps
def test_a_walk_is_its_recorded_states_and_straight_between_them():
    walks = _walks(_teacher())
    every = torch.arange(6)
    for k in (0, 3, 8):
        torch.testing.assert_close(state_at(walks, every, walks.times[k].repeat(6)), walks.states[:, k])
    # halfway through step 3 the Euler walk is halfway between its states 3 and 4
    middle = (walks.times[3] + walks.times[4]) / 2
    torch.testing.assert_close(state_at(walks, every, middle.repeat(6)),
                               (walks.states[:, 3] + walks.states[:, 4]) / 2)


def test_walk_items_are_self_items_moved_onto_a_samplers_jump():
    g = torch.Generator().manual_seed(1)
    config = CONFIG.replace(shift_min=0.5, shift_max=3.0)
    draw = draw_shortcut_items(64, config, g)
    walked = place_walk_items(draw, (1, 3), 0.5, config.substeps, torch.Generator().manual_seed(2))
    walk = walked.role == ItemRole.WALK
    assert walk.any() and bool((draw.role[walk] == ItemRole.SELF).all())
    assert torch.equal(walked.role[~walk], draw.role[~walk]) and torch.equal(walked.times[~walk], draw.times[~walk])
    assert (walked.role == ItemRole.SELF).any()  # half of them stay self items
    for i in torch.nonzero(walk).flatten().tolist():
        n = int(walked.schedule_length[i]) // config.substeps
        k = int(walked.start[i]) // config.substeps
        assert n in (1, 3) and 0 <= k < n
        sampler = shifted_schedule(n, float(walked.shift[i]), dtype=torch.float64)
        torch.testing.assert_close(walked.times[i, [0, -1]], sampler[[k, k + 1]])
    untouched = place_walk_items(draw, (1,), 0.0, config.substeps, torch.Generator().manual_seed(2))
    assert torch.equal(untouched.role, draw.role) and torch.equal(untouched.times, draw.times)


def test_a_walk_items_target_is_the_teachers_average_velocity_over_the_samplers_jump():
    net = _teacher()
    walks = _walks(net, steps=8)
    g = torch.Generator().manual_seed(0)
    draw = place_walk_items(draw_shortcut_items(16, CONFIG.replace(teacher_ratio=0.0), g), (2,), 1.0,
                            CONFIG.substeps, g)
    assert bool((draw.role == ItemRole.WALK).all())
    index = torch.arange(16) % 6
    x_t, target = walk_target(walks, index, draw)
    # shift 1 and 2 steps: the jumps are 4 of the 8 recorded steps, start to middle or middle to end
    for i in range(16):
        k = int(draw.start[i]) // CONFIG.substeps
        a, b = walks.states[index[i], 4 * k], walks.states[index[i], 4 * k + 4]
        torch.testing.assert_close(x_t[i], a)
        jump = walks.times[4 * k] - walks.times[4 * k + 4]
        torch.testing.assert_close(target[i], ((a - b) / jump).float())


def _walk_run(recipe, trajectories, latents, steps=40, config=CONFIG):
    net = _teacher()
    with ShortcutTrainer(net, lambda x, t, **_: net(x, t), latents,
                         config.replace(steps=steps, teacher_ratio=0.0, learning_rate=3e-3),
                         trajectories=trajectories, training_recipe=recipe) as trainer:
        trainer.run(progress=False)
        noise = trajectories.states[:, 0]
        one_step = trainer.sample_as("student", noise, shifted_schedule(1, 1.0), {}, 1.0)
        return float((one_step - trajectories.latents).pow(2).mean())


def test_training_on_one_step_walks_brings_the_one_step_sample_towards_the_teachers():
    net = _teacher()
    walks = _walks(net, n=6, steps=8)
    one_step = TrainingRecipe(walk_steps=(1,), walk_ratio=1.0)
    before = float((sample_euler(lambda x, t: net(x, t), walks.states[:, 0], shifted_schedule(1, 1.0), disable=True)
                    - walks.latents).pow(2).mean())
    after = _walk_run(one_step, walks, walks.latents)
    assert after < 0.5 * before


def test_walk_items_need_the_walks_and_leave_the_papers_run_alone():
    net = _teacher()
    walks = _walks(net)
    with pytest.raises(TrainingDataError, match="walk_steps"):
        ShortcutTrainer(net, lambda x, t, **_: net(x, t), walks.latents, CONFIG,
                        training_recipe=TrainingRecipe(walk_steps=(1, 2), walk_ratio=0.5))
    with pytest.raises(ValueError, match="walk_steps"):
        TrainingRecipe(walk_steps=(0,), walk_ratio=0.5)
    # walk_steps without a share draws nothing more: the paper's run, bit for bit
    paper, _, state = _train(walks, walks.latents)
    idle = ShortcutTrainer(net, lambda x, t, **_: net(x, t), walks.latents, CONFIG, trajectories=walks,
                           training_recipe=TrainingRecipe(walk_steps=(1,), walk_ratio=0.0))
    with idle as trainer:
        trainer.run(progress=False)
        assert trainer.losses == paper.losses and torch.equal(trainer.generator.get_state(), state)


def test_reflow_items_are_self_items_kept_at_their_drawn_times():
    draw = draw_shortcut_items(64, CONFIG.replace(shift_min=0.5, shift_max=3.0), torch.Generator().manual_seed(1))
    straight = place_reflow_items(draw, 0.5, torch.Generator().manual_seed(2))
    reflow = straight.role == ItemRole.REFLOW
    assert reflow.any() and bool((draw.role[reflow] == ItemRole.SELF).all())
    assert (straight.role == ItemRole.SELF).any() and torch.equal(straight.role[~reflow], draw.role[~reflow])
    assert torch.equal(straight.times, draw.times)
    none = place_reflow_items(draw, 0.0, torch.Generator().manual_seed(2))
    assert torch.equal(none.role, draw.role)


def test_reflow_noise_is_the_noise_the_teacher_walked_from():
    net = _teacher()
    walks = _walks(net)
    torch.testing.assert_close(reflow_noise(walks, torch.tensor([2, 0])), walks.states[[2, 0], 0], rtol=1e-4, atol=1e-4)
    # a walk recorded from t = 0.8: the line through its sample and first state, carried on to t = 1
    late = TeacherTrajectories(walks.states, walks.times * 0.8)
    noise = reflow_noise(late, torch.tensor([1]))
    on_line = walks.latents[1] + 0.8 * (noise[0] - walks.latents[1])
    torch.testing.assert_close(on_line, walks.states[1, 0], rtol=1e-4, atol=1e-4)


def _reflow_run(net, walks, recipe, steps=60):
    with ShortcutTrainer(net, lambda x, t, **_: net(x, t), walks.latents,
                         CONFIG.replace(steps=steps, teacher_ratio=0.0, learning_rate=3e-3),
                         trajectories=walks, training_recipe=recipe) as trainer:
        trainer.run(progress=False)
        return {n: float((trainer.sample_as("student", walks.states[:, 0], shifted_schedule(n, 1.0), {}, 1.0)
                          - walks.latents).pow(2).mean()) for n in (1, 2)}


def test_training_on_the_straight_lines_brings_one_and_two_steps_towards_the_teachers_samples():
    net = _teacher()
    walks = _walks(net, n=6, steps=8)
    teacher = {n: float((sample_euler(lambda x, t: net(x, t), walks.states[:, 0], shifted_schedule(n, 1.0),
                                      disable=True) - walks.latents).pow(2).mean()) for n in (1, 2)}
    after = _reflow_run(net, walks, TrainingRecipe(reflow_ratio=1.0))
    assert after[1] < 0.5 * teacher[1] and after[2] < 0.5 * teacher[2]


def test_reflow_items_need_the_walks_and_leave_the_papers_run_alone():
    net = _teacher()
    walks = _walks(net)
    with pytest.raises(TrainingDataError, match="reflow_ratio"):
        ShortcutTrainer(net, lambda x, t, **_: net(x, t), walks.latents, CONFIG,
                        training_recipe=TrainingRecipe(reflow_ratio=0.5))
    with pytest.raises(ValueError, match="reflow_ratio"):
        TrainingRecipe(reflow_ratio=1.5)
    paper, _, state = _train(walks, walks.latents)
    with ShortcutTrainer(net, lambda x, t, **_: net(x, t), walks.latents, CONFIG, trajectories=walks,
                         training_recipe=TrainingRecipe(reflow_ratio=0.0)) as trainer:
        trainer.run(progress=False)
        assert trainer.losses == paper.losses and torch.equal(trainer.generator.get_state(), state)

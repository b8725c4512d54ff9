"""The training recipe's levers: per-step values, the paper's recipe unchanged, and what a lever may not touch."""

from __future__ import annotations

import math

import pytest
import torch

from shortcut_core.config import ConfigError, ShortcutConfig
from shortcut_core.objective import ItemRole, draw_shortcut_items, shortcut_loss
from shortcut_core.trainer import ShortcutTrainer
from shortcut_core.training_recipe import (PAPER, TRAINING_RECIPES, TrainingRecipe, ema_decay_at, learning_rate_at,
                                           teacher_ratio_at)

from test_trainer import SHAPE, TinyVelocityNet


def test_the_paper_recipe_holds_every_knob_constant():
    for step in (0, 1, 50, 99):
        assert learning_rate_at(step, 100, 2e-5, PAPER) == 2e-5
        assert ema_decay_at(step + 1, 0.999, PAPER.slow_ema_power) == 0.999
        assert teacher_ratio_at(step, 100, 0.4, PAPER) == 0.4


def test_warm_up_then_cosine_decay():
    recipe = TrainingRecipe(warmup=0.1, decay="cosine", final_lr=0.1)
    lrs = [learning_rate_at(step, 100, 1.0, recipe) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)      # ten warm-up steps up to the peak
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                    # then falling ...
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)                            # ... to final_lr
    linear = [learning_rate_at(step, 100, 1.0, TrainingRecipe(decay="linear", final_lr=0.0)) for step in (0, 50)]
    assert linear == pytest.approx([1.0, 0.5])


def test_ema_warm_up_follows_the_student_first_and_never_exceeds_the_decay():
    decays = [ema_decay_at(k, 0.999, 2 / 3) for k in range(1, 40_000, 500)]
    assert decays[0] < 0.5 and max(decays) == 0.999
    assert all(a <= b for a, b in zip(decays, decays[1:]))
    assert ema_decay_at(100, 0.99, 2 / 3) == pytest.approx(1 - 101 ** (-2 / 3))


def test_teacher_share_ramps_to_the_configs():
    recipe = TrainingRecipe(teacher_start=1.0, teacher_ramp=0.5)
    assert teacher_ratio_at(0, 100, 0.4, recipe) == 1.0
    assert teacher_ratio_at(25, 100, 0.4, recipe) == pytest.approx(0.7)
    assert teacher_ratio_at(50, 100, 0.4, recipe) == pytest.approx(0.4)
    assert teacher_ratio_at(99, 100, 0.4, recipe) == pytest.approx(0.4)


@pytest.mark.parametrize("bad", [dict(decay="step"), dict(warmup=1.5), dict(final_lr=-0.1),
                                 dict(slow_ema_power=2.0), dict(teacher_start=1.2), dict(huber_c=-0.1),
                                 dict(self_steps=()), dict(self_steps=(0, 3))])
def test_a_bad_lever_names_itself(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainingRecipe(**bad)


def test_config_recipe_is_one_of_the_named_and_sets_the_sub_steps_left_at_auto():
    assert ShortcutConfig().recipe == "paper" and set(TRAINING_RECIPES) == {"fast", "paper"}
    with pytest.raises(ConfigError, match="recipe"):
        ShortcutConfig(recipe="fastest")
    fast = ShortcutConfig(recipe="fast")
    assert fast.substeps == 4 and fast.self_schedule_lengths == (4, 8, 16)
    paper = fast.replace(recipe="paper")  # one choice away: the paper's schedules exactly
    assert paper.substeps == 2 and paper.self_schedule_lengths == (2, 4, 8, 16)
    assert paper.teacher_schedule_lengths == (32,)
    assert ShortcutConfig(t_skip=2).substeps == 2  # a number typed in is used as typed
    with pytest.raises(ConfigError, match="t_skip"):
        ShortcutConfig(t_skip=3)


def _run(recipe: TrainingRecipe | None, config: ShortcutConfig):
    torch.manual_seed(0)
    net = TinyVelocityNet()
    latents = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    with ShortcutTrainer(net, lambda x, t, **_: net(x, t), latents, config, training_recipe=recipe) as trainer:
        lrs = []
        for _ in range(config.steps):
            trainer.step()
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return trainer.result(), lrs, trainer.generator.get_state()


CONFIG = ShortcutConfig(rank=4, alpha=4.0, batch_size=4, steps=6, learning_rate=1e-2, guidance_range=None,
                        resolution_shift_prob=0.0, gradient_checkpointing=False, checkpoint_every=0, seed=3)


def test_the_configs_paper_recipe_is_the_paper_run_bit_for_bit():
    named, lrs, _ = _run(None, CONFIG.replace(recipe="paper"))
    explicit, _, _ = _run(TrainingRecipe(), CONFIG.replace(t_skip=2))
    assert lrs == [CONFIG.learning_rate] * CONFIG.steps
    assert named.losses == explicit.losses
    for key, weights in named.lora.items():
        assert torch.equal(weights.down, explicit.lora[key].down) and torch.equal(weights.up, explicit.lora[key].up)


def test_levers_change_values_not_the_draws():
    """A schedule changes the learning rate, EMA decays and teacher share per step, but every run draws the
    same latents, noises, times and roles from the generator: a lever is measured against the same draws."""
    paper, paper_lrs, paper_rng = _run(PAPER, CONFIG)
    lever = TrainingRecipe(warmup=0.5, decay="cosine", final_lr=0.0, fast_ema_power=0.5, slow_ema_power=0.5,
                           teacher_start=1.0, teacher_ramp=0.5)
    moved, lrs, rng = _run(lever, CONFIG)
    assert torch.equal(rng, paper_rng)
    assert lrs != paper_lrs and max(lrs) == pytest.approx(CONFIG.learning_rate) and lrs[-1] < lrs[2]
    assert moved.losses != paper.losses
    assert all(math.isfinite(v) for v in moved.losses)


def test_the_pseudo_huber_loss_keeps_an_item_with_a_large_error_from_dominating():
    target = torch.zeros(2, 4, 3)
    prediction = torch.stack([torch.full((4, 3), 0.01), torch.full((4, 3), 1.0)]).requires_grad_()
    grads = {}
    for c in (0.0, 1e-4):
        loss, per_item = shortcut_loss(prediction, target, huber_c=c)
        assert torch.allclose(per_item, torch.tensor([1e-4, 1.0]))  # always the per-item MSE
        (grad,) = torch.autograd.grad(loss, prediction)
        grads[c] = grad.reshape(2, -1).norm(dim=1)
        if c == 0:
            assert loss == per_item.mean()
        else:
            assert float(loss) == pytest.approx(float(((per_item + c * c).sqrt() - c).mean()))
    assert float(grads[0.0][1] / grads[0.0][0]) == pytest.approx(100.0, rel=1e-4)  # MSE: 100x the pull
    assert float(grads[1e-4][1] / grads[1e-4][0]) == pytest.approx(1.0, rel=0.02)  # pseudo-Huber: the same


def test_a_pseudo_huber_run_reports_the_mse_and_trains_otherwise():
    paper, _, paper_rng = _run(PAPER, CONFIG)
    huber, _, rng = _run(TrainingRecipe(huber_c=0.03), CONFIG)
    assert torch.equal(rng, paper_rng)
    assert huber.losses[0] == paper.losses[0]  # the first step's loss is measured before any update
    assert huber.losses != paper.losses and all(math.isfinite(v) for v in huber.losses)


def test_self_steps_teach_the_samplers_step_counts():
    """The paper's self items teach the 1-, 2-, 4- and 8-step walks; `self_steps` names the walks instead (3 is
    one jump of t_skip sub-steps over a 3 * t_skip-step schedule), at the same forwards an item."""
    cfg = CONFIG.replace(batch_size=512, teacher_ratio=0.0, t_skip=2)
    paper = draw_shortcut_items(512, cfg, torch.Generator().manual_seed(0))
    assert set(paper.schedule_length.tolist()) == {2, 4, 8, 16}
    mine = draw_shortcut_items(512, cfg, torch.Generator().manual_seed(0), self_lengths=(2, 4, 6))
    assert set(mine.schedule_length.tolist()) == {2, 4, 6}
    assert (mine.role == int(ItemRole.SELF)).all()
    three = mine.schedule_length == 6
    # a 3-step item's target spans one of the 3-step sampler's steps: from t[start] over 2 of 6 sub-steps
    assert set(mine.start[three].tolist()) == {0, 2, 4}
    assert mine.times[three].shape[-1] == 3

    trained, _, _ = _run(TrainingRecipe(self_steps=(1, 2, 3)), CONFIG)
    paper_run, _, _ = _run(PAPER, CONFIG)
    assert trained.losses != paper_run.losses and all(math.isfinite(v) for v in trained.losses)


def test_lora_plus_moves_the_up_factors_faster_and_resumes_exactly(tmp_path):
    """LoRA+: the up factors (zero at the start, the only ones with a gradient at step 1) take an AdamW step of
    up_lr_ratio times the learning rate; the offloaded optimizer does the same, and a checkpoint of the two
    parameter groups resumes to the straight run bit for bit."""
    config = CONFIG.replace(steps=1)
    plain, _, _ = _run(PAPER, config)
    plus, _, _ = _run(TrainingRecipe(up_lr_ratio=4.0), config)
    offloaded, _, _ = _run(TrainingRecipe(up_lr_ratio=4.0), config.replace(offload_optimizer=True))
    for key, weights in plain.lora.items():
        up, up_plus = weights.up.abs().max().item(), plus.lora[key].up.abs().max().item()
        assert up == pytest.approx(config.learning_rate, rel=1e-3)      # AdamW's first step: lr per element
        assert up_plus == pytest.approx(4 * config.learning_rate, rel=1e-3)
        assert torch.equal(plus.lora[key].down, weights.down)          # no gradient through a zero up factor
        assert torch.equal(offloaded.lora[key].up, plus.lora[key].up)
    recipe, steps = TrainingRecipe(up_lr_ratio=4.0), 4
    config = CONFIG.replace(steps=steps, checkpoint_every=2)
    straight, _, _ = _run(recipe, config.replace(checkpoint_every=0))
    latents = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "plus.train_state")
    torch.manual_seed(0)
    net = TinyVelocityNet()
    with ShortcutTrainer(net, lambda x, t, **_: net(x, t), latents, config, training_recipe=recipe) as trainer:
        for _ in range(steps // 2):
            trainer.step()
        trainer.save_checkpoint(path)
    torch.manual_seed(0)
    net = TinyVelocityNet()
    with ShortcutTrainer(net, lambda x, t, **_: net(x, t), latents, config, training_recipe=recipe) as trainer:
        trainer.load_checkpoint(path)
        for _ in range(steps - steps // 2):
            trainer.step()
        resumed = trainer.result()
    for key, weights in straight.lora.items():
        assert torch.equal(resumed.lora[key].up, weights.up) and torch.equal(resumed.lora[key].down, weights.down)

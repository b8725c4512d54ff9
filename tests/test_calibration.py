"""The recipe calibration, and sampling with the run's adapters in the middle of training."""

from __future__ import annotations

import pytest
import torch

from shortcut_core import LoraMetadata, ShortcutConfig, ShortcutTrainer, sample_euler, shifted_schedule
from shortcut_core.adapters import STUDENT, TEACHER
from shortcut_core.calibration import Calibration, Recipe, calibrate_recipe, recipe_grid, sample_distance

from test_trainer import SHAPE, TinyVelocityNet


def test_the_grid_holds_the_loras_recipe_first_then_strengths_shifts_and_twice_the_steps():
    grid = recipe_grid(3, 3.0)
    assert grid[0] == Recipe(3, 1.0, 3.0)
    assert len(grid) == 2 * 4 * 3 and len(set(grid)) == len(grid)
    assert {r.steps for r in grid} == {3, 6}
    assert {r.strength for r in grid} == {1.0, 1.25, 1.5, 1.75}
    assert {r.shift for r in grid} == {2.0, 3.0, 4.5}


def test_the_best_recipe_is_the_closest_at_the_loras_own_step_count():
    grid = recipe_grid(3, 3.0)
    reference = torch.zeros(4, 2)
    target = {Recipe(3, 1.5, 4.5): 0.1, Recipe(6, 1.0, 3.0): 0.01}  # twice the steps is closer still

    def sample(recipe):
        return torch.full((4, 2), target.get(recipe, 0.5))

    calibration = calibrate_recipe(sample, reference, grid, reference_steps=32)
    assert calibration.best == (Recipe(3, 1.5, 4.5), pytest.approx(0.1))
    assert calibration.baseline == (Recipe(3, 1.0, 3.0), pytest.approx(0.5))
    assert Calibration.from_dict(calibration.to_dict()).table == calibration.table
    text = calibration.text()
    assert text.startswith("calibrated: 3 steps, strength 1.5, shift 4.5\nrms 0.1000 (strength 1, shift 3: 0.5000)")
    assert "6 steps, shift" in text and max(len(line) for line in text.splitlines()) <= 64


def test_the_distance_is_the_root_mean_square_difference():
    assert sample_distance(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])) == pytest.approx(12.5 ** 0.5)


def _trainer(net, steps=4):
    latents = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    config = ShortcutConfig(rank=4, alpha=4.0, batch_size=4, steps=steps, learning_rate=1e-2, checkpoint_every=0,
                            guidance_range=None, resolution_shift_prob=0.0, teacher_min_steps=8, teacher_max_steps=8,
                            sample_steps=2, sample_shift=1.0, gradient_checkpointing=False)
    return ShortcutTrainer(net, lambda x, t, **e: net(x, t), latents, config)


def test_sampling_with_the_adapters_during_training_changes_nothing_of_the_run():
    torch.manual_seed(0)
    net = TinyVelocityNet()
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9))
    sigmas = shifted_schedule(2, 1.0)
    with _trainer(net) as plain:
        expected = plain.run(progress=False)
    previews = []
    with _trainer(net) as watched:
        def preview(report):
            previews.append(watched.sample_as(STUDENT, noise, sigmas, strength=1.5))
            watched.sample_as(TEACHER, noise, sigmas)
        result = watched.run(callback=preview, progress=False)
    assert result.losses == expected.losses
    assert all(torch.equal(result.lora[k].up, expected.lora[k].up) and torch.equal(result.lora[k].down,
               expected.lora[k].down) for k in expected.lora)
    assert len(previews) == 4 and not torch.equal(previews[0], previews[-1])  # the student moved


def test_sample_as_is_euler_with_the_role_and_strength_applied():
    torch.manual_seed(0)
    net = TinyVelocityNet()
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9))
    sigmas = shifted_schedule(3, 2.0)
    with _trainer(net, steps=2) as trainer:
        trainer.run(progress=False)
        teacher = trainer.sample_as(TEACHER, noise, sigmas)
        strong = trainer.sample_as(STUDENT, noise, sigmas, strength=1.75)
        student = trainer.sample_as(STUDENT, noise, sigmas)
        lora = trainer.adapters.lora_state(STUDENT)
    assert torch.equal(teacher, sample_euler(lambda x, t: net(x, t), noise, sigmas))
    from shortcut_core import lora_applied
    with lora_applied(net, lora, 1.75):
        assert torch.allclose(strong, sample_euler(lambda x, t: net(x, t), noise, sigmas), atol=1e-6)
    assert not torch.allclose(student, strong)


def test_calibrate_measures_the_grid_and_the_metadata_recommends_its_best():
    torch.manual_seed(0)
    net = TinyVelocityNet()
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(9))
    with _trainer(net, steps=3) as trainer:
        trainer.run(progress=False)
        assert trainer.lora_metadata().calibration is None
        calibration = trainer.calibrate(noise)
        metadata = trainer.lora_metadata()
    assert calibration.reference_steps == 8 and calibration.samples == 4
    assert len(calibration.table) == 24 and calibration.table[0][0] == Recipe(2, 1.0, 1.0)
    best, distance = calibration.best
    assert distance == min(d for r, d in calibration.table if r.steps == 2)
    assert (metadata.steps, metadata.strength, metadata.shift) == (best.steps, best.strength, best.shift)
    again = LoraMetadata.from_strings(metadata.to_strings())
    assert Calibration.from_dict(again.calibration).table == calibration.table

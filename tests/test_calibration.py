"""The recipe calibration, and sampling with the run's adapters in the middle of training."""

from __future__ import annotations

import math

import pytest
import torch

from shortcut_core import LoraMetadata, ShortcutConfig, ShortcutTrainer, sample_euler, shifted_schedule
from shortcut_core.adapters import STUDENT, TEACHER
from shortcut_core.calibration import (MULTISTEP, TIME_SHIFT, Calibration, Recipe, calibrate_recipe, choose,
                                       choose_walk, sample_distance, search_recipes, search_walk)
from shortcut_core.sampling import told_times

from test_trainer import SHAPE, TinyVelocityNet


def _bowl(best_shift: dict[int, float], best_strength: dict[int, float]):
    """A distance with one optimum per step count, in log shift and strength; counts what it measures."""
    calls = []

    def measure(recipe):  # the same squared error for each of 4 noises: no spread, so no ties
        calls.append(recipe)
        return torch.full((4,), (math.log(recipe.shift / best_shift[recipe.steps]) ** 2
                                 + (recipe.strength - best_strength[recipe.steps]) ** 2 + 0.01 / recipe.steps) ** 2)
    return measure, calls


def test_the_search_follows_the_optimum_past_the_edge_of_its_first_line_for_every_step_count():
    best_shift = {1: 0.1, 2: 0.1, 3: 1.0, 4: 9.0}         # 0.1 and 9: beyond x1/8 and x3 of the LoRA's 3.0
    best_strength = {1: 2.5, 2: 1.75, 3: 1.25, 4: 0.5}
    measure, calls = _bowl(best_shift, best_strength)
    table = search_recipes(measure, steps=3, shift=3.0)
    assert table[0][0] == Recipe(3, 1.0, 3.0)              # the LoRA's own recipe first: the baseline
    assert len(calls) == len(set(calls)) == len(table)     # each recipe measured once
    calibration = Calibration(table=[(r, float(e.mean().sqrt())) for r, e in table], reference_steps=32, samples=4)
    assert calibration.step_counts == [1, 2, 3, 4]
    assert {r.shift for r, _ in table if r.steps == 1} == {3.0}  # one Euler step: the shift changes nothing
    for n in (1, 2, 3, 4):
        recipe, _ = calibration.best_for(n)
        assert n == 1 or abs(math.log(recipe.shift / best_shift[n])) <= math.log(1.5) / 2 + 1e-9, (n, recipe)
        assert abs(recipe.strength - best_strength[n]) <= 0.25 + 1e-9, (n, recipe)
        assert len([r for r, _ in table if r.steps == n]) <= 26  # the cost: about 20 recipes per step count
    assert min(r.shift for r, _ in table) < 3.0 * 1.5 ** -5 and max(r.shift for r, _ in table) > 3.0 * 1.5 ** 3


def test_a_recipe_the_noises_cannot_tell_from_the_closest_gives_way_to_the_one_nearest_the_loras_own():
    own = Recipe(3, 1.0, 1.0)
    base = torch.linspace(0.5, 1.5, 16)
    wobble = torch.tensor([0.1, -0.1] * 8)  # paired differences of spread 0.1: a standard error of 0.026
    rows = [(own, base + 0.02 + wobble),                       # 0.02 worse on average than the closest: a tie
            (Recipe(3, 1.0, 1.0 / 1.5), base + 0.01 - wobble),
            (Recipe(3, 1.5, 1.0 / 1.5 ** 3), base)]            # the closest on average
    assert choose(rows, own) == own
    rows.append((Recipe(3, 2.0, 0.1), base - 0.2 + 0.1 * wobble))  # closer by far more than its spread
    assert choose(rows, own) == Recipe(3, 2.0, 0.1)


def test_the_search_stops_widening_where_its_range_ends():
    measure, _ = _bowl({n: 1e-6 for n in (1, 2, 3, 4)}, {n: 10.0 for n in (1, 2, 3, 4)})
    table = search_recipes(measure, steps=2, shift=1.0)
    # four shifts past the line's lower end, then half a step finer; strengths up to the range's end
    assert min(r.shift for r, _ in table) >= 1.5 ** -9.5 * 0.99 and max(r.strength for r, _ in table) == 4.0


def test_the_best_recipe_is_the_closest_at_the_loras_own_step_count_and_each_step_count_keeps_its_own():
    target = {Recipe(3, 1.5, 4.5): 0.1, Recipe(6, 1.0, 3.0): 0.01, Recipe(1, 2.0, 2.0): 0.3}
    reference = torch.zeros(4, 2)

    def sample(recipe):
        return torch.full((4, 2), target.get(recipe, 0.5))

    table = [(r, sample_distance(sample(r), reference)) for r in [Recipe(3, 1.0, 3.0), *target, Recipe(1, 1.0, 3.0)]]
    calibration = Calibration(table=table, reference_steps=32, samples=4)
    assert calibration.best == (Recipe(3, 1.5, 4.5), pytest.approx(0.1))  # 6 steps is closer still, not chosen
    assert calibration.baseline == (Recipe(3, 1.0, 3.0), pytest.approx(0.5))
    assert calibration.recipes() == {1: Recipe(1, 2.0, 2.0), 3: Recipe(3, 1.5, 4.5), 6: Recipe(6, 1.0, 3.0)}
    data = calibration.to_dict()
    assert data["recipes"]["1"] == {"strength": 2.0, "shift": 2.0, "time_shift": 0.0, "multistep": 0.0}
    assert Calibration.from_dict(data).table == calibration.table
    text = calibration.text()
    assert text.startswith("calibrated: 3 steps, strength 1.5, shift 4.5\nrms 0.1000 (strength 1, shift 3: 0.5000)")
    assert " 1 step  strength 2    shift 2      rms 0.3000" in text and " 6 steps" in text
    assert max(len(line) for line in text.splitlines()) <= 64


def test_a_file_calibrated_before_per_step_recipes_still_loads():
    old = {"metric": "rms distance to the teacher's samples", "reference_steps": 32, "samples": 16,
           "table": [[3, 1.0, 3.25, 0.2], [3, 1.25, 2.1667, 0.15], [6, 1.0, 3.25, 0.1]]}
    calibration = Calibration.from_dict(old)
    assert calibration.best == (Recipe(3, 1.25, 2.1667), 0.15)
    assert calibration.recipes() == {3: Recipe(3, 1.25, 2.1667), 6: Recipe(6, 1.0, 3.25)}
    assert calibration.text().startswith("calibrated: 3 steps, strength 1.25, shift 2.17")


def test_the_times_told_are_eulers_at_0_and_move_within_each_jump_never_past_the_first():
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    assert torch.equal(told_times(sigmas), sigmas[:-1])
    assert told_times(sigmas, -0.5).tolist() == pytest.approx([1.0, 0.8, 0.3])   # noisier, capped at the first
    assert told_times(sigmas, 0.25).tolist() == pytest.approx([0.9, 0.5, 0.15])  # cleaner
    assert told_times(torch.tensor([0.8, 0.0]), 0.3).tolist() == pytest.approx([0.56])


def test_sampling_at_a_time_shift_tells_the_model_those_times_and_at_0_is_euler_bit_for_bit():
    told = []

    def velocity(x, t):
        told.append(float(t[0]))
        return x * t.reshape(-1, 1) + 1

    x, sigmas = torch.randn(2, 3), torch.tensor([1.0, 0.5, 0.0])
    euler = sample_euler(velocity, x, sigmas)
    assert torch.equal(sample_euler(velocity, x, sigmas, time_shift=0.0), euler)
    told.clear()
    shifted = sample_euler(velocity, x, sigmas, time_shift=-0.2)
    assert told == pytest.approx([1.0, 0.6]) and not torch.allclose(shifted, euler)


def test_the_multistep_step_is_euler_at_0_adams_bashforths_at_one_half_on_equal_jumps_and_leaves_one_jump_alone():
    def velocity(x, t):
        return x * t.reshape(-1, 1) ** 2 + 1

    x, sigmas = torch.randn(2, 3), torch.tensor([1.0, 0.5, 0.0])
    euler = sample_euler(velocity, x, sigmas)
    assert torch.equal(sample_euler(velocity, x, sigmas, multistep=0.0), euler)
    v0 = velocity(x, torch.full((2,), 1.0))
    x1 = x - 0.5 * v0
    v1 = velocity(x1, torch.full((2,), 0.5))
    two_step = x1 - 0.5 * (1.5 * v1 - 0.5 * v0)  # Adams-Bashforth's two-step rule
    assert torch.allclose(sample_euler(velocity, x, sigmas, multistep=0.5), two_step)
    assert not torch.allclose(two_step, euler)
    one = torch.tensor([1.0, 0.0])
    assert torch.equal(sample_euler(velocity, x, one, multistep=0.5), sample_euler(velocity, x, one))


def _errors(best_value: float, gain: float, best_shift: float = 2.0, field: str = "time_shift"):
    """Squared errors over 16 noises with a spread they cannot resolve, less up to `gain` around one value of the
    walk's `field` and one shift."""
    def measure(recipe):
        value = getattr(recipe, field)
        wobble = 0.01 * torch.tensor([(-1.0) ** i for i in range(16)]) * (1 + abs(value))
        closer = gain * (1 - 4 * abs(value - best_value) - abs(math.log(recipe.shift / best_shift)))
        return torch.linspace(1.0, 1.1, 16) + wobble - max(closer, 0.0)
    return measure


def test_the_time_shift_search_refines_around_its_best_moves_the_shift_beside_it_and_tells_only_noisier_times():
    half = 1.5 ** 0.5
    recipe = Recipe(3, 1.5, 2.0)
    rows = search_walk(_errors(-0.28, 0.5, best_shift=2.0 / half), recipe, TIME_SHIFT)
    measured = {}
    for r, _ in rows:
        assert (r.steps, r.strength) == (3, 1.5)
        measured.setdefault(r.shift, []).append(r.time_shift)
    assert sorted(measured[2.0]) == [-0.4, -0.3, -0.2, -0.1, 0.0]     # the line, then around its best
    assert sorted(measured[round(2.0 / half, 6)]) == [-0.4, -0.3, -0.2]  # the better shift, around it
    assert measured[round(2.0 * half, 6)] == [-0.3]
    assert choose_walk(rows, recipe) == Recipe(3, 1.5, round(2.0 / half, 6), -0.3)
    cleaner = search_walk(_errors(0.3, 0.5), recipe, TIME_SHIFT)  # never told a cleaner time than the state's
    assert max(r.time_shift for r, _ in cleaner) == 0.0 and choose_walk(cleaner, recipe) == recipe
    with pytest.raises(ValueError, match="time_shift: one jump"):
        search_walk(_errors(0.3, 0.5), Recipe(1, 2.0, 2.0), TIME_SHIFT)


def test_a_time_shift_the_noises_cannot_tell_from_eulers_gives_way_to_euler():
    recipe = Recipe(3, 1.0, 2.0)
    for gain in (0.0, 0.0005):
        assert choose_walk(search_walk(_errors(-0.3, gain), recipe, TIME_SHIFT), recipe) == recipe


def test_the_multistep_search_starts_at_the_chosen_time_shift_and_stays_between_euler_and_adams_bashforth():
    recipe = Recipe(3, 1.5, 2.0, -0.2)
    rows = search_walk(_errors(0.38, 0.5, field="multistep"), recipe, MULTISTEP)
    assert {(r.steps, r.strength, r.time_shift) for r, _ in rows} == {(3, 1.5, -0.2)}
    assert sorted(r.multistep for r, _ in rows if r.shift == 2.0) == [0.0, 0.2, 0.3, 0.4, 0.5]
    assert choose_walk(rows, recipe) == Recipe(3, 1.5, 2.0, -0.2, 0.4)
    beyond = search_walk(_errors(0.6, 0.5, field="multistep"), recipe, MULTISTEP)  # never past c = 1/2
    assert max(r.multistep for r, _ in beyond) == 0.5 and choose_walk(beyond, recipe).multistep == 0.5
    backwards = search_walk(_errors(-0.3, 0.5, field="multistep"), recipe, MULTISTEP)  # nor below Euler
    assert min(r.multistep for r, _ in backwards) == 0.0 and choose_walk(backwards, recipe) == recipe
    with pytest.raises(ValueError, match="multistep: one jump"):
        search_walk(_errors(0.3, 0.5), Recipe(1, 2.0, 2.0), MULTISTEP)


def test_calibrate_chooses_the_time_shift_then_the_multistep_at_each_step_counts_recipe_and_the_file_keeps_them():
    measure, _ = _bowl({n: 1.0 for n in (1, 2, 3, 4)}, {n: 1.5 for n in (1, 2, 3, 4)})
    reference = torch.zeros(4, 1)

    def sample(recipe):  # the bowl's distance, less at 2 steps told -0.2 (less again at c 0.4 there), at 3 at c 0.2
        gain = 1.0
        if (recipe.steps, recipe.time_shift) == (2, -0.2):
            gain *= 0.9 if recipe.multistep != 0.4 else 0.81
        if (recipe.steps, recipe.time_shift, recipe.multistep) == (3, 0.0, 0.2):
            gain *= 0.9
        return (measure(recipe) * gain).sqrt()[:, None]

    calibration = calibrate_recipe(sample, reference, steps=3, shift=1.0, reference_steps=32)
    assert calibration.recipes() == {1: Recipe(1, 1.5, 1.0), 2: Recipe(2, 1.5, 1.0, -0.2, 0.4),
                                     3: Recipe(3, 1.5, 1.0, 0.0, 0.2), 4: Recipe(4, 1.5, 1.0)}
    told = calibrate_recipe(sample, reference, steps=3, shift=1.0, reference_steps=32, walk_levers=(TIME_SHIFT,))
    assert told.recipes()[2] == Recipe(2, 1.5, 1.0, -0.2) and told.recipes()[3] == Recipe(3, 1.5, 1.0)
    plain = calibrate_recipe(sample, reference, steps=3, shift=1.0, reference_steps=32, walk_levers=())
    assert plain.recipes()[2] == Recipe(2, 1.5, 1.0) and not any(any(r.walk.values()) for r, _ in plain.table)
    data = calibration.to_dict()
    assert all(len(row) == 4 for row in data["table"]) and data["walk_table"]  # older readers read "table"
    assert data["recipes"]["2"] == {"strength": 1.5, "shift": 1.0, "time_shift": -0.2, "multistep": 0.4}
    again = Calibration.from_dict(data)
    assert again.recipes() == calibration.recipes() and sorted(again.table, key=str) == sorted(calibration.table, key=str)
    text = again.text()
    assert " 2 steps strength 1.5  shift 1      rms" in text and "time shift -0.2, multistep 0.4" in text
    assert "multistep 0.2" in text and max(len(line) for line in text.splitlines()) <= 64
    data.pop("walk_table")  # a file written before the walk's choices: Euler's walk at every step count
    for recipe in data["recipes"].values():
        recipe.pop("time_shift"), recipe.pop("multistep")
    assert Calibration.from_dict(data).recipes() == plain.recipes()


def test_the_distance_is_the_root_mean_square_difference():
    assert sample_distance(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])) == pytest.approx(12.5 ** 0.5)


def _trainer(net, steps=4, **changes):
    latents = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    config = ShortcutConfig(rank=4, alpha=4.0, batch_size=4, steps=steps, learning_rate=1e-2, checkpoint_every=0,
                            guidance_range=None, resolution_shift_prob=0.0, teacher_min_steps=8, teacher_max_steps=8,
                            sample_steps=2, sample_shift=1.0, gradient_checkpointing=False).replace(**changes)
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


def test_calibrate_searches_every_step_count_and_the_metadata_recommends_its_best():
    torch.manual_seed(0)
    net = TinyVelocityNet()
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(9))
    with _trainer(net, steps=3) as trainer:
        trainer.run(progress=False)
        assert trainer.lora_metadata().calibration is None
        calibration = trainer.calibrate(noise)
        metadata = trainer.lora_metadata()
    assert calibration.reference_steps == 8 and calibration.samples == 4
    assert calibration.table[0][0] == Recipe(2, 1.0, 1.0) and calibration.step_counts == [1, 2, 3, 4]
    best, distance = calibration.best
    # the closest on its walk (a walk the 4 noises cannot tell apart from Euler's gives way to it)
    assert distance == min(d for r, d in calibration.table if r.steps == 2 and r.walk == best.walk)
    assert (metadata.steps, metadata.strength, metadata.shift) == (best.steps, best.strength, best.shift)
    one = calibration.best_for(1)[0]
    assert metadata.calibration["recipes"]["1"] == {"strength": one.strength, "shift": one.shift,
                                                    **one.walk}
    assert {tuple(r.walk.values()) for r, _ in calibration.table if r.steps == 1} == {(0.0, 0.0)}  # one jump: Euler
    for n in (2, 3, 4):  # each chosen recipe's time shifts were measured beside it
        chosen = calibration.best_for(n)[0]
        assert {r.time_shift for r, _ in calibration.table
                if (r.steps, r.strength) == (n, chosen.strength)} >= {-0.4, -0.2, 0.0}
    again = LoraMetadata.from_strings(metadata.to_strings())
    assert Calibration.from_dict(again.calibration).table == calibration.table


def test_centre_shifts_moves_the_draw_around_the_teachers_best_few_step_shift_and_nothing_else():
    from shortcut_core.config import schedule_around

    torch.manual_seed(0)
    net = TinyVelocityNet()
    noise = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(9))
    with _trainer(net, steps=3, sample_shift=3.25, shift_min=2.5, shift_max=4.5) as plain:
        given = plain.config
        best = plain.centre_shifts(noise)
        centred = plain.config
        plain.run(progress=False)
        with pytest.raises(RuntimeError, match="before the first step"):
            plain.centre_shifts(noise)
        lora, losses = plain.adapters.lora_state(STUDENT), list(plain.losses)
    assert best.steps == 2 and best.strength == 1.0
    assert centred == given.replace(**schedule_around(best.shift, given.resolution_shift_prob))
    assert centred.sample_shift == pytest.approx(best.shift, rel=1e-3) and centred.shift_min < best.shift < centred.shift_max

    # the teacher's own 2-step samples are closer to its 8-step ones at the shift found than at the config's
    reference = sample_euler(lambda x, t: net(x, t), noise, shifted_schedule(8, given.sample_shift))
    def distance(shift):
        return sample_distance(sample_euler(lambda x, t: net(x, t), noise, shifted_schedule(2, shift)), reference)
    assert best.shift != given.sample_shift and distance(best.shift) < distance(given.sample_shift)

    # centring changes the config only: a run given the centred config from the start is the same run
    changes = {k: getattr(centred, k) for k in ("sample_shift", "shift_min", "shift_max")}
    with _trainer(net, steps=3, **changes) as direct:
        direct.run(progress=False)
        assert direct.losses == losses
        assert all(torch.equal(direct.adapters.lora_state(STUDENT)[k].up, lora[k].up) for k in lora)


def test_a_raise_between_samplings_stops_the_search_and_leaves_the_run_as_it_was():
    torch.manual_seed(0)
    net = TinyVelocityNet()
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(9))
    calls = []

    def cancel_at_third():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with _trainer(net, steps=2, sample_shift=3.25, shift_min=2.5, shift_max=4.5) as trainer:
        given = trainer.config
        with pytest.raises(KeyboardInterrupt):
            trainer.centre_shifts(noise, between=cancel_at_third)
        assert trainer.config == given and len(calls) == 3
        trainer.run(progress=False)
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            trainer.calibrate(noise, between=cancel_at_third)
        assert trainer.calibration is None and trainer.lora_metadata().calibration is None

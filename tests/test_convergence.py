"""benchmarks.convergence's tables: each lever against the paper's recipe on every teacher, and points that
round-trip through --out / --load (how docs/convergence-*.md are made from runs on several machines)."""

from __future__ import annotations

import pytest

from contextlib import contextmanager
from dataclasses import replace

from benchmarks.convergence import Point, keep_best_table, length_free, main, versus_paper
from shortcut_core.training_recipe import FAST, PAPER


def _point(teacher: str, recipe: str, rmse3: float, fd3: float, steps: int = 100) -> Point:
    return Point(teacher, recipe, steps, 1.0, {1: 0.5, 2: 0.3, 3: rmse3, 4: 0.1}, fd3, 1.0,
                 {n: (1.0, 1.0) for n in (1, 2, 3, 4)})


def test_each_lever_is_a_ratio_to_the_paper_on_every_teacher():
    points = [_point("a", "paper", 0.2, 2.0), _point("b", "paper", 0.1, 1.0),
              _point("a", "warm-up", 0.1, 1.0), _point("b", "warm-up", 0.15, 0.5),
              _point("a", "better", 0.19, 1.9), _point("b", "better", 0.09, 0.9)]
    table = versus_paper(points)
    warm_up = next(line for line in table.splitlines() if line.startswith("| warm-up"))
    assert "0.50 / 0.50" in warm_up and "1.50 / 0.50" in warm_up and "1 of 2" in warm_up
    better = next(line for line in table.splitlines() if line.startswith("| better "))
    assert "0.95 / 0.95" in better and "0.90 / 0.90" in better and "2 of 2" in better


def test_curves_have_no_lever_table():
    """Several paper points per teacher (a curve over budgets) are not an ablation."""
    assert versus_paper([_point("a", "paper", 0.2, 2.0, 10), _point("a", "paper", 0.1, 1.0, 30),
                         _point("a", "fast", 0.1, 1.0, 10)]) is None


def test_points_round_trip_through_out_and_load(tmp_path):
    import json

    saved = tmp_path / "run.json"
    points = [_point("a", "paper", 0.2, 2.0), _point("a", "warm-up", 0.1, 1.0)]
    saved.write_text(json.dumps([p.__dict__ for p in points]))
    loaded = main(["--teachers", "none", "--load", str(saved), "--out", str(tmp_path / "table")])
    assert loaded == points
    text = (tmp_path / "table.md").read_text()
    assert str(saved) in text.splitlines()[0] and "| warm-up" in text


def test_the_plot_draws_a_panel_per_teacher(tmp_path):
    pytest.importorskip("PIL", reason="the plot needs Pillow (ComfyUI's requirements have it)")
    from PIL import Image

    from benchmarks.convergence import plot

    points = [_point(t, r, 0.2 - 0.05 * i, 1.0, steps) for t in ("a", "b", "c") for r in ("paper", "fast")
              for i, steps in enumerate((10, 30, 90))]
    plot(points, tmp_path / "plot.png", panel=(300, 200))
    image = Image.open(tmp_path / "plot.png")
    assert image.size == (600, 2 * 200 + 40)  # two columns, two rows of panels, a legend


def test_levers_over_several_seeds_are_ratios_to_the_same_seeds_paper_averaged():
    """With --seeds each point is labelled with its seed; a lever is compared with the paper's run of its own
    seed, and the table gives the mean ratio, the range, and the paper's own spread over seeds."""
    points = [_point("a", "paper (seed 0)", 0.2, 2.0), _point("a", "paper (seed 1)", 0.1, 1.0),
              _point("a", "lever (seed 0)", 0.1, 1.0), _point("a", "lever (seed 1)", 0.17, 0.5)]
    table = versus_paper(points)
    lever = next(line for line in table.splitlines() if line.split("|")[1].strip() == "lever")
    # RMSE ratios 0.5 and 1.7: mean 1.1, so not better; FD ratios 0.5 and 0.5
    assert "1.10 / 0.50 (0.50-1.70)" in lever and "0 of 1" in lever
    spread = next(line for line in table.splitlines() if "over 2 seeds" in line)
    assert "47.1%" in spread  # sd 0.0707 over mean 0.15
    # two paper points of one seed are a curve, not an ablation
    assert versus_paper(points + [_point("a", "paper (seed 0)", 0.3, 2.0, steps=300)]) is None


def test_the_goal_table_compares_the_full_paper_run_before_and_after_with_a_lever():
    from benchmarks.convergence import goal_table

    def paper(seed: int, steps: int, scale: float) -> Point:
        p = _point("a", f"paper (seed {seed})", 0.1 * scale, 1.0, steps)
        return Point(p.teacher, p.recipe, steps, 1.0, {1: 0.4 * scale, 2: 0.15 * scale, 3: 0.1 * scale, 4: 0.08},
                     1.1, 1.0, p.recipes, before={1: 0.8, 2: 0.3, 3: 0.2 * scale, 4: 0.15})

    points = [paper(0, 300, 1.0), paper(1, 300, 1.0), paper(0, 100, 3.0),   # the 100-step points are not the budget
              _point("a", "lever (seed 0)", 0.09, 1.0, 100), _point("a", "lever (seed 1)", 0.11, 1.0, 100)]
    row = next(line for line in goal_table(points, "lever").splitlines() if line.startswith("| a "))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:] == ["2", "0.2000", "0.1000 (0.50x)", "0.1000 (1.00x)", "1.10x", "0.1500 (0.75x)",
                         "0.8000 -> 0.4000 (0.50x)"]
    # today's column from other full-budget points (e.g. the shifts centred on the teacher), 0.4.0's still from
    # the paper's; without such points the teacher has no row
    centred = [Point("a", f"centred (seed {s})", 300, 1.0, {1: 0.32, 2: 0.12, 3: 0.08, 4: 0.07}, 1.2, 1.0,
                     points[0].recipes) for s in (0, 1)]
    row = next(line for line in goal_table(points + centred, "lever", now="centred").splitlines()
               if line.startswith("| a "))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2:4] == ["0.2000", "0.0800 (0.40x)"] and cells[6:] == ["0.1200 (0.60x)", "0.8000 -> 0.3200 (0.40x)"]
    assert "| a " not in goal_table(points, "lever", now="centred")


def test_paper_points_of_one_seed_alone_have_no_lever_table():
    assert versus_paper([_point("a", "paper", 0.2, 2.0), _point("b", "paper", 0.1, 1.0)]) is None


def test_a_run_keeps_the_length_its_calibration_distance_prefers_not_the_best_rmse():
    """The kept length is chosen by what a run can see (the calibration's distance), and the table shows the
    3-step RMSE there beside the end's and the oracle's."""
    run = [replace(_point("a", "fast", rmse, 1.0, steps), calibrated3=seen)
           for steps, rmse, seen in ((100, 0.30, 0.5), (200, 0.20, 0.3), (300, 0.10, 0.4), (400, 0.25, 0.6))]
    row = next(line for line in keep_best_table(run).splitlines() if line.startswith("| a "))
    assert "100 / 200 / 300 / 400" in row and "| 0.2500 " in row
    assert "0.2000 at 200 (0.80x)" in row and "0.1000 at 300" in row
    assert keep_best_table([_point("a", "paper", 0.2, 2.0)]) is None  # no calibration distances: no table


def test_only_recipes_whose_schedules_ignore_the_runs_length_are_measured_on_the_way():
    assert length_free(PAPER) and length_free(FAST)
    assert not length_free(replace(PAPER, decay="cosine")) and not length_free(replace(PAPER, warmup=0.1))
    assert not length_free(replace(PAPER, coarse_share=0.5))
    assert not length_free(replace(PAPER, teacher_start=1.0, teacher_ramp=0.5))


def test_the_per_jump_search_finds_each_jumps_strength_and_the_shift_from_the_calibrated_start():
    from benchmarks.sampling_levers import multistep_table, per_jump_table, sampled_table, search_per_jump
    want, want_shift = [0.75, 2.5, 1.25], 1.25 * 1.1

    def score(strengths, shift):  # separable, its minimum on the search's grid
        return sum((s - w) ** 2 for s, w in zip(strengths, want)) + (shift - want_shift) ** 2

    strengths, shift, best = search_per_jump(score, [1.0, 1.0, 1.0], 1.0)
    assert strengths == want and shift == pytest.approx(want_shift) and best == pytest.approx(0.0)
    # a start that is already best stays put
    assert search_per_jump(score, want, want_shift)[:2] == (want, want_shift)
    row = dict(teacher="t", steps=3, strength=1.0, shift=1.0, rmse=0.2, fd=1.0, strengths=want, per_jump_shift=shift,
               per_jump_rmse=0.1, per_jump_fd=2.0)
    assert "0.500 (2.00)" in per_jump_table([row])
    sampled = [dict(teacher="t", lora=lora, rmse={1: 0.4, 2: 0.3, 3: rmse3, 4: 0.1}, fd3=fd3)
               for lora, rmse3, fd3 in (("student", 0.2, 1.0), ("fast EMA", 0.1, 3.0))]
    fast = next(line for line in sampled_table(sampled).splitlines() if "fast EMA" in line)
    assert "0.500 (3.00)" in fast
    corrected = dict(teacher="t", steps=2, c=0.3, shift=1.25, rmse=0.2, fd=1.0, multistep_rmse=0.25, multistep_fd=0.5)
    assert "1.250 (0.50)" in multistep_table([corrected]) and "0.3; 1.25" in multistep_table([corrected])


@contextmanager
def _two_steps_trained(told: list | None = None):
    """A tiny trainer after two steps (its velocity records the times it is told into `told`) and 4 noises."""
    import torch
    from shortcut_core.config import ShortcutConfig
    from shortcut_core.trainer import ShortcutTrainer
    from test_trainer import SHAPE, TinyVelocityNet

    torch.manual_seed(0)
    net = TinyVelocityNet()
    latents = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    config = ShortcutConfig(rank=4, alpha=4.0, batch_size=4, steps=2, learning_rate=1e-2, guidance_range=None,
                            resolution_shift_prob=0.0, gradient_checkpointing=False, checkpoint_every=0, seed=3)
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))

    def velocity(x, t, **_):
        if told is not None:
            told.append(float(t[0]))
        return net(x, t)

    with ShortcutTrainer(net, velocity, latents, config) as trainer:
        trainer.run(2, progress=False)
        yield trainer, noise


def test_the_multistep_correction_is_euler_at_c_0_and_moves_only_later_jumps():
    import torch
    from benchmarks.sampling_levers import student_sampler
    from shortcut_core.schedules import shifted_schedule
    with _two_steps_trained() as (trainer, noise):
        three = shifted_schedule(3, 1.0)
        euler = student_sampler(trainer, [1.25] * 3)(noise, three, {})
        assert torch.equal(student_sampler(trainer, [1.25] * 3, 0.0)(noise, three, {}), euler)
        assert not torch.allclose(student_sampler(trainer, [1.25] * 3, 0.5)(noise, three, {}), euler)
        one = shifted_schedule(1, 1.0)  # a single jump has no earlier velocity to correct with
        assert torch.equal(student_sampler(trainer, [1.25], 0.5)(noise, one, {}),
                           student_sampler(trainer, [1.25])(noise, one, {}))


def test_the_time_shift_is_euler_at_0_never_tells_a_time_past_the_first_and_moves_the_later_jumps():
    import torch
    from benchmarks.sampling_levers import student_sampler
    from shortcut_core.schedules import shifted_schedule
    told = []
    with _two_steps_trained(told) as (trainer, noise):
        three = shifted_schedule(3, 1.0)
        told.clear()
        euler = student_sampler(trainer, [1.0] * 3)(noise, three, {})
        assert told == pytest.approx(three[:-1].tolist())
        assert torch.equal(student_sampler(trainer, [1.0] * 3, time_shift=0.0)(noise, three, {}), euler)
        told.clear()
        later = student_sampler(trainer, [1.0] * 3, time_shift=-0.5)(noise, three, {})
        t = three.tolist()  # a negative shift tells a noisier time, capped at the first jump's
        assert told == pytest.approx([t[0], t[1] + 0.5 * (t[1] - t[2]), t[2] + 0.5 * t[2]])
        assert not torch.allclose(later, euler)
        told.clear()
        one = shifted_schedule(1, 1.0)
        student_sampler(trainer, [1.0], time_shift=0.3)(noise, one, {})
        assert told == pytest.approx([0.7 * float(one[0])])

"""benchmarks.convergence's tables: each lever against the paper's recipe on every teacher, and points that
round-trip through --out / --load (how docs/convergence-*.md are made from runs on several machines)."""

from __future__ import annotations

import pytest

from benchmarks.convergence import Point, main, versus_paper


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

"""The loss-curve image: shape, range, and that the curve is where the values say."""

from __future__ import annotations

import numpy as np

from shortcut_core.loss_plot import loss_curve_image, smoothed


def test_smoothed_is_a_trailing_mean():
    assert np.allclose(smoothed([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    assert np.allclose(smoothed([5.0, 1.0], 1), [5.0, 1.0])


def _ink_rows(img: np.ndarray, column: int) -> np.ndarray:
    return np.nonzero((img[:, column] < 0.9).any(axis=1))[0]


def test_a_falling_loss_is_drawn_high_on_the_left_and_low_on_the_right():
    img = loss_curve_image(np.linspace(1.0, 0.1, 200).tolist(), width=200, height=100, margin=10)
    assert img.shape == (100, 200, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    left, right = _ink_rows(img, 15), _ink_rows(img, 185)
    assert left.size and right.size and left.mean() < right.mean()


def test_empty_and_non_finite_losses_give_a_blank_plot():
    blank = loss_curve_image([], width=64, height=32, margin=4)
    assert np.array_equal(loss_curve_image([float("nan"), float("inf")], width=64, height=32, margin=4), blank)

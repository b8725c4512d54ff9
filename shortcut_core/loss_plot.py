"""A loss curve as an RGB image array, drawn with numpy alone (no plotting library)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

RAW, SMOOTH, AXES = (0.68, 0.78, 0.93), (0.05, 0.25, 0.65), (0.35, 0.35, 0.35)


def smoothed(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (a window of 1 returns the values)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v
    csum = np.cumsum(np.insert(v, 0, 0.0))
    lo = np.maximum(np.arange(1, v.size + 1) - window, 0)
    return (csum[1:] - csum[lo]) / (np.arange(1, v.size + 1) - lo)


def _draw_polyline(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, color, thickness: int) -> None:
    h, w, _ = img.shape
    for (x0, y0), (x1, y1) in zip(zip(xs[:-1], ys[:-1]), zip(xs[1:], ys[1:])):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
        px = np.round(np.linspace(x0, x1, n)).astype(int)
        py = np.round(np.linspace(y0, y1, n)).astype(int)
        for d in range(-(thickness // 2), thickness - thickness // 2):
            img[np.clip(py + d, 0, h - 1), np.clip(px, 0, w - 1)] = color
    if len(xs) == 1:
        img[int(ys[0]), int(xs[0])] = color


def loss_curve_image(losses: Sequence[float], width: int = 640, height: int = 320, margin: int = 16) -> np.ndarray:
    """(height, width, 3) float32 in [0, 1]: raw loss (light), moving average (dark), log scale
    when the loss spans more than a decade. Non-finite values are left out."""
    img = np.ones((height, width, 3), dtype=np.float32)
    img[margin:height - margin, margin] = AXES
    img[height - margin, margin:width - margin] = AXES
    values = np.asarray([v for v in losses if math.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return img
    log = values.min() > 0 and values.max() / values.min() > 10.0
    transform = np.log10 if log else (lambda a: a)
    curves = (transform(values), transform(smoothed(values, max(1, values.size // 50))))
    lo, hi = min(c.min() for c in curves), max(c.max() for c in curves)
    span = hi - lo if hi > lo else 1.0
    plot_w, plot_h = width - 2 * margin - 2, height - 2 * margin - 2
    xs = margin + 1 + (np.arange(values.size) / max(values.size - 1, 1)) * plot_w
    for curve, color, thickness in zip(curves, (RAW, SMOOTH), (1, 2)):
        ys = margin + 1 + (1.0 - (curve - lo) / span) * plot_h
        _draw_polyline(img, xs, ys, color, thickness)
    return img

"""What a user watches while TrainShortcut runs: few-step previews in the node, the final comparison, and
the calibrated recipe the LoRA file then carries (on a real ComfyUI with a tiny Flux)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_host_nodes import node, train_node
from test_host_reliability import latents


@pytest.fixture()
def progress_hook():
    """Everything the nodes send through the host's progress bars: (value, total, preview, node_id)."""
    import comfy.utils
    calls = []
    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             calls.append((value, total, preview, node_id)))
    try:
        yield calls
    finally:
        comfy.utils.set_progress_bar_global_hook(before)


def _pixels(picture) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=np.int16)


def test_previews_reach_the_node_through_the_hosts_progress_bar(flux, lora_dir, progress_hook):
    patcher, positive = flux
    train_node(patcher, positive, latents(), steps=4, preview_every=2, unique_id="7")
    shown = [(value, preview) for value, _, preview, node_id in progress_hook if preview is not None and node_id == "7"]
    assert [value for value, _ in shown] == [0, 2, 4]
    for _, (kind, picture, max_size) in shown:
        assert kind == "JPEG" and picture.height >= 128 and picture.width > 3 * picture.height * 0.9
    first, last = _pixels(shown[0][1][1]), _pixels(shown[-1][1][1])
    third = first.shape[1] // 3
    assert np.array_equal(first[:, :third - 8], last[:, :third - 8])   # the teacher's few steps: made once
    assert not np.array_equal(first[:, third + 8:2 * third - 8], last[:, third + 8:2 * third - 8])  # the student moved


def test_previews_never_change_the_training_result(flux, lora_dir):
    patcher, positive = flux
    _, watched, loss_watched, _, _, _, _, _ = train_node(patcher, positive, latents(), steps=3, preview_every=1,
                                                   save_name="watched")
    _, plain, loss_plain, _, _, _, _, _ = train_node(patcher, positive, latents(), steps=3, preview_every=0,
                                               save_name="plain")
    assert loss_watched == loss_plain
    assert watched.keys() == plain.keys() and all(torch.equal(watched[k], plain[k]) for k in plain)


def test_the_preview_output_is_the_final_comparison(flux, lora_dir):
    patcher, positive = flux
    _, _, _, preview, _, plot, _, _ = train_node(patcher, positive, latents(), steps=2, preview_every=0)
    assert preview.dtype == torch.float32 and preview.shape[0] == 1 and preview.shape[-1] == 3
    assert preview.shape[1] >= 128 and preview.shape[2] > 3 * (preview.shape[1] - 20)  # three labelled panels
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0 and float(preview.std()) > 0.01
    assert plot.shape[-1] == 3 and plot.shape != preview.shape   # the loss curve has its own output


def test_calibration_writes_the_recipe_the_loader_outputs_and_the_node_shows(flux, lora_dir):
    from shortcut_core import load_lora
    from shortcut_core.calibration import Calibration
    patcher, positive = flux
    out = type(node("TrainShortcut"))
    _, lora, _, _, _, _, recipe_steps, recipe_shift = train_node(patcher, positive, latents(), steps=2, calibrate=True,
                                                                 save_name="calibrated", sample_shift=2.0)
    metadata = load_lora(lora_dir / "calibrated.safetensors").metadata
    calibration = Calibration.from_dict(metadata.calibration)
    best, distance = calibration.best
    assert (metadata.steps, metadata.strength, metadata.shift) == (best.steps, best.strength, best.shift)
    assert (recipe_steps, recipe_shift) == (best.steps, best.shift)  # the node's outputs, for Shortcut Sampler
    assert distance == min(d for r, d in calibration.table if r.steps == 3)
    assert calibration.samples == 4 and calibration.reference_steps == 32 and len(calibration.table) == 24
    assert {r.shift for r, _ in calibration.table} == {2.0, 2.0 / 1.5, 3.0}
    _, steps, shift, strength = node("ShortcutLoRALoader").load(patcher, "calibrated.safetensors", 1.0)["result"]
    assert (steps, shift, strength) == (best.steps, best.shift, best.strength)
    text = node("ShortcutLoRALoader").load(patcher, "calibrated.safetensors", 1.0)["ui"]["text"][0]
    assert f"shift {best.shift:.3g}, strength {best.strength:g} (calibrated against the teacher's 32-step" in text
    shown = out().train(model=patcher, latents=latents(), positive=positive, steps=1, batch_size=2, learning_rate=1e-3,
                        rank=4, seed=0, save_name="shown", checkpoint_every=0, resume_lora="(none)", cfg=1.0,
                        preview_every=0, calibrate=True)
    assert shown["ui"]["text"][0].startswith("calibrated: 3 steps")
    assert "rms to the teacher's 32-step samples, 4 held-out noises" in shown["ui"]["text"][0]

"""The time a run takes on this device: predicted with the memory plan before it starts, measured as it runs
(shortcut_core/run_time.py), in the node's text and the headless command's output."""

from __future__ import annotations

import torch

from ..shortcut_core.config import ShortcutConfig
from ..shortcut_core.memory_plan import MemoryPlan, ModelShape, TrainingShape
from ..shortcut_core.run_time import card_peak_flops, plan_time_text, predicted_step_seconds, time_text
from ..shortcut_core.trainer import StepReport


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return str(device)


def predicted_time_text(device: torch.device, shape: ModelShape, training: TrainingShape, config: ShortcutConfig,
                        plan: MemoryPlan) -> str:
    """'time: about 1.6 s/step, 4 h 27 min for 10000 steps (predicted for NVIDIA H200)', or, on a device whose
    peak the pack does not know (a CPU), that the time comes from the first steps."""
    name = device_name(device)
    peak = card_peak_flops(name) if device.type == "cuda" else None
    seconds = None if peak is None else predicted_step_seconds(shape, training, config.substeps, peak, plan.streamed)
    return plan_time_text(seconds, config.steps, name)


def measured_time_text(report: StepReport) -> str | None:
    """'about 1.8 s/step, 5 h 0 min for 10000 steps; ETA ...' from the run's clock; None until it is measured."""
    if report.seconds_per_step is None:
        return None
    return time_text(report.seconds_per_step, report.total, report.seconds_left)


def progress_text(report: StepReport) -> str:
    """The node's live line: 'step 37/10000  loss 0.0123  about 1.8 s/step, 5 h 0 min for 10000 steps; ETA ...'."""
    text = f"step {report.step}/{report.total}  loss {report.loss:.4g}"
    measured = measured_time_text(report)
    return text if measured is None else f"{text}  {measured}"

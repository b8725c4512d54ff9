"""What a run in the graph reports to: ComfyUI's progress bar with previews, the node's text, and the UI's
Cancel button (a RunReporter, host/run.py)."""

from __future__ import annotations

import sys

import comfy.model_management
import comfy.utils
import latent_preview

from ..shortcut_core.trainer import StepReport
from .timing import progress_text


class Progress:
    """The node's RunReporter: the host's progress bar with previews, the live loss as node text, and the UI's
    Cancel button."""

    def __init__(self, total: int, node_id: str | None = None, start: int = 0):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.bar.update_absolute(start, total)
        self.node_id, self.total = node_id, total

    def step(self, report: StepReport) -> None:
        self.bar.update_absolute(report.step, report.total)
        self.say(progress_text(report))
        comfy.model_management.throw_exception_if_processing_interrupted()

    def preview(self, step: int, picture) -> None:
        """A picture in the node, through the bar's preview channel (as KSampler's latent previews)."""
        self.bar.update_absolute(step, self.total, ("JPEG", picture, latent_preview.MAX_PREVIEW_RESOLUTION))

    def say(self, text: str) -> None:
        if self.node_id is None:
            return
        server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
        if server is None:
            return  # no running server (a script or a test): the tqdm bar shows the loss
        server.send_progress_text(text, self.node_id)

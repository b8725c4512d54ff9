"""What a training run in the graph is: the node-visible run settings beside the engine's config
(RunSettings), the settled run the host trains (TrainingRun), what it gives back (TrainingOutcome), and what it
reports to as it goes (RunReporter). Low in the house: settling, training and memory all read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..shortcut_core.calibration import Calibration
from ..shortcut_core.config import ShortcutConfig
from ..shortcut_core.data_parallel import DataParallel
from ..shortcut_core.knobs import OPTIONS, TRAIN, knob
from ..shortcut_core.trainer import ShortcutTrainer, StepReport, TrainResult

LORA_FILE = "lora file"  # a knob's kind: a file of models/loras, or NO_RESUME
NO_RESUME = "(none)"


@dataclass(frozen=True)
class RunSettings:
    """The run's knobs that are no engine setting (ShortcutConfig holds those): where it writes, what it shows,
    how it places the model. Declared as the config's knobs are (shortcut_core/knobs.py)."""
    save_name: str = knob("shortcut_lora", "File name in models/loras for the LoRA (with metadata) and its training "
                          "state; _2, _3, ... is appended rather than overwrite a file.", shown_on=TRAIN, slot=5)
    resume_lora: str = knob(NO_RESUME, "Continue from a LoRA: exactly (optimizer, EMAs, step) when its .train_state "
                            "file is beside it, else starting the student and both EMAs from it.", shown_on=TRAIN,
                            slot=7, kind=LORA_FILE)
    cfg: float = knob(0.0, "True CFG inside the student's prediction and every target sub-step, for models without "
                      "distilled guidance; sample the LoRA with the same cfg. 0: the model family's when a negative is "
                      "connected (SD3.5 3.5, Wan 5, Qwen-Image 2.5, Chroma and Lumina 2 4; Flux dev 1: it has "
                      "distilled guidance), else 1.", 0.0, 30.0, 0.1, shown_on=TRAIN, slot=8)
    preview_every: int = knob(100, "Show the teacher and the student at the LoRA's few steps beside the teacher at "
                              "many, in this node, every this many steps (0: off). The final comparison is the "
                              "preview output either way.", 0, 1_000_000, shown_on=TRAIN, slot=9)
    calibrate: bool = knob(True, "At the end, measure which strength and shift make the LoRA's few-step samples "
                           "closest to the teacher's many-step ones, and write that recipe into the file (Shortcut "
                           "LoRA Loader outputs it).", shown_on=TRAIN, slot=10)
    export_diffusers: bool = knob(False, "Flux only: also write the LoRA in the authors' diffusers format "
                                  "(<save_name>_diffusers.safetensors).", shown_on=OPTIONS, slot=26)
    # memory modes (README: Will it fit?) come last on the options node, so saved workflows keep their widget order
    stream_weights: bool = knob(False, "Keep on the GPU only the model weights that fit beside training and stream "
                                "the rest from RAM: whole blocks from pinned memory, each copied while the one "
                                "before computes (with gradient_checkpointing; else ComfyUI's lowvram copies per "
                                "layer). Flux at 1024 px on 16 GB; slower per step where the copies outlast the "
                                "compute.", shown_on=OPTIONS, slot=29)
    centre_shifts: bool = knob(False, "Before the first step, find the shift the model itself samples sample_steps "
                               "best at (the calibration's search on the teacher) and train and sample around it, "
                               "in place of shift_min, shift_max and sample_shift. Better on three of four CPU "
                               "teachers whose own shift is far from their few-step best (README).",
                               shown_on=OPTIONS, slot=33)


class RunReporter(Protocol):
    """What a run reports to as it goes: the node's progress bar and text (host/progress.py) or the headless
    command's printout and stop request. Raising from `step` stops the run (with a checkpoint)."""

    def step(self, report: StepReport) -> None: ...

    def preview(self, step: int, picture) -> None: ...

    def say(self, text: str) -> None: ...


@dataclass
class TrainingRun:
    """What a training run asks of the host, apart from the model and conditioning: the settled config and
    run settings, where it writes, and what it reports to."""
    config: ShortcutConfig
    cfg: float = 1.0
    init_lora: dict | None = None
    resume_state: str | None = None       # a trainer checkpoint to continue from exactly
    checkpoint_path: str | None = None
    reporter: RunReporter | None = None   # progress, text and previews (the node's bar or the command's output)
    on_checkpoint: Callable[[ShortcutTrainer], None] | None = None
    preview_every: int = 0                # few-step previews in the node every this many steps (0: none)
    calibrate: bool = False               # measure the best few-step recipe at the end (into the LoRA's metadata)
    centre_shifts: bool = False           # first move the shifts around the teacher's best few-step one
    stream_weights: bool = False          # keep on the device only the weights that fit beside training (lowvram)
    prefetch_blocks: bool = True          # stream those block by block, one ahead (else: the host's copies per op)
    parallel: DataParallel | None = None  # data parallel under torchrun (the headless command)
    summary: str = ""                     # the recipe chosen for the model's family, shown with the memory plan


@dataclass
class TrainingOutcome:
    result: TrainResult
    comparison: torch.Tensor | None = None    # IMAGE: teacher few steps | student | teacher many steps
    calibration: Calibration | None = None

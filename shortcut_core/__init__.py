"""shortcut_core: SCFM (shortcut flow matching) distillation and few-step sampling for any torch flow model.

The engine imports torch, peft, safetensors, numpy and tqdm only; it knows nothing of ComfyUI.
A flow model is reached through a velocity callable `v = velocity(x, t, **extra_args)`, with
x_t = (1 - t) * x0 + t * noise and v = noise - x0.
"""

import importlib.metadata
import re
from pathlib import Path

from .activation_checkpointing import checkpoint_blocks
from .calibration import Calibration, Recipe, calibrate_recipe, search_recipes
from .checkpoint import CheckpointWriteError
from .adapters import (BASE, EMA_FAST, EMA_SLOW, STUDENT, TEACHER, LoraState, LoraWeights, ShortcutAdapters,
                       linear_module_names)
from .config import ConfigError, ShortcutConfig
from .lora_file import LoraFile, LoraFileError, LoraMetadata, load_lora, save_lora
from .objective import (ItemRole, ShortcutDraw, average_velocity_target, draw_shortcut_items, euler_walk,
                        flow_velocity_target, interpolate, shortcut_loss)
from .safetensors_io import SafetensorsFileError, read_safetensors, write_safetensors_atomic
from .sampling import VelocityFn, sample_euler
from .schedules import (T_MAX, packed_token_count, resolution_mu, resolution_shift, shift_time, shifted_schedule)
from .trainer import (NonFiniteLossError, ShortcutTrainer, StepReport, TrainingDataError, TrainResult, lora_applied)

_DISTRIBUTION = "shortcut-flow"  # pyproject.toml's [project] name


def _pack_version(pyproject: Path) -> str:
    """The `[project] version` of `pyproject` when it is this pack's (pyproject.toml is the one source of the
    version), else the installed distribution's, else "0+unknown". A regex, not tomllib: Python 3.10 has none."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    table = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    fields = dict(re.findall(r'^(name|version)[ \t]*=[ \t]*["\']([^"\']*)["\']', table.group(1), re.M)) if table else {}
    if fields.get("name") == _DISTRIBUTION and fields.get("version"):
        return fields["version"]
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _pack_version(Path(__file__).resolve().parent.parent / "pyproject.toml")

"""shortcut_core: SCFM (shortcut flow matching) distillation and few-step sampling for any torch flow model.

The engine imports torch, peft, safetensors, numpy and tqdm only; it knows nothing of ComfyUI.
A flow model is reached through a velocity callable `v = velocity(x, t, **extra_args)`, with
x_t = (1 - t) * x0 + t * noise and v = noise - x0.
"""

from .activation_checkpointing import checkpoint_blocks
from .calibration import Calibration, Recipe, calibrate_recipe, recipe_grid
from .adapters import (BASE, EMA_FAST, EMA_SLOW, STUDENT, TEACHER, LoraState, LoraWeights, ShortcutAdapters,
                       linear_module_names)
from .config import ConfigError, ShortcutConfig
from .lora_file import LoraFile, LoraFileError, LoraMetadata, load_lora, save_lora
from .objective import (ItemRole, ShortcutDraw, average_velocity_target, draw_shortcut_items, euler_walk,
                        flow_velocity_target, interpolate, shortcut_loss)
from .safetensors_io import SafetensorsFileError, read_safetensors, write_safetensors_atomic
from .sampling import VelocityFn, sample_euler
from .schedules import (T_MAX, packed_token_count, resolution_mu, resolution_shift, shift_time, shifted_schedule)
from .trainer import (CheckpointWriteError, NonFiniteLossError, ShortcutTrainer, StepReport, TrainingDataError, TrainResult, lora_applied)

__version__ = "0.1.0"

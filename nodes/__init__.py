"""The pack's nodes: thin declarations; the work is the host adapter's (host/), over the engine (shortcut_core/)."""

from .lora_loader import ShortcutLoRALoader
from .sampler import ShortcutSampler, ShortcutScheduler
from .teacher_latents import ShortcutTeacherLatents
from .train import ShortcutTrainingOptions, TrainShortcut

NODE_CLASS_MAPPINGS = {
    "ShortcutSampler": ShortcutSampler,
    "ShortcutScheduler": ShortcutScheduler,
    "ShortcutLoRALoader": ShortcutLoRALoader,
    "TrainShortcut": TrainShortcut,
    "ShortcutTrainingOptions": ShortcutTrainingOptions,
    "ShortcutTeacherLatents": ShortcutTeacherLatents,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ShortcutSampler": "Shortcut Sampler",
    "ShortcutScheduler": "Shortcut Scheduler",
    "ShortcutLoRALoader": "Shortcut LoRA Loader",
    "TrainShortcut": "Train Shortcut (SCFM)",
    "ShortcutTrainingOptions": "Shortcut Training Options",
    "ShortcutTeacherLatents": "Shortcut Teacher Latents",
}

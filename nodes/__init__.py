"""The pack's ComfyUI nodes (ShortcutSampler, ShortcutLoRALoader, TrainShortcut arrive with the
node-pack issue). Only this package and its host adapter import ComfyUI."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

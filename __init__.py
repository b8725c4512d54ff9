"""shortcut-flow: a ComfyUI node pack for few-step sampling of flow-matching models with SCFM LoRAs.

ComfyUI imports this file as the pack's entry point. The engine lives in shortcut_core/ (no
ComfyUI import); the nodes in nodes/ are thin wrappers around it.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

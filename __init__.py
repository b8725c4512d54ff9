"""shortcut-flow: a ComfyUI node pack for few-step sampling of flow-matching models with SCFM LoRAs.

ComfyUI imports this file as the pack's entry point. The engine lives in shortcut_core/ (no
ComfyUI import); the nodes in nodes/ are thin wrappers around it.
"""

if __package__:  # imported as the pack's package, as ComfyUI does
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a lone file: pytest sets up the pack folder as a package and imports this file
    # on its own when the folder's name is no Python identifier (a clone named `shortcut-flow`,
    # a temp dir `tmp.X`). There is no package to import `.nodes` from; nothing is registered.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

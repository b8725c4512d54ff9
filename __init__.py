"""shortcut-flow: a ComfyUI node pack for few-step sampling of flow-matching models with SCFM LoRAs.

ComfyUI imports this file as the pack's entry point. The engine lives in shortcut_core/ (no
ComfyUI import); the nodes in nodes/ are thin wrappers around it.
"""

# Outside ComfyUI (pytest collecting the pack folder, a script using shortcut_core) there is no
# host to register nodes with: the entry point then registers nothing instead of failing.
_HOST_MODULES = {"comfy", "comfy_api", "folder_paths", "latent_preview", "node_helpers", "server"}

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
# The frontend extension (web/shortcut_flow.js): the nodes' final text stays in the node after the run.
WEB_DIRECTORY = "./web"

if __package__:  # imported as the pack's package, as ComfyUI does
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _HOST_MODULES:
            raise
# Imported as a lone file (pytest does that to the pack folder when its name is no Python
# identifier, e.g. `shortcut-flow`), there is no package to import `.nodes` from.

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

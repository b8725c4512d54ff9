"""The pack's __init__.py, loaded the way ComfyUI loads a custom node folder and as a lone file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_as_comfyui_does(name: str):
    """ComfyUI: spec_from_file_location(<folder name>, <folder>/__init__.py), then exec_module.
    Returns the pack module and its `nodes` subpackage; sys.modules is left as it was."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        return module, sys.modules[name + ".nodes"]
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_comfyui_style_load_registers_the_nodes_package_mappings():
    pack, nodes = _load_as_comfyui_does("shortcut-flow")  # a folder name that is no identifier
    assert pack.NODE_CLASS_MAPPINGS is nodes.NODE_CLASS_MAPPINGS
    assert pack.NODE_DISPLAY_NAME_MAPPINGS is nodes.NODE_DISPLAY_NAME_MAPPINGS


def test_lone_file_load_imports_without_a_package():
    # what pytest does to the pack folder when its name is no identifier (e.g. `shortcut-flow`)
    spec = importlib.util.spec_from_file_location("__init__", ROOT / "__init__.py", submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = ""
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}

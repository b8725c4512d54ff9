"""The pack's __init__.py, loaded the way ComfyUI loads a custom node folder and as a lone file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_comfyui_style_load_without_comfyui_registers_nothing_and_does_not_fail(monkeypatch):
    # no ComfyUI on sys.path (CI, or pytest collecting the folder as a package)
    for name in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "comfy").is_dir()])
    spec = importlib.util.spec_from_file_location("shortcut-flow", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["shortcut-flow"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for key in [k for k in sys.modules if k == "shortcut-flow" or k.startswith("shortcut-flow.")]:
            del sys.modules[key]
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}


def test_lone_file_load_imports_without_a_package():
    # what pytest does to the pack folder when its name is no identifier (e.g. `shortcut-flow`)
    spec = importlib.util.spec_from_file_location("__init__", ROOT / "__init__.py", submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = ""
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}

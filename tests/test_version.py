"""shortcut_core.__version__ comes from one place: pyproject.toml's [project] version."""

from __future__ import annotations

import re
from pathlib import Path

import shortcut_core

ROOT = Path(__file__).resolve().parent.parent


def _declared_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib  # Python 3.11+: an independent reading of the file
    except ImportError:
        return re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    return tomllib.loads(text)["project"]["version"]


def test_the_engine_version_is_pyprojects():
    assert shortcut_core.__version__ == _declared_version()


def test_only_this_packs_project_table_gives_the_version(tmp_path, monkeypatch):
    # what the pack folder holds when a version is set by hand or another tool's table comes first
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.other]\nversion = "9.9.9"\n\n[project]\nname = "shortcut-flow"\n'
                         '# a comment\nversion = "1.2.3"\ndependencies = [\n  "x",\n]\n\n[tool.setuptools]\n',
                         encoding="utf-8")
    assert shortcut_core._pack_version(pyproject) == "1.2.3"
    # another project's pyproject.toml (the engine installed into site-packages) or none: the installed metadata
    monkeypatch.setattr(shortcut_core.importlib.metadata, "version", lambda name: {"shortcut-flow": "4.5.6"}[name])
    pyproject.write_text('[project]\nname = "someone-else"\nversion = "7.0.0"\n', encoding="utf-8")
    assert shortcut_core._pack_version(pyproject) == "4.5.6"
    assert shortcut_core._pack_version(tmp_path / "missing.toml") == "4.5.6"


def test_without_pyproject_or_installed_metadata_the_version_says_unknown(tmp_path, monkeypatch):
    def not_installed(name):
        raise shortcut_core.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(shortcut_core.importlib.metadata, "version", not_installed)
    assert shortcut_core._pack_version(tmp_path / "missing.toml") == "0+unknown"

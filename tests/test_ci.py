"""README's two commands are the project's contract; CI runs the test one as README writes it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _command_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r"\s*```(?:bash|sh)?\n(python[^\n]*)\n```", README)
    assert match, f"README.md: no ```bash block with a python command right after {marker!r}"
    return match.group(1)


def test_readme_gives_the_demo_and_the_test_command():
    demo = _command_after("<!-- ci: demo command -->")
    tests = _command_after("<!-- ci: test command -->")
    assert "python -m benchmarks.demo" in demo
    assert "python -m pytest" in tests
    for command in (demo, tests):  # a fresh machine installs the CPU torch wheel and the dev requirements
        assert "torch==2.13.0" in command and "-r requirements-dev.txt" in command


def test_ci_runs_exactly_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    extracted = subprocess.run(["bash", str(script), "--print-command"], capture_output=True, text=True,
                               check=True).stdout.strip()
    assert extracted == _command_after("<!-- ci: test command -->")
    assert 'bash -c "$command"' in script.read_text(encoding="utf-8")


def test_requirements_never_list_torch():
    for name in ("requirements.txt", "requirements-dev.txt"):
        lines = [l.split("#")[0].strip() for l in (ROOT / name).read_text().splitlines()]
        assert not any(re.match(r"^torch(vision|audio)?\b", l) for l in lines), name


def test_the_version_is_semver_and_the_changelog_opens_with_it():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(r"^## (\S+)", changelog, re.M).group(1) == version
    # each entry tells a user whether saved workflows change
    entries = re.split(r"^## ", changelog, flags=re.M)[1:]
    assert all("workflow" in entry.lower() for entry in entries)


def test_the_license_is_the_hosts_and_declared_as_the_registry_asks():
    assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    assert "Version 3" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    assert re.search(r'^license = \{file = "LICENSE"\}$', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)

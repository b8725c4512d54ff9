"""Shared fixtures. Host tests (marker `host`) run against a real ComfyUI checkout and skip,
loudly counted at the end of the run, when none is usable. SHORTCUT_FLOW_REQUIRE_HOST=1 turns
those skips into failures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: `import shortcut_core` finds the project, while ComfyUI's root (put
# first by comfy_host) keeps `nodes` meaning ComfyUI's nodes.py rather than this pack's nodes/.
if str(PROJECT_ROOT) not in sys.path:
    sys.path.append(str(PROJECT_ROOT))

import comfy_host  # noqa: E402
import comfy_server  # noqa: E402

_host_skips: list[str] = []


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a busy machine's thread contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def comfyui():
    """The ComfyUI root, imported in-process on the CPU; skips the test when there is none."""
    path, why = comfy_host.start_comfyui()
    if path is None:
        if os.environ.get("SHORTCUT_FLOW_REQUIRE_HOST") == "1":
            pytest.fail(f"host test needs ComfyUI: {why}")
        pytest.skip(f"HOST TEST SKIPPED: {why}")
    return path


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfyui" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.host)


def pytest_runtest_logreport(report):
    if report.skipped and "host" in report.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _host_skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if comfy_server.SCREENSHOTS:  # the browser tests ran
        terminalreporter.write_line(f"browser tests: ComfyUI's server ran the pack from {comfy_server.PACK_DIR}, "
                                    f"frontend {comfy_server.FRONTEND_VERSION[0] or '?'} "
                                    f"({comfy_server.FRONTEND_ROOT or 'the one the host pins'})")
    for shot in comfy_server.SCREENSHOTS:
        terminalreporter.write_line(f"frontend screenshot: {shot}")
    path, _ = comfy_host.find_comfyui()
    if _host_skips:
        bar = "!" * 78
        terminalreporter.write_line(bar, red=True, bold=True)
        terminalreporter.write_line(f"!! {len(_host_skips)} HOST TESTS SKIPPED", red=True, bold=True)
        reasons: dict[str, int] = {}
        for _, reason in _host_skips:
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, count in reasons.items():
            terminalreporter.write_line(f"!!   {count}: {reason}", red=True, bold=True)
        terminalreporter.write_line("!! Node and ComfyUI-integration behaviour was NOT tested in this run.", red=True, bold=True)
        terminalreporter.write_line(bar, red=True, bold=True)
    else:
        terminalreporter.write_line(f"host tests: none skipped (ComfyUI: {path or 'not found'})", green=True)


@pytest.fixture(scope="module")
def pack(comfyui):
    """ComfyUI's built-in nodes and this pack, loaded through the host's own custom-node loader."""
    comfy_host.load_builtin_nodes()
    return comfy_host.load_pack()


@pytest.fixture(scope="module")
def mappings(pack):
    """Every node class the host knows: its built-ins and this pack's."""
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture()
def flux(pack):
    """A tiny Flux built under inference_mode (as ComfyUI builds models) and one conditioning: (patcher, positive).
    Modules that need more (a negative) define their own."""
    import torch

    with torch.inference_mode():
        _, patcher = comfy_host.tiny_flux(seed=1)
    return patcher, comfy_host.flux_positive(patcher, tokens=6, seed=7)


@pytest.fixture()
def lora_dir(comfyui, tmp_path):
    """An empty models/loras for the test."""
    folder = tmp_path / "loras"
    folder.mkdir()
    with comfy_host.host_folders(loras=folder):
        yield folder

"""The real ComfyUI server (its own main.py) with this pack installed, and headless Chromium on its frontend.

For the `browser` tests: the server runs as a child process in its own process group on a free loopback
port, with a temporary --base-directory whose custom_nodes/ links this project (or the unpacked release
named by SHORTCUT_FLOW_PACK_DIR) as `shortcut-flow` (a clone's usual name); the browser is Debian's chromium driven by the playwright package. Every wait is
bounded, and both are always stopped, their whole process trees with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from comfy_host import PROJECT_ROOT

PACK_NAME = "shortcut-flow"
# What the server installs: this checkout, or (CI) the release `comfy node pack` made of it, unpacked.
PACK_DIR = Path(os.environ.get("SHORTCUT_FLOW_PACK_DIR") or PROJECT_ROOT).resolve()
# Beside it, a tiny Flux as a loader node, so that the frontend can run a training on a CPU.
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"
# The frontend the server serves: the one the host's requirements pin (unset), or another build's static folder
# (`comfyui-frontend-package` installed with pip --target: <target>/comfyui_frontend_package/static), served with
# ComfyUI's own --front-end-root. CI runs the browser tests with both (docs/testing.md).
FRONTEND_ROOT = os.environ.get("SHORTCUT_FLOW_FRONTEND_ROOT") or None
CHROMIUM = "/usr/bin/chromium"
# The flags of a browser that must stay on this machine: nothing in the background phones home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
# Frontend settings of a user who has used ComfyUI before: no first-run template browser over the canvas
# (Comfy.TutorialCompleted, in 1.27.10 and in 1.58.1 alike), no minimap over the screenshots, and the two
# canvas-navigation values already set. Without the last two, frontend 1.27.10 throws on every start of a new
# profile ("Cannot read properties of undefined (reading 'id')": its NavigationMode setting writes them before
# they are registered), whatever custom nodes are installed; with them any page error is ours to explain.
# Everything else is at its default, the node text's level of detail included: what a user sees.
SCREENSHOTS: list[str] = []  # saved by the browser tests, printed at the end of the run
FRONTEND_VERSION = [""]  # the frontend the browser tests met (window.__COMFYUI_FRONTEND_VERSION__)

USER_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Canvas.LeftMouseClickBehavior": "panning",
    "Comfy.Canvas.MouseWheelScroll": "zoom",
    "Comfy.Minimap.Visible": False,
    # Its Missing Models check races the frontend's own loading of a model folder (ModelFolder.load returns
    # an empty folder while another caller is loading it) and lists present files as missing under load;
    # the browser tests check the workflows' model files against the server's lists instead.
    "Comfy.Workflow.ShowMissingModelsWarning": False,
}


def browser_missing() -> str | None:
    """Why headless Chromium cannot be driven here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"no {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; its own browser download is not needed)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def _stop(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace` seconds."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class ComfyServer:
    """`with ComfyServer(comfyui_root, base_dir) as server:` a running server at server.url."""

    def __init__(self, comfyui_root: Path, base_dir: Path, start_timeout: float = 240.0, settings: dict | None = None):
        self.root, self.base_dir, self.start_timeout = Path(comfyui_root), Path(base_dir), start_timeout
        self.settings = USER_SETTINGS if settings is None else settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.process: subprocess.Popen | None = None

    def _prepare(self) -> None:
        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK_NAME, PACK_DIR), (TEST_NODES.name, TEST_NODES)):
            link = custom_nodes / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        settings = self.base_dir / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(self.settings), encoding="utf-8")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def __enter__(self) -> "ComfyServer":
        self._prepare()
        log = open(self.log_path, "wb")
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(self.base_dir), "--disable-auto-launch",
                   # the database would otherwise be written into the ComfyUI tree itself
                   "--database-url", "sqlite:///:memory:"]
        if FRONTEND_ROOT:
            command += ["--front-end-root", str(Path(FRONTEND_ROOT).resolve())]
        self.process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        try:
            self._wait_until_up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI's server exited with {self.process.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                get_json(self.url + "/api/system_stats", timeout=5.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI's server did not answer within {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            _stop(self.process)


@contextlib.contextmanager
def chromium(*origins: str):
    """A headless Chromium (playwright) whose pages may only reach `origins`: every other request is
    aborted, so a test never sends traffic off this machine."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        try:
            context = browser.new_context(viewport={"width": 1920, "height": 1080})
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(origins)
                          else route.abort())
            yield context
        finally:
            browser.close()


def place_model_files(base_dir: Path, files: dict[str, list[str]], input_subfolders: list[str]) -> None:
    """Empty files under base_dir/models/<folder>/ and input folders, as a user who has the models has them."""
    for folder, names in files.items():
        (base_dir / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base_dir / "models" / folder / name).write_bytes(b"")
    for sub in input_subfolders:
        (base_dir / "input" / sub).mkdir(parents=True, exist_ok=True)


DOCS_SCREENSHOTS = os.environ.get("SHORTCUT_FLOW_DOCS_SCREENSHOTS")  # a folder: README's screenshots are made there
DOCS_WIDTH = 1280


def keep_docs_screenshot(shot: Path) -> None:
    """With SHORTCUT_FLOW_DOCS_SCREENSHOTS set, a small copy of the screenshot for the docs (PNG, 1280 wide)."""
    if not DOCS_SCREENSHOTS:
        return
    from PIL import Image

    folder = Path(DOCS_SCREENSHOTS)
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(shot) as image:
        small = image.convert("RGB").resize((DOCS_WIDTH, round(image.height * DOCS_WIDTH / image.width)), Image.LANCZOS)
        small.quantize(colors=128).save(folder / shot.name, optimize=True)


"""The pack in ComfyUI's real server and real frontend, as a user meets it (marker `browser`).

Run with the frontend the host pins, or with another build (SHORTCUT_FLOW_FRONTEND_ROOT: its static folder;
CI runs both, docs/testing.md). Every check holds for each.

ComfyUI's own main.py serves the pack from a temporary --base-directory; its HTTP API must list every
node with a tooltip on every input and every workflow as a template; then headless Chromium opens
each workflow, fetched from the template route the templates browser uses, in the real frontend and
finds every node type known, no error thrown, the API prompt the Run button would queue equal to the
one the in-process tests validate, and the widget values as the file has them. One screenshot per
workflow is saved and its path printed at the end of the run.
"""

from __future__ import annotations

import os

import pytest

import comfy_host
import comfy_server
from workflow_files import FRONTEND_ONLY, INPUT_SUBFOLDERS, MODEL_FILES, WORKFLOWS, load, to_prompt

pytestmark = pytest.mark.browser

APP_READY_MS = 120_000  # a 2-core CPU builds the frontend in about 5 s; a cold disk can take far longer
TEMPLATES = f"/api/workflow_templates/{comfy_server.PACK_NAME}"
HOST_API_GAP = "JobsApiError: Failed to fetch jobs: 404"  # /api/jobs: newer servers only


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    why = comfy_server.browser_missing()
    if why is not None:
        if os.environ.get("SHORTCUT_FLOW_REQUIRE_HOST") == "1":
            pytest.fail(f"browser test needs headless Chromium: {why}")
        pytest.skip(f"BROWSER TEST SKIPPED: {why}")
    base = tmp_path_factory.mktemp("comfyui-base")
    # The workflows' model files and dataset folder exist, as for a user who has downloaded them.
    comfy_server.place_model_files(base, MODEL_FILES, INPUT_SUBFOLDERS)
    with comfy_server.ComfyServer(comfyui, base) as running:
        yield running


@pytest.fixture(scope="module")
def bare_server(comfyui, tmp_path_factory):
    """A new user's server: none of the workflows' model files but the LoRA (which a user trains or brings), and
    the frontend's Missing Models check on, as it is by default."""
    base = tmp_path_factory.mktemp("comfyui-bare")
    comfy_server.place_model_files(base, {"loras": MODEL_FILES["loras"]}, INPUT_SUBFOLDERS)
    settings = {k: v for k, v in comfy_server.USER_SETTINGS.items() if k != "Comfy.Workflow.ShowMissingModelsWarning"}
    with comfy_server.ComfyServer(comfyui, base, settings=settings) as running:
        yield running


@pytest.fixture(scope="module")
def browser(server, bare_server, mappings):
    # `mappings` loads ComfyUI's nodes in this process with asyncio.run, which cannot run inside the event
    # loop playwright's sync API keeps: it is loaded before the browser starts.
    with comfy_server.chromium(server.url, bare_server.url) as context:
        yield context


@pytest.fixture(scope="module")
def object_info(server):
    return comfy_server.get_json(server.url + "/api/object_info")


def test_object_info_lists_every_node_of_the_pack_with_tooltips(object_info, pack):
    ours = {name for name, info in object_info.items()
            if info.get("python_module") == f"custom_nodes.{comfy_server.PACK_NAME}"}
    assert ours == set(pack.NODE_CLASS_MAPPINGS), "the server's node list differs from the pack's"
    for name in sorted(ours):
        info = object_info[name]
        assert info["description"], f"{name}: no description"
        assert info["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[name]
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert inputs, name
        for input_name, spec in inputs.items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            assert str(options.get("tooltip", "")).strip(), f"{name}.{input_name}: no tooltip"


def test_workflow_templates_list_every_workflow(server):
    templates = comfy_server.get_json(server.url + "/api/workflow_templates")
    assert sorted(templates.get(comfy_server.PACK_NAME, [])) == sorted(p.stem for p in WORKFLOWS), templates
    for path in WORKFLOWS:  # the template route serves the file itself
        assert comfy_server.get_json(f"{server.url}{TEMPLATES}/{path.name}") == load(path)


def test_every_model_a_workflow_names_is_listed_by_the_server(server):
    """What the frontend's Missing Models check asks of the server, for each loader's properties.models."""
    named = {(m["directory"], m["name"]) for path in WORKFLOWS for node in load(path)["nodes"]
             for m in node.get("properties", {}).get("models", [])}
    assert named
    for directory, name in sorted(named):
        listed = {m["name"] for m in comfy_server.get_json(f"{server.url}/api/experiment/models/{directory}")}
        assert name in listed, f"{directory}/{name}: not listed by the server ({sorted(listed)})"


def _screenshots(tmp_path_factory):
    """A folder for this run's screenshots, named by the frontend that drew them (CI keeps each run's apart)."""
    return tmp_path_factory.mktemp(f"screenshots-frontend-{comfy_server.FRONTEND_VERSION[0] or 'pinned'}")


def _open_app(browser, url: str):
    page = browser.new_page()
    page_errors: list[str] = []
    console_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(error.stack or str(error)))
    # Resources the server does not have (user.css, empty user folders) and blocked off-machine requests
    # are the browser's network log, not errors of the page; nor is a newer frontend asking ComfyUI 0.3.64 for
    # its job list, an API that server does not have yet (1.58.1 logs "JobsApiError: ... 404" on each status).
    page.on("console", lambda message: console_errors.append(message.text)
            if message.type == "error" and not message.text.startswith("Failed to load resource")
            and HOST_API_GAP not in message.text else None)
    page.goto(url, timeout=60_000)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=APP_READY_MS)
    comfy_server.FRONTEND_VERSION[0] = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")
    return page, page_errors, console_errors


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_opens_in_the_real_frontend(path, server, browser, mappings, tmp_path_factory):
    workflow = load(path)
    page, page_errors, console_errors = _open_app(browser, server.url)
    try:
        registered = page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)")
        missing = sorted({n["type"] for n in workflow["nodes"]} - set(registered))
        assert not missing, f"node types the frontend does not know: {missing}"

        # Loaded as the templates browser loads it: the JSON the server's template route gives.
        page.evaluate("""async (url) => {
            const workflow = await (await fetch(url)).json();
            await window.app.loadGraphData(workflow);
        }""", f"{server.url}{TEMPLATES}/{path.name}")
        page.wait_for_timeout(500)  # let the canvas draw before the screenshot

        # Readable where it opens, at the frontend's default level of detail: below about 8 px of text the
        # canvas draws nodes as grey boxes (LiteGraph.Canvas.MinFontSizeForLOD; 1.58 at the old 55% zoom).
        view = page.evaluate("() => [window.app.canvas.low_quality, window.app.canvas.ds.scale]")
        assert view[0] is False, f"the workflow opens at zoom {view[1]}, where the frontend draws no node text"

        shot = _screenshots(tmp_path_factory) / f"{path.stem}.png"
        page.screenshot(path=str(shot))
        comfy_server.SCREENSHOTS.append(str(shot))
        comfy_server.keep_docs_screenshot(shot)

        dialogs = page.evaluate("""() => Array.from(document.querySelectorAll('.p-dialog'))
                                       .map(d => d.innerText.slice(0, 300))""")
        assert not dialogs, f"the frontend opened dialogs (missing nodes or models?): {dialogs}"

        loaded = page.evaluate("() => window.app.graph.serialize()")
        by_id = {n["id"]: n for n in loaded["nodes"]}
        assert set(by_id) == {n["id"] for n in workflow["nodes"]}
        for node in workflow["nodes"]:
            got = by_id[node["id"]]
            assert got["type"] == node["type"]
            # a node without widgets: 1.27 saves [], 1.58 no widgets_values at all
            assert (got.get("widgets_values") or []) == (node.get("widgets_values") or []), \
                f"node {node['id']} ({node['type']}): the frontend's widget values differ from the file's"

        # Training shows what a user sets on every run; the rest is on Shortcut Training Options.
        counts = page.evaluate("""() => window.app.graph._nodes.filter(n => n.type === 'TrainShortcut')
                                         .map(n => (n.widgets || []).length)""")
        assert all(count <= 16 for count in counts), f"TrainShortcut shows {counts} widgets"

        queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        expected = to_prompt(workflow, mappings)
        assert set(queued) == {str(n["id"]) for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY}
        for node_id, entry in expected.items():
            assert queued[node_id]["class_type"] == entry["class_type"]
            assert queued[node_id]["inputs"] == entry["inputs"], \
                f"node {node_id} ({entry['class_type']}): the queued inputs differ from the file's"

        assert not page_errors, "the frontend threw:\n" + "\n\n".join(page_errors)
        assert not console_errors, "the frontend logged errors:\n" + "\n".join(console_errors)
    finally:
        page.close()



def test_options_saved_before_the_memory_modes_open_with_them_off(server, browser):
    """CHANGELOG 0.3.0: the three memory-mode widgets come after the others, so a 0.2.0 save (27 values) opens with
    its values where they were and the modes at their defaults."""
    workflow = load(comfy_host.PROJECT_ROOT / "workflows" / "flux_few_shot_train_shortcut.json")
    [options] = [n for n in workflow["nodes"] if n["type"] == "ShortcutTrainingOptions"]
    saved = options["widgets_values"][:-7]  # and 0.6's recipe, compile_blocks, fp8_targets, centre_shifts after them
    assert len(saved) == 27 and options["widgets_values"][-7:] == ["all", False, False, "paper", False, False, False]
    options["widgets_values"] = saved
    page, page_errors, _ = _open_app(browser, server.url)
    try:
        page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
        queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        inputs = queued[str(options["id"])]["inputs"]
        assert (inputs["lora_layers"], inputs["offload_optimizer"], inputs["stream_weights"]) == ("all", False, False)
        assert (inputs["recipe"], inputs["compile_blocks"], inputs["fp8_targets"]) == ("paper", False, False)
        assert inputs["centre_shifts"] is False
        assert (inputs["t_max"], inputs["export_diffusers"]) == (saved[-2], saved[-1])
        assert not page_errors
    finally:
        page.close()


TRAINING_PROMPT = {  # a small data-free graph: tiny Flux -> teacher latents from prompts -> Train Shortcut -> previews
    "1": {"class_type": "TinyFluxForTests", "inputs": {"seed": 3}},
    "3": {"class_type": "ShortcutTeacherLatents", "inputs": {
        "model": ["1", 0], "clip": ["1", 2], "prompts": "a red cube\na blue sphere\n# a comment\na green cone",
        "per_prompt": 2, "width": 64, "height": 64, "steps": 4, "guidance": 3.5, "cfg": 1.0, "negative_prompt": "",
        "seed": 0, "batch_size": 2, "cache": True, "schedule": "teacher: euler, simple", "shift": 3.25,
        "length": 1}},
    "4": {"class_type": "TrainShortcut", "inputs": {
        "model": ["1", 0], "latents": ["3", 0], "positive": ["3", 1], "steps": 12, "batch_size": 2,
        "learning_rate": 0.001, "rank": 4, "seed": 0, "save_name": "frontend_run", "checkpoint_every": 0,
        "resume_lora": "(none)", "cfg": 1.0, "preview_every": 4, "calibrate": True}},
    "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 3]}},
    "6": {"class_type": "PreviewImage", "inputs": {"images": ["4", 5]}},
}


def test_a_training_run_in_the_real_frontend_shows_previews_and_the_calibrated_recipe(server, browser,
                                                                                        tmp_path_factory):
    """Queued as the Run button queues it: the teacher's latents are made from prompts (and cached), the
    training node shows few-step previews as it trains, its text ends with the calibrated recipe, and both
    image outputs are previewed."""
    page, page_errors, console_errors = _open_app(browser, server.url)
    try:
        page.evaluate("async (prompt) => { await window.app.loadApiJson(prompt, 'training'); }", TRAINING_PROMPT)
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        # the node's text: its result (web/shortcut_flow.js) once it ran, its progress text while it runs
        node_state = """() => window.app.graph._nodes.map(n => [n.type, (n.imgs || []).length,
            ((n.widgets || []).find(w => w.name === 'shortcut_flow_result')
             || (n.widgets || []).find(w => w.name === '$$node-text-preview') || {}).value || ''])"""
        # polled once a second: polling on every animation frame would take the CPU the server trains on
        # done when both previews show, or at once when the server refused the prompt (a missing input, ...) or
        # a node failed
        refused = "(Object.keys(window.app.lastNodeErrors || {}).length > 0 || !!window.app.lastExecutionError)"
        page.wait_for_function(f"() => {refused} || "
                               f"({node_state})().filter(([t, imgs]) => t === 'PreviewImage' && imgs).length === 2",
                               timeout=240_000, polling=1000)
        assert not page.evaluate(f"() => {refused}"), page.evaluate(
            "() => JSON.stringify([window.app.lastNodeErrors, window.app.lastExecutionError])")
        shot = _screenshots(tmp_path_factory) / "training_run.png"
        page.screenshot(path=str(shot))
        comfy_server.SCREENSHOTS.append(str(shot))
        comfy_server.keep_docs_screenshot(shot)
        [(_, previews, text)] = [row for row in page.evaluate(node_state) if row[0] == "TrainShortcut"]
        assert previews >= 1, "no few-step preview reached the Train Shortcut node"
        assert text.startswith("calibrated: 3 steps, strength "), text
        assert (server.base_dir / "models" / "loras" / "frontend_run.safetensors").is_file()
        assert len(list((server.base_dir / "output" / "shortcut_teacher_cache").glob("*.safetensors"))) == 6
        assert not page_errors, "the frontend threw:\n" + "\n\n".join(page_errors)
        assert not console_errors, "the frontend logged errors:\n" + "\n".join(console_errors)
    finally:
        page.close()


# What each frontend shows of the models a workflow names that the server lacks: 1.58 a notice ("N issues found")
# whose View details opens the workflow overview's Missing Models group; 1.27 a Missing Models dialog.
MISSING_MODELS_SHOWN = """() => !!(Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() === 'View details')
    || Array.from(document.querySelectorAll('.p-dialog')).find(d => d.innerText.includes('Missing Models')))"""
MISSING_MODELS_TEXT = """async () => {
    const notice = Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() === 'View details');
    if (notice) {
        const issues = notice.closest('div[role], div').parentElement.innerText;
        notice.click();
        for (let i = 0; i < 50 && !document.querySelector('[data-testid="error-group-missing-model"]'); i++)
            await new Promise(resolve => setTimeout(resolve, 100));
        const group = document.querySelector('[data-testid="error-group-missing-model"]');
        return [issues, group ? group.innerText : ''];
    }
    const dialog = Array.from(document.querySelectorAll('.p-dialog')).find(d => d.innerText.includes('Missing Models'));
    return [dialog.innerText, dialog.innerText];
}"""
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_a_new_user_is_offered_a_download_for_every_model_and_nothing_else(path, bare_server, browser):
    """Opened on a server without the models, the frontend lists each model file the workflow names, each with a
    download entry (its loader's properties.models), and no other issue."""
    workflow = load(path)
    expected = sorted(m["name"] for node in workflow["nodes"] for m in node.get("properties", {}).get("models", []))
    page, page_errors, _ = _open_app(browser, bare_server.url)
    try:
        # the workflow restored from the last page of this browser may have opened its own dialog: closed first
        page.wait_for_timeout(1000)
        for _ in range(5):
            if not page.evaluate("() => document.querySelectorAll('.p-dialog').length"):
                break
            page.keyboard.press("Escape")
            page.wait_for_timeout(300)
        page.evaluate("""async (url) => {
            const workflow = await (await fetch(url)).json();
            await window.app.loadGraphData(workflow);
        }""", f"{bare_server.url}{TEMPLATES}/{path.name}")
        page.wait_for_function(MISSING_MODELS_SHOWN, timeout=30_000, polling=200)
        issues, listed = page.evaluate(MISSING_MODELS_TEXT)
        lines = [line.strip() for line in listed.splitlines() if line.strip()]
        names = sorted(line.split(" / ")[-1] for line in lines if line.lower().endswith(MODEL_SUFFIXES))
        downloads = [line for line in lines if line == "Download" or line.startswith("Download (")]
        assert names == expected, f"the frontend lists {names}; the workflow names {expected}:\n{listed}"
        assert len(downloads) == len(expected), f"not every model has a download entry:\n{listed}"
        if "issues found" in issues:  # 1.58 counts every issue of the workflow in its notice
            assert f"{len(expected)} issues found" in issues, f"other issues than the models: {issues}"
        assert not page_errors, "the frontend threw:\n" + "\n\n".join(page_errors)
    finally:
        page.close()

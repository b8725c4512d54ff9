"""The example workflows (workflows/*.json, ComfyUI's UI format) against the real host.

Each file is checked the way ComfyUI would meet it: its graph is self-consistent, every node is
a registered class (ComfyUI's built-ins and this pack, loaded through ComfyUI's own custom-node
loader) whose inputs, outputs and widget values fit the class, and the API prompt the frontend
would queue from it passes the host's own `execution.validate_prompt`, with the model, LoRA and
dataset names it references present as placeholder files.
"""

from __future__ import annotations

import asyncio
import copy

import pytest

import comfy_host
from workflow_files import (FRONTEND_ONLY, INPUT_SUBFOLDERS, MODEL_FILES, WORKFLOWS, input_specs, is_widget,
                            TITLE_H, class_outputs, class_widgets, load, to_prompt, type_name)

@pytest.fixture()
def placeholder_files(comfyui, tmp_path):
    """Empty model files and the few-shot input folder the workflows name, in temporary folders registered
    with folder_paths; folder_paths is restored afterwards."""
    models = {}
    for folder, names in MODEL_FILES.items():
        models[folder] = tmp_path / "models" / folder
        models[folder].mkdir(parents=True)
        for name in names:
            (models[folder] / name).write_bytes(b"")
    input_dir = tmp_path / "input"
    for sub in INPUT_SUBFOLDERS:
        (input_dir / sub).mkdir(parents=True)
    with comfy_host.host_folders(models=models, input_dir=input_dir):
        yield tmp_path


def _validate(prompt: dict):
    import execution

    return asyncio.run(execution.validate_prompt("shortcut-flow-workflow-test", prompt, None))


def _output_nodes(prompt: dict, mappings: dict) -> set[str]:
    return {k for k, v in prompt.items() if getattr(mappings[v["class_type"]], "OUTPUT_NODE", False) is True}


def test_there_are_example_workflows():
    assert len(WORKFLOWS) >= 3, [p.name for p in WORKFLOWS]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_graph_is_consistent(path):
    wf = load(path)
    assert wf.get("version") == 0.4
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)), "duplicate node ids"
    by_id = {n["id"]: n for n in wf["nodes"]}
    link_ids = [l[0] for l in wf["links"]]
    assert len(link_ids) == len(set(link_ids)), "duplicate link ids"
    assert wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max(link_ids, default=0)
    links = {}
    for link in wf["links"]:
        assert len(link) == 6, link
        lid, src, src_slot, dst, dst_slot, typ = link
        links[lid] = link
        assert src in by_id and dst in by_id, link
        outs, ins = by_id[src].get("outputs", []), by_id[dst].get("inputs", [])
        assert 0 <= src_slot < len(outs) and 0 <= dst_slot < len(ins), link
        assert lid in (outs[src_slot].get("links") or []), f"link {lid} missing from its source output"
        assert ins[dst_slot].get("link") == lid, f"link {lid} missing from its target input"
        assert typ == outs[src_slot]["type"] == ins[dst_slot]["type"], link
    for node in wf["nodes"]:  # and nothing dangles the other way
        for slot, out in enumerate(node.get("outputs", [])):
            for lid in out.get("links") or []:
                assert lid in links and links[lid][1] == node["id"] and links[lid][2] == slot, (node["id"], lid)
        for slot, inp in enumerate(node.get("inputs", [])):
            if inp.get("link") is not None:
                lid = inp["link"]
                assert lid in links and links[lid][3] == node["id"] and links[lid][4] == slot, (node["id"], lid)
        assert node.get("mode", 0) == 0, f"node {node['id']} is muted or bypassed"
        assert node.get("properties", {}).get("Node name for S&R", node["type"]) == node["type"], node["id"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_layout_is_readable(path):
    """No two nodes overlap (title bars included), every link runs left to right, and there is a note."""
    wf = load(path)
    rects = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]}
    ids = sorted(rects)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            ra, rb = rects[a], rects[b]
            assert ra[2] <= rb[0] or rb[2] <= ra[0] or ra[3] <= rb[1] or rb[3] <= ra[1], f"nodes {a} and {b} overlap"
    for _, src, _, dst, _, _ in wf["links"]:
        assert rects[src][2] < rects[dst][0], f"link {src} -> {dst} runs right to left"
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and all(len(n["widgets_values"][0]) > 200 for n in notes)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_match_their_classes(path, mappings):
    wf = load(path)
    for node in wf["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in mappings, f"{where}: no such node type in ComfyUI + this pack"
        cls = mappings[node["type"]]
        outputs = class_outputs(cls)
        assert [(o["name"], o["type"]) for o in node.get("outputs", [])] == outputs, where
        specs = {name: spec for name, spec, _ in input_specs(cls)}
        for inp in node.get("inputs", []):
            assert inp["name"] in specs, f"{where}: unknown input {inp['name']}"
            spec = specs[inp["name"]]
            assert inp["type"] == type_name(spec), f"{where}: input {inp['name']} type"
            if "widget" in inp:
                assert is_widget(spec) and inp["widget"]["name"] == inp["name"], f"{where}: {inp['name']}"
            else:
                assert not is_widget(spec), f"{where}: widget {inp['name']} listed as a plain input"
        listed = {inp["name"] for inp in node.get("inputs", [])}
        for name, spec, section in input_specs(cls):
            if not is_widget(spec) and section == "required":
                assert name in listed, f"{where}: required input {name} has no slot"
        widgets = class_widgets(cls)
        expected = len(widgets) + sum(control for _, control in widgets)
        assert len(node.get("widgets_values") or []) == expected, \
            f"{where}: {len(node.get('widgets_values') or [])} widget values, the class has {expected}"
        i = 0
        for name, control in widgets:
            if control:
                assert node["widgets_values"][i + 1] in ("fixed", "increment", "decrement", "randomize"), \
                    f"{where}: control value after {name}"
            i += 2 if control else 1


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_the_hosts_prompt_validation(path, mappings, placeholder_files):
    prompt = to_prompt(load(path), mappings)
    outputs = _output_nodes(prompt, mappings)
    assert outputs
    valid, error, good_outputs, node_errors = _validate(prompt)
    assert (valid, error, node_errors) == (True, None, {})
    # validate_prompt is "valid" when ANY output validates: every one must
    assert set(good_outputs) == outputs


def _recipe(prompt, class_type):
    return [(k, v["inputs"]) for k, v in prompt.items() if v["class_type"] == class_type]


def test_workflows_follow_their_recipes(mappings):
    prompts = {p.name: to_prompt(load(p), mappings) for p in WORKFLOWS}

    a = prompts["flux_3step_shortcut_lora.json"]
    [(loader_id, loader)] = _recipe(a, "ShortcutLoRALoader")
    [(_, sampler)] = _recipe(a, "ShortcutSampler")
    assert loader["lora_name"] == "flux-scfm-3step.safetensors" and loader["strength"] == 1.0
    assert sampler["steps"] == [loader_id, 1] and sampler["shift"] == [loader_id, 2]  # the file's recipe
    assert [g["guidance"] for _, g in _recipe(a, "FluxGuidance")] == [3.5]

    b = prompts["flux_few_shot_train_shortcut.json"]
    [(data_id, data)] = _recipe(b, "LoadImageTextSetFromFolderNode")
    [(train_id, train)] = _recipe(b, "TrainShortcut")
    [(_, sampler)] = _recipe(b, "ShortcutSampler")
    assert data["folder"] == "shortcut_fewshot" and train["positive"] == [data_id, 1]
    assert train["save_name"] == "flux_shortcut_fewshot" and train["checkpoint_every"] == 200
    assert sampler["model"] == [train_id, 0] and (sampler["steps"], sampler["shift"]) == ([train_id, 6], [train_id, 7])
    assert [s["lora"] for _, s in _recipe(b, "SaveLoRANode")] == [[train_id, 1]]
    assert sorted(p["images"] for _, p in _recipe(b, "PreviewImage")) == [[train_id, 3], [train_id, 5]]
    assert (train["preview_every"], train["calibrate"]) == (100, True)
    [(options_id, options)] = _recipe(b, "ShortcutTrainingOptions")
    assert train["options"] == [options_id, 0] and options["alpha"] == 64.0 and options["t_skip"] == 2

    c = prompts["flux_data_free_distill.json"]
    host_teacher = comfy_host.pack_module("nodes.host_teacher")
    [(train_id, train)] = _recipe(c, "TrainShortcut")
    makers = dict(_recipe(c, "ShortcutTeacherLatents"))
    data = makers[train["latents"][0]]
    assert train["positive"] == [train["latents"][0], 1]  # one conditioning per teacher latent
    training_prompts = host_teacher.parse_prompts(data["prompts"])
    assert len(training_prompts) >= 32 and len(set(training_prompts)) == len(training_prompts)
    assert (data["steps"], data["schedule"], data["cache"]) == (28, host_teacher.TEACHER_SCHEDULE, True)
    assert (train["preview_every"], train["calibrate"]) == (100, True) and "options" not in train
    assert sorted(p["images"] for _, p in _recipe(c, "PreviewImage")) == [[train_id, 3], [train_id, 5]]
    # the comparison: held-out prompts, same seed, teacher at 28 steps vs the trained model at its recipe
    [(teacher_id, teacher)] = [(k, m) for k, m in makers.items() if m["model"] != [train_id, 0] and k != train["latents"][0]]
    [(student_id, student)] = [(k, m) for k, m in makers.items() if m["model"] == [train_id, 0]]
    assert teacher["prompts"] == student["prompts"] and teacher["seed"] == student["seed"]
    compare_prompts = host_teacher.parse_prompts(c[teacher["prompts"][0]]["inputs"]["value"])
    assert compare_prompts and not set(compare_prompts) & set(training_prompts)
    assert (teacher["steps"], teacher["schedule"]) == (28, host_teacher.TEACHER_SCHEDULE)
    assert (student["steps"], student["shift"], student["schedule"]) == \
        ([train_id, 6], [train_id, 7], host_teacher.SHORTCUT_SCHEDULE)
    [(stitch_id, stitch)] = _recipe(c, "ImageStitch")
    assert c[stitch["image1"][0]]["inputs"]["samples"] == [teacher_id, 0]
    assert c[stitch["image2"][0]]["inputs"]["samples"] == [student_id, 0]
    assert [s["images"] for _, s in _recipe(c, "SaveImage")] == [[stitch_id, 0]]


OUR_STEPS_WIDGETS = ("ShortcutSampler", "TrainShortcut", "ShortcutTeacherLatents")  # each has `steps`, min 1


def test_the_hosts_validation_rejects_our_steps_below_their_minimum(mappings, placeholder_files):
    """A `steps` widget of 0 (min 1) on any of our nodes is caught: the validator really checks our inputs."""
    checked = set()
    for path in WORKFLOWS:
        wf = load(path)
        for node in wf["nodes"]:
            if node["type"] not in OUR_STEPS_WIDGETS or any(i["name"] == "steps" and i.get("link") is not None
                                                            for i in node.get("inputs", [])):
                continue
            bad = copy.deepcopy(wf)
            target = next(n for n in bad["nodes"] if n["id"] == node["id"])
            names = [name for name, control in class_widgets(mappings[node["type"]]) for _ in range(1 + control)]
            target["widgets_values"][names.index("steps")] = 0
            prompt = to_prompt(bad, mappings)
            valid, error, good_outputs, node_errors = _validate(prompt)
            sid = str(node["id"])
            assert sid in node_errors, (path.name, node_errors)
            assert [(e["type"], e["extra_info"]["input_name"]) for e in node_errors[sid]["errors"]] == \
                [("value_smaller_than_min", "steps")]
            downstream = set(node_errors[sid]["dependent_outputs"])
            assert downstream and not downstream & set(good_outputs)
            # Outputs that do not depend on the node still validate, and then validate_prompt says valid.
            assert valid is bool(good_outputs)
            checked.add(node["type"])
    assert checked == {"TrainShortcut", "ShortcutTeacherLatents"}  # every ShortcutSampler's steps is linked


def test_a_linked_steps_widget_ignores_its_own_value(mappings, placeholder_files):
    """Where the loader drives ShortcutSampler's steps, the widget value is not what is queued."""
    wf = load(comfy_host.PROJECT_ROOT / "workflows" / "flux_3step_shortcut_lora.json")
    [sampler] = [n for n in wf["nodes"] if n["type"] == "ShortcutSampler"]
    names = [name for name, control in class_widgets(mappings["ShortcutSampler"]) for _ in range(1 + control)]
    sampler["widgets_values"][names.index("steps")] = 0
    prompt = to_prompt(wf, mappings)
    assert isinstance(prompt[str(sampler["id"])]["inputs"]["steps"], list)
    valid, error, _, node_errors = _validate(prompt)
    assert (valid, node_errors) == (True, {})


def test_a_train_shortcut_saved_with_0_1_0_is_refused_not_misread(mappings, placeholder_files):
    """CHANGELOG 0.2.0: Train Shortcut's widgets changed. A 0.1.0 save's 36 values land in the new widgets by
    position (as the frontend assigns them); ComfyUI must refuse that prompt rather than train on them."""
    wf = load(comfy_host.PROJECT_ROOT / "workflows" / "flux_few_shot_train_shortcut.json")
    [train] = [n for n in wf["nodes"] if n["type"] == "TrainShortcut"]
    train["widgets_values"] = [2000, 8, 2e-05, 64, 64.0, 0, "flux_shortcut_fewshot", 200, "(none)", 1.0, 0.0, 7.5,
                               True, 3, 3.25, 1.0, 2, 0.4, 32, 32, 0.0, 2.5, 4.5, 0.1, 0.999, 0.99, 0, 0.0001, 10.0,
                               1, False, "", 0.9, 0.999, 1e-08, 0.99999]  # the 0.1.0 widget list
    valid, _, good_outputs, node_errors = _validate(to_prompt(wf, mappings))
    errors = node_errors[str(train["id"])]["errors"]
    assert {e["extra_info"]["input_name"] for e in errors} >= {"resume_lora", "cfg"}
    assert not set(good_outputs) & set(node_errors[str(train["id"])]["dependent_outputs"])


# The authors' 3-step Flux LoRA: its direct file URL could not be confirmed from here (their pages are in the note).
DOWNLOAD_UNCONFIRMED = {"flux-scfm-3step.safetensors"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_model_file_a_workflow_names_has_a_download_entry(path):
    """As official templates do: the frontend's Missing Models dialog offers these entries for download."""
    folder_of = {name: folder for folder, names in MODEL_FILES.items() for name in names}
    checked = 0
    for node in load(path)["nodes"]:
        entries = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
        for name in [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v in folder_of]:
            if name in DOWNLOAD_UNCONFIRMED:
                continue
            assert name in entries, f"node {node['id']} ({node['type']}) names {name} without a download entry"
            assert entries[name]["directory"] == folder_of[name]
            assert entries[name]["url"].startswith("https://huggingface.co/") and entries[name]["url"].endswith(name)
            checked += 1
    assert checked >= 4  # the Flux dev set: diffusion model, two text encoders, VAE

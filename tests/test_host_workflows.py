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
    assert len(WORKFLOWS) >= 5, [p.name for p in WORKFLOWS]


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
    assert loader["lora_name"] == "flux-scfm-3step.safetensors" and (loader["strength"], loader["steps"]) == (0.0, 0)
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
    assert train["options"] == [options_id, 0] and options["alpha"] == 64.0 and options["t_skip"] == 0
    assert options["recipe"] == "paper"

    c = prompts["flux_data_free_distill.json"]
    host_teacher = comfy_host.pack_module("host.teacher")
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
    _check_the_comparison(c, train_id, training_prompts, teacher_steps=28)


def _check_the_comparison(prompt, train_id, training_prompts, teacher_steps):
    """A data-free workflow's comparison: held-out prompts, same seed, the teacher at its data's steps vs the
    trained model at its recipe, both at the training data's cfg, negative and size, stitched side by side
    (teacher left) and saved."""
    host_teacher = comfy_host.pack_module("host.teacher")
    train = prompt[train_id]["inputs"]
    makers = dict(_recipe(prompt, "ShortcutTeacherLatents"))
    data = makers[train["latents"][0]]
    [(teacher_id, teacher)] = [(k, m) for k, m in makers.items() if m["model"] != [train_id, 0] and k != train["latents"][0]]
    [(student_id, student)] = [(k, m) for k, m in makers.items() if m["model"] == [train_id, 0]]
    assert teacher["model"] == train["model"]  # the teacher that was distilled
    assert teacher["prompts"] == student["prompts"] and teacher["seed"] == student["seed"]
    compare_prompts = host_teacher.parse_prompts(prompt[teacher["prompts"][0]]["inputs"]["value"])
    assert compare_prompts and not set(compare_prompts) & set(training_prompts)
    assert (teacher["steps"], teacher["schedule"]) == (teacher_steps, host_teacher.TEACHER_SCHEDULE)
    assert (student["steps"], student["shift"], student["schedule"]) == \
        ([train_id, 6], [train_id, 7], host_teacher.SHORTCUT_SCHEDULE)
    for maker in (teacher, student):
        assert [maker[k] for k in ("cfg", "negative_prompt", "width", "height", "length")] == \
            [data[k] for k in ("cfg", "negative_prompt", "width", "height", "length")]
    [(stitch_id, stitch)] = _recipe(prompt, "ImageStitch")
    assert prompt[stitch["image1"][0]]["inputs"]["samples"] == [teacher_id, 0]
    assert prompt[stitch["image2"][0]]["inputs"]["samples"] == [student_id, 0]
    assert [s["images"] for _, s in _recipe(prompt, "SaveImage")] == [[stitch_id, 0]]


def _model_chain(prompt, link):
    """(class type, inputs) of the nodes up a MODEL link, nearest first: model patches, then the loader."""
    chain = []
    while isinstance(link, list):
        node = prompt[link[0]]
        chain.append((node["class_type"], node["inputs"]))
        link = node["inputs"].get("model")
    return chain


def _check_the_teacher_data(prompt, train_id, steps, min_prompts):
    """Train Shortcut's latents, their conditionings and negatives all come from one Shortcut Teacher Latents node,
    which samples the model being trained on the teacher schedule at the training cfg."""
    host_teacher = comfy_host.pack_module("host.teacher")
    train = prompt[train_id]["inputs"]
    data_id = train["latents"][0]
    data = prompt[data_id]["inputs"]
    assert prompt[data_id]["class_type"] == "ShortcutTeacherLatents"
    assert (train["latents"], train["positive"], train["negative"]) == ([data_id, 0], [data_id, 1], [data_id, 2])
    assert data["model"] == train["model"]
    training_prompts = host_teacher.parse_prompts(data["prompts"])
    assert len(training_prompts) >= min_prompts and len(set(training_prompts)) == len(training_prompts)
    assert (data["steps"], data["schedule"], data["cache"], data["cfg"]) == \
        (steps, host_teacher.TEACHER_SCHEDULE, True, train["cfg"])
    return data, training_prompts


def _check_the_family_recipe(prompt, train_id, model_shift, sample_steps):
    """A model family other than Flux: Train Shortcut at true CFG with a negative, and Shortcut Training Options
    with the LoRA's steps, sampling at the model's own shift and training shifts drawn around it (the paper's Flux
    draw scaled to that shift, no resolution shift), not Flux's numbers."""
    from shortcut_core.config import schedule_around

    train = prompt[train_id]["inputs"]
    options = prompt[train["options"][0]]["inputs"]
    assert train["cfg"] > 1.0 and isinstance(train.get("negative"), list)
    assert (options["sample_steps"], options["sample_shift"]) == (sample_steps, model_shift)
    for knob, value in schedule_around(model_shift).items():
        assert options[knob] == pytest.approx(value, abs=1e-3), knob
    assert (train["preview_every"], train["calibrate"]) == (100, True)
    assert sorted(p["images"] for _, p in _recipe(prompt, "PreviewImage")) == [[train_id, 3], [train_id, 5]]


def _loaded_as_comfyuis_example(mappings, name: str, sampling: str, shift: float, unet: str, clip: tuple[str, str],
                                vae: str):
    """A workflow's prompt whose Train Shortcut takes the model file through one ModelSampling node at `shift`, with
    the text encoder (file, type) and VAE named: (prompt, Train Shortcut's id, its inputs)."""
    p = to_prompt(load(comfy_host.PROJECT_ROOT / "workflows" / name), mappings)
    [(train_id, train)] = _recipe(p, "TrainShortcut")
    chain = _model_chain(p, train["model"])
    assert [c for c, _ in chain] == [sampling, "UNETLoader"] and chain[0][1]["shift"] == shift
    assert chain[1][1]["unet_name"] == unet
    [(_, loader)] = _recipe(p, "CLIPLoader")
    assert (loader["clip_name"], loader["type"]) == clip
    assert [v["vae_name"] for _, v in _recipe(p, "VAELoader")] == [vae]
    return p, train_id, train


def test_the_wan_workflow_follows_its_recipe(mappings):
    """Wan 2.1 T2V 1.3B as ComfyUI's own example loads and samples it (shift 8, true CFG against Wan's negative,
    33 frames at 832x480), distilled on its own clips into a 4-step LoRA that samples a new prompt into a video."""
    p, train_id, train = _loaded_as_comfyuis_example(mappings, "wan_t2v_few_step_shortcut.json", "ModelSamplingSD3", 8.0,
                                                     "wan2.1_t2v_1.3B_fp16.safetensors",
                                                     ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan"),
                                                     "wan_2.1_vae.safetensors")

    data, training_prompts = _check_the_teacher_data(p, train_id, steps=30, min_prompts=8)
    assert train["cfg"] == 5.0 and data["negative_prompt"].strip()
    assert (data["width"], data["height"], data["length"]) == (832, 480, 33)  # Wan counts 4k + 1 frames
    _check_the_family_recipe(p, train_id, model_shift=8.0, sample_steps=4)

    # a new prompt at the trained recipe, with the training cfg and negative, at the size it was trained at
    [(sampler_id, sampler)] = _recipe(p, "ShortcutSampler")
    assert sampler["model"] == [train_id, 0] and (sampler["steps"], sampler["shift"]) == ([train_id, 6], [train_id, 7])
    assert (sampler["cfg"], sampler["resolution_shift"], sampler["denoise"]) == (train["cfg"], False, 1.0)
    positive, negative = (p[sampler[k][0]] for k in ("positive", "negative"))
    assert positive["class_type"] == negative["class_type"] == "CLIPTextEncode"
    assert negative["inputs"]["text"] == data["negative_prompt"]
    assert positive["inputs"]["text"] not in training_prompts
    latent = p[sampler["latent_image"][0]]
    assert latent["class_type"] == "EmptyHunyuanLatentVideo"
    size = ("width", "height", "length")
    assert [latent["inputs"][k] for k in size] == [data[k] for k in size]
    [(decode_id, decode)] = _recipe(p, "VAEDecode")
    [(video_id, video)] = _recipe(p, "CreateVideo")
    assert decode["samples"] == [sampler_id, 0] and video["images"] == [decode_id, 0] and video["fps"] == 16.0
    assert [s["video"] for _, s in _recipe(p, "SaveVideo")] == [[video_id, 0]]


def test_the_qwen_image_workflow_follows_its_recipe(mappings):
    """Qwen-Image as ComfyUI's own example loads and samples it (ModelSamplingAuraFlow 3.1, true CFG 2.5 against an
    empty negative), distilled data-free on 40 prompts into a 4-step LoRA and compared with the teacher."""
    p, train_id, train = _loaded_as_comfyuis_example(mappings, "qwen_image_few_step_shortcut.json",
                                                     "ModelSamplingAuraFlow", 3.1, "qwen_image_fp8_e4m3fn.safetensors",
                                                     ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image"),
                                                     "qwen_image_vae.safetensors")

    data, training_prompts = _check_the_teacher_data(p, train_id, steps=30, min_prompts=32)
    assert train["cfg"] == 2.5 and data["negative_prompt"] == ""  # ComfyUI's example: an empty negative
    assert (data["width"], data["height"], data["length"]) == (1024, 1024, 1)
    _check_the_family_recipe(p, train_id, model_shift=3.1, sample_steps=4)
    _check_the_comparison(p, train_id, training_prompts, teacher_steps=30)


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
# The style-stacking workflow's LoRAs are the user's own: a style LoRA, and a shortcut trained on it.
DOWNLOAD_UNCONFIRMED = {"flux-scfm-3step.safetensors", "my_style_lora.safetensors", "flux_shortcut_my_style.safetensors"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_model_file_a_workflow_names_has_a_download_entry(path):
    """As official templates do: the frontend's Missing Models dialog offers these entries for download."""
    folder_of = {name: folder for folder, names in MODEL_FILES.items() for name in names}
    checked, directories = 0, set()
    for node in load(path)["nodes"]:
        entries = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
        for name in [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v in folder_of]:
            if name in DOWNLOAD_UNCONFIRMED:
                continue
            assert name in entries, f"node {node['id']} ({node['type']}) names {name} without a download entry"
            assert entries[name]["directory"] == folder_of[name]
            assert entries[name]["url"].startswith("https://huggingface.co/") and entries[name]["url"].endswith(name)
            checked += 1
            directories.add(folder_of[name])
    # a whole model set: its diffusion model, text encoder(s) and VAE (Flux dev: two text encoders)
    assert {"diffusion_models", "text_encoders", "vae"} <= directories
    assert checked >= (4 if path.name.startswith("flux_") else 3)


# ------------------------------------------------------------------------------------------ run through the executor
class LatentColoursVAE:
    """Stands in for a VAE (a real one is gigabytes): each latent cell's first three channels as a colour, 8 x 8
    pixels per cell, and for a video latent 4 frames per latent frame after the first, as Wan's VAE counts them."""

    def decode(self, latent):
        import torch

        rgb = torch.sigmoid(latent[:, :3].float())
        if rgb.dim() == 5:  # [B, 3, T, h, w] -> [B, (T - 1) * 4 + 1, 8h, 8w, 3]
            rgb = torch.cat([rgb[:, :, :1], rgb[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
            return rgb.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1).permute(0, 2, 3, 4, 1)
        return rgb.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1).permute(0, 2, 3, 1)


class TinyLoaderForTests:
    """Every loader of a workflow run by the executor: the tiny model of the workflow's family, a tiny text encoder
    whose width fits it, and the colour VAE."""
    family = "flux"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "tests"

    def load(self):
        import torch

        with torch.inference_mode():  # as the host's loaders build models
            if self.family == "wan":
                _, patcher = comfy_host.tiny_wan(seed=1)
            elif self.family == "qwen_image":
                _, patcher = comfy_host.tiny_qwen_image(seed=1)
            else:
                _, patcher = comfy_host.tiny_flux(seed=1, vec_in_dim=32)
        return (patcher, comfy_host.tiny_clip(seed=2), LatentColoursVAE())


LOADERS = {"UNETLoader": 0, "CLIPLoader": 1, "DualCLIPLoader": 1, "VAELoader": 2}


def _shrunk(prompt: dict) -> dict:
    """The workflow's prompt at a size a CPU runs in seconds: its loaders one tiny-model node, 64 px, 5 frames
    for video, 2 sampling steps, the first two prompts of each list, 2 training steps; its wiring as it is."""
    host_teacher = comfy_host.pack_module("host.teacher")
    out = {"loader": {"class_type": "TinyLoaderForTests", "inputs": {}}}
    for node_id, node in prompt.items():
        if node["class_type"] in LOADERS:
            continue
        inputs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list) and prompt[value[0]]["class_type"] in LOADERS:
                value = ["loader", LOADERS[prompt[value[0]]["class_type"]]]
            inputs[name] = value
        small = {
            "ShortcutTeacherLatents": dict(width=64, height=64, steps=2, batch_size=2,
                                           length=5 if inputs.get("length", 1) > 1 else 1),
            "EmptyHunyuanLatentVideo": dict(width=64, height=64, length=5),
            "EmptySD3LatentImage": dict(width=64, height=64),
            "TrainShortcut": dict(steps=2, batch_size=2, rank=4, checkpoint_every=0, preview_every=1),
            "ShortcutTrainingOptions": dict(alpha=4.0, teacher_min_steps=8, teacher_max_steps=8),
        }.get(node["class_type"], {})
        for name, value in small.items():
            if not isinstance(inputs.get(name), list):  # a linked input keeps its link
                inputs[name] = value
        for name in ("prompts", "value"):
            if isinstance(inputs.get(name), str) and node["class_type"] in ("ShortcutTeacherLatents",
                                                                            "PrimitiveStringMultiline"):
                inputs[name] = "\n".join(host_teacher.parse_prompts(inputs[name])[:2])
        out[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return out


TEACHER_WORKFLOWS = {"flux_data_free_distill.json": "flux", "wan_t2v_few_step_shortcut.json": "wan",
                     "qwen_image_few_step_shortcut.json": "qwen_image"}


@pytest.mark.parametrize("name", sorted(TEACHER_WORKFLOWS))
def test_a_teacher_data_workflow_runs_through_the_hosts_executor(name, mappings, tmp_path, monkeypatch):
    """The workflow's own wiring and settings run by ComfyUI's executor, only smaller and on a tiny model of its
    family: the teacher's latents (video clips for Wan, one-frame latents for Qwen-Image) train the LoRA, the
    trained model samples, and the files the note promises are written."""
    import execution
    import nodes
    from test_host_executor import RecordingServer

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TinyLoaderForTests", TinyLoaderForTests)
    monkeypatch.setattr(TinyLoaderForTests, "family", TEACHER_WORKFLOWS[name])
    prompt = _shrunk(to_prompt(load(comfy_host.PROJECT_ROOT / "workflows" / name), mappings))
    [train] = [n["inputs"] for n in prompt.values() if n["class_type"] == "TrainShortcut"]
    with comfy_host.host_folders(loras=tmp_path / "loras", output_dir=tmp_path / "output",
                                 temp_dir=tmp_path / "temp"):
        (tmp_path / "loras").mkdir()
        valid, error, outputs, node_errors = _validate(prompt)
        assert (valid, error, node_errors) == (True, None, {})
        executor = execution.PromptExecutor(RecordingServer(), cache_type=execution.CacheType.CLASSIC)
        executor.execute(prompt, "shortcut-flow-workflow-run", {}, outputs)
        assert executor.success, executor.status_messages[-1]
    assert (tmp_path / "loras" / f"{train['save_name']}.safetensors").is_file()
    saved = sorted(p.relative_to(tmp_path / "output").as_posix() for p in (tmp_path / "output").rglob("*.*")
                   if "shortcut_teacher_cache" not in p.parts)
    if TEACHER_WORKFLOWS[name] == "wan":
        import av

        assert saved == ["video/wan_shortcut_4step_00001_.mp4"], saved
        with av.open(str(tmp_path / "output" / saved[0])) as video:  # every frame of the clip, at Wan's rate
            stream = video.streams.video[0]
            assert (stream.frames, stream.width, stream.height, float(stream.average_rate)) == (5, 64, 64, 16.0)
    else:
        assert len(saved) == 2 and all(p.startswith("scfm_compare/") and p.endswith(".png") for p in saved), saved

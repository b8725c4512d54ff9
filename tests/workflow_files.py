"""The example workflows (workflows/*.json, ComfyUI's UI format) read as ComfyUI reads them: the node
classes' widgets in order, and the API prompt the frontend queues for a UI workflow (graphToPrompt).
Shared by the in-process workflow tests and the browser tests, which compare this with the real frontend."""

from __future__ import annotations

import enum
import json
from pathlib import Path

from comfy_host import PROJECT_ROOT

WORKFLOWS = sorted((PROJECT_ROOT / "workflows").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # the browser's own nodes: never queued
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TITLE_H = 30  # LiteGraph draws a node's title bar above its pos

# What the workflows reference, created as empty placeholders for validation.
MODEL_FILES = {
    "diffusion_models": ["flux1-dev.safetensors", "wan2.1_t2v_1.3B_fp16.safetensors",
                         "qwen_image_fp8_e4m3fn.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                      "qwen_2.5_vl_7b_fp8_scaled.safetensors"],
    "vae": ["ae.safetensors", "wan_2.1_vae.safetensors", "qwen_image_vae.safetensors"],
    "loras": ["flux-scfm-3step.safetensors", "my_style_lora.safetensors", "flux_shortcut_my_style.safetensors"],
}
INPUT_SUBFOLDERS = ["shortcut_fewshot"]


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def norm(t):
    """IO enums (V3 and typed V1 nodes) and plain strings alike."""
    return t.value if isinstance(t, enum.Enum) else t


def input_specs(cls) -> list[tuple[str, tuple, str]]:
    """(name, spec, 'required'|'optional') in INPUT_TYPES order."""
    it = cls.INPUT_TYPES()
    return [(name, spec, section) for section in ("required", "optional") for name, spec in it.get(section, {}).items()]


def opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def type_name(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else norm(spec[0])


def is_widget(spec) -> bool:
    return type_name(spec) in WIDGET_TYPES and not opts(spec).get("forceInput")


def has_control(name: str, spec) -> bool:
    """The frontend adds a control_after_generate widget (fixed/randomize/...) after an INT that asks for one,
    and, by legacy convention, after any INT named seed or noise_seed that does not say otherwise."""
    return type_name(spec) == "INT" and opts(spec).get("control_after_generate", name in ("seed", "noise_seed"))


def class_widgets(cls) -> list[tuple[str, bool]]:
    """(widget name, followed by a control value?) in widgets_values order."""
    return [(name, has_control(name, spec)) for name, spec, _ in input_specs(cls) if is_widget(spec)]


def class_outputs(cls) -> list[tuple[str, str]]:
    types = [norm(t) for t in cls.RETURN_TYPES]
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def to_prompt(workflow: dict, mappings: dict) -> dict:
    """The API prompt the frontend queues for a UI workflow (graphToPrompt)."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}

    def source(link_id):
        """[node id, slot] feeding a link, through Reroutes; a PrimitiveNode gives its value instead."""
        _, node_id, slot, *_ = links[link_id]
        node = by_id[node_id]
        while node["type"] == "Reroute":
            _, node_id, slot, *_ = links[node["inputs"][0]["link"]]
            node = by_id[node_id]
        if node["type"] == "PrimitiveNode":
            return node["widgets_values"][0]
        return [str(node_id), slot]

    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        cls = mappings[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, control in class_widgets(cls):
            inputs[name] = values[i]
            i += 2 if control else 1
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                inputs[inp["name"]] = source(inp["link"])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt

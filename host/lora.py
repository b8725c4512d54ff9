"""LoRA files and LORA_MODEL values between the engine and ComfyUI.

The engine names a layer by its module path inside `diffusion_model` (LoraState). ComfyUI names
weights `diffusion_model.<path>.weight`, and its loader also reads the diffusers names of the
authors' Flux files. Loading goes through the host's own pipeline (comfy.sd.load_lora_for_models),
so a file applies here exactly as it would through a stock LoraLoader, but nothing the host
skips is dropped silently.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_base
import comfy.model_patcher
import comfy.sd
import comfy.utils
import comfy.weight_adapter

from ..shortcut_core.adapters import LoraState, LoraWeights, linear_module_names
from ..shortcut_core.lora_file import LoraFileError, LoraMetadata, load_lora, save_lora
from ..shortcut_core.safetensors_io import read_safetensors

HOST_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
_UP, _DOWN, _ALPHA = ".lora_up.weight", ".lora_down.weight", ".alpha"

# (dim, start, length) of a fused weight, as ComfyUI's key maps write offsets.
Offset = tuple[int, int, int]
ExportPart = tuple[str, Optional[Offset], Optional[Callable[[torch.Tensor], torch.Tensor]]]


# ---------------------------------------------------------------------------- ComfyUI's own key style

def host_key_map(lora: LoraState) -> dict[str, str]:
    """{module path: ComfyUI state-dict prefix} for every layer of the LoRA."""
    return {path: HOST_PREFIX + path for path in lora}


def to_lora_model(lora: LoraState) -> dict[str, torch.Tensor]:
    """The host's LORA_MODEL value, keyed as its TrainLoraNode keys one (lora_up / lora_down / alpha)."""
    out: dict[str, torch.Tensor] = {}
    for path, w in lora.items():
        prefix = HOST_PREFIX + path
        out[prefix + _UP] = w.up
        out[prefix + _DOWN] = w.down
        out[prefix + _ALPHA] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return out


def from_lora_model(sd: Mapping[str, torch.Tensor]) -> LoraState:
    """A LORA_MODEL in the host's lora_up / lora_down / alpha style, back as a LoraState."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in sd.items():
        path, kind = _split_host_key(key)
        if path is None:
            foreign.append(key)
        else:
            parts.setdefault(path, {})[kind] = tensor
    if foreign:
        # TrainLoraNode also trains bias / norm diffs (".diff", ".diff_b"); a LoraState cannot
        # carry them, and dropping them would change what the LoRA does.
        raise ValueError(f"LORA_MODEL holds {len(foreign)} entries that are not LoRA layers of the diffusion model "
                         f"(e.g. {foreign[:3]}); only {HOST_PREFIX}<layer>{_UP} / {_DOWN} / {_ALPHA} can be converted")
    lora: LoraState = {}
    for path, p in sorted(parts.items()):
        for kind, suffix in (("up", _UP), ("down", _DOWN)):
            if kind not in p:
                raise ValueError(f"LORA_MODEL layer {path!r} has no {HOST_PREFIX}{path}{suffix}; the layer is incomplete")
        down, up = p["down"], p["up"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"LORA_MODEL layer {path!r} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                             f"which do not form a linear LoRA")
        # No alpha key means scale 1 to the host's loader, i.e. alpha == rank.
        alpha = float(p["alpha"].item()) if "alpha" in p else float(down.shape[0])
        lora[path] = LoraWeights(down, up, alpha)
    return lora


def _split_host_key(key: str) -> tuple[str | None, str | None]:
    if not key.startswith(HOST_PREFIX):
        return None, None
    for suffix, kind in ((_UP, "up"), (_DOWN, "down"), (_ALPHA, "alpha")):
        if key.endswith(suffix) and len(key) > len(HOST_PREFIX) + len(suffix):
            return key[len(HOST_PREFIX):-len(suffix)], kind
    return None, None


def save_host_lora(path: str | os.PathLike, lora: LoraState, metadata: LoraMetadata | None = None) -> None:
    """Write the LoRA atomically in ComfyUI's key style, readable by the stock LoraLoader."""
    save_lora(path, lora, metadata=metadata, key_map=host_key_map(lora), style="kohya", write_alpha=True)


def read_host_lora(path: str | os.PathLike, model, input_name: str = "resume_lora") -> LoraState:
    """A LoRA file in ComfyUI's key style (this pack's files, TrainLoraNode's) as a LoraState on
    `model`'s network, to train on from. Keys naming no linear layer of the model are an error:
    training on from a part of a LoRA would silently drop the rest."""
    network = model.model.diffusion_model
    loaded = load_lora(path, key_map={name: HOST_PREFIX + name for name in linear_module_names(network)})
    if loaded.unmatched:
        shown = ", ".join(loaded.unmatched[:5]) + (", ..." if len(loaded.unmatched) > 5 else "")
        raise LoraFileError(f"{input_name}: {os.fspath(path)!r} has {len(loaded.unmatched)} keys that name no linear "
                            f"layer of this model ({shown}); train on from a LoRA this pack wrote for this model, "
                            f"or load other LoRAs with a LoRA loader before TrainShortcut")
    if not loaded.weights:
        raise LoraFileError(f"{input_name}: {os.fspath(path)!r} holds no LoRA layers")
    return loaded.weights


# ---------------------------------------------------------------------------- the authors' diffusers style

def flux_diffusers_export_map(model) -> dict[str, list[ExportPart]]:
    """{module path in diffusion_model: [(diffusers name, offset, function), ...]} from ComfyUI's own Flux map."""
    if not isinstance(model, comfy.model_base.Flux):
        raise ValueError(f"diffusers Flux LoRA export needs a Flux model (comfy.model_base.Flux); "
                         f"got {type(model).__module__}.{type(model).__name__}")
    # The host's import map {diffusers key: ComfyUI key | (key, offset) | (key, None, function)},
    # inverted, so export agrees with what the host's loader reads by construction.
    table = comfy.utils.flux_to_diffusers(model.model_config.unet_config, output_prefix=HOST_PREFIX)
    out: dict[str, list[ExportPart]] = {}
    for diffusers_key, target in table.items():
        if not diffusers_key.endswith(".weight"):
            continue
        if isinstance(target, str):
            target = (target,)
        host_key, offset, function = (tuple(target) + (None, None))[:3]
        if not host_key.endswith(".weight") or not host_key.startswith(HOST_PREFIX):
            continue  # norm scales and the like: no LoRA lives there
        parts = out.setdefault(host_key[len(HOST_PREFIX):-len(".weight")], [])
        # Newer hosts also read other names for weights that already have one, listed after it
        # (LyCoris `ff.linear_in`, Flux 2 `attn.to_qkv_mlp_proj` for all of linear1, ...): a name
        # over rows an earlier name already covers is such an alias, and the file keeps the first.
        if not any(_rows_overlap(offset, taken) for _, taken, _ in parts):
            parts.append((diffusers_key[:-len(".weight")], offset, function))
    for parts in out.values():
        parts.sort(key=lambda part: (part[1] or (0, 0, 0))[1])
    return out


def save_diffusers_flux(path: str | os.PathLike, lora: LoraState, model, metadata: LoraMetadata | None = None) -> None:
    """Write the LoRA atomically in the authors' diffusers format (transformer.*, lora_A/lora_B, no alpha)."""
    export = flux_diffusers_export_map(model)
    missing = sorted(p for p in lora if p not in export)
    if missing:
        raise ValueError(f"{len(missing)} LoRA layers have no diffusers Flux name, so the diffusers format cannot "
                         f"hold them: {missing}. Save in ComfyUI's format (save_host_lora) instead")
    split: LoraState = {}
    for module_path, w in lora.items():
        parts = export[module_path]
        _check_cover(module_path, parts, w.up.shape[0])
        for name, offset, function in parts:
            up = w.up if offset is None else w.up.narrow(offset[0], offset[1], offset[2])
            if function is not None:
                up = _inverse_of_host_function(module_path, function, up)
            # alpha stays per part: save_lora folds alpha / rank into up when no alpha key is written.
            split[name] = LoraWeights(w.down, up, w.alpha)
    key_map = {name: DIFFUSERS_PREFIX + name for name in split}
    save_lora(path, split, metadata=metadata, key_map=key_map, style="peft", write_alpha=False)


def _rows_overlap(a: Offset | None, b: Offset | None) -> bool:
    """Whether two parts of a weight (None: all of it) share output rows."""
    if a is None or b is None or a[0] != b[0]:
        return True
    return a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def _check_cover(module_path: str, parts: list[ExportPart], rows: int) -> None:
    # flux_to_diffusers assumes mlp_ratio 4 for single blocks' linear1: a fused layer whose parts do
    # not tile its rows exactly would lose (or misplace) part of the LoRA.
    if len(parts) == 1 and parts[0][1] is None:
        return
    start = 0
    for name, offset, _ in parts:
        if offset is None or offset[0] != 0 or offset[1] != start:
            raise ValueError(f"layer {module_path!r}: ComfyUI's diffusers map splits it as "
                             f"{[(n, o) for n, o, _ in parts]}, which does not tile its {rows} output rows")
        start += offset[2]
    if start != rows:
        raise ValueError(f"layer {module_path!r} has {rows} output rows but its diffusers parts cover {start}; "
                         f"this Flux variant does not fit the diffusers layout")


def _inverse_of_host_function(module_path: str, function, up: torch.Tensor) -> torch.Tensor:
    # The host applies `function` to the file's delta; the file must hold its inverse. For
    # swap_scale_shift on an even split that is the function itself: verify, do not assume.
    stored = function(up)
    if stored.shape != up.shape or not torch.equal(function(stored), up):
        raise ValueError(f"layer {module_path!r}: the host's conversion {getattr(function, '__name__', function)} "
                         f"is not its own inverse for shape {tuple(up.shape)}; cannot export it")
    return stored


# ---------------------------------------------------------------------------- loading onto a MODEL

@dataclass
class LoraLoadReport:
    path: str
    patched_weights: int          # model weights that received a patch
    matched_keys: int             # file keys the host read
    unmatched_keys: list[str]     # file keys the host ignored or could not apply
    metadata: LoraMetadata


class _RecordingDict(dict):
    """A state dict that remembers which keys the host's loader read: its matched keys."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def load_lora_onto(patcher: comfy.model_patcher.ModelPatcher, path: str | os.PathLike,
                   strength: float | Callable[[LoraMetadata], float]) -> tuple[comfy.model_patcher.ModelPatcher,
                                                                                LoraLoadReport]:
    """Patch a clone of `patcher` with a LoRA file through the host's own loader; the original is untouched.
    `strength` may be a function of the file's metadata (the strength its recipe recommends)."""
    path = os.fspath(path)
    tensors, raw_metadata = read_safetensors(path, what="LoRA file")
    metadata = LoraMetadata.from_strings(raw_metadata, path=path)
    strength = _checked_strength(strength(metadata) if callable(strength) else strength)

    # The steps of comfy.sd.load_lora_for_models, with the state dict recording what was read.
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    sd = _RecordingDict(comfy.lora_convert.convert_lora(tensors))
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    # Same layer names, other widths (another model of a family, or another architecture that
    # shares a few names): the host would log a shape error at sampling time and skip the layer.
    misfits = _misfitting(patches, patcher.model.state_dict())
    patches = {k: v for k, v in patches.items() if k not in misfits}
    if not patches:
        sample = list(tensors)[:5]
        shown = f"its keys look like {sample} ({len(tensors)} in all)" if tensors else "it holds no tensors"
        raise LoraFileError(f"LoRA file {path!r} matched nothing in this model ({type(patcher.model).__name__}); it "
                            f"was likely made for another architecture: {shown}")

    new = patcher.clone()
    applied = set(new.add_patches(patches, strength))
    refused = _file_keys_of([k for k in patches if k not in applied] + list(misfits), key_map, sd.read)
    unmatched = sorted(set(sd) - sd.read) + refused
    if unmatched:
        logging.warning("LoRA file %s: %d keys were not applied to the model: %s", path, len(unmatched),
                        ", ".join(unmatched))
    report = LoraLoadReport(path=path, patched_weights=len({_weight_key(k) for k in applied}),
                            matched_keys=len(sd.read - set(refused)), unmatched_keys=unmatched, metadata=metadata)
    return new, report


def _misfitting(patches: Mapping, state: Mapping[str, torch.Tensor]) -> list:
    """Patch keys whose LoRA delta (up rows x down columns) does not fit the weight (or its slice) it targets."""
    out = []
    for key, adapter in patches.items():
        if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter) or adapter.weights[3] is not None:
            continue  # other adapter kinds and conv LoRAs: the host checks them when it applies them
        weight = state.get(_weight_key(key))
        if weight is None:
            continue
        shape = list(weight.shape)
        if not isinstance(key, str) and key[1] is not None:
            dim, _, length = key[1]
            shape[dim] = length
        up, down = adapter.weights[0], adapter.weights[1]
        if weight.dim() == 2 and (up.shape[0], down.shape[1]) != tuple(shape):
            out.append(key)
    return out


def _checked_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number (got {strength!r})")
    return float(strength)


def _weight_key(patch_key) -> str:
    # A patch key is the weight's name, or (name, offset[, function]) for part of a fused weight.
    return patch_key if isinstance(patch_key, str) else patch_key[0]


def _file_keys_of(patch_keys, key_map: Mapping[str, object], read: set[str]) -> list[str]:
    """The read file keys behind patches the model refused (their layer prefixes map to those patches)."""
    if not patch_keys:
        return []
    wanted = set(patch_keys)
    prefixes = [prefix for prefix, target in key_map.items() if target in wanted]
    keys = sorted({k for k in read for p in prefixes if k.startswith(p) and k[len(p):][:1] in (".", "_")})
    return keys or [f"<patch for {k!r}>" for k in patch_keys]


def with_lora(model, lora_model: dict, strength: float = 1.0):
    """A clone of the MODEL with a LORA_MODEL applied as weight patches, as the stock LoraModelLoader does."""
    return comfy.sd.load_lora_for_models(model, None, lora_model, strength, 0)[0]

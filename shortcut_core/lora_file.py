"""LoRA files: safetensors with SCFM sampling metadata, in whatever key style the caller maps to.

Inside the engine a LoRA is {module path: LoraWeights}. A file names each layer by a prefix
that the caller's `key_map` {module path: file prefix} chooses (identity when omitted): the node
pack's host adapter supplies ComfyUI's `diffusion_model.<path>` names or the diffusers names of
the authors' files. Each layer is stored as `<prefix>.lora_A.weight` (down), `<prefix>.lora_B.weight`
(up) and, unless disabled, `<prefix>.alpha`; kohya's lora_down/lora_up names are read too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .adapters import LoraState, LoraWeights
from .safetensors_io import SafetensorsFileError, read_safetensors, write_safetensors_atomic

META_PREFIX = "shortcut_flow."
FORMAT_VERSION = "1"
SUFFIX_STYLES = {"peft": ("lora_A.weight", "lora_B.weight"), "kohya": ("lora_down.weight", "lora_up.weight")}
_DOWN = {s[0]: style for style, s in SUFFIX_STYLES.items()}
_UP = {s[1]: style for style, s in SUFFIX_STYLES.items()}


class LoraFileError(SafetensorsFileError):
    pass


@dataclass
class LoraMetadata:
    """What a shortcut LoRA recommends for sampling, and how it was trained. None: not recorded."""
    steps: int | None = None
    shift: float | None = None
    strength: float | None = None
    config: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None  # Calibration.to_dict(): how steps / shift / strength were chosen
    extra: dict[str, str] = field(default_factory=dict)  # any other metadata, kept verbatim

    def to_strings(self) -> dict[str, str]:
        out = dict(self.extra)
        out[META_PREFIX + "format"] = FORMAT_VERSION
        if self.steps is not None:
            out[META_PREFIX + "sample_steps"] = str(int(self.steps))
        if self.shift is not None:
            out[META_PREFIX + "sample_shift"] = repr(float(self.shift))
        if self.strength is not None:
            out[META_PREFIX + "sample_strength"] = repr(float(self.strength))
        if self.config is not None:
            out[META_PREFIX + "config"] = json.dumps(self.config, sort_keys=True)
        if self.calibration is not None:
            out[META_PREFIX + "calibration"] = json.dumps(self.calibration, sort_keys=True)
        return out

    @classmethod
    def from_strings(cls, raw: Mapping[str, str], *, path: str = "") -> "LoraMetadata":
        extra = {k: v for k, v in raw.items() if not k.startswith(META_PREFIX)}
        ours = {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX)}
        try:
            return cls(steps=int(ours["sample_steps"]) if "sample_steps" in ours else None,
                       shift=float(ours["sample_shift"]) if "sample_shift" in ours else None,
                       strength=float(ours["sample_strength"]) if "sample_strength" in ours else None,
                       config=json.loads(ours["config"]) if "config" in ours else None,
                       calibration=json.loads(ours["calibration"]) if "calibration" in ours else None,
                       extra=extra)
        except (ValueError, json.JSONDecodeError) as e:
            raise LoraFileError(f"LoRA file {path!r} has unreadable shortcut_flow metadata ({e}); "
                                f"the weights may still be usable with explicit steps/shift/strength") from e


@dataclass
class LoraFile:
    weights: LoraState
    metadata: LoraMetadata
    unmatched: list[str]  # file keys that no entry of key_map claimed


def save_lora(path: str | os.PathLike, weights: Mapping[str, LoraWeights], *, metadata: LoraMetadata | None = None,
              key_map: Mapping[str, str] | None = None, style: str = "peft", write_alpha: bool = True,
              dtype: torch.dtype | None = None) -> None:
    """Write a LoRA atomically. Without an alpha key readers assume alpha == rank, so alpha is
    then folded into `up` (the function is kept; the tensors change by that factor)."""
    if style not in SUFFIX_STYLES:
        raise ValueError(f"style must be one of {sorted(SUFFIX_STYLES)} (got {style!r})")
    down_suffix, up_suffix = SUFFIX_STYLES[style]
    tensors: dict[str, torch.Tensor] = {}
    for module_path, w in weights.items():
        if key_map is not None and module_path not in key_map:
            raise KeyError(f"key_map has no file name for layer {module_path!r}")
        prefix = key_map[module_path] if key_map is not None else module_path
        down, up = w.down, w.up
        if not write_alpha and w.alpha != w.rank:
            up = (up.to(torch.float64) * (w.alpha / w.rank)).to(up.dtype)
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        if f"{prefix}.{down_suffix}" in tensors:
            raise KeyError(f"key_map sends two layers to the same file name {prefix!r}")
        tensors[f"{prefix}.{down_suffix}"] = down
        tensors[f"{prefix}.{up_suffix}"] = up
        if write_alpha:
            tensors[f"{prefix}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    write_safetensors_atomic(path, tensors, (metadata or LoraMetadata()).to_strings())


def load_lora(path: str | os.PathLike, *, key_map: Mapping[str, str] | None = None) -> LoraFile:
    """Read a LoRA file; key_map is {module path: file prefix} as for save_lora.

    Keys whose prefix key_map does not name are returned in `unmatched`, never dropped silently.
    """
    path = os.fspath(path)
    tensors, raw_meta = read_safetensors(path, what="LoRA file")
    to_module: dict[str, str] | None = None
    if key_map is not None:
        to_module = {}
        for module_path, prefix in key_map.items():
            if prefix in to_module:
                raise KeyError(f"key_map sends layers {to_module[prefix]!r} and {module_path!r} to one file name {prefix!r}")
            to_module[prefix] = module_path

    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    alpha_keys: dict[str, str] = {}
    unmatched: list[str] = []
    for key, tensor in tensors.items():
        prefix, kind = _split_key(key)
        module_path = prefix if to_module is None else to_module.get(prefix) if prefix is not None else None
        if module_path is None:
            unmatched.append(key)
        elif kind == "down":
            downs[module_path] = tensor
        elif kind == "up":
            ups[module_path] = tensor
        else:
            alphas[module_path] = float(tensor.item())
            alpha_keys[module_path] = key

    weights: LoraState = {}
    for module_path in sorted(set(downs) | set(ups)):
        if module_path not in downs or module_path not in ups:
            half = "down (lora_A)" if module_path not in downs else "up (lora_B)"
            raise LoraFileError(f"LoRA file {path!r}: layer {module_path!r} has no {half} weight; the file is incomplete")
        down, up = downs[module_path], ups[module_path]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraFileError(f"LoRA file {path!r}: layer {module_path!r} has down {tuple(down.shape)} and up "
                                f"{tuple(up.shape)}, which do not form a linear LoRA")
        weights[module_path] = LoraWeights(down, up, alphas.get(module_path, float(down.shape[0])))
    unmatched += [alpha_keys[m] for m in alphas if m not in weights]
    return LoraFile(weights=weights, metadata=LoraMetadata.from_strings(raw_meta, path=path), unmatched=sorted(unmatched))


def _split_key(key: str) -> tuple[str | None, str | None]:
    for suffix in _DOWN:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], "down"
    for suffix in _UP:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], "up"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return None, None

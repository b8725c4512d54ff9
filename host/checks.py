"""Input checks: what the pack refuses before any work starts, with a message that names the input and says
what to do. Models that are no flow models, one expert of a two-expert model, latents of the wrong kind or
size, and what newer hosts do that the trainer cannot follow."""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import torch

import comfy.model_base
import comfy.model_sampling
import folder_paths


class HostInputError(ValueError):
    """A node input the pack cannot use; the message names the input and says what to do."""


# Node inputs checked against the node's own INPUT_TYPES before any work starts. ComfyUI checks widget values when a
# prompt is queued, but not values that arrive through links (an INT from another node) or from scripts calling the
# node: every number, flag and text is checked here once more, and the error names the input and its allowed range.
def _problem(name: str, value: Any, kind: Any, options: dict) -> str | None:
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}: expected a whole number, got {value!r}"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"{name}: expected a finite number, got {value!r}"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{name}: expected true or false, got {value!r}"
        return None
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{name}: expected text, got {value!r}"
    else:
        return None  # choices (files: the node says which folder), MODEL, LATENT, ...: the node checks them
    lo, hi = options.get("min"), options.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return f"{name}: {value!r} is out of range; use a value from {lo} to {hi}"
    return None


def check_inputs(input_types: dict, values: dict[str, Any]) -> None:
    for section in ("required", "optional"):
        for name, (kind, *rest) in input_types.get(section, {}).items():
            if name not in values or (section == "optional" and values[name] is None):
                continue
            problem = _problem(name, values[name], kind, rest[0] if rest else {})
            if problem:
                raise ValueError(problem + ".")


def require_flow_model(model, input_name: str = "model") -> None:
    """Refuse models that do not predict a flow velocity: SD1.5 / SDXL (eps, v-prediction), and the
    CONST subclasses of newer hosts whose output is not one (IMG_TO_IMG_FLOW predicts x0,
    IMG_TO_IMG_VELOCITY a whole jump x - output)."""
    sampling = model.get_model_object("model_sampling")
    # the prediction type is the first of the host's comfy.model_sampling classes in the MRO
    kinds = [c.__name__ for c in type(sampling).__mro__ if c.__module__ == comfy.model_sampling.__name__]
    kind = next((k for k in kinds if k.isupper() or k in ("EDM", "IMG_TO_IMG")), kinds[0] if kinds else "?")
    if isinstance(sampling, comfy.model_sampling.CONST) and _denoises_as_velocity(sampling):
        return
    raise HostInputError(
        f"{input_name}: this {type(model.model).__name__} model predicts {kind}, not a flow velocity (CONST, "
        f"denoised = x - t * v). Shortcut LoRAs work on flow-matching models: Flux, SD3/3.5, Chroma, Lumina, "
        f"Qwen-Image, ... (check any ModelSampling node before this one)")


def _denoises_as_velocity(sampling) -> bool:
    """Whether the host turns the network output v into denoised = x - t * v, CONST's own rule: asked of
    the model's sampling object itself, so a subclass that overrides it is caught whatever its name."""
    x, v, t = torch.tensor([[0.25, -1.0]]), torch.tensor([[1.5, 0.5]]), torch.tensor([0.5])
    try:
        denoised = sampling.calculate_denoised(t, v, x)
    except Exception:  # noqa: BLE001 - any failure means it is not the rule we rely on
        return False
    return isinstance(denoised, torch.Tensor) and torch.allclose(denoised.float(), x - t * v)


# Models that cannot be shortcut by one LoRA: Wan 2.2 A14B is two experts (high noise, then low noise) that the
# host loads as two Wan 2.1-class models and its workflows switch between by step (KSamplerAdvanced): a LoRA on
# one expert learns jumps that end where the other expert takes over, not a shortcut of the pair. The host cannot
# tell an expert from a Wan 2.1 14B by its weights, so the file names the graph loads are read.
EXPERT_PAIR_FILES = re.compile(r"wan[-_ .]?2[-_ .]?2.*(a14b|(high|low)[-_ ]?noise)", re.IGNORECASE)

# the host's model-file extensions, and GGUF (the loaders of the ComfyUI-GGUF pack)
MODEL_FILE_EXTENSIONS = (*sorted(folder_paths.supported_pt_extensions), ".gguf")


def upstream_files(prompt: dict | None, node_id: str | None, input_name: str = "model") -> list[str]:
    """The file names a node's MODEL was loaded from, read off the executing prompt: the model-file widgets of the
    nodes up its chain of "model" inputs (loaders, LoRA loaders, ModelSampling and other model patches)."""
    if not prompt or node_id is None or str(node_id) not in prompt:
        return []
    names: list[str] = []
    seen: set[str] = set()
    link = prompt[str(node_id)].get("inputs", {}).get(input_name)
    while isinstance(link, list) and len(link) == 2 and str(link[0]) in prompt and str(link[0]) not in seen:
        seen.add(str(link[0]))
        inputs = prompt[str(link[0])].get("inputs", {})
        names += [v for v in inputs.values() if isinstance(v, str) and v.lower().endswith(MODEL_FILE_EXTENSIONS)]
        link = inputs.get("model")
    return names


def require_single_model(model, files: Sequence[str], input_name: str = "model") -> None:
    """Refuse one expert of a model the host samples as two (Wan 2.2 A14B), by the files the graph loads."""
    if not isinstance(model.model, getattr(comfy.model_base, "WAN21", ())) or isinstance(
            model.model, getattr(comfy.model_base, "WAN22", ())):
        return
    expert = next((f for f in files if EXPERT_PAIR_FILES.search(os.path.basename(f))), None)
    if expert is not None:
        raise HostInputError(
            f"{input_name}: {expert} is one of Wan 2.2 A14B's two experts (high noise, then low noise, switched by "
            f"step). A shortcut jumps across the whole schedule, which no single expert covers, so a LoRA on one "
            f"expert is not a shortcut of the pair. Use Wan 2.2 5B (wan2.2_ti2v_5B) or Wan 2.1 (1.3B / 14B) instead")


def require_latent_dimensions(model, latents: torch.Tensor, input_name: str = "latents") -> None:
    """Latents of the kind the model makes: images [B, C, H, W] or video [B, C, T, H, W] (its latent format), after
    the host's own fix (comfy.sample.fix_empty_latent_channels: an image latent into a video model is one frame)."""
    expected = getattr(model.get_model_object("latent_format"), "latent_dimensions", 2)
    got = latents.dim() - 2
    if got != expected:
        kind = {2: "images [B, C, H, W]", 3: "video [B, C, T, H, W]"}
        raise HostInputError(f"{input_name}: this {type(model.model).__name__} model takes "
                             f"{kind.get(expected, f'{expected}-D latents')}, got shape {tuple(latents.shape)}; "
                             f"encode with the model's own VAE or make the empty latent with its own node")


# What newer hosts do differently (read in ComfyUI 0.38.1's source; 0.3.64, tested here, has none of it).
def require_trainable(model, input_name: str = "model") -> None:
    """Refuse what the trainer cannot follow: a noise scale other than 1 (the host's ModelNoiseScale:
    its samplers scale the noise, the SCFM objective's x_t does not), and MultiGPU clones (the host
    runs those forwards under no_grad: no gradient would reach the LoRA)."""
    scale = getattr(model.get_model_object("model_sampling"), "noise_scale", 1.0)
    if not math.isclose(float(scale), 1.0):
        raise HostInputError(f"{input_name}: its noise scale is {scale} (a ModelNoiseScale node); SCFM trains at "
                             f"noise scale 1: train on the model without that node and add it after training")
    if "multigpu_clones" in model.model_options:
        raise HostInputError(f"{input_name}: has MultiGPU clones, whose forwards the host runs without gradients; "
                             f"TrainShortcut trains on one device: connect the model before the MultiGPU node")


_EMPTY_DATASET = "latents: the dataset is empty; connect at least one latent (VAE Encode of an image)"


def one_size_batch(samples) -> torch.Tensor:
    """A LATENT's samples as one batch: a tensor, or a list of latents (bucketed datasets) of one size."""
    if isinstance(samples, (list, tuple)):
        if not samples:
            raise HostInputError(_EMPTY_DATASET)
        # entries are batches [B, C, (T,) H, W], as the host's dataset nodes make them, or single [C, H, W] images
        batches = [s if s.dim() >= 4 else s[None] for s in samples]
        sizes = sorted({tuple(s.shape[2:]) for s in batches})
        if len(sizes) > 1:
            raise HostInputError(f"latents: the latents have {len(sizes)} sizes {sizes}; resize the images to one size "
                                 f"(e.g. the dataset node's resize option) or train one size per run")
        samples = torch.cat(batches)
    if not isinstance(samples, torch.Tensor) or samples.dim() < 3:
        raise HostInputError(f"latents: expected a LATENT batch, got {type(samples).__name__} "
                             f"{tuple(getattr(samples, 'shape', ()))}")
    if samples.shape[0] == 0:
        raise HostInputError(_EMPTY_DATASET)
    return samples

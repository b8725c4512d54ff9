"""Latents a model samples from a list of prompts, each with its own encoded conditioning, cached on disk.

Text goes through the host's own encoding (CLIP.tokenize +
encode_from_tokens_scheduled), images through the host's own sampler (comfy.sample.sample: the teacher's
euler / simple, as KSampler; or comfy.sample.sample_custom with the SCFM schedule for a shortcut model),
with one progress bar over all images, the host's latent previews and Cancel. Each image is stored as soon
as it is made, under a key of everything that made it (fingerprints of the model's weights and patches and
of the text encoder, its prompt, its place among the prompt's images, every setting): a re-run makes only
what is missing, a Cancel loses only the batch in flight, a damaged file is made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import node_helpers

from ..shortcut_core.sample_cache import SampleCache, fingerprint
from .checks import HostInputError, require_flow_model
from .sampling import shortcut_euler, shortcut_sigmas

log = logging.getLogger("shortcut-flow")

CACHE_FOLDER = "shortcut_teacher_cache"  # under ComfyUI's output folder, which (unlike temp) outlives a restart
TEACHER_SCHEDULE = "teacher: euler, simple"
SHORTCUT_SCHEDULE = "shortcut: euler, SCFM shift"
SCHEDULES = (TEACHER_SCHEDULE, SHORTCUT_SCHEDULE)
# Pixels per latent cell and frames per latent frame of each latent format's VAE, as the host's own empty-latent
# nodes make them (EmptySD3LatentImage, EmptyHunyuanLatentVideo: 8 and 4; Wan22ImageToVideoLatent: 16 and 4;
# EmptyLTXVLatentVideo: 32 and 8).
VAE_COMPRESSION = {"Wan22": (16, 4), "LTXV": (32, 8)}
DEFAULT_COMPRESSION = (8, 4)


def compression(latent_format) -> tuple[int, int]:
    """(pixels per latent cell, frames per latent frame) of a latent format."""
    return VAE_COMPRESSION.get(type(latent_format).__name__, DEFAULT_COMPRESSION)


def latent_shape(latent_format, width: int, height: int, length: int) -> tuple[int, ...]:
    """One empty latent: [C, H, W], or [C, T, H, W] for formats with a time axis (an image model with one, as
    Qwen-Image, gets one frame), as the host's empty-latent nodes make it."""
    spatial, temporal = compression(latent_format)
    size = (height // spatial, width // spatial)
    if getattr(latent_format, "latent_dimensions", 2) == 3:
        return (latent_format.latent_channels, (length - 1) // temporal + 1, *size)
    return (latent_format.latent_channels, *size)


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are ignored."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@dataclass(frozen=True)
class SamplingSettings:
    width: int
    height: int
    steps: int
    guidance: float
    cfg: float
    negative_prompt: str
    seed: int
    schedule: str
    shift: float
    length: int = 1  # frames, for video models


def sampling_settings(values: Mapping[str, Any]) -> SamplingSettings:
    """The settings from Shortcut Teacher Latents' widget values (the node's and the headless command's): the shift
    counts on the shortcut schedule alone."""
    return SamplingSettings(width=values["width"], height=values["height"], steps=values["steps"],
                            guidance=values["guidance"], cfg=values["cfg"], negative_prompt=values["negative_prompt"],
                            seed=values["seed"], schedule=values["schedule"],
                            shift=values["shift"] if values["schedule"] == SHORTCUT_SCHEDULE else 0.0,
                            length=values.get("length", 1))


def _settings_key(settings: SamplingSettings) -> dict:
    """The settings as the cache keys them; one frame is keyed as before there were frames (caches stay valid)."""
    key = asdict(settings)
    if key["length"] == 1:
        del key["length"]
    return key


def model_fingerprint(model) -> str:
    """The diffusion model's weights, its patches (LoRAs and their strengths) and the sampling object it
    runs with (a ModelSampling node's shift)."""
    parts: list[Any] = [type(model.model).__name__]
    parts += list(model.model.diffusion_model.state_dict().items())
    for key in sorted(model.patches, key=str):
        for patch in model.patches[key]:
            strength, adapter, strength_model = patch[0], patch[1], patch[2]
            tensors = getattr(adapter, "weights", adapter)
            tensors = tensors if isinstance(tensors, (list, tuple)) else [tensors]
            parts += [str(key), strength, strength_model] + [t for t in tensors if isinstance(t, torch.Tensor)]
    sampling = model.get_model_object("model_sampling")
    parts += [type(sampling).__name__] + list(sampling.state_dict().items())
    parts.append(sorted(model.model_options))
    return fingerprint(parts)


def clip_fingerprint(clip) -> str:
    parts: list[Any] = [type(clip.cond_stage_model).__name__, type(clip.tokenizer).__name__, clip.layer_idx]
    parts += list(clip.cond_stage_model.state_dict().items())
    for key in sorted(clip.patcher.patches, key=str):
        parts += [str(key)] + [t for p in clip.patcher.patches[key] for t in _tensors(p)]
    return fingerprint(parts)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [t for t in _tensors(getattr(value, "weights", ())) if isinstance(t, torch.Tensor)]


def image_seed(seed: int, prompt: str, index: int) -> int:
    """The noise seed of the index-th image of a prompt: tied to the prompt's text, not its line, so that
    adding, removing or reordering prompts leaves every other image (and its cache entry) as it was."""
    digest = hashlib.sha256(f"{seed}\0{prompt}\0{index}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def _conditioning_to_tensors(conditioning: list, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A CONDITIONING as flat tensors + JSON; None when some value is neither (then it is not cached)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: list[dict[str, Any]] = []
    for i, (cond, options) in enumerate(conditioning):
        tensors[f"{prefix}{i}.cond"] = cond
        values: dict[str, Any] = {}
        for key, value in options.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{i}.{key}"] = value
            else:
                try:
                    json.dumps(value)
                except TypeError:
                    return None
                values[key] = value
        plain.append(values)
    return tensors, {"entries": plain}


def _conditioning_from_tensors(tensors: dict[str, torch.Tensor], plain: dict[str, Any], prefix: str) -> list:
    out = []
    for i, values in enumerate(plain["entries"]):
        options = dict(values)
        start = f"{prefix}{i}."
        for key, value in tensors.items():
            if key.startswith(start) and key != start + "cond":
                options[key[len(start):]] = value
        out.append([tensors[start + "cond"], options])
    return out


class PromptLatents:
    """Makes (or reads back) the images of a prompt list; see the module docstring."""

    def __init__(self, model, clip, settings: SamplingSettings, cache: bool):
        require_flow_model(model)
        self.model, self.clip, self.settings = model, clip, settings
        self.cache = SampleCache(folder_paths.get_output_directory() + "/" + CACHE_FOLDER) if cache else None
        self._prefix: str | None = None
        self._encoded: dict[str, list] = {}

    def key_prefix(self) -> str:
        if self._prefix is None:
            self._prefix = fingerprint([model_fingerprint(self.model), clip_fingerprint(self.clip),
                                        _settings_key(self.settings)])
        return self._prefix

    def encode(self, text: str, guidance: float | None = None) -> list:
        if text not in self._encoded:
            self._encoded[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        conditioning = self._encoded[text]
        if guidance is not None:  # Flux's distilled guidance; a model without that input ignores it
            conditioning = node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})
        return conditioning

    def make(self, prompts: list[str], per_prompt: int, batch_size: int):
        """(latents [N, C, H, W], positive list, negative list), N = len(prompts) * per_prompt, in order."""
        jobs = [(prompt, j) for prompt in prompts for j in range(per_prompt)]
        found: dict[tuple[str, int], tuple] = {}
        if self.cache is not None:
            for job in jobs:
                entry = self._read(job)
                if entry is not None:
                    found[job] = entry
        missing = [job for job in jobs if job not in found]
        if missing:
            log.info("Shortcut Teacher Latents: %d of %d images cached, sampling %d", len(found), len(jobs),
                     len(missing))
            found.update(self._sample(missing, batch_size))
        latents = torch.cat([found[job][0] for job in jobs])
        positive = [entry for job in jobs for entry in found[job][1]]
        negative = [entry for job in jobs for entry in found[job][2]]
        return latents, positive, negative

    def _key(self, job: tuple[str, int]) -> str:
        return fingerprint([self.key_prefix(), job[0], job[1]])

    def _read(self, job):
        entry = self.cache.get(self._key(job))
        if entry is None:
            return None
        tensors, metadata = entry
        try:
            plain = json.loads(metadata["shortcut_flow.conditioning"])
            return (tensors["latent"], _conditioning_from_tensors(tensors, plain["positive"], "pos"),
                    _conditioning_from_tensors(tensors, plain["negative"], "neg"))
        except (KeyError, ValueError, TypeError) as e:  # written by another version, or damaged
            log.warning("shortcut-flow: cached sample %s is incomplete (%s); it is made again", self._key(job), e)
            return None

    def _write(self, job, latent: torch.Tensor, positive: list, negative: list) -> None:
        pos, neg = _conditioning_to_tensors(positive, "pos"), _conditioning_to_tensors(negative, "neg")
        if pos is None or neg is None:
            return  # conditioning values that are no tensors and no JSON: this image is not cached
        tensors = {"latent": latent, **pos[0], **neg[0]}
        self.cache.put(self._key(job), tensors,
                       {"shortcut_flow.conditioning": json.dumps({"positive": pos[1], "negative": neg[1]})})

    def _sample(self, jobs: list[tuple[str, int]], batch_size: int) -> dict:
        s, model = self.settings, self.model
        latent_format = model.model.latent_format
        shape = latent_shape(latent_format, s.width, s.height, s.length)
        negative = self.encode(s.negative_prompt)
        total = len(jobs) * s.steps
        bar = comfy.utils.ProgressBar(total)
        previewer = latent_preview.get_previewer(model.load_device, latent_format)
        done, out = 0, {}
        by_prompt: dict[str, list[tuple[str, int]]] = {}
        for job in jobs:
            by_prompt.setdefault(job[0], []).append(job)
        for prompt, prompt_jobs in by_prompt.items():
            positive = self.encode(prompt, s.guidance)
            for start in range(0, len(prompt_jobs), batch_size):
                batch = prompt_jobs[start:start + batch_size]
                seeds = [image_seed(s.seed, prompt, j) for _, j in batch]
                noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
                                   for seed in seeds])
                empty = torch.zeros_like(noise)

                def callback(step, x0, x, steps, offset=done):
                    preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
                    bar.update_absolute(offset + (step + 1) * len(batch), total, preview)
                    comfy.model_management.throw_exception_if_processing_interrupted()

                samples = self._run_sampler(noise, empty, positive, negative, seeds[0], callback)
                done += s.steps * len(batch)
                for (job, latent) in zip(batch, samples.split(1)):
                    latent = latent.to(comfy.model_management.intermediate_device()).float()
                    out[job] = (latent, positive, negative)
                    if self.cache is not None:
                        self._write(job, latent, positive, negative)
        return out

    def _run_sampler(self, noise, latent, positive, negative, seed: int, callback) -> torch.Tensor:
        s = self.settings
        if s.schedule == TEACHER_SCHEDULE:
            return comfy.sample.sample(self.model, noise, s.steps, s.cfg, "euler", "simple", positive, negative,
                                       latent, callback=callback, disable_pbar=True, seed=seed)
        sigmas = shortcut_sigmas(s.steps, s.shift)
        return comfy.sample.sample_custom(self.model, noise, s.cfg, comfy.samplers.KSAMPLER(shortcut_euler), sigmas,
                                          positive, negative, latent, callback=callback, disable_pbar=True, seed=seed)


def check_settings(prompts: list[str], settings: SamplingSettings, latent_format=None) -> None:
    if not prompts:
        raise HostInputError("prompts: no prompt; write one prompt per line (blank lines and # comments are "
                             "ignored)")
    spatial, temporal = compression(latent_format)
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value % (2 * spatial):
            raise HostInputError(f"{name}: {value} is not a multiple of {2 * spatial}; this model's latents are "
                                 f"patched in 2x2 cells of {spatial} pixels")
    video = getattr(latent_format, "latent_dimensions", 2) == 3
    if settings.length != 1 and not video:
        raise HostInputError(f"length: {settings.length} frames, but this model makes images; set length to 1")
    if (settings.length - 1) % temporal:
        raise HostInputError(f"length: {settings.length} frames; this video model takes {temporal}k + 1 frames "
                             f"(1, {1 + temporal}, {1 + 2 * temporal}, ...), as its empty-latent node counts them")
    if settings.schedule not in SCHEDULES:
        raise HostInputError(f"schedule: {settings.schedule!r}; one of {list(SCHEDULES)}")

"""The host adapter: what the engine needs from ComfyUI, through ComfyUI's own plumbing.

With host_lora.py (LoRA keys and files) this is the one place that knows ComfyUI. It turns a
MODEL (ModelPatcher) plus CONDITIONING into the engine's velocity callable `v = f(x, t, ...)`
for any model whose model_sampling is flow (CONST): Flux dev/schnell/Kontext, SD3/3.5, Chroma,
... The host's CFGGuider loads the model, encodes the conditioning for it (pooled vectors, Flux
guidance, reference latents) and sets up model patches; its `sampling_function` gives the
denoised estimate x - t * v exactly as its own samplers see it, true CFG included, and the
velocity is read back from it in float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview

from ..shortcut_core.calibration import Calibration
from ..shortcut_core.adapters import lora_target_names
from ..shortcut_core.config import SCHEDULE_KNOBS, ShortcutConfig, schedule_around
from ..shortcut_core.data_parallel import DataParallel
from ..shortcut_core.memory_plan import (GB, MemoryPlan, ModelShape, TrainingShape, lora_fan, plan_training,
                                         suggestions)
from ..shortcut_core.sampling import sample_euler
from ..shortcut_core.schedules import resolution_shift, shifted_schedule
from ..shortcut_core.trainer import ShortcutTrainer, StepReport, TrainResult
from . import host_preview

log = logging.getLogger("shortcut-flow")


class HostInputError(ValueError):
    """A node input the pack cannot use; the message names the input and says what to do."""


# ---------------------------------------------------------------------------------------------- models
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


# ---------------------------------------------------------------------------------------------- families
# ModelSamplingFlux's shift is Flux's mu: the model samples at e^mu. 1.15 is the host's Flux default (and what its
# ModelSamplingFlux node gives at 1024 px): the shift the paper's recipe (draw 2.5-4.5, sample 3.25) was tuned at.
FLUX_MU = 1.15

# True CFG each family is sampled with (the "auto" cfg when a negative is connected): ComfyUI's example workflows
# for each family, SD3.5 the SCFM authors' recipe (3.5, empty negative), Wan the Wan authors' text-to-video default
# (generate.py's sample_guide_scale 5; ComfyUI's example uses 6). Families not named here (Flux dev and HunyuanVideo
# take distilled guidance instead) run at 1.0.
FAMILY_CFG = {"SD3": 3.5, "AuraFlow": 3.5, "HiDream": 5.0, "WAN21": 5.0, "WAN22": 5.0, "QwenImage": 2.5,
              "Chroma": 4.0, "Lumina2": 4.0, "LTXV": 3.0}

# Models that cannot be shortcut by one LoRA: Wan 2.2 A14B is two experts (high noise, then low noise) that the
# host loads as two Wan 2.1-class models and its workflows switch between by step (KSamplerAdvanced): a LoRA on
# one expert learns jumps that end where the other expert takes over, not a shortcut of the pair. The host cannot
# tell an expert from a Wan 2.1 14B by its weights, so the file names the graph loads are read.
EXPERT_PAIR_FILES = re.compile(r"wan[-_ .]?2[-_ .]?2.*(a14b|(high|low)[-_ ]?noise)", re.IGNORECASE)


@dataclass(frozen=True)
class FamilyRecipe:
    """The SCFM recipe for the model a user connects, where the paper's Flux recipe does not fit it as is."""
    family: str                   # the host's model class (Flux, SD3, WAN21, QwenImage, ...)
    model_shift: float            # the shift the model samples at, after any ModelSampling node
    schedule: dict[str, float]    # shift_min, shift_max, resolution_shift_prob, sample_shift
    guidance_draw: bool           # a distilled-guidance input the trainer draws per item (Flux dev, HunyuanVideo)
    cfg: float                    # true CFG the family is sampled with (1.0: none)

    def text(self, cfg: float) -> str:
        """The recipe as the node shows it, for a run at true CFG `cfg`."""
        s = self.schedule
        return (f"{self.family} recipe: training shifts {s['shift_min']:.3g}-{s['shift_max']:.3g}"
                + (f" (resolution shift {s['resolution_shift_prob']:.0%})" if s["resolution_shift_prob"] else "")
                + f", sampling shift {s['sample_shift']:.3g}, "
                + ("guidance drawn per item, " if self.guidance_draw else "")
                + f"cfg {cfg:g}" + ("" if cfg != 1.0 or self.cfg == 1.0 else
                                    f" ({self.family} samples with true CFG {self.cfg:g}: connect a negative, e.g. an "
                                    f"empty prompt, to distil the guided model)"))


def family_recipe(model) -> FamilyRecipe:
    """The recipe for a MODEL, from what the host knows of it: its model class, its sampling object (a ModelSampling
    node before this one counts) and its network's guidance input. Flux sampled at its own shift gets the paper's
    recipe unchanged; any other shift gets the paper's draw scaled to it (config.schedule_around)."""
    sampling = model.get_model_object("model_sampling")
    family = type(model.model).__name__
    flux_like = isinstance(sampling, comfy.model_sampling.ModelSamplingFlux)
    raw = float(getattr(sampling, "shift", 1.0))
    shift = math.exp(raw) if flux_like else raw
    if flux_like and math.isclose(raw, FLUX_MU):
        paper = ShortcutConfig()
        schedule = {k: getattr(paper, k) for k in SCHEDULE_KNOBS}
    else:
        schedule = schedule_around(shift)
    cfg = next((FAMILY_CFG[c.__name__] for c in type(model.model).__mro__ if c.__name__ in FAMILY_CFG), 1.0)
    return FamilyRecipe(family=family, model_shift=shift, schedule=schedule,
                        guidance_draw=distilled_guidance(model.model.diffusion_model), cfg=cfg)


def distilled_guidance(network: torch.nn.Module) -> bool:
    """Whether the network embeds a guidance input (Flux dev, HunyuanVideo): the trainer draws it per item. A model
    may still pass one that nothing embeds (Chroma's model passes 0; schnell's guidance_in is an Identity)."""
    guidance_in = getattr(network, "guidance_in", None)
    return guidance_in is not None and not isinstance(guidance_in, torch.nn.Identity)


def resolved_cfg(recipe: FamilyRecipe, cfg: float, negative) -> float:
    """cfg 0 means the family's: its true CFG when a negative is connected, else 1 (the positive alone)."""
    if cfg > 0:
        return float(cfg)
    return recipe.cfg if negative is not None else 1.0


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


def repeated_blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The network's transformer blocks (Flux: double + single blocks, MMDiT: joint blocks), for
    gradient checkpointing: the members of its top-level ModuleLists."""
    blocks: list[torch.nn.Module] = []
    for child in network.children():
        if isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
    return blocks


def token_count(model, latent_shape: Sequence[int]) -> int:
    """Image (and time) tokens the network makes of one latent [C, (T,) H, W]: each dimension padded to the
    network's patch and divided by it, by each family's own patchify: Flux, Chroma and SD3 patch 2 x 2 over H, W
    (comfy/ldm/flux/model.py and chroma/model.py pad to the patch; mmdit.py PatchEmbed); Qwen-Image and Lumina 2
    2 x 2 over H, W (qwen_image/model.py process_img, lumina/model.py patchify_and_embed; Qwen's one frame is no
    axis of its own); Wan and HunyuanVideo (1, 2, 2) over T, H, W (their patch_embedding / img_in Conv3d); LTXV
    (1, 1, 1) (lightricks/symmetric_patchifier.py, its `patchifier`). A network with neither attribute is counted
    as 2 x 2 over the last two dimensions."""
    net = model.model.diffusion_model
    patchifier = getattr(net, "patchifier", None)
    patch = patchifier.patch_size if patchifier is not None else getattr(net, "patch_size", 2)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    dims = tuple(latent_shape)[1:][-len(patch):]
    dims = (1,) * (len(patch) - len(dims)) + dims  # an image into a video model is one frame, as the host makes it
    return max(1, math.prod(-(-d // p) for d, p in zip(dims, patch)))


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


# ---------------------------------------------------------------------------------------------- sampling
def shortcut_sigmas(steps: int, shift: float, *, denoise: float = 1.0, use_resolution_shift: bool = False,
                    tokens: int | None = None) -> torch.Tensor:
    """The SCFM schedule as SIGMAS; denoise < 1 keeps the last steps of a longer schedule, as KSampler does.
    With use_resolution_shift the shift is the resolution shift of `tokens` image tokens (token_count)."""
    if use_resolution_shift:
        if tokens is None:
            raise HostInputError("resolution_shift: needs the latent's size")
        shift = resolution_shift(tokens)
    if denoise <= 0.0:
        return torch.zeros(0)
    total = max(steps, int(steps / denoise))
    return shifted_schedule(total, float(shift))[-(steps + 1):]


def shortcut_euler(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None, disable=None):
    """A KSAMPLER function: the engine's Euler over the host's denoiser (v = (x - denoised) / sigma).

    Given the same sigmas this is the host's own "euler" sampler step for step.
    """
    def velocity(x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
        denoised = model(x, t, **extra)
        return (x - denoised) / t.reshape(-1, *([1] * (x.ndim - 1)))

    def step_callback(state: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(state)

    return sample_euler(velocity, x, sigmas, extra_args, step_callback, disable)


def make_guider(model, positive, negative, cfg: float) -> comfy.samplers.CFGGuider:
    """The host's CFG guider; without a negative it runs the positive alone (cfg must then be 1)."""
    if negative is None and not math.isclose(cfg, 1.0):
        raise HostInputError(f"cfg: is {cfg} but no negative conditioning is connected; connect one for true CFG "
                             f"or set cfg to 1.0 (Flux dev uses its distilled guidance instead)")
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive} if negative is None else {"positive": positive, "negative": negative})
    guider.set_cfg(cfg)
    return guider


def sample(model, positive, negative, latent: dict, *, seed: int, sigmas: torch.Tensor, cfg: float = 1.0) -> dict:
    """Sample a LATENT with the shortcut Euler sampler on the given sigmas; progress, previews and
    interruption as KSampler (common_ksampler) does them."""
    require_flow_model(model)
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    guider = make_guider(model, positive, negative, cfg)
    steps = max(len(sigmas) - 1, 0)
    callback = latent_preview.prepare_callback(model, steps)
    samples = guider.sample(noise, latent_image, comfy.samplers.KSAMPLER(shortcut_euler), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    # newer hosts also hand latents between nodes in an intermediate dtype (fp16 with --fp16-intermediates)
    dtype = getattr(comfy.model_management, "intermediate_dtype", lambda: samples.dtype)()
    out["samples"] = samples.to(device=comfy.model_management.intermediate_device(), dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------- training
_UNTRAINABLE_COND_KEYS = ("area", "mask", "control", "gligen", "hooks", "timestep_start", "timestep_end")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


class ConditionedVelocity:
    """v = f(x, t, item=..., guidance=...) for a ComfyUI flow model with per-item conditioning.

    `conds` are the guider's encoded conditioning lists: one entry per training latent, or one
    shared entry. Each call batches the entries of `item` with the host's own COND concatenation
    (cross-attention lengths padded as the host pads them) and runs the host's sampling_function.
    A per-item `guidance` replaces the conditioning's Flux guidance (the trainer's draw).
    """

    def __init__(self, model, conds: dict[str, list[dict]], count: int, cfg: float, model_options: dict,
                 seed: int | None, input_name: str = "positive"):
        self.model, self.cfg, self.model_options, self.seed = model, float(cfg), model_options, seed
        self.positive = self._per_item(conds["positive"], count, input_name)
        negative = conds.get("negative")
        self.negative = self._per_item(negative, count, "negative") if negative is not None else None
        self.takes_guidance = ("guidance" in self.positive[0]["model_conds"]
                               and distilled_guidance(model.diffusion_model))
        # Items whose conditionings the host cannot concatenate (other prompt lengths in a
        # CONDRegular, reference latents on some items only) run as separate forwards, as the
        # host's calc_cond_batch runs such conds; items of one group share a forward.
        self.group_of = self._group_ids()
        # One network forward per call (the trainer may then mix adapters per item) unless
        # conditionings of other shapes must run apart.
        self.keeps_batch_whole = len(set(self.group_of)) == 1

    def distinct_items(self) -> list[int]:
        """The first item of each distinct conditioning (one for a shared conditioning)."""
        seen: set[int] = set()
        return [i for i, entry in enumerate(self.positive) if not (id(entry) in seen or seen.add(id(entry)))]

    def _group_ids(self) -> list[int]:
        representatives: list[int] = []
        ids = []
        for i in range(len(self.positive)):
            for gid, r in enumerate(representatives):
                if all(comfy.samplers.cond_equal_size(entries[i]["model_conds"], entries[r]["model_conds"])
                       for entries in (self.positive, self.negative) if entries is not None):
                    ids.append(gid)
                    break
            else:
                ids.append(len(representatives))
                representatives.append(i)
        return ids

    @staticmethod
    def _per_item(entries: list[dict], count: int, input_name: str) -> list[dict]:
        if len(entries) not in (1, count):
            raise HostInputError(f"{input_name}: has {len(entries)} conditionings for {count} latents; give one per "
                                 f"latent (in the same order) or a single one for all")
        for entry in entries:
            used = [k for k in _UNTRAINABLE_COND_KEYS if k in entry]
            if used:
                raise HostInputError(f"{input_name}: conditioning with {', '.join(used)} cannot be trained on; give "
                                     f"plain text conditioning (CLIPTextEncode, FluxGuidance, ReferenceLatent)")
            for key, cond in entry["model_conds"].items():
                tensors = cond.cond if isinstance(cond.cond, list) else [cond.cond]
                if any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] != 1 for t in tensors):
                    raise HostInputError(f"{input_name}: a conditioning's {key!r} holds a batch of "
                                         f"{tensors[0].shape[0]}; give one conditioning per latent as a list instead")
        return entries if len(entries) == count else entries * count

    def _batched(self, entries: list[dict], item: torch.Tensor, guidance: torch.Tensor | None, device) -> list[dict]:
        chosen = [entries[i] for i in item.tolist()]
        model_conds = {}
        for key, first in chosen[0]["model_conds"].items():
            # concat makes new tensors outside inference mode: autograd may save them
            model_conds[key] = first._copy_with(_to_device(first.concat([c["model_conds"][key] for c in chosen[1:]]), device))
        if guidance is not None and "guidance" in model_conds:
            model_conds["guidance"] = model_conds["guidance"]._copy_with(guidance.to(device, torch.float32))
        return [{"model_conds": model_conds, "uuid": chosen[0].get("uuid")}]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, item: torch.Tensor, guidance: torch.Tensor | None = None,
                 **_: Any) -> torch.Tensor:
        groups = torch.tensor([self.group_of[i] for i in item.tolist()])
        if bool((groups == groups[0]).all()):
            return self._velocity(x, t, item, guidance)
        rows = [torch.nonzero(groups == g).flatten() for g in groups.unique()]
        parts = [self._velocity(x[r], t[r], item[r], None if guidance is None else guidance[r]) for r in rows]
        return torch.cat(parts)[torch.argsort(torch.cat(rows))]

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, item: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        cond = self._batched(self.positive, item, guidance, x.device)
        uncond = self._batched(self.negative, item, guidance, x.device) if self.negative is not None else None
        denoised = comfy.samplers.sampling_function(self.model, x, t, uncond, cond, self.cfg,
                                                    model_options=self.model_options, seed=self.seed)
        return (x - denoised) / t.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class TrainingRun:
    """What TrainShortcut asks of the host, apart from the model and conditioning."""
    config: ShortcutConfig
    cfg: float = 1.0
    init_lora: dict | None = None
    resume_state: str | None = None       # a trainer checkpoint to continue from exactly
    checkpoint_path: str | None = None
    progress: Progress | None = None      # the node's progress bar, text and previews
    on_checkpoint: Callable[[ShortcutTrainer], None] | None = None
    preview_every: int = 0                # few-step previews in the node every this many steps (0: none)
    calibrate: bool = False               # measure the best few-step recipe at the end (into the LoRA's metadata)
    stream_weights: bool = False          # keep on the device only the weights that fit beside training (lowvram)
    parallel: DataParallel | None = None  # data parallel under torchrun (the headless command)
    summary: str = ""                     # the recipe chosen for the model's family, shown with the memory plan


@dataclass
class TrainingOutcome:
    result: TrainResult
    comparison: torch.Tensor | None = None    # IMAGE: teacher few steps | student | teacher many steps
    calibration: Calibration | None = None


# Held-out noises for calibration: two per training conditioning, 4 to 16 in all.
CALIBRATION_SAMPLES = (4, 16)


class _TrainingSampler(comfy.samplers.Sampler):
    """Runs the SCFM loop where a sampler would run: the host's guider has loaded the model,
    processed the latents into the model's space and encoded the conditioning for them."""

    def __init__(self, run: TrainingRun):
        self.run = run
        self.outcome: TrainingOutcome | None = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        run, base = self.run, model_wrap.inner_model
        latents = latent_image.detach().clone().float()
        count = latents.shape[0]
        config = run.config
        velocity = ConditionedVelocity(base, model_wrap.conds, count, run.cfg, extra_args["model_options"],
                                       extra_args.get("seed"))
        if config.guidance_range is not None and not velocity.takes_guidance:
            config = config.replace(guidance_range=None)  # no distilled guidance input (schnell, SD3.5, Chroma): nothing to draw
        network = base.diffusion_model
        with ShortcutTrainer(network, velocity, latents, config, extra_args={"item": torch.arange(count)},
                             init_lora=run.init_lora, blocks=repeated_blocks(network),
                             token_count=token_count(model_wrap.model_patcher, tuple(latents.shape[1:])),
                             device=latents.device, parallel=run.parallel) as trainer:
            if run.resume_state:
                trainer.load_checkpoint(run.resume_state)
            previewer = host_preview.latent_previewer(model_wrap.model_patcher)
            show = run.progress.preview if run.progress is not None else (lambda step, picture: None)
            preview = None if previewer is None else host_preview.TrainingPreview(
                trainer, previewer, show, tuple(latents.shape[1:]), run.preview_every)
            watchers = [w for w in (run.progress, preview) if w is not None]

            def after_step(report: StepReport) -> None:
                for watcher in watchers:
                    watcher(report)

            on_checkpoint = None if run.on_checkpoint is None else (lambda: run.on_checkpoint(trainer))
            result = trainer.train(callback=after_step, checkpoint_path=run.checkpoint_path,
                                   on_checkpoint=on_checkpoint, progress=comfy.utils.PROGRESS_BAR_ENABLED)
            calibration = None
            if run.calibrate:
                calibration = self._calibrate(trainer, velocity, tuple(latents.shape[1:]))
                if on_checkpoint is not None:
                    on_checkpoint()  # the LoRA file gets the calibrated recipe
                result = trainer.result()
            comparison = None
            if preview is not None:
                best = calibration.best[0] if calibration is not None else None
                comparison = host_preview.to_image_tensor(preview.picture(best))
            self.outcome = TrainingOutcome(result=result, comparison=comparison, calibration=calibration)
        return torch.zeros_like(latent_image)

    def _calibrate(self, trainer: ShortcutTrainer, velocity: ConditionedVelocity, latent_shape: tuple[int, ...]):
        if self.run.progress is not None:
            self.run.progress.say("calibrating the few-step recipe ...")
        distinct = velocity.distinct_items()
        lo, hi = CALIBRATION_SAMPLES
        items = torch.tensor([distinct[i % len(distinct)] for i in range(min(hi, max(lo, 2 * len(distinct))))])
        # Held-out: a generator of its own, never the one training draws from.
        noise = torch.randn((len(items), *latent_shape), generator=torch.Generator().manual_seed(trainer.config.seed + 1))
        calibration = trainer.calibrate(noise, {"item": items})
        log.info("TrainShortcut: %s", calibration.text())
        if self.run.progress is not None:
            self.run.progress.say(calibration.text())
        return calibration


def train(model, latents: torch.Tensor, positive, negative, run: TrainingRun) -> TrainingOutcome:
    """SCFM on a ComfyUI model inside the graph. The shared network is used in place and left
    exactly as it was (adapters removed, weights untouched), also on errors and interrupts."""
    require_flow_model(model)
    require_trainable(model)
    latents = comfy.sample.fix_empty_latent_channels(model, one_size_batch(latents))
    require_latent_dimensions(model, latents)
    model = fully_loadable(model)
    plan = check_memory(model, latents, positive, negative, run)
    guider = make_guider(model, positive, negative, run.cfg)
    sampler = _TrainingSampler(run)
    streaming = reserved_beside_weights(plan) if run.stream_weights else contextlib.nullcontext()
    with torch.inference_mode(False), host_training_mode(), streaming:
        latents = latents.clone()  # an ordinary tensor, whatever mode made it
        # The whole model goes to the load device (the host's TrainLoraNode does the same), unless the run
        # streams weights: then the host places what fits beside the reserve and copies the rest in per
        # forward (its lowvram path); the adapters live on the load device either way, and fp8-stored
        # weights stay fp8 and are cast at use.
        comfy.model_management.load_models_gpu([model], force_full_load=not run.stream_weights)
        # The host sizes the model's GPU placement by the noise it is given: one forward of a
        # training batch (CFG doubles it), not all the latents at once. The guider needs sigmas
        # to run at all; the trainer draws its own times.
        forward_batch = run.config.batch_size * (2 if negative is not None and not math.isclose(run.cfg, 1.0) else 1)
        guider.sample(latents.new_zeros((forward_batch,) + tuple(latents.shape[1:])), latents, sampler,
                      torch.tensor([1.0, 0.0]), seed=run.config.seed, disable_pbar=True)
    assert sampler.outcome is not None
    return sampler.outcome


# ---------------------------------------------------------------------------------------------- memory
def model_shape(model, target_modules=None, stored_itemsize: int | None = None, lora_layers: str = "all") -> ModelShape:
    """What the memory plan needs of a MODEL, read off its network (stored_itemsize: as if stored so)."""
    network = model.model.diffusion_model
    blocks = repeated_blocks(network)
    stored = network.dtype if hasattr(network, "dtype") else next(network.parameters()).dtype
    compute = getattr(model.model, "manual_cast_dtype", None) or stored
    weight_bytes = sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers()))
    if stored_itemsize is not None:
        weight_bytes = weight_bytes * stored_itemsize // stored.itemsize
    hidden = next((m.in_features for b in blocks[:1] for m in b.modules() if isinstance(m, torch.nn.Linear)), 0)
    shapes = [(network.get_submodule(n).in_features, network.get_submodule(n).out_features)
              for n in lora_target_names(network, target_modules, lora_layers, blocks)]
    return ModelShape(weight_bytes=weight_bytes, block_kinds=tuple(type(b).__name__ for b in blocks),
                      block_params=tuple(sum(p.numel() for p in b.parameters()) for b in blocks), hidden=hidden,
                      compute_bytes=torch.empty(0, dtype=compute).element_size() if stored_itemsize is None
                      else max(stored_itemsize, torch.empty(0, dtype=compute).element_size()),
                      stored_bytes=stored_itemsize or stored.itemsize, lora_params=lora_fan(shapes))


def available_memory(device: torch.device) -> int | None:
    """Bytes training can have on the device: free now, plus what loaded models hold (ComfyUI unloads them
    to load this one); None on a CPU, where the plan is shown, not enforced."""
    if comfy.model_management.is_device_cpu(device):
        return None
    held = sum(m.model_loaded_memory() for m in comfy.model_management.current_loaded_models)
    return int(comfy.model_management.get_free_memory(device)) + int(held)


def stream_headroom() -> int:
    """What ComfyUI keeps free beside a partially loaded model's weights (its minimum inference memory)."""
    return int(comfy.model_management.minimum_inference_memory())


def check_memory(model, latents: torch.Tensor, positive, negative, run: TrainingRun) -> MemoryPlan:
    """The run's predicted peak against the device's memory, before any weight moves: shown in the node
    when it fits (or on a CPU); otherwise refused, naming the settings that would fit and their peaks."""
    config = run.config
    cfg_factor = 2 if negative is not None and not math.isclose(run.cfg, 1.0) else 1
    text_tokens = max((c[0].shape[1] for c in positive if isinstance(c[0], torch.Tensor) and c[0].dim() == 3),
                      default=0)
    shape = model_shape(model, config.target_modules, lora_layers=config.lora_layers)
    training = TrainingShape(rank=config.rank, forward_batch=config.batch_size * cfg_factor,
                             tokens=token_count(model, tuple(latents.shape[1:])) + text_tokens,
                             checkpointing=config.gradient_checkpointing, offload_optimizer=config.offload_optimizer,
                             stream_headroom=stream_headroom() if run.stream_weights else None)
    free = available_memory(model.load_device)
    plan = plan_training(shape, training, free)
    stored = str(next(model.model.diffusion_model.parameters()).dtype).replace("torch.", "")
    text = plan.text(free, stored)
    shown = f"{run.summary}\n{text}" if run.summary else text
    log.info("TrainShortcut %s", shown)
    if free is None or plan.fits(free):
        if run.progress is not None:
            run.progress.say(shown)
        return plan
    fp8 = (model_shape(model, config.target_modules, stored_itemsize=1, lora_layers=config.lora_layers)
           if shape.stored_bytes > 1 else None)
    blocks = (model_shape(model, config.target_modules, lora_layers="blocks")
              if config.lora_layers == "all" and shape.block_kinds else None)
    options = suggestions(shape, training, config.batch_size, config.grad_accum_steps, cfg_factor, free, fp8,
                          blocks, stream_headroom())
    raise HostInputError(f"training needs about {plan.needed / GB:.1f} GB on {model.load_device} but "
                         f"{free / GB:.1f} GB are free ({text}). Change "
                         + "; or ".join(f"{s.change}: {s.plan.needed / GB:.1f} GB" for s in options))


@contextlib.contextmanager
def reserved_beside_weights(plan: MemoryPlan):
    """While training streams weights: the host keeps the plan's non-weight memory free whenever it places
    weights (its --reserve-vram reserve, raised for the run), so its sampler's own load cannot fill it."""
    management = comfy.model_management
    before = management.EXTRA_RESERVED_VRAM
    management.EXTRA_RESERVED_VRAM = before + plan.needed - plan.weights
    try:
        yield
    finally:
        management.EXTRA_RESERVED_VRAM = before


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


def fully_loadable(model):
    """The patcher to train through. With dynamic VRAM (newer hosts, on by default on NVIDIA with torch
    >= 2.8) weights stay off the GPU and are copied in per operation, so adapters would sit on another
    device than their inputs and autograd could keep weights the host reuses. Training then runs on the
    patcher's non-dynamic delegate, the host's own route for conds with hooks: the same weights and
    patches, fully loadable (the host may hold a second copy in RAM while it exists)."""
    if not getattr(model, "is_dynamic", lambda: False)():
        return model
    try:
        return model.get_non_dynamic_delegate()
    except Exception as e:  # noqa: BLE001 - e.g. the host's RuntimeError for a patcher no core loader made
        raise HostInputError(f"model: ComfyUI streams this model's weights to the GPU on demand (dynamic VRAM), "
                             f"which training cannot run through, and no fully loaded copy could be made "
                             f"({type(e).__name__}: {e}). Start ComfyUI with --disable-dynamic-vram to train, "
                             f"or load the model with a core loader (Load Diffusion Model / Load Checkpoint)") from e


@contextlib.contextmanager
def host_training_mode():
    """Newer hosts switch some ops to autograd-safe paths (no views into reused cast buffers, residuals
    out of place) while comfy.model_management.in_training is set; their TrainLoraNode sets it too."""
    management = comfy.model_management
    if not hasattr(management, "in_training"):
        yield
        return
    before = management.in_training
    management.in_training = True
    try:
        yield
    finally:
        management.in_training = before


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


class Progress:
    """The host's progress bar with previews, the live loss as node text, and the UI's Cancel button."""

    def __init__(self, total: int, node_id: str | None = None, start: int = 0):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.bar.update_absolute(start, total)
        self.node_id, self.total = node_id, total

    def __call__(self, report: StepReport) -> None:
        self.bar.update_absolute(report.step, report.total)
        self.say(f"step {report.step}/{report.total}  loss {report.loss:.4g}")
        comfy.model_management.throw_exception_if_processing_interrupted()

    def preview(self, step: int, picture) -> None:
        """A picture in the node, through the bar's preview channel (as KSampler's latent previews)."""
        self.bar.update_absolute(step, self.total, ("JPEG", picture, latent_preview.MAX_PREVIEW_RESOLUTION))

    def say(self, text: str) -> None:
        if self.node_id is None:
            return
        server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
        if server is None:
            return  # no running server (a script or a test): the tqdm bar shows the loss
        server.send_progress_text(text, self.node_id)


# ---------------------------------------------------------------------------------------------- files
TRAIN_STATE_SUFFIX = ".train_state"  # beside the LoRA; not a LoRA extension, so no LoRA list shows it
_SAVE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. ")


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str, input_name: str = "lora_name") -> str:
    if name not in folder_paths.get_filename_list("loras"):
        raise HostInputError(f"{input_name}: {name!r} is not in models/loras; pick a file from the list "
                             f"(refresh the browser page after copying new files)")
    return folder_paths.get_full_path_or_raise("loras", name)


def output_paths(save_name: str, input_name: str = "save_name") -> tuple[str, str]:
    """(LoRA file, training state) for a save name, always inside the first models/loras folder."""

    name = save_name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if (not name or name.startswith(".") or ".." in name or not set(name) <= _SAVE_NAME_CHARS):
        raise HostInputError(f"{input_name}: {save_name!r} is not a plain file name; use letters, digits, spaces, "
                             f"'_', '-' and '.', without folders or '..' (files are written to models/loras)")
    folder = folder_paths.get_folder_paths("loras")[0]
    path = os.path.join(folder, name + ".safetensors")
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
        raise HostInputError(f"{input_name}: {save_name!r} would leave models/loras")
    return path, os.path.join(folder, name + TRAIN_STATE_SUFFIX)


def with_lora(model, lora_model: dict, strength: float = 1.0):
    """A clone of the MODEL with a LORA_MODEL applied as weight patches, as the stock LoraModelLoader does."""
    return comfy.sd.load_lora_for_models(model, None, lora_model, strength, 0)[0]


def free_output_paths(save_name: str, keep: str | None = None) -> tuple[str, str]:
    """output_paths, with _2, _3, ... appended while the LoRA file exists (unless it is `keep`,
    the file being resumed): a new run never overwrites a user's file. The folder is made now, before
    any training, when it does not exist yet (a fresh --base-directory has no models/loras)."""
    lora, state = output_paths(save_name)
    try:
        os.makedirs(os.path.dirname(lora), exist_ok=True)
    except OSError as e:
        raise HostInputError(f"save_name: cannot create the LoRA folder {os.path.dirname(lora)!r} ({e.strerror or e}); "
                             f"create it or point ComfyUI's loras folder at a writable place") from e
    stem, n = lora[: -len(".safetensors")], 1
    while os.path.exists(lora) and (keep is None or os.path.abspath(lora) != os.path.abspath(keep)):
        n += 1
        lora, state = f"{stem}_{n}.safetensors", f"{stem}_{n}{TRAIN_STATE_SUFFIX}"
    return lora, state

"""The one run API, for the node and the headless command alike: `settle_run` turns the graph's inputs and
every knob's value into a settled run (the config is settled here and only here), `train_in_graph`
(host/training.py) trains it, and `finish_run` turns its outcome into the node's outputs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from ..shortcut_core.adapters import STUDENT
from ..shortcut_core.data_parallel import DataParallel
from ..shortcut_core.knobs import OPTIONS, TRAIN
from ..shortcut_core.loss_plot import loss_curve_image
from .checks import HostInputError, check_inputs, require_single_model
from .families import family_recipe, resolved_cfg
from .files import TRAIN_STATE_SUFFIX, free_output_paths, lora_path
from .lora import read_host_lora, save_diffusers_flux, save_host_lora, to_lora_model, with_lora
from .recipes import lora_recipes, with_recipes
from .run import NO_RESUME, RunReporter, TrainingOutcome, TrainingRun
from .widgets import knob_inputs, node_widgets, run_settings, settled_config

log = logging.getLogger("shortcut-flow")


@dataclass(frozen=True)
class SettledRun:
    """A run ready to train: the graph's inputs, the settled TrainingRun and where its files go."""
    model: Any
    latents: torch.Tensor
    positive: list
    negative: list | None
    run: TrainingRun
    lora_file: str
    export_diffusers: bool
    writer: bool              # this process writes the files (always, but under data parallelism process 0 alone)


class TrainOutputs(NamedTuple):
    """Train Shortcut's outputs, by name."""
    model: Any
    lora: dict
    loss: dict
    preview: torch.Tensor
    steps: int
    loss_plot: torch.Tensor
    sample_steps: int
    sample_shift: float


def option_defaults() -> dict[str, Any]:
    """What an unconnected options input means: every option at the default a new options node shows."""
    return {w.name: w.default for w in node_widgets(OPTIONS)}


def settle_run(model, latents: torch.Tensor, positive, negative, values: Mapping[str, Any],
               options: Mapping[str, Any] | None = None, *, files: Sequence[str] = (),
               reporter: RunReporter | None = None, parallel: DataParallel | None = None) -> SettledRun:
    """A settled run from the graph's inputs, Train Shortcut's widget values (`values`), the options node's
    (`options`, None: unconnected), the model files the graph or command loaded (`files`), what the run reports
    to, and data parallelism (the headless command under torchrun)."""
    given = dict(options or {})
    defaults = option_defaults()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise HostInputError(f"options: unknown knobs {unknown}; connect a Shortcut Training Options node")
    check_inputs({"required": knob_inputs(OPTIONS)}, given)  # values can come from anywhere: check them
    check_inputs({"required": knob_inputs(TRAIN)}, values)
    knobs = {**defaults, **given, **values}
    require_single_model(model, files)
    settings = run_settings(knobs)
    recipe = family_recipe(model)
    if settings.export_diffusers and recipe.family != "Flux":
        raise HostInputError(f"export_diffusers: the authors' diffusers format is for Flux; this is a "
                             f"{recipe.family} model. Turn it off: the LoRA is saved in ComfyUI's format "
                             f"either way, which ComfyUI's loaders read")
    cfg = resolved_cfg(recipe, settings.cfg, negative)
    config = settled_config(knobs, recipe.schedule, extra={"family": recipe.family, "cfg": cfg})
    if not recipe.guidance_draw:
        config = config.replace(guidance_range=None)  # no distilled guidance input (schnell, SD3.5, Chroma): no draw

    init_lora, resume_state, keep = None, None, None
    if settings.resume_lora != NO_RESUME:
        keep = lora_path(settings.resume_lora, "resume_lora")
        state = keep[: -len(".safetensors")] + TRAIN_STATE_SUFFIX
        if os.path.exists(state):
            resume_state = state
        else:
            init_lora = read_host_lora(keep, model)
            ranks = sorted({w.rank for w in init_lora.values()})
            if ranks != [config.rank]:
                raise HostInputError(f"resume_lora: {settings.resume_lora} has rank "
                                     f"{ranks[0] if len(ranks) == 1 else ranks}, the rank input is {config.rank}; set "
                                     f"rank to the file's to train on from it")
    lora_file, state_file = free_output_paths(settings.save_name, keep=keep)
    writer = parallel is None or parallel.rank == 0

    def write_lora(trainer) -> None:
        if writer:
            save_host_lora(lora_file, trainer.adapters.lora_state(STUDENT), trainer.lora_metadata())

    run = TrainingRun(config=config, cfg=cfg, init_lora=init_lora, resume_state=resume_state,
                      checkpoint_path=state_file, reporter=reporter, on_checkpoint=write_lora,
                      preview_every=settings.preview_every, calibrate=settings.calibrate,
                      centre_shifts=settings.centre_shifts,
                      stream_weights=settings.stream_weights, parallel=parallel, summary=recipe.text(cfg))
    return SettledRun(model=model, latents=latents, positive=positive, negative=negative, run=run, lora_file=lora_file,
                      export_diffusers=settings.export_diffusers, writer=writer)


def finish_run(settled: SettledRun, outcome: TrainingOutcome) -> TrainOutputs:
    """The node's outputs for a trained run (and the diffusers copy of the LoRA, when asked for)."""
    result = outcome.result
    log.info("TrainShortcut: %d steps, final loss %.4g; wrote %s", result.steps,
             result.losses[-1] if result.losses else float("nan"), settled.lora_file)
    if settled.export_diffusers and settled.writer:
        save_diffusers_flux(settled.lora_file[: -len(".safetensors")] + "_diffusers.safetensors", result.lora,
                            settled.model.model, result.metadata)
    lora_model = to_lora_model(result.lora)
    # the trained MODEL carries the LoRA's recipe per step count, as Shortcut LoRA Loader's does
    patched = with_recipes(with_lora(settled.model, lora_model, result.metadata.strength),
                           lora_recipes(result.metadata, settled.model))
    return TrainOutputs(
        model=patched, lora=lora_model,
        loss={"loss": list(result.losses)},
        preview=outcome.comparison if outcome.comparison is not None else torch.zeros(1, 64, 192, 3),
        steps=result.steps, loss_plot=torch.from_numpy(loss_curve_image(result.losses))[None],
        sample_steps=result.metadata.steps, sample_shift=float(result.metadata.shift))

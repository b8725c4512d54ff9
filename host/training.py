"""Training inside the graph: the SCFM loop runs where a sampler would run, so the host loads the model,
encodes the conditioning and places the weights exactly as for sampling; the shared network is left exactly
as it was. With the shims newer hosts need (dynamic VRAM, their training mode)."""

from __future__ import annotations

import contextlib
import logging
import math

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..shortcut_core.trainer import ShortcutTrainer, StepReport
from . import preview as host_preview
from .checks import HostInputError, one_size_batch, require_flow_model, require_latent_dimensions, require_trainable
from .families import repeated_blocks, token_count
from .memory import check_memory, reserved_beside_weights
from .run import TrainingOutcome, TrainingRun
from .sampling import make_guider
from .velocity import ConditionedVelocity

log = logging.getLogger("shortcut-flow")


# Held-out noises for calibration: two per training conditioning, 4 to 16 in all.
CALIBRATION_SAMPLES = (4, 16)


class GraphTrainingSampler(comfy.samplers.Sampler):
    """Runs the SCFM loop where a sampler would run (its `sample` is the host's name for it): the host's guider
    has loaded the model, processed the latents into the model's space and encoded the conditioning for them."""

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
        network = base.diffusion_model
        blocks = repeated_blocks(network)
        streamed = None
        if run.stream_weights and run.prefetch_blocks and config.gradient_checkpointing:
            streamed = blocks_left_in_ram(blocks)
            if streamed and run.reporter is not None:
                run.reporter.say(f"streaming {len(streamed)} of {len(blocks)} blocks from RAM, each copied in while "
                                 f"the one before computes")
        with ShortcutTrainer(network, velocity, latents, config, extra_args={"item": torch.arange(count)},
                             init_lora=run.init_lora, blocks=blocks,
                             token_count=token_count(model_wrap.model_patcher, tuple(latents.shape[1:])),
                             device=latents.device, parallel=run.parallel, streamed_blocks=streamed) as trainer:
            if run.centre_shifts:  # before a resume too: the same shifts as the run it continues (its checkpoint says)
                self._centre_shifts(trainer, velocity, tuple(latents.shape[1:]))
            if run.resume_state:
                trainer.load_checkpoint(run.resume_state)
            previewer = host_preview.latent_previewer(model_wrap.model_patcher)
            show = run.reporter.preview if run.reporter is not None else (lambda step, picture: None)
            preview = None if previewer is None else host_preview.TrainingPreview(
                trainer, previewer, show, tuple(latents.shape[1:]), run.preview_every)
            def after_step(report: StepReport) -> None:
                if run.reporter is not None:
                    run.reporter.step(report)
                if preview is not None:
                    preview(report)

            on_checkpoint = None if run.on_checkpoint is None else (lambda: run.on_checkpoint(trainer))
            result = trainer.run(callback=after_step, checkpoint_path=run.checkpoint_path,
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

    def _centre_shifts(self, trainer: ShortcutTrainer, velocity: ConditionedVelocity, latent_shape: tuple[int, ...]):
        before = trainer.config
        if self.run.reporter is not None:
            self.run.reporter.say(f"finding the shift the model samples {before.sample_steps} steps best at ...")
        noise, items = held_out_noise(trainer, velocity, latent_shape)
        best = trainer.centre_shifts(noise, {"item": items}, between=interrupted)
        cfg = trainer.config
        text = (f"the model samples {best.steps} steps best at shift {best.shift:.3g} (its own: "
                f"{before.sample_shift:.3g}): training shifts {cfg.shift_min:.3g}-{cfg.shift_max:.3g}")
        log.info("TrainShortcut: %s", text)
        if self.run.reporter is not None:
            self.run.reporter.say(text)

    def _calibrate(self, trainer: ShortcutTrainer, velocity: ConditionedVelocity, latent_shape: tuple[int, ...]):
        if self.run.reporter is not None:
            self.run.reporter.say("calibrating the few-step recipe ...")
        noise, items = held_out_noise(trainer, velocity, latent_shape)
        calibration = trainer.calibrate(noise, {"item": items}, between=interrupted)
        log.info("TrainShortcut: %s", calibration.text())
        if self.run.reporter is not None:
            self.run.reporter.say(calibration.text())
        return calibration


def interrupted() -> None:
    """Raise where the user pressed Cancel (ComfyUI's interrupt): between the calibration's samplings, which
    have no training step to stop at."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def held_out_noise(trainer: ShortcutTrainer, velocity: ConditionedVelocity, latent_shape: tuple[int, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration's noises and the conditioning item of each: every distinct conditioning, two noises each,
    from a generator of its own (never the one training draws from)."""
    distinct = velocity.distinct_items()
    lo, hi = CALIBRATION_SAMPLES
    items = torch.tensor([distinct[i % len(distinct)] for i in range(min(hi, max(lo, 2 * len(distinct))))])
    noise = torch.randn((len(items), *latent_shape), generator=torch.Generator().manual_seed(trainer.config.seed + 1))
    return noise, items


def blocks_left_in_ram(blocks) -> list[int]:
    """The blocks the host did not load whole (its lowvram mark on a layer: weights copied in at each op). The
    trainer streams these block by block instead (shortcut_core/block_streaming.py): the whole block from pinned
    RAM, one block ahead, its device-resident part too, for the run."""
    return [i for i, block in enumerate(blocks) if any(getattr(m, "comfy_cast_weights", False) for m in block.modules())]


def train_in_graph(model, latents: torch.Tensor, positive, negative, run: TrainingRun) -> TrainingOutcome:
    """SCFM on a ComfyUI model inside the graph. The shared network is used in place and left
    exactly as it was (adapters removed, weights untouched), also on errors and interrupts."""
    require_flow_model(model)
    require_trainable(model)
    latents = comfy.sample.fix_empty_latent_channels(model, one_size_batch(latents))
    require_latent_dimensions(model, latents)
    model = fully_loadable(model)
    plan = check_memory(model, latents, positive, negative, run)
    guider = make_guider(model, positive, negative, run.cfg)
    sampler = GraphTrainingSampler(run)
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

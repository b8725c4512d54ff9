"""The SCFM training loop: velocity-field self-distillation of a LoRA with a dual EMA.

The trainer knows a module (where the LoRA lives) and a velocity callable that runs it:
`v = velocity(x, t, **extra_args)`. Per-item extra arguments (text embeddings, pooled vectors,
...) are tensors whose first dimension indexes the training latents; with
`guidance_range` set, a per-item `guidance` tensor is added (Flux dev's distilled guidance).

Per optimizer step and micro-batch: draw items (objective.draw_shortcut_items), build x_t, make
the target under no_grad with the teacher / fast EMA / slow EMA roles, run the student once
with grad, MSE, backward. Then clip, AdamW, and update both EMAs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .activation_checkpointing import checkpoint_blocks
from .adapters import (EMA_FAST, EMA_SLOW, STUDENT, TEACHER, LoraState, LoraWeights, ShortcutAdapters,
                       exact_module_pattern, lora_target_names, uniform_rank_alpha)
from .block_streaming import BlockStreamer
from .calibration import STEP_COUNTS, WALK_LEVERS, Calibration, Recipe, WalkLever, calibrate_recipe
from .checkpoint import CheckpointWriteError, checkpoint_state, load_into, write_checkpoint
from .config import ConfigError, ShortcutConfig, schedule_around
from .data_parallel import DataParallel
from .fp8_compute import fp8_compute_supported, fp8_no_grad_linears
from .regional_compile import compiled_blocks
from .inference_tensors import InferenceTensorAliases
from .lora_file import LoraMetadata
from .objective import ItemRole, ShortcutDraw, average_velocity_target, draw_shortcut_items, interpolate, select_items, shortcut_loss
from .optimizer_offload import OffloadedAdamW
from .run_time import StepClock
from .safetensors_io import SafetensorsFileError
from .sampling import VelocityFn, sample_euler
from .schedules import packed_token_count, shifted_schedule
from .trajectories import (TeacherTrajectories, place_reflow_items, place_teacher_items, place_walk_items,
                           recorded_teacher_walk, reflow_noise, walk_target)
from .training_recipe import PAPER, TRAINING_RECIPES, TrainingRecipe, ema_decay_at, learning_rate_at, teacher_ratio_at


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; training stopped before the optimizer used it. `step` is the
    (1-based) step that failed; the run holds the steps before it."""

    def __init__(self, step: int, loss: float):
        self.step = step
        super().__init__(f"the loss became {loss} at step {step}; training stopped before applying it, and the "
                         f"last checkpoint (if any) was kept. Lower learning_rate, check the latents for NaN/inf, or "
                         f"train in a wider dtype.")


class TrainingDataError(ValueError):
    """The latents or their per-item arguments cannot be trained on; the message says which and why."""


@dataclass
class StepReport:
    step: int                 # optimizer steps done so far
    total: int                # optimizer steps planned
    loss: float               # mean loss of this step
    loss_shortcut: float | None
    loss_flow: float | None
    grad_norm: float
    # measured by run() over the steps since its warm-up (run_time.StepClock); None until then
    seconds_per_step: float | None = None
    seconds_left: float | None = None


@dataclass
class TrainResult:
    lora: LoraState           # the student: what a user samples with
    ema_slow: LoraState
    ema_fast: LoraState
    losses: list[float]
    steps: int
    metadata: LoraMetadata


def _check_latents(latents: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(latents, torch.Tensor):
        stacked = latents
    else:
        items = list(latents)
        if not items:
            raise TrainingDataError("latents: the training set is empty; give at least one latent")
        shapes = sorted({tuple(x.shape) for x in items})
        if len(shapes) > 1:
            raise TrainingDataError(f"latents: items have different shapes {shapes}; resize the images to one size "
                                    f"(or train one size per run)")
        stacked = torch.stack(items)
    if stacked.dim() < 2 or stacked.shape[0] == 0:
        raise TrainingDataError(f"latents: expected a batch of at least one latent, got shape {tuple(stacked.shape)}")
    if not stacked.is_floating_point():
        raise TrainingDataError(f"latents: expected floating-point values, got {stacked.dtype}")
    if not torch.isfinite(stacked).all():
        raise TrainingDataError("latents: contain NaN or inf values; re-encode the images")
    return stacked


class ShortcutTrainer:
    """Holds one SCFM run: adapters in `module`, optimizer, RNG, step count and loss history.

    A velocity callable whose every call is one batch-first forward of `module` may set
    `keeps_batch_whole = True`: the first half of each target then runs teacher and fast-EMA
    items in one forward (per-item adapters) instead of one forward per role.

    Use as a context manager (or call close()): closing removes the adapters, leaving `module`
    exactly as it was. `blocks` are the module's repeated blocks, for gradient checkpointing
    (ShortcutConfig.gradient_checkpointing) and for cloning their inputs (blocks that add residuals in place).
    """

    def __init__(self, module: nn.Module, velocity: VelocityFn, latents: torch.Tensor | Sequence[torch.Tensor],
                 config: ShortcutConfig | None = None, *, extra_args: Mapping[str, Any] | None = None,
                 teacher_lora: Mapping[str, LoraWeights] | None = None, init_lora: Mapping[str, LoraWeights] | None = None,
                 blocks: Sequence[nn.Module] = (), clone_block_inputs: bool = True, token_count: int | None = None,
                 device: torch.device | str | None = None, lora_dtype: torch.dtype = torch.float32,
                 parallel: DataParallel | None = None, training_recipe: TrainingRecipe | None = None,
                 trajectories: TeacherTrajectories | None = None, streamed_blocks: Sequence[int] | None = None):
        self.config = config = config if config is not None else ShortcutConfig()
        # how learning rate, EMA decays and teacher share move over the run (None: the config's named recipe's;
        # the sub-steps are the config's: ShortcutConfig.substeps)
        self.training_recipe = recipe = TRAINING_RECIPES[config.recipe] if training_recipe is None else training_recipe
        self._use_config(config)
        self.parallel = parallel  # data parallel (see data_parallel.py): this process's shard of every batch
        self.latents = _check_latents(latents)
        n = self.latents.shape[0]
        # data-free: the teacher's walks that made the latents; TEACHER items then start on them (trajectories.py)
        if trajectories is not None and (trajectories.states.shape[0] != n
                                         or trajectories.states.shape[2:] != self.latents.shape[1:]):
            raise TrainingDataError(f"trajectories: {trajectories.states.shape[0]} walks of "
                                    f"{list(trajectories.states.shape[2:])} for {n} latents of "
                                    f"{list(self.latents.shape[1:])}; pass the walks that made the latents")
        if trajectories is not None and trajectories.steps % config.substeps:
            raise TrainingDataError(f"trajectories: {trajectories.steps} steps, not a multiple of t_skip "
                                    f"({config.substeps}); record the teacher's walks at a multiple of it")
        self.trajectories = trajectories
        self._walks = recipe.walk_steps is not None and recipe.walk_ratio > 0
        self._reflow = recipe.reflow_ratio > 0
        from_walks = [name for name, on in (("sampler walks (walk_steps)", self._walks),
                                            ("straight lines from noise to sample (reflow_ratio)", self._reflow)) if on]
        if from_walks and trajectories is None:
            raise TrainingDataError(f"the training recipe teaches {' and '.join(from_walks)} from the teacher's "
                                    "recorded walks: pass trajectories (data-free latents sampled by Shortcut Teacher "
                                    "Latents)")
        self.extra_args = dict(extra_args or {})
        for key, value in self.extra_args.items():
            if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != n):
                raise TrainingDataError(f"extra argument {key!r}: has {value.shape[0] if value.dim() else 0} items but "
                                        f"there are {n} latents; give one per latent")
        if config.guidance_range is not None and "guidance" in self.extra_args:
            raise TrainingDataError("extra argument 'guidance' is drawn per item by the trainer (guidance_range); "
                                    "remove it, or set ShortcutConfig.guidance_range = None to pass your own")
        if token_count is None and config.resolution_shift_prob > 0:
            token_count = packed_token_count(self.latents.shape[1:])
        self.token_count = token_count
        self.velocity = velocity
        self.module = module
        self.blocks = list(blocks)
        self.clone_block_inputs = clone_block_inputs
        if device is None:
            first = next(iter(module.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)

        self.generator = torch.Generator().manual_seed(config.seed)
        targets: tuple[str, ...] | str | None = config.target_modules
        if config.lora_layers != "all":
            targets = exact_module_pattern(lora_target_names(module, config.target_modules, config.lora_layers,
                                                             self.blocks))
        self.adapters = ShortcutAdapters(module, rank=config.rank, alpha=config.alpha, target_modules=targets,
                                         dtype=lora_dtype, generator=self.generator, teacher=teacher_lora,
                                         device=self.device)
        try:
            # EMA initialisation as the authors: from the resumed student, else from the teacher LoRA, else zero.
            if init_lora is not None:
                self.adapters.load_lora_state(STUDENT, init_lora, strict=False)
                self.adapters.restart_emas()
            elif teacher_lora is not None:
                for role in (EMA_SLOW, EMA_FAST):
                    self.adapters.load_lora_state(role, teacher_lora, strict=False)
            adamw = dict(lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
                         weight_decay=config.weight_decay)
            student = self.adapters.parameters(STUDENT)  # down, up, down, up, ...
            if self.training_recipe.up_lr_ratio != 1.0:
                student = [{"params": student[0::2]}, {"params": student[1::2], "lr_ratio": self.training_recipe.up_lr_ratio}]
            self.optimizer = (OffloadedAdamW(student, **adamw) if config.offload_optimizer
                              else torch.optim.AdamW(student, **adamw))
        except BaseException:
            self.adapters.detach()
            raise
        # Teacher and fast-EMA items share one forward when the velocity runs each call as one
        # batch-first network pass (it says so with `keeps_batch_whole`); else one forward per role.
        self._first_half = self.velocity_per_item if getattr(velocity, "keeps_batch_whole", False) else None
        # A model loaded under inference_mode (every ComfyUI model) is trained through storage aliases.
        self._inference_aliases = InferenceTensorAliases(module)
        # Weights streamed block by block (block_streaming.py): None, off; else the blocks' weights found off the
        # device, and those of the blocks listed (which the streamer takes off it for the run). Compiled blocks
        # guard on their weight tensors, which streaming replaces at every call: one or the other.
        self.streamer: BlockStreamer | None = None
        if streamed_blocks is not None:
            for name, message in (("gradient_checkpointing", "must be on to stream weights block by block: the "
                                   "backward then needs one block's weights at a time (got False)"),
                                  ("compile_blocks", "cannot run together with stream_weights yet (got True); "
                                   "switch one of them off")):
                if getattr(config, name) != (name == "gradient_checkpointing"):
                    self.close()
                    raise ConfigError(name, message)
            try:
                self.streamer = BlockStreamer(self.blocks, self.device, offload=streamed_blocks).__enter__()
            except BaseException:
                self.close()
                raise
        # Each repeated block compiled (regional_compile.py), held open for the run.
        self._compiled = contextlib.ExitStack()
        if config.compile_blocks:
            self._compiled.enter_context(compiled_blocks(self.blocks))
            self._first_half = None  # per-item adapters pick by hooks dynamo does not tell apart: per-role passes
        # fp8 matmuls for the targets' no-grad passes: open for the run (one cache of quantized weights), active
        # only while a target is computed (fp8_compute.py); GPUs without fp8 tensor cores run as before
        self._fp8 = None
        if config.fp8_targets and (self.device.type == "cpu" or fp8_compute_supported(self.device)):
            self._fp8 = fp8_no_grad_linears(module).__enter__()
            self._fp8.active = False
        self.step_count = 0
        self.losses: list[float] = []
        self.calibration: Calibration | None = None
        self._consistent = True

    def _use_config(self, config: ShortcutConfig) -> None:
        self.config = config
        # after the recipe's coarse phase, targets walk the paper's sub-steps (t_skip left at auto only)
        self._fine_config = (config.replace(t_skip=PAPER.t_skip)
                             if config.t_skip == 0 and self.training_recipe.coarse_share < 1 else config)

    @property
    def processes(self) -> int:
        """Processes training this run together (1 without data parallelism)."""
        return self.parallel.world if self.parallel is not None else 1

    # ------------------------------------------------------------------ velocity roles
    def velocity_as(self, role: str) -> VelocityFn:
        """The velocity callable with the module switched to `role` for each call."""
        def velocity(x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
            with self.adapters.use(role):
                return self.velocity(x, t, **extra)
        return velocity

    def velocity_per_item(self, roles: torch.Tensor) -> VelocityFn:
        """A velocity running item i as the teacher (TEACHER items) or the fast EMA (SELF items),
        all in one forward: the first half of every SCFM target in one pass."""
        names = [TEACHER if r == ItemRole.TEACHER else EMA_FAST for r in roles.tolist()]

        def velocity(x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
            with self.adapters.use_per_item(names):
                return self.velocity(x, t, **extra)
        return velocity

    # ------------------------------------------------------------------ one step
    def _micro_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], ShortcutDraw, torch.Tensor]:
        """The micro-batch's items, noise and draws. Data parallel: every process draws the whole batch of
        all processes from the same generator and keeps its shard (the draws of one process with that batch)."""
        cfg, g, n = self.config, self.generator, self.latents.shape[0]
        total = cfg.batch_size * self.processes
        part = self.parallel.shard(total) if self.parallel is not None else slice(None)
        index = torch.randint(n, (total,), generator=g)
        noise = torch.randn((total, *self.latents.shape[1:]), generator=g, dtype=torch.float32)
        if self.step_count >= self.training_recipe.coarse_share * cfg.steps:
            cfg = self._fine_config
        steps = self.training_recipe.self_steps
        draw = draw_shortcut_items(total, cfg, g, self.token_count,
                                   teacher_ratio_at(self.step_count, cfg.steps, cfg.teacher_ratio, self.training_recipe),
                                   None if steps is None else tuple(n * cfg.substeps for n in steps))
        if self.trajectories is not None:
            draw = place_teacher_items(draw, self.trajectories, cfg.substeps, g)
        if self._walks:
            draw = place_walk_items(draw, self.training_recipe.walk_steps, self.training_recipe.walk_ratio,
                                    cfg.substeps, g, cfg.t_max)
        if self._reflow:
            draw = place_reflow_items(draw, self.training_recipe.reflow_ratio, g)
        index, draw = index[part], draw.shard(part)
        x0 = self.latents[index].to(self.device)
        noise = noise[part].to(self.device, x0.dtype)
        extra = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                 for k, v in select_items(self.extra_args, index, n).items()}
        return x0, noise, extra, draw, index

    @contextlib.contextmanager
    def _fp8_targets(self):
        if self._fp8 is None:
            yield
            return
        self._fp8.active = True
        try:
            yield
        finally:
            self._fp8.active = False

    def step(self) -> StepReport:
        """One optimizer step (grad_accum_steps micro-batches). Exceptions before the update leave
        the run exactly as before the call (the RNG is rewound), so it can be checkpointed and resumed."""
        cfg = self.config
        rng_before = self.generator.get_state()
        params = self.adapters.parameters(STUDENT)
        total = 0.0
        shortcut_losses: list[torch.Tensor] = []
        flow_losses: list[torch.Tensor] = []
        for group in self.optimizer.param_groups:
            group["lr"] = (learning_rate_at(self.step_count, cfg.steps, cfg.learning_rate, self.training_recipe)
                           * group.get("lr_ratio", 1.0))
        try:
            for _ in range(cfg.grad_accum_steps):
                x0, noise, extra, draw, index = self._micro_batch()
                if draw.guidance is not None:
                    extra["guidance"] = draw.guidance.to(self.device)
                t = draw.t.to(self.device)
                straight = torch.nonzero(draw.role == ItemRole.REFLOW).flatten()
                if straight.numel():  # the noise the teacher took to this sample, not a fresh one
                    noise[straight.to(self.device)] = reflow_noise(self.trajectories, index[straight]).to(self.device, noise.dtype)
                x_t = interpolate(x0, noise, t)
                teacher_walk = None
                if self.trajectories is not None:
                    on_walk, x_half, moved = recorded_teacher_walk(self.trajectories, index, draw, self.device)
                    x_t[torch.nonzero(draw.role == ItemRole.TEACHER).flatten().to(self.device)] = on_walk.to(x_t.dtype)
                    teacher_walk = (x_half, moved)
                walking = torch.nonzero(draw.role == ItemRole.WALK).flatten().to(self.device)
                if walking.numel():
                    on_walk, walk_velocity = walk_target(self.trajectories, index, draw, self.device)
                    x_t[walking] = on_walk.to(x_t.dtype)
                with self._fp8_targets():
                    target = average_velocity_target(x_t, x0, noise, draw, teacher=self.velocity_as(TEACHER),
                                                     fast_ema=self.velocity_as(EMA_FAST), slow_ema=self.velocity_as(EMA_SLOW),
                                                     extra_args=extra, first_half=self._first_half, teacher_walk=teacher_walk)
                if walking.numel():
                    target[walking] = walk_velocity.to(target.dtype)
                # The student runs last and its backward follows at once, so a recomputing
                # checkpoint replays the forward with the student adapter still active.
                with checkpoint_blocks(self.blocks, recompute=cfg.gradient_checkpointing,
                                       clone_inputs=self.clone_block_inputs,
                                       around_recompute=self.streamer.in_backward if self.streamer else None):
                    prediction = self.velocity(x_t, t, **extra)
                    loss, per_item = shortcut_loss(prediction, target, self.training_recipe.huber_c)
                    loss_value = float(per_item.detach().mean())  # the MSE, whatever loss is minimised
                    finite = math.isfinite(loss_value)
                    if self.parallel is not None:  # every process stops at the same micro-batch
                        finite = not self.parallel.any(not finite, self.device)
                    if not finite:
                        raise NonFiniteLossError(self.step_count + 1, loss_value)
                    (loss / cfg.grad_accum_steps).backward()
                total += loss_value / cfg.grad_accum_steps
                is_flow = ((draw.role == ItemRole.FLOW) | (draw.role == ItemRole.REFLOW)).to(per_item.device)
                shortcut_losses.append(per_item.detach()[~is_flow])
                flow_losses.append(per_item.detach()[is_flow])
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            self.generator.set_state(rng_before)
            raise

        if self.parallel is not None:
            self.parallel.average_gradients(params)
            total = self.parallel.mean(total, self.device)
        self._consistent = False  # an interrupt from here on would leave a half-updated run
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        if cfg.ema_restart_every and self.step_count % cfg.ema_restart_every == 0:
            self.adapters.restart_emas()
        else:
            self.adapters.update_ema(EMA_SLOW, ema_decay_at(self.step_count, cfg.ema_slow_decay, self.training_recipe.slow_ema_power))
            self.adapters.update_ema(EMA_FAST, ema_decay_at(self.step_count, cfg.ema_fast_decay, self.training_recipe.fast_ema_power))
        self.losses.append(total)
        self._consistent = True

        def mean_or_none(parts: list[torch.Tensor]) -> float | None:
            joined = torch.cat(parts)
            return float(joined.mean()) if joined.numel() else None

        return StepReport(step=self.step_count, total=cfg.steps, loss=total, loss_shortcut=mean_or_none(shortcut_losses),
                          loss_flow=mean_or_none(flow_losses), grad_norm=float(grad_norm))

    # ------------------------------------------------------------------ the loop
    def run(self, steps: int | None = None, *, callback: Callable[[StepReport], None] | None = None,
            checkpoint_path: str | None = None, on_checkpoint: Callable[[], None] | None = None,
            progress: bool = True) -> TrainResult:
        """Train until `steps` optimizer steps are done in total (default config.steps).

        `callback(report)` runs after every step; raising from it interrupts training. On an
        interrupt the state after the last completed step is checkpointed (when checkpoint_path
        is set) and the exception propagates. A non-finite loss stops training without writing.
        `on_checkpoint()` runs after every checkpoint written (e.g. to write the LoRA file beside it).
        """
        goal = self.config.steps if steps is None else steps
        bar = tqdm(total=goal, initial=self.step_count, disable=not progress, desc="SCFM training")
        clock = StepClock(goal, start=self.step_count)
        try:
            while self.step_count < goal:
                report = self.step()
                clock.tick(self.step_count)
                report = replace(report, seconds_per_step=clock.seconds_per_step, seconds_left=clock.seconds_left())
                bar.update(1)
                bar.set_postfix(loss=f"{report.loss:.4g}")
                every = self.config.checkpoint_every
                if checkpoint_path and every and self.step_count % every == 0 and self.step_count < goal:
                    self._checkpoint(checkpoint_path, on_checkpoint)
                if callback is not None:
                    callback(report)
        except (NonFiniteLossError, CheckpointWriteError):
            raise
        except BaseException:
            if checkpoint_path and self._consistent and self.step_count > 0:
                self._checkpoint(checkpoint_path, on_checkpoint)
            raise
        finally:
            bar.close()
        if checkpoint_path:
            self._checkpoint(checkpoint_path, on_checkpoint)
        return self.result()

    def _checkpoint(self, path: str, on_checkpoint: Callable[[], None] | None) -> None:
        tensors, meta = self.state_tensors()
        if self.parallel is not None:
            # every process holds the run; one writes it, after checking that all hold the same
            self.parallel.check_identical([t for k, t in sorted(tensors.items()) if k not in ("rng", "losses")],
                                          "the LoRA, EMA or optimizer state")
            if self.parallel.rank != 0:
                return
        try:
            write_checkpoint(path, tensors, meta)
            if on_checkpoint is not None:
                on_checkpoint()
        except SafetensorsFileError as e:
            raise CheckpointWriteError(f"training stopped after step {self.step_count}: {e}") from e

    def result(self) -> TrainResult:
        return TrainResult(lora=self.adapters.lora_state(STUDENT), ema_slow=self.adapters.lora_state(EMA_SLOW),
                           ema_fast=self.adapters.lora_state(EMA_FAST), losses=list(self.losses), steps=self.step_count,
                           metadata=self.lora_metadata())

    def lora_metadata(self) -> LoraMetadata:
        """The recipe to sample with (the calibrated one once calibrate() ran) and the training config."""
        cfg = self.config
        config = cfg.to_dict()
        config["trained_steps"] = self.step_count
        if self.calibration is None:
            return LoraMetadata(steps=cfg.sample_steps, shift=cfg.sample_shift, strength=cfg.sample_strength,
                                config=config)
        best, _ = self.calibration.best
        return LoraMetadata(steps=best.steps, shift=best.shift, strength=best.strength, config=config,
                            calibration=self.calibration.to_dict())

    # ------------------------------------------------------------------ sampling with the run's adapters
    @torch.no_grad()
    def sample_as(self, role: str, noise: torch.Tensor, sigmas: torch.Tensor, extra_args: Mapping[str, Any] | None = None,
                  strength: float = 1.0, time_shift: float = 0.0, multistep: float = 0.0) -> torch.Tensor:
        """Euler samples from `noise` along `sigmas` with the module as `role` (the student at `strength`; the
        walk's `time_shift` and `multistep` as sampling.sample_euler takes them): previews and calibration. Uses neither
        the training RNG nor the optimizer, and puts the adapters back as they were, so training goes on exactly
        as without the call."""
        with self.adapters.use(role):
            self.adapters.set_strength(role, strength)
            try:
                return sample_euler(self.velocity, noise.to(self.device), sigmas.to(self.device),
                                    dict(extra_args or {}), disable=True, time_shift=time_shift,
                                    multistep=multistep)
            finally:
                self.adapters.set_strength(role, 1.0)

    def calibrate(self, noise: torch.Tensor, extra_args: Mapping[str, Any] | None = None, *,
                  reference_steps: int | None = None, step_counts: Sequence[int] = STEP_COUNTS,
                  between: Callable[[], None] | None = None,
                  walk_levers: Sequence[WalkLever] = WALK_LEVERS) -> Calibration:
        """Measure the student's few-step samples against the teacher's many-step samples from the same
        held-out noises, searching the recipe (strength, shift, then the walk: time shift, multistep) for the config's sample_steps
        and each of `step_counts` (calibration.calibrate_recipe), and keep the result: lora_metadata() then recommends the
        best recipe at sample_steps and carries the best for every step count. `between()` runs before each
        sampling (raising from it stops the search, e.g. on the host's interrupt). `walk_levers=()`: Euler's
        walk only (calibration.calibrate_recipe)."""
        self.calibration = self._measure_recipes(STUDENT, noise, extra_args, reference_steps, step_counts, between,
                                                 walk_levers)
        return self.calibration

    def centre_shifts(self, noise: torch.Tensor, extra_args: Mapping[str, Any] | None = None, *,
                      reference_steps: int | None = None, between: Callable[[], None] | None = None) -> Recipe:
        """Before the first step: move the run's shifts, the training draw and the sampling shift, around the
        shift at which the teacher itself samples the config's sample_steps best (the calibration's search on
        the teacher, over held-out noises; config.schedule_around). A model's own shift is made for many steps
        (Flux's 3.25, Wan's 8), and on a teacher whose few-step walks want another one, a LoRA trained around the
        model's is worse and no recipe chosen afterwards recovers it (docs/convergence.md). Returns the teacher's
        best recipe; the LoRA, optimizer and training RNG are untouched (and the config too when `between`, run
        before each sampling, raises)."""
        if self.step_count:
            raise RuntimeError(f"centre_shifts moves the training draw before the first step (the run is at step "
                               f"{self.step_count})")
        cfg = self.config
        best, _ = self._measure_recipes(TEACHER, noise, extra_args, reference_steps, (cfg.sample_steps,),
                                        between, walk_levers=()).best_for(cfg.sample_steps)
        self._use_config(cfg.replace(**schedule_around(best.shift, cfg.resolution_shift_prob)))
        return best

    def _measure_recipes(self, role: str, noise: torch.Tensor, extra_args: Mapping[str, Any] | None,
                         reference_steps: int | None, step_counts: Sequence[int],
                         between: Callable[[], None] | None = None,
                         walk_levers: Sequence[WalkLever] = WALK_LEVERS) -> Calibration:
        cfg = self.config
        reference_steps = reference_steps or cfg.reference_steps

        def in_batches(role: str, sigmas: torch.Tensor, strength: float = 1.0, **walk: float) -> torch.Tensor:
            if between is not None:
                between()
            # forwards no larger than a training batch's: the memory the run was sized for
            n, size = noise.shape[0], cfg.batch_size
            return torch.cat([self.sample_as(role, noise[i:i + size], sigmas,
                                             select_items(extra_args or {}, torch.arange(i, min(i + size, n)), n),
                                             strength, **walk) for i in range(0, n, size)])

        reference = in_batches(TEACHER, shifted_schedule(reference_steps, cfg.sample_shift, t_max=cfg.t_max))

        def sample(recipe: Recipe) -> torch.Tensor:
            # the teacher has no strength: its line of strengths measures alike and the choice keeps 1
            return in_batches(role, shifted_schedule(recipe.steps, recipe.shift, t_max=cfg.t_max),
                              recipe.strength if role == STUDENT else 1.0, **recipe.walk)

        return calibrate_recipe(sample, reference, cfg.sample_steps, cfg.sample_shift, reference_steps, step_counts,
                                walk_levers)

    # ------------------------------------------------------------------ checkpoints (format: checkpoint.py)
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resume needs, as flat tensors plus JSON-able metadata."""
        return checkpoint_state(self.adapters, self.optimizer, self.generator, self.losses, self.step_count,
                                self.config, self.processes)

    def save_checkpoint(self, path: str) -> None:
        write_checkpoint(path, *self.state_tensors())

    def load_checkpoint(self, path: str) -> None:
        """Continue a run from a checkpoint written by save_checkpoint (same module, same LoRA layout)."""
        self.step_count, self.losses = load_into(path, self.adapters, self.optimizer, self.generator, self.config,
                                                 self.processes, stacklevel=2)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Remove the adapters and put back the module's own tensors (idempotent)."""
        if getattr(self, "_fp8", None) is not None:
            self._fp8.close()
        if getattr(self, "_compiled", None) is not None:
            self._compiled.close()
        if getattr(self, "streamer", None) is not None:
            self.streamer.close()
        self._inference_aliases.restore()
        self.adapters.detach()

    def __enter__(self) -> "ShortcutTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def lora_applied(module: nn.Module, lora: Mapping[str, LoraWeights], strength: float = 1.0):
    """Run `module` with a LoRA for the duration of the block (e.g. to sample in the engine alone).

    The LoRA is attached as the student adapter at `strength`; the module is restored on exit.
    """
    rank, alpha = uniform_rank_alpha(lora, "the LoRA")
    adapters = ShortcutAdapters(module, rank=rank, alpha=alpha, target_modules=exact_module_pattern(lora))
    try:
        adapters.load_lora_state(STUDENT, lora)
        adapters.set_strength(STUDENT, strength)
        for p in adapters.parameters(STUDENT):
            p.requires_grad_(False)
        yield adapters
    finally:
        adapters.detach()

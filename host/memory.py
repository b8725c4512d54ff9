"""The memory plan against the device: what the plan needs of a MODEL, what the device has free, the check
before any weight moves (shown, or refused with settings that fit), and the reserve kept while weights stream."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch

import comfy.model_management

from ..shortcut_core.adapters import lora_target_names
from ..shortcut_core.memory_plan import (GB, MemoryPlan, ModelShape, TrainingShape, lora_fan, plan_training,
                                         suggestions)
from .checks import HostInputError
from .families import repeated_blocks, token_count
from .run import TrainingRun
from .timing import predicted_time_text

log = logging.getLogger("shortcut-flow")


def model_shape(model, target_modules=None, lora_layers: str = "all") -> ModelShape:
    """What the memory plan needs of a MODEL, read off its network."""
    network = model.model.diffusion_model
    blocks = repeated_blocks(network)
    stored = network.dtype if hasattr(network, "dtype") else next(network.parameters()).dtype
    compute = getattr(model.model, "manual_cast_dtype", None) or stored
    weight_bytes = sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers()))
    hidden = next((m.in_features for b in blocks[:1] for m in b.modules() if isinstance(m, torch.nn.Linear)), 0)
    return ModelShape(weight_bytes=weight_bytes, block_kinds=tuple(type(b).__name__ for b in blocks),
                      block_params=tuple(sum(p.numel() for p in b.parameters()) for b in blocks), hidden=hidden,
                      compute_bytes=torch.empty(0, dtype=compute).element_size(), stored_bytes=stored.itemsize,
                      lora_params=lora_params(network, blocks, target_modules, lora_layers))


def lora_params(network: torch.nn.Module, blocks, target_modules, lora_layers: str) -> int:
    """LoRA parameters at rank 1 on the layers a run targets (ModelShape.lora_params)."""
    return lora_fan([(network.get_submodule(n).in_features, network.get_submodule(n).out_features)
                     for n in lora_target_names(network, target_modules, lora_layers, blocks)])


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
                             stream_headroom=stream_headroom() if run.stream_weights else None,
                             prefetch_blocks=run.prefetch_blocks)
    free = available_memory(model.load_device)
    plan = plan_training(shape, training, free)
    stored = str(next(model.model.diffusion_model.parameters()).dtype).replace("torch.", "")
    plan_text = plan.text(free, stored)
    text = f"{plan_text}\n{predicted_time_text(model.load_device, shape, training, config, plan)}"
    shown = f"{run.summary}\n{text}" if run.summary else text
    log.info("TrainShortcut %s", shown)
    if free is None or plan.fits(free):
        if run.reporter is not None:
            run.reporter.say(shown)
        return plan
    # the same model stored in fp8 (computing as before), and with LoRA on its blocks alone
    fp8 = (dataclasses.replace(shape, weight_bytes=shape.weight_bytes // shape.stored_bytes, stored_bytes=1)
           if shape.stored_bytes > 1 else None)
    network = model.model.diffusion_model
    blocks = (dataclasses.replace(shape, lora_params=lora_params(network, repeated_blocks(network),
                                                                 config.target_modules, "blocks"))
              if config.lora_layers == "all" and shape.block_kinds else None)
    options = suggestions(shape, training, config.batch_size, config.grad_accum_steps, cfg_factor, free, fp8,
                          blocks, stream_headroom())
    raise HostInputError(f"training needs about {plan.needed / GB:.1f} GB on {model.load_device} but "
                         f"{free / GB:.1f} GB are free ({plan_text}). Change "
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

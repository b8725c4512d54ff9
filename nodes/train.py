"""TrainShortcut: SCFM distillation of a shortcut LoRA on the loaded model, inside the graph."""

from __future__ import annotations

import logging
import os

import torch

from ..shortcut_core.adapters import STUDENT
from ..shortcut_core.config import ShortcutConfig
from ..shortcut_core.loss_plot import loss_curve_image
from . import host, host_lora
from .inputs import checked_inputs

log = logging.getLogger("shortcut-flow")
_D = ShortcutConfig()  # the paper's defaults, one place
NO_RESUME = "(none)"


def _int(default, tooltip, lo=0, hi=1_000_000):
    return ("INT", {"default": default, "min": lo, "max": hi, "tooltip": tooltip})


def _float(default, tooltip, lo=0.0, hi=1.0, step=0.01):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tooltip})


class TrainShortcut:
    @classmethod
    def INPUT_TYPES(cls):
        lo_g, hi_g = _D.guidance_range
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The flow-matching teacher (Flux, SD3.5, ...). It is left unchanged; "
                                               "the LoRA trains on top of it (and of any LoRA already applied)."}),
                "latents": ("LATENT", {"tooltip": "Training latents: a few images through VAEEncode (few-shot), or "
                                                  "latents the teacher itself sampled (data-free). One size per run."}),
                "positive": ("CONDITIONING", {"tooltip": "One conditioning per latent (in order), or one for all."}),
                "steps": _int(_D.steps, "Optimizer steps (the authors: about 10k for Flux).", 1),
                "batch_size": _int(_D.batch_size, "Items per step, drawn from the latents.", 1, 4096),
                "learning_rate": _float(_D.learning_rate, "AdamW learning rate (constant).", 1e-8, 1.0, 1e-6),
                "rank": _int(_D.rank, "LoRA rank, on every linear layer.", 1, 1024),
                "alpha": _float(_D.alpha, "LoRA alpha; scale = alpha / rank.", 0.01, 4096.0, 1.0),
                "seed": ("INT", {"default": _D.seed, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Seeds the LoRA init and every draw: a run is reproducible (and "
                                            "not re-trained on every queue)."}),
                "save_name": ("STRING", {"default": "shortcut_lora", "tooltip": "File name in models/loras for the "
                                         "LoRA (with metadata) and its training state; _2, _3, ... is appended "
                                         "rather than overwrite a file."}),
                "checkpoint_every": _int(_D.checkpoint_every, "Write the LoRA and training state every this many "
                                         "steps (0: only at the end). Cancel also writes them.", 0),
                "resume_lora": ([NO_RESUME] + host.lora_names(), {
                    "tooltip": "Continue from a LoRA: exactly (optimizer, EMAs, step) when its .train_state file is "
                               "beside it, else starting the student and both EMAs from it."}),
                "cfg": _float(1.0, "True CFG inside the student's prediction and every target sub-step, for models "
                              "without distilled guidance (SD3.5: 3.5 with an empty negative). Needs a negative.",
                              1.0, 30.0, 0.1),
                "guidance_min": _float(lo_g, "Guidance-distilled models (Flux dev): per-item guidance drawn from "
                                       "[min, max); ignored by models without a guidance input.", 0.0, 100.0, 0.1),
                "guidance_max": _float(hi_g, "Upper end of the guidance draw.", 0.0, 100.0, 0.1),
                "gradient_checkpointing": ("BOOLEAN", {"default": _D.gradient_checkpointing,
                                                       "tooltip": "Recompute block activations in backward: much "
                                                                  "less memory, about a third more time."}),
                "sample_steps": _int(_D.sample_steps, "Steps the LoRA is meant for (stored in the file).", 1, 100),
                "sample_shift": _float(_D.sample_shift, "Shift the LoRA is meant for (stored in the file).", 0.01,
                                       100.0),
                "sample_strength": _float(_D.sample_strength, "Strength the LoRA is meant for (stored in the file).",
                                          0.01, 4.0),
                "t_skip": _int(_D.t_skip, "Sub-steps each target walks (even): first half teacher or fast EMA, "
                               "second half slow EMA.", 2, 64),
                "teacher_ratio": _float(_D.teacher_ratio, "Share of items whose target starts with the teacher."),
                "teacher_min_steps": _int(_D.teacher_min_steps, "Teacher items use schedules of this many steps...", 2),
                "teacher_max_steps": _int(_D.teacher_max_steps, "...up to this many, in strides of t_skip.", 2),
                "non_shortcut_ratio": _float(_D.non_shortcut_ratio, "Share of items with the plain flow-matching "
                                             "target (pre-training fusion; 0 for Flux)."),
                "shift_min": _float(_D.shift_min, "Training schedules use a shift drawn from [min, max].", 0.01, 100.0),
                "shift_max": _float(_D.shift_max, "Upper end of the shift draw.", 0.01, 100.0),
                "resolution_shift_prob": _float(_D.resolution_shift_prob, "Probability of the resolution shift "
                                                "e^mu instead (0 for SD3)."),
                "ema_slow_decay": _float(_D.ema_slow_decay, "Slow EMA decay (second half of each target).", 0.0,
                                         0.999999, 0.0001),
                "ema_fast_decay": _float(_D.ema_fast_decay, "Fast EMA decay (first half of self items).", 0.0,
                                         0.999999, 0.0001),
                "ema_restart_every": _int(_D.ema_restart_every, "Restart both EMAs from the student every this "
                                          "many steps (0: never; SD3.5 recipe: 2000).", 0),
                "weight_decay": _float(_D.weight_decay, "AdamW weight decay.", 0.0, 1.0, 1e-5),
                "max_grad_norm": _float(_D.max_grad_norm, "Gradient-norm clip (10 Flux, 2 SD3.5).", 0.001, 1e6, 0.1),
                "grad_accum_steps": _int(_D.grad_accum_steps, "Micro-batches per optimizer step.", 1, 1024),
                "export_diffusers": ("BOOLEAN", {"default": False, "tooltip": "Flux only: also write the LoRA in the "
                                                 "authors' diffusers format (<save_name>_diffusers.safetensors)."}),
                "target_modules": ("STRING", {"default": "", "tooltip": "Empty: LoRA on every linear layer (the "
                                              "paper). Else comma-separated module names or suffixes, e.g. "
                                              "'img_attn.qkv, linear1'."}),
                "adam_beta1": _float(_D.adam_betas[0], "AdamW beta1.", 0.0, 0.9999, 0.001),
                "adam_beta2": _float(_D.adam_betas[1], "AdamW beta2.", 0.0, 0.99999, 0.0001),
                "adam_eps": _float(_D.adam_eps, "AdamW epsilon.", 1e-12, 1e-2, 1e-9),
                "t_max": _float(_D.t_max, "First schedule point (the paper: 1 - 1e-5, never pure noise).", 0.5, 1.0,
                                1e-5),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning for true CFG (cfg > 1): one per "
                                                         "latent or one for all, e.g. an empty prompt."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL", "LORA_MODEL", "LOSS_MAP", "IMAGE", "INT")
    RETURN_NAMES = ("model", "lora", "loss", "loss_plot", "steps")
    OUTPUT_TOOLTIPS = ("The input model with the trained shortcut LoRA applied (strength 1).",
                       "The LoRA, for the stock Save LoRA Weights and Load LoRA Model nodes.",
                       "Loss per step, for the stock Plot Loss Graph node.",
                       "The loss curve (light: per step, dark: moving average).",
                       "Optimizer steps the LoRA has been trained for.")
    FUNCTION = "train"
    CATEGORY = "training"
    DESCRIPTION = ("Distils the model into a few-step sampler with SCFM (velocity-field self-distillation, dual "
                   "EMA): trains a shortcut LoRA on few-shot or teacher-made latents.")

    @checked_inputs
    def train(self, model, latents, positive, steps, batch_size, learning_rate, rank, alpha, seed, save_name,
              checkpoint_every, resume_lora, cfg, guidance_min, guidance_max, gradient_checkpointing, sample_steps,
              sample_shift, sample_strength, t_skip, teacher_ratio, teacher_min_steps, teacher_max_steps,
              non_shortcut_ratio, shift_min, shift_max, resolution_shift_prob, ema_slow_decay, ema_fast_decay,
              ema_restart_every, weight_decay, max_grad_norm, grad_accum_steps, export_diffusers, target_modules,
              adam_beta1, adam_beta2, adam_eps, t_max, negative=None, unique_id=None):
        targets = tuple(name.strip() for name in target_modules.split(",") if name.strip()) or None
        config = ShortcutConfig(
            rank=rank, alpha=alpha, target_modules=targets, t_skip=t_skip, t_max=t_max,
            adam_betas=(adam_beta1, adam_beta2), adam_eps=adam_eps, teacher_ratio=teacher_ratio, teacher_min_steps=teacher_min_steps,
            teacher_max_steps=teacher_max_steps, non_shortcut_ratio=non_shortcut_ratio, shift_min=shift_min,
            shift_max=shift_max, resolution_shift_prob=resolution_shift_prob, guidance_range=(guidance_min, guidance_max),
            ema_slow_decay=ema_slow_decay, ema_fast_decay=ema_fast_decay, ema_restart_every=ema_restart_every,
            learning_rate=learning_rate, weight_decay=weight_decay, max_grad_norm=max_grad_norm, batch_size=batch_size,
            grad_accum_steps=grad_accum_steps, steps=steps, seed=seed, checkpoint_every=checkpoint_every,
            gradient_checkpointing=gradient_checkpointing, sample_steps=sample_steps, sample_shift=sample_shift,
            sample_strength=sample_strength)
        init_lora, resume_state, keep = None, None, None
        if resume_lora != NO_RESUME:
            keep = host.lora_path(resume_lora, "resume_lora")
            state = keep[: -len(".safetensors")] + host.TRAIN_STATE_SUFFIX
            if os.path.exists(state):
                resume_state = state
            else:
                init_lora = host_lora.read_host_lora(keep, model)
                ranks = sorted({w.rank for w in init_lora.values()})
                if ranks != [rank]:
                    raise host.HostInputError(f"resume_lora: {resume_lora} has rank {ranks[0] if len(ranks) == 1 else ranks}"
                                              f", the rank input is {rank}; set rank to the file's to train on from it")
        lora_file, state_file = host.free_output_paths(save_name, keep=keep)

        def write_lora(trainer) -> None:
            host_lora.save_host_lora(lora_file, trainer.adapters.lora_state(STUDENT), trainer.lora_metadata())

        run = host.TrainingRun(config=config, cfg=cfg, init_lora=init_lora, resume_state=resume_state,
                               checkpoint_path=state_file, on_step=host.Progress(steps, unique_id),
                               on_checkpoint=write_lora)
        result = host.train(model, latents["samples"], positive, negative, run)
        log.info("TrainShortcut: %d steps, final loss %.4g; wrote %s", result.steps,
                 result.losses[-1] if result.losses else float("nan"), lora_file)
        if export_diffusers:
            host_lora.save_diffusers_flux(lora_file[: -len(".safetensors")] + "_diffusers.safetensors", result.lora,
                                          model.model, result.metadata)
        lora_model = host_lora.to_lora_model(result.lora)
        plot = torch.from_numpy(loss_curve_image(result.losses))[None]
        return (host.with_lora(model, lora_model, 1.0), lora_model, {"loss": list(result.losses)}, plot, result.steps)

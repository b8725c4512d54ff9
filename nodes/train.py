"""TrainShortcut: SCFM distillation of a shortcut LoRA on the loaded model, inside the graph; and
ShortcutTrainingOptions, the recipe's other knobs, for the few who change them."""

from __future__ import annotations

import logging
import os

import torch

from ..shortcut_core.adapters import STUDENT
from ..shortcut_core.config import LORA_LAYERS, SCHEDULE_KNOBS, ShortcutConfig
from ..shortcut_core.loss_plot import loss_curve_image
from . import host, host_lora
from .inputs import check_inputs, checked_inputs

log = logging.getLogger("shortcut-flow")
_D = ShortcutConfig()  # the paper's defaults, one place
NO_RESUME = "(none)"
OPTIONS_TYPE = "SHORTCUT_TRAINING_OPTIONS"


def _int(default, tooltip, lo=0, hi=1_000_000):
    return ("INT", {"default": default, "min": lo, "max": hi, "tooltip": tooltip})


def _float(default, tooltip, lo=0.0, hi=1.0, step=0.01):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tooltip})


class ShortcutTrainingOptions:
    """Every knob of the SCFM recipe that TrainShortcut does not show, at the authors' Flux defaults."""

    @classmethod
    def INPUT_TYPES(cls):
        lo_g, hi_g = _D.guidance_range
        return {
            "required": {
                "alpha": _float(_D.alpha, "LoRA alpha; scale = alpha / rank. The paper keeps alpha = rank (64): "
                                "set it to your rank to keep that scale.", 0.01, 4096.0, 1.0),
                "guidance_min": _float(lo_g, "Guidance-distilled models (Flux dev): per-item guidance drawn from "
                                       "[min, max); ignored by models without a guidance input.", 0.0, 100.0, 0.1),
                "guidance_max": _float(hi_g, "Upper end of the guidance draw.", 0.0, 100.0, 0.1),
                "gradient_checkpointing": ("BOOLEAN", {"default": _D.gradient_checkpointing,
                                                       "tooltip": "Recompute block activations in backward: much "
                                                                  "less memory, about a third more time."}),
                "sample_steps": _int(_D.sample_steps, "Steps the LoRA is meant for: previews, calibration and the "
                                     "file's recipe.", 1, 100),
                "sample_shift": _float(_D.sample_shift, "Shift the LoRA is meant for (calibration tries it and its "
                                       "neighbours). Left at 3.25: the shift the connected model samples at.",
                                       0.01, 100.0),
                "sample_strength": _float(_D.sample_strength, "Strength written to the file when calibrate is off.",
                                          0.01, 4.0),
                "t_skip": _int(_D.t_skip, "Sub-steps each target walks (even): first half teacher or fast EMA, "
                               "second half slow EMA.", 2, 64),
                "teacher_ratio": _float(_D.teacher_ratio, "Share of items whose target starts with the teacher."),
                "teacher_min_steps": _int(_D.teacher_min_steps, "Teacher items use schedules of this many steps...", 2),
                "teacher_max_steps": _int(_D.teacher_max_steps, "...up to this many, in strides of t_skip.", 2),
                "non_shortcut_ratio": _float(_D.non_shortcut_ratio, "Share of items with the plain flow-matching "
                                             "target (pre-training fusion; 0 for Flux)."),
                "shift_min": _float(_D.shift_min, "Training schedules use a shift drawn from [min, max]. Left at Flux's "
                                   "2.5 (and likewise the three below), the connected model's own is used: the "
                                   "paper's draw scaled to the shift it samples at (Wan 8: 6.15-11.1; README).",
                                   0.01, 100.0),
                "shift_max": _float(_D.shift_max, "Upper end of the shift draw.", 0.01, 100.0),
                "resolution_shift_prob": _float(_D.resolution_shift_prob, "Probability of Flux's resolution shift "
                                                "e^mu instead. Left at 0.1: 0.1 for Flux and Chroma, 0 for the "
                                                "other families (as the SD3.5 recipe)."),
                "ema_slow_decay": _float(_D.ema_slow_decay, "Slow EMA decay (second half of each target).", 0.0,
                                         0.999999, 0.0001),
                "ema_fast_decay": _float(_D.ema_fast_decay, "Fast EMA decay (first half of self items).", 0.0,
                                         0.999999, 0.0001),
                "ema_restart_every": _int(_D.ema_restart_every, "Restart both EMAs from the student every this "
                                          "many steps (0: never; SD3.5 recipe: 2000).", 0),
                "weight_decay": _float(_D.weight_decay, "AdamW weight decay.", 0.0, 1.0, 1e-5),
                "max_grad_norm": _float(_D.max_grad_norm, "Gradient-norm clip (10 Flux, 2 SD3.5).", 0.001, 1e6, 0.1),
                "grad_accum_steps": _int(_D.grad_accum_steps, "Micro-batches per optimizer step.", 1, 1024),
                "target_modules": ("STRING", {"default": "", "tooltip": "Empty: LoRA on every linear layer (the "
                                              "paper). Else comma-separated module names or suffixes, e.g. "
                                              "'img_attn.qkv, linear1'."}),
                "adam_beta1": _float(_D.adam_betas[0], "AdamW beta1.", 0.0, 0.9999, 0.001),
                "adam_beta2": _float(_D.adam_betas[1], "AdamW beta2.", 0.0, 0.99999, 0.0001),
                "adam_eps": _float(_D.adam_eps, "AdamW epsilon.", 1e-12, 1e-2, 1e-9),
                "t_max": _float(_D.t_max, "First schedule point (the paper: 1 - 1e-5, never pure noise).", 0.5, 1.0,
                                1e-5),
                "export_diffusers": ("BOOLEAN", {"default": False, "tooltip": "Flux only: also write the LoRA in the "
                                                 "authors' diffusers format (<save_name>_diffusers.safetensors)."}),
                # memory modes (README: Will it fit?); last, so saved workflows keep their widget order
                "lora_layers": (list(LORA_LAYERS), {"default": _D.lora_layers, "tooltip": "all: "
                                + LORA_LAYERS["all"] + ". blocks: " + LORA_LAYERS["blocks"] + " (about a quarter "
                                "less LoRA memory on Flux)."}),
                "offload_optimizer": ("BOOLEAN", {"default": _D.offload_optimizer, "tooltip": "Keep AdamW's state "
                                                  "in RAM and step it on the CPU: a third of the LoRA's memory off "
                                                  "the GPU, same result, some time per step."}),
                "stream_weights": ("BOOLEAN", {"default": False, "tooltip": "Keep on the GPU only the model weights "
                                               "that fit beside training and copy the rest in from RAM at every "
                                               "forward (ComfyUI's lowvram loading): Flux at 1024 px on 16 GB, "
                                               "slower per step."}),
            }
        }

    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("The options, for Train Shortcut's options input.",)
    FUNCTION = "options"
    CATEGORY = "training"
    DESCRIPTION = ("The SCFM recipe's other knobs for Train Shortcut (the authors' Flux defaults). Leave Train "
                   "Shortcut's options input unconnected to use the defaults.")

    def options(self, **values):
        check_inputs(type(self).INPUT_TYPES(), values)
        return (dict(values),)


def _option_defaults() -> dict:
    return {name: spec[1]["default"] for name, spec in ShortcutTrainingOptions.INPUT_TYPES()["required"].items()}


class TrainShortcut:
    @classmethod
    def INPUT_TYPES(cls):
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
                "seed": ("INT", {"default": _D.seed, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Seeds the LoRA init, every draw and the preview noise: a run is "
                                            "reproducible (and not re-trained on every queue)."}),
                "save_name": ("STRING", {"default": "shortcut_lora", "tooltip": "File name in models/loras for the "
                                         "LoRA (with metadata) and its training state; _2, _3, ... is appended "
                                         "rather than overwrite a file."}),
                "checkpoint_every": _int(_D.checkpoint_every, "Write the LoRA and training state every this many "
                                         "steps (0: only at the end). Cancel also writes them.", 0),
                "resume_lora": ([NO_RESUME] + host.lora_names(), {
                    "tooltip": "Continue from a LoRA: exactly (optimizer, EMAs, step) when its .train_state file is "
                               "beside it, else starting the student and both EMAs from it."}),
                "cfg": _float(0.0, "True CFG inside the student's prediction and every target sub-step, for models "
                              "without distilled guidance; sample the LoRA with the same cfg. 0: the model family's "
                              "when a negative is connected (SD3.5 3.5, Wan 5, Qwen-Image 2.5, "
                              "Chroma and Lumina 2 4; Flux dev 1: it has distilled guidance), else 1.", 0.0, 30.0, 0.1),
                "preview_every": _int(100, "Show the teacher and the student at the LoRA's few steps beside the "
                                      "teacher at many, in this node, every this many steps (0: off). The final "
                                      "comparison is the preview output either way.", 0),
                "calibrate": ("BOOLEAN", {"default": True, "tooltip": "At the end, measure which strength and "
                                          "shift make the LoRA's few-step samples closest to the teacher's many-step "
                                          "ones, and write that recipe into the file (Shortcut LoRA Loader outputs it)."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning for true CFG (cfg > 1): one per "
                                                         "latent or one for all, e.g. an empty prompt."}),
                "options": (OPTIONS_TYPE, {"tooltip": "The recipe's other knobs (Shortcut Training Options); "
                                                      "unconnected: the authors' Flux defaults."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    RETURN_TYPES = ("MODEL", "LORA_MODEL", "LOSS_MAP", "IMAGE", "INT", "IMAGE", "INT", "FLOAT")
    RETURN_NAMES = ("model", "lora", "loss", "preview", "steps", "loss_plot", "sample_steps", "sample_shift")
    OUTPUT_TOOLTIPS = ("The input model with the trained shortcut LoRA applied at its recommended strength.",
                       "The LoRA, for the stock Save LoRA Weights and Load LoRA Model nodes.",
                       "Loss per step, for the stock Plot Loss Graph node.",
                       "Teacher at the LoRA's few steps | trained student (its recommended recipe) | teacher at "
                       "many steps, from one fixed noise, decoded by the latent previewer.",
                       "Optimizer steps the LoRA has been trained for.",
                       "The loss curve (light: per step, dark: moving average).",
                       "Steps the LoRA is for, for Shortcut Sampler's steps.",
                       "Shift the LoRA recommends (calibrated when calibrate is on), for Shortcut Sampler's shift.")
    FUNCTION = "train"
    CATEGORY = "training"
    DESCRIPTION = ("Distils the model into a few-step sampler with SCFM (velocity-field self-distillation, dual "
                   "EMA): trains a shortcut LoRA on few-shot or teacher-made latents, shows few-step previews "
                   "as it goes and calibrates the recipe it recommends.")

    @checked_inputs
    def train(self, model, latents, positive, steps, batch_size, learning_rate, rank, seed, save_name,
              checkpoint_every, resume_lora, cfg, preview_every, calibrate, negative=None, options=None,
              unique_id=None, prompt=None, *, progress=None, parallel=None, files=()):
        """`progress`, `parallel` and `files` are for the headless command (nodes/headless.py): its progress bar
        and stop requests, data parallelism (only process 0 writes files), and the model files it loaded."""
        given = dict(options or {})
        defaults = _option_defaults()
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise host.HostInputError(f"options: unknown knobs {unknown}; connect a Shortcut Training Options node")
        check_inputs(ShortcutTrainingOptions.INPUT_TYPES(), given)  # values can come from anywhere: check them
        o = {**defaults, **given}
        host.require_single_model(model, [*files, *host.upstream_files(prompt, unique_id)])
        # The schedule knobs left at the paper's (Flux) values follow the connected model's family.
        recipe = host.family_recipe(model)
        if o["export_diffusers"] and recipe.family != "Flux":
            raise host.HostInputError(f"export_diffusers: the authors' diffusers format is for Flux; this is a "
                                      f"{recipe.family} model. Turn it off: the LoRA is saved in ComfyUI's format "
                                      f"either way, which ComfyUI's loaders read")
        for knob in SCHEDULE_KNOBS:
            if o[knob] == defaults[knob]:
                o[knob] = recipe.schedule[knob]
        cfg = host.resolved_cfg(recipe, cfg, negative)
        targets = tuple(name.strip() for name in o["target_modules"].split(",") if name.strip()) or None
        config = ShortcutConfig(
            rank=rank, alpha=o["alpha"], target_modules=targets, t_skip=o["t_skip"], t_max=o["t_max"],
            adam_betas=(o["adam_beta1"], o["adam_beta2"]), adam_eps=o["adam_eps"], teacher_ratio=o["teacher_ratio"],
            teacher_min_steps=o["teacher_min_steps"], teacher_max_steps=o["teacher_max_steps"],
            non_shortcut_ratio=o["non_shortcut_ratio"], shift_min=o["shift_min"], shift_max=o["shift_max"],
            resolution_shift_prob=o["resolution_shift_prob"], guidance_range=(o["guidance_min"], o["guidance_max"]),
            ema_slow_decay=o["ema_slow_decay"], ema_fast_decay=o["ema_fast_decay"],
            ema_restart_every=o["ema_restart_every"], learning_rate=learning_rate, weight_decay=o["weight_decay"],
            max_grad_norm=o["max_grad_norm"], batch_size=batch_size, grad_accum_steps=o["grad_accum_steps"],
            steps=steps, seed=seed, checkpoint_every=checkpoint_every,
            gradient_checkpointing=o["gradient_checkpointing"], offload_optimizer=o["offload_optimizer"],
            lora_layers=o["lora_layers"], sample_steps=o["sample_steps"],
            sample_shift=o["sample_shift"], sample_strength=o["sample_strength"],
            extra={"family": recipe.family, "cfg": cfg})
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

        writer = parallel is None or parallel.rank == 0

        def write_lora(trainer) -> None:
            if writer:
                host_lora.save_host_lora(lora_file, trainer.adapters.lora_state(STUDENT), trainer.lora_metadata())

        run = host.TrainingRun(config=config, cfg=cfg, init_lora=init_lora, resume_state=resume_state,
                               checkpoint_path=state_file, progress=progress or host.Progress(steps, unique_id),
                               on_checkpoint=write_lora, preview_every=preview_every, calibrate=calibrate,
                               stream_weights=o["stream_weights"], parallel=parallel,
                               summary=recipe.text(cfg))
        outcome = host.train(model, latents["samples"], positive, negative, run)
        result = outcome.result
        log.info("TrainShortcut: %d steps, final loss %.4g; wrote %s", result.steps,
                 result.losses[-1] if result.losses else float("nan"), lora_file)
        if o["export_diffusers"] and writer:
            host_lora.save_diffusers_flux(lora_file[: -len(".safetensors")] + "_diffusers.safetensors", result.lora,
                                          model.model, result.metadata)
        lora_model = host_lora.to_lora_model(result.lora)
        plot = torch.from_numpy(loss_curve_image(result.losses))[None]
        preview = outcome.comparison if outcome.comparison is not None else torch.zeros(1, 64, 192, 3)
        patched = host.with_lora(model, lora_model, result.metadata.strength)
        outputs = (patched, lora_model, {"loss": list(result.losses)}, preview, result.steps, plot,
                   result.metadata.steps, float(result.metadata.shift))
        if outcome.calibration is None:
            return outputs
        return {"ui": {"text": [outcome.calibration.text()]}, "result": outputs}

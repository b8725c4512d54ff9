"""ShortcutTeacherLatents: the teacher's own samples for a list of prompts, one conditioning per latent,
ready for TrainShortcut (the paper's data-free route); with the shortcut schedule, the trained model's."""

from __future__ import annotations

from ..host.teacher import SCHEDULES, TEACHER_SCHEDULE, PromptLatents, check_settings, parse_prompts, sampling_settings
from .inputs import checked_inputs


class ShortcutTeacherLatents:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The teacher (Flux dev, SD3.5, ...), or a trained shortcut model with "
                                               "the shortcut schedule to compare on the same prompts and seeds."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder: each prompt is encoded once."}),
                "prompts": ("STRING", {"multiline": True, "default": "",
                                       "tooltip": "One prompt per line; blank lines and lines starting with # are "
                                                  "ignored. Varied prompts make a general shortcut LoRA."}),
                "per_prompt": ("INT", {"default": 1, "min": 1, "max": 256,
                                       "tooltip": "Images per prompt, each from its own seed."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16, "tooltip": "Image width."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16, "tooltip": "Image height."}),
                "steps": ("INT", {"default": 28, "min": 1, "max": 1000,
                                  "tooltip": "Sampling steps (the teacher: 28 for Flux dev; a shortcut model: 3)."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Flux dev's distilled guidance, given to every prompt; models "
                                                  "without a guidance input ignore it."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "True CFG against negative_prompt (SD3.5: 3.5); 1.0 for Flux dev."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "The negative prompt for cfg > 1 (empty: an empty "
                                                          "prompt, as the SD3.5 recipe)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Each image's noise comes from this seed, its prompt's text and its "
                                            "number: editing other prompts changes no image."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 256,
                                       "tooltip": "Images of one prompt sampled together."}),
                "cache": ("BOOLEAN", {"default": True, "tooltip": "Keep every image and its conditioning in "
                                      "output/shortcut_teacher_cache: a re-run or a run after Cancel makes only "
                                      "what is missing."}),
                "schedule": (list(SCHEDULES), {
                    "default": TEACHER_SCHEDULE,
                    "tooltip": "teacher: euler on the model's own (simple) schedule, as KSampler. shortcut: euler "
                               "on the SCFM schedule with the shift below, for a model with a shortcut LoRA."}),
                "shift": ("FLOAT", {"default": 3.25, "min": 0.01, "max": 100.0, "step": 0.01,
                                    "tooltip": "The SCFM schedule's shift (shortcut schedule only)."}),
                "length": ("INT", {"default": 1, "min": 1, "max": 4096, "step": 1,
                                   "tooltip": "Video models: frames per clip, counted as their Empty Latent Video "
                                              "node counts them (Wan, HunyuanVideo: 4k + 1, e.g. 33 or 81). 1 for "
                                              "image models."}),
            }
        }

    RETURN_TYPES = ("LATENT", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("latents", "positive", "negative")
    OUTPUT_TOOLTIPS = ("Every image, prompt by prompt (per_prompt each), one size.",
                       "One conditioning per latent, in the same order: Train Shortcut's positive.",
                       "The negative prompt's conditioning per latent: Train Shortcut's negative when cfg > 1.")
    FUNCTION = "make"
    CATEGORY = "training"
    DESCRIPTION = ("Samples the model on a list of prompts (the paper's data-free distillation data), with one "
                   "conditioning per latent for Train Shortcut; cached on disk, resumed after Cancel.")

    @checked_inputs
    def make(self, model, clip, prompts, per_prompt, width, height, steps, guidance, cfg, negative_prompt, seed,
             batch_size, cache, schedule, shift, length=1):
        lines = parse_prompts(prompts)
        settings = sampling_settings(dict(width=width, height=height, steps=steps, guidance=guidance, cfg=cfg,
                                          negative_prompt=negative_prompt, seed=seed, schedule=schedule, shift=shift,
                                          length=length))
        check_settings(lines, settings, model.get_model_object("latent_format"))
        latents, positive, negative = PromptLatents(model, clip, settings, cache).make(lines, per_prompt, batch_size)
        return ({"samples": latents}, positive, negative)

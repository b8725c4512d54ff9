"""TrainShortcut: SCFM distillation of a shortcut LoRA on the loaded model, inside the graph; and
ShortcutTrainingOptions, the recipe's other knobs, for the few who change them. Every knob's widget comes from
its declaration (shortcut_core/config.py, host/run.py); the work is host/settle.py's and host/training.py's."""

from __future__ import annotations

from ..host.checks import check_inputs, upstream_files
from ..host.progress import Progress
from ..host.settle import finish_run, settle_run
from ..host.training import train_in_graph
from ..host.widgets import knob_inputs
from ..shortcut_core.knobs import OPTIONS, TRAIN
from .inputs import checked_inputs

OPTIONS_TYPE = "SHORTCUT_TRAINING_OPTIONS"


class ShortcutTrainingOptions:
    """Every knob of the SCFM recipe that TrainShortcut does not show, at the authors' Flux defaults."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": knob_inputs(OPTIONS)}

    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("The options, for Train Shortcut's options input.",)
    FUNCTION = "options"
    CATEGORY = "training"
    DESCRIPTION = ("The SCFM recipe's other knobs for Train Shortcut (the authors' Flux defaults; the schedule's "
                   "'auto' values follow the connected model). Leave Train Shortcut's options input unconnected "
                   "to use the defaults.")

    def options(self, **values):
        check_inputs(type(self).INPUT_TYPES(), values)
        return (dict(values),)


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
                **knob_inputs(TRAIN),
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
    def train(self, model, latents, positive, negative=None, options=None, unique_id=None, prompt=None, **values):
        settled = settle_run(model, latents["samples"], positive, negative, values, options,
                             files=upstream_files(prompt, unique_id), reporter=Progress(values["steps"], unique_id))
        outcome = train_in_graph(settled.model, settled.latents, settled.positive, settled.negative, settled.run)
        outputs = tuple(finish_run(settled, outcome))
        if outcome.calibration is None:
            return outputs
        return {"ui": {"text": [outcome.calibration.text()]}, "result": outputs}

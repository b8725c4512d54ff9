"""A custom-node package for the browser tests' server only: a tiny Flux as a loader would hand it out.

No loader can make a Flux this small (ComfyUI's model detection hard-codes Flux's widths), so this node
builds one from ComfyUI's own classes (random weights, under inference_mode as loaders build models) with a
matching conditioning and a tiny text encoder, so that the real frontend can run the pack's nodes end to end
on a CPU in seconds.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: comfy_host's tiny models
import comfy_host  # noqa: E402


class TinyFluxForTests:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 3, "min": 0, "max": 2**31, "control_after_generate": False,
                                          "tooltip": "weights' seed"})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CLIP")
    FUNCTION = "load"
    CATEGORY = "tests"

    def load(self, seed):
        with torch.inference_mode():
            _, patcher = comfy_host.tiny_flux(seed=seed, vec_in_dim=32)  # the tiny CLIP's pooled width
        return patcher, comfy_host.flux_positive(patcher, tokens=6, seed=seed), comfy_host.tiny_clip(seed=seed)


NODE_CLASS_MAPPINGS = {"TinyFluxForTests": TinyFluxForTests}

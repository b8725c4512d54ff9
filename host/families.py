"""Model families: what the host knows of the model a user connects (its class, the shift it samples at, its
guidance input, its patchify), turned into the SCFM recipe that fits it, the true CFG it samples with and
the token count behind the resolution shift and the memory plan."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

import comfy.model_sampling

from ..shortcut_core.config import SCHEDULE_KNOBS, ShortcutConfig, schedule_around


FLUX_MU = 1.15

# True CFG each family is sampled with (the "auto" cfg when a negative is connected): ComfyUI's example workflows
# for each family, SD3.5 the SCFM authors' recipe (3.5, empty negative), Wan the Wan authors' text-to-video default
# (generate.py's sample_guide_scale 5; ComfyUI's example uses 6). Families not named here (Flux dev and HunyuanVideo
# take distilled guidance instead) run at 1.0.
FAMILY_CFG = {"SD3": 3.5, "AuraFlow": 3.5, "HiDream": 5.0, "WAN21": 5.0, "WAN22": 5.0, "QwenImage": 2.5,
              "Chroma": 4.0, "Lumina2": 4.0, "LTXV": 3.0}


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

"""The engine's velocity callable over a ComfyUI flow model: the host's own conditioning plumbing and
sampling_function, per training item, with the trainer's guidance draw."""

from __future__ import annotations

from typing import Any

import torch

import comfy.samplers

from .checks import HostInputError
from .families import distilled_guidance


_UNTRAINABLE_COND_KEYS = ("area", "mask", "control", "gligen", "hooks", "timestep_start", "timestep_end")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


class ConditionedVelocity:
    """v = f(x, t, item=..., guidance=...) for a ComfyUI flow model with per-item conditioning.

    `conds` are the guider's encoded conditioning lists: one entry per training latent, or one
    shared entry. Each call batches the entries of `item` with the host's own COND concatenation
    (cross-attention lengths padded as the host pads them) and runs the host's sampling_function.
    A per-item `guidance` replaces the conditioning's Flux guidance (the trainer's draw) where the network embeds
    one (`takes_guidance`); a settled run draws none elsewhere (host/settle.py).
    """

    def __init__(self, model, conds: dict[str, list[dict]], count: int, cfg: float, model_options: dict,
                 seed: int | None, input_name: str = "positive"):
        self.model, self.cfg, self.model_options, self.seed = model, float(cfg), model_options, seed
        self.positive = self._per_item(conds["positive"], count, input_name)
        negative = conds.get("negative")
        self.negative = self._per_item(negative, count, "negative") if negative is not None else None
        self.takes_guidance = ("guidance" in self.positive[0]["model_conds"]
                               and distilled_guidance(model.diffusion_model))
        # Items whose conditionings the host cannot concatenate (other prompt lengths in a
        # CONDRegular, reference latents on some items only) run as separate forwards, as the
        # host's calc_cond_batch runs such conds; items of one group share a forward.
        self.group_of = self._group_ids()
        # One network forward per call (the trainer may then mix adapters per item) unless
        # conditionings of other shapes must run apart.
        self.keeps_batch_whole = len(set(self.group_of)) == 1

    def distinct_items(self) -> list[int]:
        """The first item of each distinct conditioning (one for a shared conditioning)."""
        seen: set[int] = set()
        return [i for i, entry in enumerate(self.positive) if not (id(entry) in seen or seen.add(id(entry)))]

    def _group_ids(self) -> list[int]:
        representatives: list[int] = []
        ids = []
        for i in range(len(self.positive)):
            for gid, r in enumerate(representatives):
                if all(comfy.samplers.cond_equal_size(entries[i]["model_conds"], entries[r]["model_conds"])
                       for entries in (self.positive, self.negative) if entries is not None):
                    ids.append(gid)
                    break
            else:
                ids.append(len(representatives))
                representatives.append(i)
        return ids

    @staticmethod
    def _per_item(entries: list[dict], count: int, input_name: str) -> list[dict]:
        if len(entries) not in (1, count):
            raise HostInputError(f"{input_name}: has {len(entries)} conditionings for {count} latents; give one per "
                                 f"latent (in the same order) or a single one for all")
        for entry in entries:
            used = [k for k in _UNTRAINABLE_COND_KEYS if k in entry]
            if used:
                raise HostInputError(f"{input_name}: conditioning with {', '.join(used)} cannot be trained on; give "
                                     f"plain text conditioning (CLIPTextEncode, FluxGuidance, ReferenceLatent)")
            for key, cond in entry["model_conds"].items():
                tensors = cond.cond if isinstance(cond.cond, list) else [cond.cond]
                if any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] != 1 for t in tensors):
                    raise HostInputError(f"{input_name}: a conditioning's {key!r} holds a batch of "
                                         f"{tensors[0].shape[0]}; give one conditioning per latent as a list instead")
        return entries if len(entries) == count else entries * count

    def _batched(self, entries: list[dict], item: torch.Tensor, guidance: torch.Tensor | None, device) -> list[dict]:
        chosen = [entries[i] for i in item.tolist()]
        model_conds = {}
        for key, first in chosen[0]["model_conds"].items():
            # concat makes new tensors outside inference mode: autograd may save them
            model_conds[key] = first._copy_with(_to_device(first.concat([c["model_conds"][key] for c in chosen[1:]]), device))
        if guidance is not None and self.takes_guidance:
            model_conds["guidance"] = model_conds["guidance"]._copy_with(guidance.to(device, torch.float32))
        return [{"model_conds": model_conds, "uuid": chosen[0].get("uuid")}]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, item: torch.Tensor, guidance: torch.Tensor | None = None,
                 **_: Any) -> torch.Tensor:
        groups = torch.tensor([self.group_of[i] for i in item.tolist()])
        if bool((groups == groups[0]).all()):
            return self._velocity(x, t, item, guidance)
        rows = [torch.nonzero(groups == g).flatten() for g in groups.unique()]
        parts = [self._velocity(x[r], t[r], item[r], None if guidance is None else guidance[r]) for r in rows]
        return torch.cat(parts)[torch.argsort(torch.cat(rows))]

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, item: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        cond = self._batched(self.positive, item, guidance, x.device)
        uncond = self._batched(self.negative, item, guidance, x.device) if self.negative is not None else None
        denoised = comfy.samplers.sampling_function(self.model, x, t, uncond, cond, self.cfg,
                                                    model_options=self.model_options, seed=self.seed)
        return (x - denoised) / t.reshape(-1, *([1] * (x.ndim - 1)))

"""Training a LoRA through weights that were created under torch.inference_mode, without copying them.

ComfyUI runs every node under inference_mode, so the weights of a model it loads are inference
tensors. Autograd refuses to save those for backward, and a frozen linear saves its weight to
pass the gradient on to its input: a LoRA upstream of such a weight could not learn through it.
For the duration of a training run each such parameter or buffer is replaced by an ordinary
tensor that aliases its storage (`Tensor.set_`; no bytes are copied) and carries the original's
Python attributes, and the original objects are put back afterwards, so the module ends exactly
as it was.

A parameter made under inference_mode and later moved or converted outside it (`module.to(device)`:
ComfyUI moving a model to the GPU inside a node that trains) is no longer an inference tensor but keeps
the inference tensor's missing version counter, which autograd refuses just the same: it is aliased too.
"""

from __future__ import annotations

import torch
from torch import nn


def _alias(t: torch.Tensor) -> torch.Tensor | None:
    """An ordinary tensor over t's storage, or None when t cannot be aliased (a tensor subclass)."""
    if type(t) not in (torch.Tensor, nn.Parameter):
        return None
    try:
        with torch.inference_mode(False), torch.no_grad():
            alias = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(),
                                                                       t.size(), t.stride())
    except (RuntimeError, TypeError):
        return None
    alias = nn.Parameter(alias, requires_grad=False) if isinstance(t, nn.Parameter) else alias
    # Attributes a host set on its weights travel with them: newer ComfyUI reads a weight's
    # `_model_dtype` to size the GPU copy it streams the weight into.
    alias.__dict__.update(t.__dict__)
    return alias


def _untracked(t: torch.Tensor) -> bool:
    """Whether autograd would refuse to save t: an inference tensor, or one that inherited its missing
    version counter."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False


class InferenceTensorAliases:
    """Swap every inference-mode parameter and buffer of `module` for a storage alias; `restore()` undoes it."""

    def __init__(self, module: nn.Module):
        self._swapped: list[tuple[dict, str, torch.Tensor]] = []
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in list(table.items()):
                    if t is not None and _untracked(t):
                        alias = _alias(t)
                        if alias is not None:
                            self._swapped.append((table, name, t))
                            table[name] = alias
        self.count = len(self._swapped)

    def restore(self) -> None:
        for table, name, original in reversed(self._swapped):
            table[name] = original
        self._swapped = []

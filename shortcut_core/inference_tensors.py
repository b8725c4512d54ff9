"""Training a LoRA through weights that were created under torch.inference_mode.

ComfyUI runs every node under inference_mode, so the weights of a model it loads are inference
tensors. Autograd refuses to save those for backward, and a frozen linear saves its weight to
pass the gradient on to its input: a LoRA upstream of such a weight cannot learn through it.
While grad is enabled, each module owning inference tensors runs its forward on ordinary copies
of them, made for that call and freed with the activations that saved them (one block's worth
under gradient checkpointing, as when the host casts fp8 weights at use). Under no_grad, as in
SCFM's target passes and in sampling, nothing is copied. The module's own tensors are put back
after every call, also when it raises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _inference_tensor_names(module: nn.Module) -> tuple[list[str], list[str]]:
    params = [n for n, t in module._parameters.items() if t is not None and t.is_inference()]
    buffers = [n for n, t in module._buffers.items() if t is not None and t.is_inference()]
    return params, buffers


class InferenceTensorCopies:
    """Forward hooks on every submodule of `module` that owns inference tensors; `remove()` undoes them."""

    def __init__(self, module: nn.Module):
        self._handles: list[RemovableHandle] = []
        self._originals: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}
        self.owners = 0
        for sub in module.modules():
            params, buffers = _inference_tensor_names(sub)
            if params or buffers:
                self.owners += 1
                self._handles.append(sub.register_forward_pre_hook(self._make_swap_in(params, buffers)))
                self._handles.append(sub.register_forward_hook(self._swap_back, always_call=True))

    def _make_swap_in(self, params: list[str], buffers: list[str]):
        def swap_in(sub: nn.Module, args: Any) -> None:
            if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                return
            swapped = []
            for name in params:
                original = sub._parameters[name]
                swapped.append((sub._parameters, name, original))
                sub._parameters[name] = nn.Parameter(original.clone(), requires_grad=False)
            for name in buffers:
                original = sub._buffers[name]
                swapped.append((sub._buffers, name, original))
                sub._buffers[name] = original.clone()
            self._originals.setdefault(id(sub), []).append(swapped)
        return swap_in

    def _swap_back(self, sub: nn.Module, args: Any, output: Any) -> None:
        stack = self._originals.get(id(sub))
        if not stack:
            return
        for table, name, original in stack.pop():
            table[name] = original
        if not stack:
            del self._originals[id(sub)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

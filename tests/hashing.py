"""Bit-exact fingerprints of a module's tensors, for "left exactly as it was" assertions."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def tensor_hashes(module: nn.Module) -> dict[str, str]:
    """One digest per state-dict entry (with dtype and shape), so a failure names the tensor."""
    return {name: hashlib.sha256(_tensor_bytes(t)).hexdigest() + str(t.dtype) + str(t.shape)
            for name, t in module.state_dict(keep_vars=True).items()}


def module_hash(module: nn.Module) -> str:
    """One digest over every state-dict name and tensor."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()

"""A folder of samples on disk, one safetensors file per sample, named by a key the caller derives from
everything that made the sample; and the fingerprints such keys are built from.

A fingerprint of a set of weights reads a fixed number of values of each tensor (spread evenly over it)
with its name, shape and dtype, so that a 24 GB model is fingerprinted in a moment: any retrained,
patched, re-quantised or swapped model differs in them; an edit that touches none of the sampled values
would not be seen (the samples are spread over every tensor, so no fine-tune escapes them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .safetensors_io import SafetensorsFileError, read_safetensors, write_safetensors_atomic

log = logging.getLogger("shortcut-flow")

FINGERPRINT_VALUES = 64  # values read per tensor


def tensor_fingerprint(tensor: torch.Tensor, values: int = FINGERPRINT_VALUES) -> bytes:
    """Shape, dtype and `values` evenly spread elements of a tensor, as bytes."""
    flat = tensor.detach().reshape(-1)
    head = f"{tuple(tensor.shape)}|{tensor.dtype}|".encode()
    if flat.numel() == 0:
        return head
    index = torch.linspace(0, flat.numel() - 1, min(values, flat.numel()), device=flat.device).round().long()
    # the raw bytes, whatever the dtype (bf16 and fp8 included)
    return head + flat[index].cpu().contiguous().view(torch.uint8).numpy().tobytes()


def fingerprint(parts: Iterable[Any]) -> str:
    """A hex digest of a sequence of tensors, (name, tensor) pairs, strings, numbers and JSON-able values."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(tensor_fingerprint(part))
        elif isinstance(part, tuple) and len(part) == 2 and isinstance(part[1], torch.Tensor):
            digest.update(str(part[0]).encode() + b"=")
            digest.update(tensor_fingerprint(part[1]))
        else:
            digest.update(json.dumps(part, sort_keys=True, default=repr).encode())
        digest.update(b"\0")
    return digest.hexdigest()


class SampleCache:
    """`folder/<key>.safetensors`: written atomically; an unreadable file is reported, removed and treated
    as missing, so a damaged cache costs a resample, never the run."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return read_safetensors(path, what="cached sample")
        except SafetensorsFileError as e:
            log.warning("shortcut-flow: %s; it is removed and made again", e)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_safetensors_atomic(self.path(key), {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                 dict(metadata or {}))

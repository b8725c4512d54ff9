"""Streaming a frozen model's block weights from RAM, one block ahead of the compute.

A card that cannot hold the whole base model keeps some blocks' weights in RAM. Copying each weight when an op
needs it (ComfyUI's lowvram route) stalls the compute on every copy, from pageable memory, four to five times per
SCFM step (the target's sub-steps, the student's forward, its recomputation, the backward): 3.5x the step time on
an H200. Here a block's weights are copied as a whole from pinned RAM on a side stream while the previous block
computes (block i+1 in forwards, i-1 in the checkpointed backward), so the copies overlap the compute, and only
host-to-device: the base is frozen, so nothing is written back and the RAM copy stays the truth.

At most two blocks' streamed weights are on the device at once: the one computing and the one arriving. The
LoRA and its state never move (they are not streamed: only tensors the streamer found off the device, or was told
to take off it, are). Streaming needs the pack's gradient checkpointing, which recomputes each block inside its
own backward (activation_checkpointing.py: `around_recompute` brings the block in there); without it autograd
would keep every block's weights for the backward, and nothing would be saved.

On a CPU there is nothing to copy to: the "device copy" is a fresh clone and the streams are no-ops, so the code
path runs and results stay bit-identical, which the tests check.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn


@dataclass
class _Streamed:
    """One block's weights kept in RAM: where each one lives in the module tree, and its RAM copy."""
    # (table, name, entry found there); the entry is None where it was on the device and is rebuilt on exit from
    # the RAM copy (holding it would keep the device memory the streaming frees)
    slots: list[tuple[dict, str, torch.Tensor | None]] = field(default_factory=list)
    parameter: list[bool] = field(default_factory=list)
    host: list[torch.Tensor] = field(default_factory=list)                     # the copy we stream from (pinned on CUDA)
    nbytes: int = 0


def _frozen_tensors(block: nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
    """A block's frozen parameters and buffers, each once, LoRA factors excluded (they stay on the device)."""
    seen: set[int] = set()
    for name, sub in block.named_modules():
        if "lora_" in name:
            continue
        for table in (sub._parameters, sub._buffers):
            for key, t in table.items():
                if t is None or t.requires_grad or id(t) in seen:
                    continue
                seen.add(id(t))
                yield table, key, t


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The RAM copy to stream from: pinned where the device is a CUDA one (a copy from pageable memory is staged
    through a pinned buffer by the driver, at half the speed and blocking), the tensor itself otherwise."""
    t = t.detach()
    if device.type == "cuda":
        return t.to("cpu").pin_memory()
    return t.to("cpu")


def _as_entry(t: torch.Tensor, parameter: bool) -> torch.Tensor:
    return nn.Parameter(t, requires_grad=False) if parameter else t


class BlockStreamer:
    """Streams the weights of `blocks` that are not on `device` (or that `offload` names: those the streamer takes
    off the device itself, by index) while the model runs; a context manager. On exit every block holds what it
    held before (offloaded weights copied back: bit-identical), hooks removed, pinned copies freed."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, *, offload: Sequence[int] = ()):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.offload = sorted(set(offload))
        bad = [i for i in self.offload if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"offload: block {bad[0]} does not exist; the model has {len(self.blocks)} repeated "
                             f"blocks (0 to {len(self.blocks) - 1})")
        self.streamed: dict[int, _Streamed] = {}
        self._order: list[int] = []          # streamed block indices, in forward order
        self._resident: dict[int, list[torch.Tensor]] = {}   # block -> its device copies while in use or arriving
        self._arrived: dict[int, object] = {}                # block -> the copy stream's event for its arrival
        self._in_use: set[int] = set()                       # the block computing now (never dropped for a prefetch)
        self._hooks: list = []
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.copied_bytes = 0

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> "BlockStreamer":
        try:
            for i, block in enumerate(self.blocks):
                entry = _Streamed()
                for table, key, t in _frozen_tensors(block):
                    on_device = t.device == self.device
                    if on_device and i not in self.offload:
                        continue
                    entry.slots.append((table, key, None if on_device else t))
                    entry.parameter.append(isinstance(t, nn.Parameter))
                    entry.host.append(_pinned(t, self.device) if (on_device or self.device.type == "cuda") else t)
                    entry.nbytes += t.numel() * t.element_size()
                if entry.slots:
                    self.streamed[i] = entry
            self._order = sorted(self.streamed)
            # The RAM copies take the weights' place, so what the device held is freed (offloaded blocks).
            for i in self._order:
                self._park(i)
            for i, block in enumerate(self.blocks):
                if i in self.streamed:
                    self._hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: self._before(i)))
                    self._hooks.append(block.register_forward_hook(lambda m, a, o, i=i: self._after(i)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._side is not None:
            self._side.synchronize()
        self._resident.clear()
        self._arrived.clear()
        for entry in self.streamed.values():
            for (table, key, original), host, parameter in zip(entry.slots, entry.host, entry.parameter):
                table[key] = original if original is not None else _as_entry(host.to(self.device), parameter)
            entry.host.clear()
        self.streamed.clear()
        self._order = []

    @property
    def streamed_bytes(self) -> int:
        return sum(e.nbytes for e in self.streamed.values())

    def _park(self, i: int) -> None:
        """Block i's slots point at the RAM copies (no device memory held for it)."""
        entry = self.streamed[i]
        for (table, key, _), host, parameter in zip(entry.slots, entry.host, entry.parameter):
            table[key] = _as_entry(host, parameter)

    # ------------------------------------------------------------------ copies
    def _copy_in(self, i: int) -> None:
        """Start bringing block i's weights to the device (on the side stream: it overlaps the compute)."""
        if i in self._resident:
            return
        host = self.streamed[i].host
        if self._side is None:
            self._resident[i] = [t.clone() for t in host]
        else:
            # the side stream must not overwrite memory the compute stream may still read (a freed block's)
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                self._resident[i] = [t.to(self.device, non_blocking=True) for t in host]
                event = torch.cuda.Event()
                event.record(self._side)
            self._arrived[i] = event
        self.copied_bytes += self.streamed[i].nbytes

    def fetch(self, i: int) -> None:
        """Block i's weights on the device, in its slots, once they have arrived."""
        self._copy_in(i)
        event = self._arrived.pop(i, None)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in self._resident[i]:
                t.record_stream(compute)  # allocated on the side stream, used on this one
        entry = self.streamed[i]
        for (table, key, _), t, parameter in zip(entry.slots, self._resident[i], entry.parameter):
            table[key] = _as_entry(t, parameter)

    def release(self, i: int) -> None:
        """Block i back to its RAM copies; its device copies are freed once the compute that reads them is done."""
        if i in self.streamed:
            self._park(i)
        self._resident.pop(i, None)
        self._arrived.pop(i, None)

    def _neighbour(self, i: int, step: int) -> int:
        k = self._order.index(i)
        return self._order[(k + step) % len(self._order)]

    def _prefetch(self, i: int) -> None:
        """Bring block i in ahead of use, dropping any other block that arrived and was not used: two at most."""
        for j in [j for j in self._resident if j != i and j not in self._in_use]:
            self.release(j)
        self._copy_in(i)

    # ------------------------------------------------------------------ hooks
    def _before(self, i: int) -> None:
        self._in_use = {i}
        self.fetch(i)
        # A forward with grad (the student's, checkpointed) ends where its backward starts: at the last block.
        last = i == self._order[-1]
        self._prefetch(i if last and torch.is_grad_enabled() else self._neighbour(i, +1))

    def _after(self, i: int) -> None:
        self._in_use = set()
        if torch.is_grad_enabled() and i == self._order[-1]:
            return  # the backward recomputes this block first
        self.release(i)

    @contextlib.contextmanager
    def in_backward(self, block: nn.Module) -> Iterator[None]:
        """Around a block's recomputation and differentiation (checkpoint_blocks' around_recompute): the block's
        weights in, the previous streamed block on its way."""
        i = next((k for k, b in enumerate(self.blocks) if b is block), None)
        if i is None or i not in self.streamed:
            yield
            return
        self._in_use = {i}
        self.fetch(i)
        self._prefetch(self._neighbour(i, -1))
        try:
            yield
        finally:
            self._in_use = set()
            self.release(i)

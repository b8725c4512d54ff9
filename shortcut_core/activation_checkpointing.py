"""Gradient (activation) checkpointing for a model's blocks, safe for blocks that add residuals in place.

A block that does `x += f(x)` on its own input breaks both plain autograd ("modified by an
inplace operation") and block checkpointing: the checkpoint keeps a reference to the input,
the block then mutates it, and the recomputation in backward starts from the wrong tensor,
silently giving wrong gradients. Cloning the block's tensor inputs inside the wrapped call makes
the block mutate a private copy, which fixes both (without recomputation, what autograd saves
from that copy is saved as a copy of its own, since the block still mutates it after saving).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _cloned(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def checkpoint_blocks(blocks: Iterable[nn.Module], *, recompute: bool = True, clone_inputs: bool = True) -> Iterator[None]:
    """Inside the block, each block's forward recomputes its activations in backward (recompute)
    and/or runs on copies of its tensor inputs (clone_inputs). Under no_grad the blocks run as usual.
    The blocks are restored on exit.
    """
    wrapped: list[nn.Module] = []
    try:
        for block in blocks:
            if "forward" in block.__dict__:
                raise ValueError(f"{type(block).__name__} already has a patched forward; wrap each block once")
            block.forward = _wrap(block.forward, recompute=recompute, clone_inputs=clone_inputs)
            wrapped.append(block)
        yield
    finally:
        for block in wrapped:
            del block.forward


def _saving_input_copies(forward, args: tuple, kwargs: dict) -> Any:
    """Run forward with autograd saving copies of tensors that alias its (cloned) inputs.

    Without recomputation autograd keeps what the block's ops save, e.g. a norm's or a LoRA's
    input; a block that then adds its residual in place into that input would invalidate it
    ("modified by an inplace operation"), cloning the input or not. One copy per saved view.
    """
    def storage(t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a plain storage
            return None

    storages = {storage(v) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)} - {None}
    copies: dict[tuple, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = storage(t)
        if ptr is None or ptr not in storages:
            return t
        key = (ptr, t._version, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in copies:
            copies[key] = t.detach().clone()
        return copies[key]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return forward(*args, **kwargs)


def _wrap(forward, *, recompute: bool, clone_inputs: bool):
    def run(*args: Any, **kwargs: Any) -> Any:
        if clone_inputs:
            args = tuple(_cloned(a) for a in args)
            kwargs = {k: _cloned(v) for k, v in kwargs.items()}
            if not recompute:
                return _saving_input_copies(forward, args, kwargs)
        return forward(*args, **kwargs)

    def wrapped_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if recompute:
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        return run(*args, **kwargs)

    return wrapped_forward

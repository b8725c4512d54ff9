"""Gradient (activation) checkpointing for a model's blocks, exact for blocks that add residuals in place.

A block that does `x += f(x)` on its own input breaks plain autograd ("modified by an inplace
operation") and torch's checkpointing alike: the checkpoint keeps a reference to the input,
the block mutates it, and backward sees the wrong tensor, silently giving wrong gradients.
Cloning the block's tensor inputs makes it mutate a private copy; what autograd saves from that
copy is saved as a copy of its own, since the block may still mutate it after saving. With
recomputation the block is re-run in backward under plain autograd (_RecomputeInBackward),
where those saved copies work; torch's own checkpoint keeps recomputed tensors by reference and
would hand backward the mutated ones (measured on ComfyUI's Flux: 4% gradient error).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn

from .forward_patches import own_forward, restore_forwards


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors in an argument, also inside tuples, lists, dicts and dataclasses: blocks take activations packed
    so (Chroma's blocks get their modulation as tuples of dataclasses of tensors from the approximator)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensor_leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensor_leaves(getattr(value, f.name))]
    return []


def _refilled(value: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """The argument with its tensor leaves (in _tensor_leaves' order) taken from `tensors`; the containers are new,
    the argument itself is left as it was."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*[_refilled(v, tensors) for v in value])
    if isinstance(value, (list, tuple)):
        return type(value)(_refilled(v, tensors) for v in value)
    if isinstance(value, dict):
        return {k: _refilled(v, tensors) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(out, f.name, _refilled(getattr(value, f.name), tensors))  # frozen ones too
        return out
    return value


def _cloned(value: Any) -> Any:
    leaves = _tensor_leaves(value)
    return _refilled(value, iter([t.clone() for t in leaves])) if leaves else value


@contextlib.contextmanager
def checkpoint_blocks(blocks: Iterable[nn.Module], *, recompute: bool = True, clone_inputs: bool = True,
                      around_recompute: Callable[[nn.Module], ContextManager] | None = None) -> Iterator[None]:
    """Inside the block, each block's forward recomputes its activations in backward (recompute)
    and/or runs on copies of its tensor inputs (clone_inputs). Under no_grad the blocks run as usual.
    `around_recompute(block)` encloses a block's recomputation and differentiation in backward (weight
    streaming brings the block's weights in there: block_streaming.py). A forward already set on the
    instance (a compiled one: regional_compile.py) is the one wrapped. The blocks are restored on exit.
    """
    wrapped: list[tuple[nn.Module, Any]] = []
    try:
        for block in blocks:
            before = own_forward(block)
            if getattr(before, "_checkpointed", False):
                raise ValueError(f"{type(block).__name__} already has a checkpointed forward; wrap each block once")
            around = (lambda b=block: around_recompute(b)) if around_recompute is not None else contextlib.nullcontext
            block.forward = _wrap(block.forward, recompute=recompute, clone_inputs=clone_inputs,
                                  module_params=block.parameters, around=around)
            wrapped.append((block, before))
        yield
    finally:
        restore_forwards(wrapped)


def _saving_input_copies(forward, args: tuple, kwargs: dict) -> Any:
    """Run forward with autograd saving copies of tensors that alias its (cloned) inputs.

    Without recomputation autograd keeps what the block's ops save, e.g. a norm's or a LoRA's
    input; a block that then adds its residual in place into that input would invalidate it
    ("modified by an inplace operation"), cloning the input or not. One copy per saved view.
    """
    def storage(t: torch.Tensor) -> int | None:
        # the storage object's identity (views share it), not its data pointer: fake tensors (memory
        # accounting) have no data, and every one of them would look like an alias of the inputs
        try:
            return t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):  # subclasses without a plain storage
            return None

    storages = {storage(t) for v in (*args, *kwargs.values()) for t in _tensor_leaves(v)} - {None}
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


class _RecomputeInBackward(torch.autograd.Function):
    """Block checkpointing that stays exact when a block mutates its (cloned) inputs in place.

    torch's non-reentrant checkpoint recomputes with its own saved-tensor hooks and keeps what
    the recomputation saves by reference, so a block that saves its input, adds a residual into
    it in place and saves again (Flux's DoubleStreamBlock: norm, `txt += ...`, norm, `txt += ...`)
    hands backward the mutated tensor: silently wrong gradients. Here the forward runs without
    grad, and backward recomputes the block under plain autograd with copies of what aliases its
    inputs (_saving_input_copies), then differentiates it at once. The block's trainable
    parameters are inputs of this function, so they get their gradients even when no tensor
    input requires grad (a LoRA only inside the blocks).
    """

    @staticmethod
    def forward(ctx, body, around, n_inputs: int, params: tuple, *tensors):
        inputs = tensors[:n_inputs]
        ctx.body, ctx.around, ctx.params = body, around, params
        ctx.save_for_backward(*inputs)
        output = body(*inputs)
        ctx.tuple_output = isinstance(output, tuple)
        return output

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with ctx.around():
            with torch.enable_grad():
                output = ctx.body(*inputs, protect_saved=True)
            outputs = output if ctx.tuple_output else (output,)
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                     if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = [t for t in inputs if t.requires_grad] + list(ctx.params)
            grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True) \
                if pairs and wrt else [None] * len(wrt)
        grads = list(grads)
        input_grads = [grads.pop(0) if t.requires_grad else None for t in inputs]
        return (None, None, None, None, *input_grads, *grads)


def _call(forward, args: tuple, kwargs: dict, *, clone_inputs: bool, protect_saved: bool) -> Any:
    """forward on clones of its tensor inputs (clone_inputs), with autograd saving copies of what
    aliases them (protect_saved: needed only where autograd records)."""
    if clone_inputs:
        args = tuple(_cloned(a) for a in args)
        kwargs = {k: _cloned(v) for k, v in kwargs.items()}
        if protect_saved:
            return _saving_input_copies(forward, args, kwargs)
    return forward(*args, **kwargs)


def _recomputed(forward, module_params, args: tuple, kwargs: dict, clone_inputs: bool, around) -> Any:
    """Run forward through _RecomputeInBackward: tensors of args and kwargs become its inputs."""
    keys = list(kwargs)
    values = list(args) + [kwargs[k] for k in keys]
    leaves = _tensor_leaves(values)  # nested ones too: a tensor left out would be a constant without gradient

    def body(*tensors: torch.Tensor, protect_saved: bool = False) -> Any:
        filled = _refilled(values, iter(tensors))
        return _call(forward, tuple(filled[:len(args)]), dict(zip(keys, filled[len(args):])),
                     clone_inputs=clone_inputs, protect_saved=protect_saved)

    params = tuple(p for p in module_params() if p.requires_grad)
    return _RecomputeInBackward.apply(body, around, len(leaves), params, *leaves, *params)


def _wrap(forward, *, recompute: bool, clone_inputs: bool, module_params, around):
    def wrapped_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if recompute:
            return _recomputed(forward, module_params, args, kwargs, clone_inputs, around)
        return _call(forward, args, kwargs, clone_inputs=clone_inputs, protect_saved=True)

    wrapped_forward._checkpointed = True
    return wrapped_forward

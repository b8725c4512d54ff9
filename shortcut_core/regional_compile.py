"""Regional compilation for training: each repeated block compiled on its own, as ComfyUI's TorchCompileModel
compiles blocks for inference, not the whole model: the blocks of one class share one compiled function, so a
57-block Flux compiles two kinds of block instead of one graph of the whole model.

What a training step makes dynamo compile, per block class (shapes are static, dynamic=False):
  - dynamo guards on peft's switches in every LoRA layer (`_active_adapter`, `_disable_adapters`), on grad mode
    and on input shapes. A step runs the blocks as teacher (adapters off), fast EMA and slow EMA under no_grad,
    each on a subset of the batch (1 to B items), and as the student without grad (the checkpoint's forward)
    and with it (its recomputation, or the forward without checkpointing): up to 3 B + 2 compiled variants,
    each compiled the first time its role and item count come up (the tests' model: B = 1, 5 in the first 3
    steps; B = 4, 10 in the first 6). Past dynamo's default limit of 8 the rest would run eagerly (one log
    line), so these compiles get `recompile_limit` (their own, kept apart from other compiles of the same blocks
    on torch that has per-call limits; else the global limit, raised while a compiled_blocks is open).
  - a block that changes in place a tensor its own ops saved for backward (Flux: `txt += ...` after a norm saved
    txt) cannot be compiled where autograd records: AOTAutograd traces autograd as eager does and refuses it,
    and the saved-tensor hooks that make eager exact (activation_checkpointing.py) only run after tracing. Such a
    block runs compiled where autograd does not record (targets, the checkpoint's forward) and eagerly where it
    does (the recomputation in backward); other blocks are compiled in backward too. One eager run on copies of
    the inputs tells which, not a refused compile: refused inside the checkpoint's backward, the trace (anomaly
    mode) leaves that backward node referenced from torch's C++ side for good, and through it the step's
    activations (measured).
  - forward hooks are guarded by their number only (torch._dynamo.config.skip_nnmodule_hook_guards): a hook
    added after compiling (ShortcutAdapters.use_per_item picks each item's adapter by one) would be baked into
    the compiled code and reused by later calls with other hooks. Calls made while a block's submodules hold
    other hooks than at the start run eagerly (the block's own hooks, block streaming's, run outside its
    forward); trainers compiling blocks run per-role forwards instead.
Compiling happens in the calls themselves, so the first steps (and any later step bringing a new item count)
are slower: time steps after the first few. Compiled variants are kept for later runs on blocks of the class.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .activation_checkpointing import _refilled, _tensor_leaves
from .forward_patches import own_forward, restore_forwards

RECOMPILE_LIMIT = 64  # 3 B + 2 variants a run, counted over the process's runs (_by_class)

# A recompile limit of one compile call's own, kept apart from other compiles of the same code (newer torch).
_PER_CALL_LIMIT = {"recompile_limit", "isolate_recompiles"} <= set(inspect.signature(torch.compile).parameters)

# One compiled forward per block class, kept for later runs: their compiled variants stay valid (the guards name
# attributes, not objects), and each new compile call would add its own to the code's lifetime total, which
# dynamo caps across all calls (accumulated_recompile_limit, 256).
_by_class: dict[tuple, Callable] = {}


@contextlib.contextmanager
def compiled_blocks(blocks: Iterable[nn.Module], *, mode: str | None = None, backend: str | Callable = "inductor",
                    recompile_limit: int = RECOMPILE_LIMIT) -> Iterator[None]:
    """Inside the block each block's forward runs compiled (mode and backend as torch.compile's); the blocks
    are restored on exit. Enter it before checkpoint_blocks, which then wraps the compiled forward. A trainer
    can hold it open for its whole life: contextlib.ExitStack.enter_context, closed in close()."""
    patched: list[tuple[nn.Module, Any]] = []
    with contextlib.nullcontext() if _PER_CALL_LIMIT else _global_recompile_limit(recompile_limit):
        try:
            for block in blocks:
                before = own_forward(block)
                if getattr(before, "_checkpointed", False):
                    raise ValueError("compile the blocks before checkpointing them "
                                     "(checkpoint_blocks wraps a compiled forward, not the reverse)")
                if getattr(before, "_compiled", False):
                    raise ValueError(f"{type(block).__name__} is already compiled; compile each block once")
                if before is not None:  # a forward set on this block alone is compiled for it alone
                    compiled = _compile(before, mode, backend, recompile_limit)
                    block.forward = _bound(before, compiled, block, pass_block=False)
                else:
                    key = (type(block), mode, backend, recompile_limit)
                    if key not in _by_class:
                        _by_class[key] = _compile(type(block).forward, mode, backend, recompile_limit)
                    block.forward = _bound(type(block).forward, _by_class[key], block, pass_block=True)
                patched.append((block, before))
            yield
        finally:
            restore_forwards(patched)


def _compile(forward: Callable, mode: str | None, backend: str | Callable, recompile_limit: int) -> Callable:
    options: dict[str, Any] = dict(dynamic=False, mode=mode, backend=backend)
    if _PER_CALL_LIMIT:
        options.update(recompile_limit=recompile_limit, isolate_recompiles=True)
    return torch.compile(forward, **options)


def _bound(forward: Callable, compiled: Callable, block: nn.Module, *, pass_block: bool) -> Callable:
    """The block's forward: compiled, or its own where compiling would be wrong or refused."""
    prefix = (block,) if pass_block else ()
    # the hooks compiled into the block's code: its submodules' (the block's own run outside its forward)
    modules = [m for m in block.modules() if m is not block]
    hooks = _hooks(modules)
    eager_with_grad: bool | None = None  # known at the first call where autograd records

    def block_forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal eager_with_grad
        if _hooks(modules) != hooks:  # hooks dynamo would not tell apart (see the module's docstring)
            return forward(*prefix, *args, **kwargs)
        if torch.is_grad_enabled():
            if eager_with_grad is None:  # asked of an eager run, not of a refused compile (module docstring)
                eager_with_grad = _changes_saved_tensors(forward, (*prefix, *args), kwargs)
                if eager_with_grad:
                    warnings.warn(f"{type(block).__name__} changes a tensor in place after autograd saved it, which "
                                  f"torch.compile refuses: it runs compiled where autograd does not record (targets, "
                                  f"the checkpoint's forward) and eagerly where it does", stacklevel=2)
            if eager_with_grad:
                return forward(*prefix, *args, **kwargs)
        return compiled(*prefix, *args, **kwargs)

    block_forward._compiled = True
    return block_forward


def _changes_saved_tensors(forward: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether forward, run on copies of its inputs, changes in place a tensor autograd saved for its backward
    (a residual added into the block's input after a norm saved it: Flux's `txt += ...`)."""
    leaves = _tensor_leaves([args, kwargs])
    copies = [t.detach().requires_grad_(t.requires_grad).clone() for t in leaves]  # not leaves: changeable
    args, kwargs = _refilled([args, kwargs], iter(copies))
    saved: list[tuple[torch.Tensor, int]] = []

    def pack(t: torch.Tensor) -> None:
        saved.append((t, t._version))  # nothing kept in the graph, which is never differentiated

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed):
            forward(*args, **kwargs)
        return any(t._version != version for t, version in saved)
    finally:
        saved.clear()  # torch's C++ side keeps the hook alive, and through it these tensors (measured)


def _hooks(modules: list[nn.Module]) -> list[Any]:
    return [h for m in modules for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]


_open_limits: list[int] = []
_limit_before: list[int] = []


@contextlib.contextmanager
def _global_recompile_limit(limit: int) -> Iterator[None]:
    """Older torch: the global recompile limit raised while any compiled_blocks is open (closed in any order)."""
    config = torch._dynamo.config
    if not _open_limits:
        _limit_before[:] = [config.recompile_limit]
    _open_limits.append(limit)
    config.recompile_limit = max([_limit_before[0], *_open_limits])
    try:
        yield
    finally:
        _open_limits.remove(limit)
        config.recompile_limit = max([_limit_before[0], *_open_limits])

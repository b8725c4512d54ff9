"""Instance forwards set over a module's class forward (checkpointing, regional compile, fp8 matmuls), and putting
back what each module had before: its own instance forward where it had one, else none (the class's again)."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn


def own_forward(module: nn.Module) -> Callable | None:
    """The forward set on this module itself (None: it runs its class's)."""
    return module.__dict__.get("forward")


def restore_forwards(saved: Sequence[tuple[nn.Module, Callable | None]]) -> None:
    """Put back each module's forward from `saved` (module, own_forward before the patch), last patched first."""
    for module, before in reversed(saved):
        if before is None:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = before


__all__ = ["own_forward", "restore_forwards"]

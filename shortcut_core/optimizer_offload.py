"""AdamW with its state in CPU memory: the device keeps only the LoRA and its gradients.

Of the six float32 copies of the LoRA a run keeps (student, gradients, AdamW's two moments, two EMAs),
the moments are touched once per optimizer step and never by a forward, so they can live in CPU RAM
(the ZeRO-Offload idea, at LoRA scale). Each step copies the gradients to a CPU master copy, runs
torch's AdamW there, and copies the updated parameters back: two transfers of the LoRA per step.
The arithmetic is torch's own AdamW on the same values, so on a CPU the result is bit-identical to
AdamW over the parameters themselves; on a GPU it differs by the two implementations' rounding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


class OffloadedAdamW:
    """The part of torch.optim.Optimizer's interface the trainer uses: step, zero_grad, param_groups,
    state_dict and load_state_dict (the same format as AdamW over the parameters, so checkpoints resume
    with the offload switched either way)."""

    def __init__(self, params: Sequence[torch.Tensor] | Sequence[dict], **adamw: Any):
        # parameter groups as torch's optimizers take them: tensors, or dicts of "params" and group options
        groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": list(params)}]
        self.params = [p for g in groups for p in g["params"]]
        pin = any(p.is_cuda for p in self.params) and torch.cuda.is_available()
        def host_copy(p: torch.Tensor) -> torch.Tensor:
            return torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)

        self.master = [host_copy(p).copy_(p.detach()) for p in self.params]
        self.grads = [host_copy(p) for p in self.params]  # where the gradients land, reused every step
        masters = iter(self.master)
        self.inner = torch.optim.AdamW([{**g, "params": [next(masters) for _ in g["params"]]} for g in groups], **adamw)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        # a parameter without a gradient takes no step, as in torch's own optimizers
        for p, m, g in zip(self.params, self.master, self.grads):
            m.grad = None if p.grad is None else g.copy_(p.grad, non_blocking=True)
        if any(p.is_cuda for p in self.params):
            torch.cuda.synchronize()  # the gradients have landed (and the last step's copies back are done)
        self.inner.step()
        for p, m in zip(self.params, self.master):
            if m.grad is not None:
                p.copy_(m, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load AdamW state (from either kind of run); the master copy follows the parameters as they are
        now, so load the parameters first."""
        self.inner.load_state_dict(state)
        for p, m in zip(self.params, self.master):
            m.copy_(p.detach())

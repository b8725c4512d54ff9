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

    def __init__(self, params: Sequence[torch.Tensor], **adamw: Any):
        self.params = list(params)
        pin = any(p.is_cuda for p in self.params) and torch.cuda.is_available()
        self.master = []
        for p in self.params:
            copy = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
            copy.copy_(p.detach())
            copy.grad = torch.zeros_like(copy)
            self.master.append(copy)
        self.inner = torch.optim.AdamW(self.master, **adamw)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        live = [(p, m) for p, m in zip(self.params, self.master) if p.grad is not None]
        for p, m in live:
            m.grad.copy_(p.grad, non_blocking=True)
        if any(p.is_cuda for p, _ in live):
            torch.cuda.synchronize()
        # a parameter without a gradient takes no step, as in torch's own optimizers
        grads = {id(m): m.grad for _, m in live}
        for m in self.master:
            m.grad = grads.get(id(m))
        try:
            self.inner.step()
        finally:
            for m in self.master:
                if m.grad is None:
                    m.grad = torch.zeros_like(m)
        for p, m in live:
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

"""Data-parallel SCFM: every process trains the same LoRA on its own shard of each batch.

The semantics are the authors' (their accelerate trainer): `batch_size` is per process, so an optimizer
step sees batch_size x processes x grad_accum_steps items. Every process draws the whole step's items
from the same generator (same seed, same state) and keeps its own slice, so a run on N processes with
batch b draws exactly what one process with batch N x b would draw. The base model is frozen and never
communicated: only the LoRA's gradients are averaged (one flat all-reduce per step), after which AdamW
and both EMAs update identically everywhere. Checkpoints compare a fingerprint of the LoRA state
across processes and stop with an error if they drifted.
"""

from __future__ import annotations

from typing import Sequence

import torch


class StateDriftError(RuntimeError):
    """The processes' LoRA states differ: a process ran other code or other data."""


def close_process_group() -> None:
    """Tear down the default process group together: every process waits for the others first. A process that
    destroys its gloo group while another is still between collectives (e.g. after a StateDriftError raised on
    both) can abort the other in gloo's destructor ("terminate called without an active exception")."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.barrier()
    except RuntimeError:  # a process already gone: nothing left to wait for
        pass
    dist.destroy_process_group()


class DataParallel:
    """The trainer's side of torch.distributed: rank, world size and the step's three collectives.
    Needs an initialised default process group (torchrun + init_process_group)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel needs torch.distributed initialised (start under torchrun and call "
                               "torch.distributed.init_process_group first)")
        self._dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def shard(self, total: int) -> slice:
        """This process's slice of a batch of `total` items (total is a multiple of the world size)."""
        size = total // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
        self._dist.all_reduce(flat, group=self.group)
        flat /= self.world
        offset = 0
        for p in with_grad:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def mean(self, value: float, device: torch.device) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        self._dist.all_reduce(t, group=self.group)
        return float(t) / self.world

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether any process raised the flag (a stop request reaches every process at the same step)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self.group)
        return bool(t)

    def check_identical(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Every process holds the same values (compared by a float64 fingerprint: sums and weighted sums)."""
        if not tensors:
            return
        device = tensors[0].device
        parts = []
        for i, t in enumerate(tensors):
            flat = t.detach().reshape(-1).to(torch.float64)
            parts.append(torch.stack([flat.sum(), (flat * (1.0 + (i % 7))).abs().sum()]))
        mine = torch.cat(parts).to(device)
        low, high = mine.clone(), mine.clone()
        self._dist.all_reduce(low, op=self._dist.ReduceOp.MIN, group=self.group)
        self._dist.all_reduce(high, op=self._dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(low, high):
            raise StateDriftError(f"{what} differs between the {self.world} processes (process {self.rank}'s "
                                  f"fingerprint is not everyone's): a process trained on other data or code; the "
                                  f"checkpoint was not written. Restart all processes from the last checkpoint")

"""How much device memory an SCFM training run needs, before any of it is spent.

peak = base weights as stored (on the device; with streaming, the part the host keeps there)
     + LoRA state: student, its gradients, AdamW's two moments, slow and fast EMA (six float32 copies;
       four with the moments offloaded to CPU RAM)
     + activations of one training forward and backward
     + weights cast to the compute dtype at use (weights stored in fp8 and computed in bf16, or
       streamed from RAM: copies made per forward)

The first two are exact by construction. Activations scale with (forward batch) x (tokens) x (hidden
width) x (bytes of the compute dtype), with coefficients measured on ComfyUI 0.3.64's Flux by
`python -m benchmarks.flux_memory` (FakeTensorMode accounting, checked against glibc's own count of real
allocations within 0.2%; torch SDPA attention, as ComfyUI runs on a GPU): per token and hidden unit, in
units of the compute dtype's bytes, a block keeps 1.0 (its input) with gradient checkpointing, and a
double-stream block 32.3 and a single-stream block 29.2 without; on top of those, 46.4 with checkpointing
(the block being recomputed, the stem, the loss) and 15.1 without. The coefficients agree within 2% between
Flux.1's width (3072) and a width of 512, and do not depend on the LoRA rank (its input copies are in
them). Blocks of other architectures are counted as double-stream blocks (the larger). Casts: one block's
weights with checkpointing (the block being recomputed), every block's without (autograd keeps each cast
weight for the backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

GB = 1e9  # what GPU makers print on the box; the plan speaks their unit

# Activation bytes per (batch item x token x hidden unit x byte of the compute dtype); see the module docstring.
CHECKPOINTED_BASE, CHECKPOINTED_PER_BLOCK = 46.4, 1.0
FULL_BASE = 15.1
FULL_PER_BLOCK = {"DoubleStreamBlock": 32.3, "SingleStreamBlock": 29.2}
FULL_PER_OTHER_BLOCK = max(FULL_PER_BLOCK.values())
LORA_STATE_COPIES = 6  # student, gradients, AdamW m and v, slow EMA, fast EMA
OFFLOADED_COPIES = 2   # AdamW's m and v, with ShortcutConfig.offload_optimizer
LORA_BYTES = 4         # the trainer keeps LoRA factors in float32 whatever the base dtype
# The allocator needs more than the bytes allocated: blocks it caches and cannot split, fragmentation. On an
# H200 capped at a 24 GB card's memory (benchmarks.gpu_fit), a 1024 px Flux run that allocated at most 21.85 GB
# ran out at 22.56 GB reserved (3.2% more); the plan asks for 5%.
ALLOCATOR_SLACK = 0.05
STREAM_MIN_RESIDENT = 128 * 2 ** 20  # ComfyUI keeps at least this much of a partially loaded model (model_management)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of the network (the host reads it off the loaded model)."""
    weight_bytes: int               # every parameter and buffer, as stored
    block_kinds: tuple[str, ...]    # class name of each repeated block, in order
    block_params: tuple[int, ...]   # parameter count of each repeated block
    hidden: int                     # the blocks' width
    compute_bytes: int              # bytes per element the network computes in (bf16: 2)
    stored_bytes: int               # bytes per element its weights are stored in (fp8: 1)
    lora_params: int                # LoRA parameters at rank 1 on the targeted layers: sum of (in + out)


@dataclass(frozen=True)
class TrainingShape:
    rank: int
    forward_batch: int              # items per training forward (batch_size, doubled by true CFG)
    tokens: int                     # image tokens + text tokens of one item
    checkpointing: bool
    offload_optimizer: bool = False
    # bytes of device memory the host keeps free beside the weights it places (None: weights all resident);
    # the weights that do not fit in the rest are streamed from RAM per forward
    stream_headroom: int | None = None
    # streamed weights copied a block ahead of the compute (block_streaming.py; with checkpointing), not per op
    prefetch_blocks: bool = True


@dataclass(frozen=True)
class MemoryPlan:
    weights: int                    # resident on the device
    lora_state: int
    activations: int
    casts: int
    streamed: int = 0               # weights kept in RAM and copied in per forward
    streamed_blocks: int = 0        # blocks whose weights that takes, at the least
    blocks: int = 0                 # the model's repeated blocks

    @property
    def total(self) -> int:
        """The bytes allocated at the peak."""
        return self.weights + self.lora_state + self.activations + self.casts

    @property
    def needed(self) -> int:
        """The device memory the run needs: the peak and the allocator's slack."""
        return round(self.total * (1 + ALLOCATOR_SLACK))

    def fits(self, free: int) -> bool:
        return self.needed <= free

    def text(self, free: int | None = None, stored: str = "") -> str:
        where = f" of {free / GB:.1f} GB free" if free is not None else ""
        of_blocks = f", {self.streamed_blocks} of {self.blocks} blocks" if self.streamed_blocks else ""
        streamed = f" (+{self.streamed / GB:.1f} streamed from RAM{of_blocks})" if self.streamed else ""
        return (f"plan: {self.needed / GB:.1f} GB{where}: weights {self.weights / GB:.1f}{(' ' + stored) if stored else ''}"
                f"{streamed}, LoRA state {self.lora_state / GB:.1f}, activations {self.activations / GB:.1f}"
                + (f", casts {self.casts / GB:.1f}" if self.casts else "")
                + f", allocator slack {(self.needed - self.total) / GB:.1f}")


def plan_training(model: ModelShape, run: TrainingShape, free: int | None = None) -> MemoryPlan:
    """The peak on the device; with streaming (run.stream_headroom set) the resident weights are what
    `free` leaves after everything else and the host's headroom (all of them where free is unknown)."""
    elements = run.forward_batch * run.tokens * model.hidden * model.compute_bytes
    if run.checkpointing:
        per_element = CHECKPOINTED_BASE + CHECKPOINTED_PER_BLOCK * len(model.block_kinds)
    else:
        per_element = FULL_BASE + sum(FULL_PER_BLOCK.get(kind, FULL_PER_OTHER_BLOCK) for kind in model.block_kinds)
    streaming = run.stream_headroom is not None
    casts = 0
    if (model.stored_bytes < model.compute_bytes or streaming) and model.block_params:
        kept = max(model.block_params) if run.checkpointing else sum(model.block_params)
        casts = kept * model.compute_bytes
        if streaming and run.prefetch_blocks and run.checkpointing:
            # the block computing and the one arriving, as stored; their casts only where the dtypes differ
            casts = max(model.block_params) * (2 * model.stored_bytes + (model.compute_bytes if model.stored_bytes
                                                                        < model.compute_bytes else 0))
    copies = LORA_STATE_COPIES - (OFFLOADED_COPIES if run.offload_optimizer else 0)
    plan = MemoryPlan(weights=model.weight_bytes, lora_state=copies * LORA_BYTES * run.rank * model.lora_params,
                      activations=round(elements * per_element), casts=casts)
    if not streaming or free is None:
        return plan
    rest = plan.total - plan.weights
    usable = int(free / (1 + ALLOCATOR_SLACK))
    resident = min(model.weight_bytes, max(STREAM_MIN_RESIDENT, usable - rest - run.stream_headroom))
    streamed = model.weight_bytes - resident
    return replace(plan, weights=resident, streamed=streamed, blocks=len(model.block_params),
                   streamed_blocks=blocks_covering(streamed, model))


def blocks_covering(streamed: int, model: ModelShape) -> int:
    """The fewest blocks whose weights make up `streamed` bytes (the largest first): how many blocks stream."""
    total, count = 0, 0
    for params in sorted(model.block_params, reverse=True):
        if total >= streamed:
            break
        total += params * model.stored_bytes
        count += 1
    return count


@dataclass(frozen=True)
class Suggestion:
    change: str
    plan: MemoryPlan


def suggestions(model: ModelShape, run: TrainingShape, batch_size: int, grad_accum: int, cfg_factor: int,
                free: int, stored_alternative: ModelShape | None = None, blocks_alternative: ModelShape | None = None,
                stream_headroom: int | None = None) -> list[Suggestion]:
    """Settings that would fit in `free` bytes, one per knob, each with its predicted peak: a smaller
    batch (the same items per optimizer step through accumulation), a lower rank, checkpointing, and
    (when given) the weights stored in fp8, the memory modes (AdamW state in RAM, LoRA on the blocks
    only, weights streamed from RAM)."""
    out: list[Suggestion] = []
    b = batch_size
    while b > 1:
        b //= 2
        plan = plan_training(model, replace(run, forward_batch=b * cfg_factor), free)
        if plan.fits(free) or b == 1:
            accum = grad_accum * batch_size // b
            out.append(Suggestion(f"batch_size {batch_size} -> {b} (grad_accum_steps {grad_accum} -> {accum})", plan))
            break
    r = run.rank
    while r > 4:
        r //= 2
        plan = plan_training(model, replace(run, rank=r), free)
        if plan.fits(free) or r <= 4:
            out.append(Suggestion(f"rank {run.rank} -> {r}", plan))
            break
    if not run.checkpointing:
        out.append(Suggestion("gradient_checkpointing on", plan_training(model, replace(run, checkpointing=True), free)))
    if stored_alternative is not None:
        out.append(Suggestion("the model loaded in fp8 (Load Diffusion Model's weight_dtype fp8_e4m3fn)",
                              plan_training(stored_alternative, run, free)))
    if not run.offload_optimizer:
        out.append(Suggestion("offload_optimizer on", plan_training(model, replace(run, offload_optimizer=True), free)))
    if blocks_alternative is not None:
        out.append(Suggestion("lora_layers blocks", plan_training(blocks_alternative, run, free)))
    if run.stream_headroom is None and stream_headroom is not None:
        plan = plan_training(model, replace(run, stream_headroom=stream_headroom), free)
        out.append(Suggestion(f"stream_weights on ({plan.streamed / GB:.1f} GB of weights streamed from RAM)", plan))
    return out


def lora_fan(shapes: Sequence[tuple[int, int]]) -> int:
    """LoRA parameters per unit of rank for linear layers of (in, out) features."""
    return sum(i + o for i, o in shapes)

"""How long a run takes: predicted from the model's FLOPs before it starts, measured while it runs.

One SCFM step runs the network over the batch `t_skip` times under no_grad (the target's sub-steps), once for
the student, about twice for its backward, and once more with gradient checkpointing (the recomputed forward):
6 forwards' worth with the paper's recipe. A forward costs 2 FLOPs per weight per token (every linear layer sees
every token) plus attention's two matmuls, 4 * tokens^2 * width per block.

The prediction divides that by the card's dense bf16 peak times the utilisation the pack reached on an H200
(docs/memory.md, "GPU measurements": Flux.1-dev at 1024 px, batch 1, rank 64: 1.57 s a step in bf16, 1.70 s with
fp8-stored weights, which are cast per forward). Weights streamed from RAM add their copies at the rate
ComfyUI's lowvram route reached there, or, streamed block by block a block ahead, overlap the compute at the
pinned copy rate (assumed: not yet measured on a GPU); offloading AdamW adds what it cost there. The prediction is a first
figure; the run replaces it with the seconds per step it measures (StepClock).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from .memory_plan import GB, ModelShape, TrainingShape

# Dense bf16 tensor-core peaks (TFLOPS, without sparsity) from the makers' data sheets; matched by name.
CARD_BF16_TFLOPS = {
    "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A40": 150.0, "A10": 125.0,
    "RTX 6000 Ada": 364.0, "RTX A6000": 155.0, "RTX 5090": 209.0, "RTX 5080": 113.0, "RTX 4090": 165.0,
    "RTX 4080": 97.0, "RTX 4070 Ti": 80.0, "RTX 4070": 58.0, "RTX 4060 Ti": 44.0, "RTX 3090": 71.0,
    "RTX 3080": 59.0, "RTX 3060": 25.0,
}
# Share of the peak a training step reached on the H200 (6 forwards of 124.5 TFLOP at 1024 px, see above):
# weights stored in the compute dtype, and stored in fp8 (cast to bf16 at every use).
UTILISATION = 0.48
UTILISATION_FP8_STORED = 0.44
# ComfyUI's lowvram route on the H200 (PCIe 5): 6.8 and 9.9 GB streamed cost 4.1 and 5.4 s a step over the
# fully loaded step, at 6 passes over the streamed weights: about 10 GB/s of streamed weights.
STREAM_BYTES_PER_SECOND = 10 * GB
# Block streaming (block_streaming.py) copies from pinned RAM on a side stream, overlapped with the compute: a
# pass costs the longer of the two. Pinned host-to-device copies reach about 22-25 GB/s on PCIe 4.0 x16 and
# twice that on PCIe 5; 20 GB/s is assumed until a GPU run of benchmarks.gpu_fit measures it.
PREFETCH_BYTES_PER_SECOND = 20 * GB
OFFLOAD_OPTIMIZER_COST = 0.21  # AdamW stepped on the CPU: +21% a step on the H200 at rank 64


def forward_flops(model: ModelShape, tokens: int, batch: int) -> float:
    """FLOPs of one forward over `batch` items of `tokens` tokens."""
    weights = model.weight_bytes / model.stored_bytes
    return batch * (2.0 * tokens * weights + 4.0 * tokens ** 2 * model.hidden * len(model.block_kinds))


def step_forwards(substeps: int, checkpointing: bool) -> int:
    """Forwards' worth of compute in one step: the target's sub-steps, the student, its backward (about two),
    and the recomputed forward with gradient checkpointing."""
    return substeps + 1 + 2 + (1 if checkpointing else 0)


def card_peak_flops(name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s, by its name as torch reports it ("NVIDIA H200"); None if unknown."""
    for card in sorted(CARD_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if card.lower() in name.lower():
            return CARD_BF16_TFLOPS[card] * 1e12
    return None


def predicted_step_seconds(model: ModelShape, run: TrainingShape, substeps: int, peak_flops: float,
                           streamed: int = 0) -> float:
    """Seconds per optimizer step on a card with `peak_flops`, with `streamed` bytes of weights copied in per
    forward (MemoryPlan.streamed)."""
    forwards = step_forwards(substeps, run.checkpointing)
    utilisation = UTILISATION_FP8_STORED if model.stored_bytes < model.compute_bytes else UTILISATION
    per_forward = forward_flops(model, run.tokens, run.forward_batch) / (peak_flops * utilisation)
    if run.prefetch_blocks and run.checkpointing:
        seconds = forwards * max(per_forward, streamed / PREFETCH_BYTES_PER_SECOND)
    else:
        seconds = forwards * (per_forward + streamed / STREAM_BYTES_PER_SECOND)
    if run.offload_optimizer:
        seconds += forwards * per_forward * OFFLOAD_OPTIMIZER_COST
    return seconds


def duration_text(seconds: float) -> str:
    """'5 h 0 min', '12 min', '45 s'."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def time_text(seconds_per_step: float, steps: int, seconds_left: float | None = None) -> str:
    """'about 1.8 s/step, 5 h 0 min for 10000 steps; ETA 3 h 12 min'."""
    rate = f"{seconds_per_step:.2f}" if seconds_per_step < 10 else f"{seconds_per_step:.0f}"
    text = f"about {rate} s/step, {duration_text(seconds_per_step * steps)} for {steps} steps"
    return text if seconds_left is None else f"{text}; ETA {duration_text(seconds_left)}"


@dataclass
class StepClock:
    """Seconds per step, measured as a run goes: the mean over the steps since the first `warmup` ones (which
    allocate, compile and fill caches), so a resumed run or a slow first step does not skew it."""
    total: int
    start: int = 0
    warmup: int = 2
    clock: Callable[[], float] = time.perf_counter
    _since: tuple[int, float] | None = field(default=None, repr=False)
    _last: tuple[int, float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.warmup == 0:
            self._since = (self.start, self.clock())

    def tick(self, step: int) -> None:
        """Step `step` (optimizer steps done in total) has just finished."""
        now = self.clock()
        if self.warmup and step - self.start == self.warmup:
            self._since = (step, now)
        self._last = (step, now)

    @property
    def seconds_per_step(self) -> float | None:
        if self._since is None or self._last is None or self._last[0] <= self._since[0]:
            return None
        return (self._last[1] - self._since[1]) / (self._last[0] - self._since[0])

    def seconds_left(self) -> float | None:
        rate = self.seconds_per_step
        return None if rate is None or self._last is None else rate * max(0, self.total - self._last[0])

    def text(self) -> str | None:
        """time_text of the measured rate for the run's steps, with the ETA; None until it is measured."""
        rate = self.seconds_per_step
        return None if rate is None else time_text(rate, self.total, self.seconds_left())


def plan_time_text(seconds_per_step: float | None, steps: int, card: str) -> str:
    """The plan line's time: predicted for the card, or said to come from the first steps."""
    if seconds_per_step is None or not math.isfinite(seconds_per_step):
        return f"time: measured from the first steps ({card})"
    return f"time: {time_text(seconds_per_step, steps)} (predicted for {card})"


__all__ = ["CARD_BF16_TFLOPS", "UTILISATION", "UTILISATION_FP8_STORED", "STREAM_BYTES_PER_SECOND",
           "OFFLOAD_OPTIMIZER_COST", "PREFETCH_BYTES_PER_SECOND", "forward_flops", "step_forwards", "card_peak_flops", "predicted_step_seconds",
           "duration_text", "time_text", "StepClock", "plan_time_text"]

"""Memory of a TrainShortcut step on Flux.1-dev at full size, accounted on a CPU, without a GPU.

Needs a ComfyUI checkout (found as the host tests find it). ComfyUI's own Flux class at Flux.1-dev's
config (hidden 3072, 24 heads, 19 double + 38 single blocks, T5 context 4096, pooled 768, guidance input)
is built under torch's FakeTensorMode: tensors have shapes and dtypes but no storage, so a 12B-parameter
step costs no memory and a few seconds a block. A TorchDispatchMode counts the bytes of every storage an
op allocates (views and in-place results allocate nothing) and finds frees through weak references, at
every op boundary: the step's transient peak. What stays between steps is counted exactly: base weights
as stored, the LoRA (float32, as the trainer keeps it: student, its gradients, AdamW's two moments, two
EMAs). The step is the trainer's: t_skip = 2 target sub-steps under no_grad, the student's forward and
backward through the pack's own checkpoint_blocks (on or off), gradient clipping, AdamW, both EMA updates.
The LoRA is attached as forward hooks with peft's arithmetic (float32 factors, the input cast to float32),
since peft's layers cannot be injected into a fake module. Attention runs through torch's
scaled_dot_product_attention, as ComfyUI does on a GPU (memory linear in tokens), not the CPU's chunked path.

    python -m benchmarks.flux_memory            # the grid: 512 / 1024 px, batch 1-8, rank 16-64, checkpointing
    python -m benchmarks.flux_memory --check    # the same accounting on real tensors against glibc's own count

Full depth is extrapolated from 1+1, 2+1 and 1+2 blocks (the cost of a double and of a single block), and one
configuration per size is also run at full depth to show the extrapolation's error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import comfy_host  # noqa: E402

from shortcut_core import checkpoint_blocks  # noqa: E402

from .report import machine_line, markdown_table  # noqa: E402

FLUX_DEV = dict(hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], context_in_dim=4096, vec_in_dim=768)
MID = dict(hidden_size=512, num_heads=8, axes_dim=[16, 24, 24], context_in_dim=256, vec_in_dim=64)
FULL_DEPTH = (19, 38)
TEXT_TOKENS = 512  # Flux dev's T5 length in ComfyUI
T_SKIP = 2
GiB = 2 ** 30


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages ops allocate inside the mode. Frees are found by sweeping weak references
    (no storage object is kept, so nothing is kept alive), whenever an allocation might raise the peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.now = self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k in self.live if k.expired()]:
            self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else [out]):
            # a view of (or an in-place result on) an input allocates nothing, and the input may predate us
            if not isinstance(t, torch.Tensor) or (i < len(returns) and returns[i].alias_info is not None):
                continue
            key = StorageWeakRef(t.untyped_storage())
            if key in self.live:
                continue
            self.live[key] = t.untyped_storage().nbytes()
            self.now += self.live[key]
            if self.now > self.peak:
                self._sweep()
                self.peak = max(self.peak, self.now)
        return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


class MallocPeak(TorchDispatchMode):
    """The check's ground truth on real CPU tensors: glibc's bytes in use (heap chunks + mmapped), after every op."""

    def __init__(self):
        super().__init__()
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _MallInfo2
        self.base = self._in_use()
        self.peak = 0

    def _in_use(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._in_use() - self.base)
        return out


def flux_network(widths: dict, double: int, single: int, weight_dtype: torch.dtype):
    """ComfyUI's Flux diffusion model; fp8-stored weights are cast to bf16 at use, as ComfyUI runs fp8 files."""
    import comfy.supported_models

    config = dict(comfy_host.TINY_FLUX, **widths, depth=double, depth_single_blocks=single)
    model_config = comfy.supported_models.Flux(config)
    compute = torch.bfloat16
    model_config.set_inference_dtype(weight_dtype, None if weight_dtype in (compute, torch.float32) else compute)
    network = model_config.get_model({}, device="cpu").diffusion_model
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def attach_lora(network: torch.nn.Module, rank: int) -> list[torch.Tensor]:
    """A LoRA on every Linear as forward hooks, with peft's arithmetic: float32 factors, input cast to float32."""
    params = []
    for module in network.modules():
        if isinstance(module, torch.nn.Linear):
            down = torch.zeros(rank, module.in_features, requires_grad=True)
            up = torch.zeros(module.out_features, rank, requires_grad=True)
            params += [down, up]

            def add_lora(layer, inputs, output, down=down, up=up):
                return output + ((inputs[0].to(down.dtype) @ down.t()) @ up.t()).to(output.dtype)

            module.register_forward_hook(add_lora)
    return params


@contextlib.contextmanager
def gpu_attention():
    """ComfyUI's GPU attention (torch SDPA: memory linear in tokens) instead of its chunked CPU path."""
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as attention

    before = flux_math.optimized_attention
    flux_math.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        flux_math.optimized_attention = before


@dataclass
class Measured:
    weights: int          # base weights as stored
    lora: int             # one copy of the LoRA (float32): the student; grads, 2 moments and 2 EMAs are as large
    step_peak: int        # transient bytes at the step's peak (activations, checkpoints, casts, optimizer temporaries)
    sampling_peak: int    # transient bytes of one no-grad forward at batch 1 (sampling)

    @property
    def state(self) -> int:
        return 6 * self.lora  # student, gradients, AdamW m and v, slow and fast EMA

    @property
    def total(self) -> int:
        return self.weights + self.state + self.step_peak


def measure(widths: dict, double: int, single: int, side: int, batch: int, rank: int, checkpointing: bool,
            weight_dtype: torch.dtype, fake: bool = True, counter=LiveBytes) -> Measured:
    """One steady-state SCFM step (the second: AdamW's moments exist) and one sampling forward, counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode, gpu_attention():
        network = flux_network(widths, double, single, weight_dtype)
        if not fake:
            with torch.no_grad():
                for p in network.parameters():
                    p.copy_((torch.randn(p.shape) * 0.02).to(p.dtype))
        lora = attach_lora(network, rank)
        optimizer = torch.optim.AdamW(lora, lr=1e-4)
        emas = [[p.detach().clone() for p in lora] for _ in range(2)]
        blocks = list(network.double_blocks) + list(network.single_blocks)
        compute = torch.bfloat16 if weight_dtype != torch.float32 else torch.float32

        def inputs(n):
            return (torch.randn(n, 16, side, side, dtype=compute), torch.rand(n),
                    torch.randn(n, TEXT_TOKENS, widths["context_in_dim"], dtype=compute),
                    torch.randn(n, widths["vec_in_dim"], dtype=compute), torch.full((n,), 3.5))

        def step():
            x, t, context, y, guidance = inputs(batch)
            with torch.no_grad():
                for _ in range(T_SKIP):  # the target's sub-steps (teacher / EMAs)
                    network(x, t, context, y=y, guidance=guidance)
            with checkpoint_blocks(blocks, recompute=checkpointing):
                prediction = network(x, t, context, y=y, guidance=guidance)
                prediction.float().pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(lora, 10.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for ema, decay in zip(emas, (0.999, 0.99)):
                torch._foreach_lerp_(ema, lora, 1.0 - decay)

        def sample():
            x, t, context, y, guidance = inputs(1)
            with torch.no_grad():
                network(x, t, context, y=y, guidance=guidance)

        step()
        with counter() as step_count:
            step()
        with counter() as sample_count:
            sample()
        weights = sum(p.numel() * p.element_size() for p in network.parameters())
        weights += sum(b.numel() * b.element_size() for b in network.buffers())
        return Measured(weights=weights, lora=sum(p.numel() * p.element_size() for p in lora),
                        step_peak=step_count.peak, sampling_peak=sample_count.peak)


def extrapolated(side, batch, rank, checkpointing, weight_dtype, depth=FULL_DEPTH) -> Measured:
    """value(D, S) = a + b_double * D + b_single * S from the 1+1, 2+1 and 1+2 block models."""
    runs = [measure(FLUX_DEV, d, s, side, batch, rank, checkpointing, weight_dtype) for d, s in ((1, 1), (2, 1), (1, 2))]

    def fit(field: str) -> int:
        v11, v21, v12 = (getattr(r, field) for r in runs)
        return round(v11 + (v21 - v11) * (depth[0] - 1) + (v12 - v11) * (depth[1] - 1))

    return Measured(**{f: fit(f) for f in ("weights", "lora", "step_peak", "sampling_peak")})


def check() -> None:
    """The counter on fake tensors, the counter on real ones, and glibc's count, on a mid-size Flux (CPU)."""
    print("Check on a mid-size Flux (w512, 2 double + 4 single blocks, 256 px, batch 2, rank 16, float32):\n")
    rows = []
    for checkpointing in (True, False):
        args = (MID, 2, 4, 32, 2, 16, checkpointing, torch.float32)
        fake = measure(*args, fake=True)
        real = measure(*args, fake=False)
        truth = measure(*args, fake=False, counter=MallocPeak)
        rows.append([checkpointing, f"{fake.step_peak / 2**20:.1f}", f"{real.step_peak / 2**20:.1f}",
                     f"{truth.step_peak / 2**20:.1f}", f"{fake.step_peak / truth.step_peak:.3f}",
                     f"{fake.sampling_peak / 2**20:.1f}", f"{truth.sampling_peak / 2**20:.1f}"])
    print(markdown_table(["checkpointing", "step peak MiB, fake", "real (counter)", "real (glibc)", "fake / glibc",
                          "sampling MiB, fake", "real (glibc)"], rows))


def full_model_shape(dtype: torch.dtype):
    """The memory plan's view of Flux.1-dev (built fake: no memory), as TrainShortcut reads it off a model."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from shortcut_core.memory_plan import ModelShape

    with FakeTensorMode(allow_non_fake_inputs=True):
        network = flux_network(FLUX_DEV, *FULL_DEPTH, dtype)
        blocks = list(network.double_blocks) + list(network.single_blocks)
        return ModelShape(
            weight_bytes=sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers())),
            block_kinds=tuple(type(b).__name__ for b in blocks),
            block_params=tuple(sum(p.numel() for p in b.parameters()) for b in blocks),
            hidden=FLUX_DEV["hidden_size"], compute_bytes=2, stored_bytes=dtype.itemsize,
            lora_params=sum(m.in_features + m.out_features for m in network.modules() if isinstance(m, torch.nn.Linear)))


def grid(ranks, batches, sizes, dtypes) -> None:
    from shortcut_core.memory_plan import TrainingShape, plan_training

    rows, worst = [], 0.0
    started = time.perf_counter()
    for px in sizes:
        for dtype_name, dtype in dtypes:
            shape = full_model_shape(dtype)
            for checkpointing in (True, False):
                for rank in ranks:
                    for batch in batches:
                        m = extrapolated(px // 8, batch, rank, checkpointing, dtype)
                        plan = plan_training(shape, TrainingShape(rank=rank, forward_batch=batch, checkpointing=checkpointing,
                                                                  tokens=(px // 16) ** 2 + TEXT_TOKENS))
                        worst = max(worst, abs(plan.total / m.total - 1))
                        rows.append([px, dtype_name, "on" if checkpointing else "off", rank, batch,
                                     f"{m.weights / GiB:.2f}", f"{m.state / GiB:.2f}", f"{m.step_peak / GiB:.2f}",
                                     f"{m.total / GiB:.2f}", f"{plan.total / GiB:.2f}",
                                     f"{(m.weights + m.sampling_peak) / GiB:.2f}"])
    print(markdown_table(["px", "weights", "checkpointing", "rank", "batch", "weights GiB", "LoRA state GiB (x6)",
                          "step transient GiB", "training peak GiB", "TrainShortcut's plan GiB",
                          "sampling peak GiB"], rows))
    print(f"\nthe plan's worst relative error over the grid: {worst:.2%} ({time.perf_counter() - started:.0f} s)")


CARDS_GB = (12, 16, 24, 48, 80)
# the card each row's time is predicted for (shortcut_core.run_time): a common one of that memory
CARD_NAMES = {12: "RTX 3060", 16: "RTX 4080", 24: "RTX 4090", 48: "RTX 6000 Ada", 80: "H100"}
USABLE = 0.94  # of a card's memory, after the CUDA context and the driver
MAX_STREAMED = 0.6
# lora_layers "blocks" is left out: it costs more quality than a lower rank saving as much (benchmarks.memory_modes)
MODES = [{}, {"offload_optimizer": True}, {"offload_optimizer": True, "stream_weights": True}]


def fit_table() -> None:
    """README's "Will it fit?": per card, the largest setting that fits without memory modes and with them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from shortcut_core.adapters import lora_target_names
    from shortcut_core.memory_plan import GB, TrainingShape, plan_training
    from shortcut_core.run_time import card_peak_flops, duration_text, predicted_step_seconds

    shapes = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        shapes[name, "all"] = shape = full_model_shape(dtype)
        with FakeTensorMode(allow_non_fake_inputs=True):
            network = flux_network(FLUX_DEV, *FULL_DEPTH, dtype)
            names = lora_target_names(network, None, "blocks", [*network.double_blocks, *network.single_blocks])
            fan = sum(network.get_submodule(n).in_features + network.get_submodule(n).out_features for n in names)
        shapes[name, "blocks"] = type(shape)(**{**shape.__dict__, "lora_params": fan})
    # larger first: resolution, then batch, then rank
    settings = [(px, batch, rank) for px in (1024, 768, 512) for batch in (8, 4, 2, 1) for rank in (64, 32, 16, 4)]

    def first_fit(free: int, modes: list[dict]):
        for px, batch, rank in settings:
            for weights in ("bf16", "fp8"):
                for mode in modes:
                    run = TrainingShape(rank=rank, forward_batch=batch, tokens=(px // 16) ** 2 + TEXT_TOKENS,
                                        checkpointing=True, offload_optimizer=mode.get("offload_optimizer", False),
                                        stream_headroom=int(1.2e9) if mode.get("stream_weights") else None)
                    shape = shapes[weights, mode.get("lora_layers", "all")]
                    plan = plan_training(shape, run, free)
                    # Streaming is worth it for a part of fp8 weights: every forward copies the streamed bytes in
                    # (4x the step time at 57% streamed, benchmarks.gpu_fit on an H200)
                    if plan.streamed and (weights != "fp8" or plan.streamed > MAX_STREAMED * shape.weight_bytes):
                        continue
                    if plan.fits(free):
                        return px, batch, rank, weights, mode, plan
        return None

    def describe(found, card: str) -> list[str]:
        if found is None:
            return ["nothing", "", "", ""]
        px, batch, rank, weights, mode, plan = found
        streamed = f", {plan.streamed / GB:.1f} GB streamed" if plan.streamed else ""
        modes = ", ".join(k if v is True else f"{k} {v}" for k, v in mode.items()) or "none"
        run = TrainingShape(rank=rank, forward_batch=batch, tokens=(px // 16) ** 2 + TEXT_TOKENS, checkpointing=True,
                            offload_optimizer=mode.get("offload_optimizer", False))
        seconds = predicted_step_seconds(shapes[weights, "all"], run, 2, card_peak_flops(card), plan.streamed)
        return [f"{px} px, batch {batch}, rank {rank}, {weights}", f"{plan.needed / GB:.1f}{streamed}", modes,
                f"{seconds:.1f} s ({duration_text(10_000 * seconds)})"]

    rows = []
    for card in CARDS_GB:
        free = int(card * 1e9 * USABLE)
        name = CARD_NAMES[card]
        plain, needs, _, time_per_step = describe(first_fit(free, MODES[:1]), name)
        rows.append([f"{card} GB ({name})", plain, needs, time_per_step] + describe(first_fit(free, MODES[1:]), name))
    print(markdown_table(["card (time predicted for)", "without modes", "needs GB", "s/step (10k steps)",
                          "with memory modes", "needs GB", "modes", "s/step (10k steps)"], rows))
    print(f"\n{USABLE:.0%} of each card usable; needs: the plan's peak and the allocator's slack; streaming keeps "
          f"1.2 GB free for ComfyUI (its minimum inference memory) and streams at most {MAX_STREAMED:.0%} of the fp8 "
          f"weights; time: shortcut_core.run_time's prediction (the H200's measured utilisation on the card's bf16 "
          f"peak; streamed weights a block ahead of the compute, at an assumed 20 GB/s of pinned copies, not yet "
          f"measured)")


def full_depth_check(px: int, dtype) -> None:
    """One configuration at the full 19 + 38 blocks, against the extrapolation."""
    args = (px // 8, 1, 64, True, dtype)
    full = measure(FLUX_DEV, *FULL_DEPTH, *args)
    line = extrapolated(*args)
    print(f"{px} px, batch 1, rank 64, checkpointing, {dtype}: full depth {full.total / GiB:.2f} GiB "
          f"(transient {full.step_peak / GiB:.2f}), extrapolated {line.total / GiB:.2f} GiB "
          f"(transient {line.step_peak / GiB:.2f})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fake accounting against real allocations, mid-size model")
    ap.add_argument("--full-depth", action="store_true", help="also run one configuration per size at full depth")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, rank 16 and 64 only")
    ap.add_argument("--fit", action="store_true", help="the plan's fit table for 12-80 GB cards (README)")
    args = ap.parse_args(argv)
    comfy_host.pack_or_exit()
    print(machine_line())
    if args.check:
        check()
        return
    if args.fit:
        fit_table()
        return
    ranks, batches = ((16, 64), (1, 8)) if args.quick else ((16, 32, 64), (1, 2, 4, 8))
    dtypes = [("bf16", torch.bfloat16), ("fp8 stored", torch.float8_e4m3fn)]
    print("Flux.1-dev (11.9B parameters) under FakeTensorMode; T5 context 512 tokens; LoRA on every linear layer;"
          " extrapolated from 1-2 block models\n")
    grid(ranks, batches, (512, 1024), dtypes)
    if args.full_depth:
        for px in (512, 1024):
            full_depth_check(px, torch.bfloat16)


if __name__ == "__main__":
    main()

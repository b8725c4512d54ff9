"""What an SCFM training step costs against a plain LoRA flow-matching step: time and memory.

Both steps run on the same model, the same LoRA and the same batch size, interleaved in one
run so machine drift hits both alike. An SCFM step is one student forward+backward plus t_skip
forwards without grad for the target, so its ideal cost ratio to a plain step is
    1 + t_skip * F / (F + B)
with F the forward time and F + B the forward+backward time, both measured here too.

    python -m benchmarks.cost                    # CPU: digits MLP and a small DiT
    python -m benchmarks.cost --device cuda      # on a GPU
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn

from shortcut_core import STUDENT, ShortcutConfig, ShortcutTrainer, checkpoint_blocks, interpolate

from .digits import DigitsFlowNet, DigitsNetConfig, timestep_embedding
from .report import machine_line, markdown_table


# ---------------------------------------------------------------------- a small DiT (tokens + attention)
class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 6 * width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, b1, g1, s2, b2, g2 = self.modulation(nn.functional.silu(c))[:, None].chunk(6, dim=-1)
        q, k, v = self.qkv(self.norm1(h) * (1 + s1) + b1).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        h = h + g1 * self.proj(a)
        return h + g2 * self.mlp_out(nn.functional.gelu(self.mlp_in(self.norm2(h) * (1 + s2) + b2)))


class SmallDiT(nn.Module):
    """v = net(x, t) on latents (B, C, H, W), patch 2, AdaLN blocks: a Flux-shaped toy."""

    def __init__(self, channels: int = 16, width: int = 256, depth: int = 4, heads: int = 4, size: int = 16):
        super().__init__()
        self.channels, self.size = channels, size
        self.time_in = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.x_in = nn.Linear(channels * 4, width)
        self.pos = nn.Parameter(torch.randn(1, (size // 2) ** 2, width) * 0.02)
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.final_modulation = nn.Linear(width, 2 * width)
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(width, channels * 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(b, (hgt // 2) * (wid // 2), c * 4)
        cond = self.time_in(timestep_embedding(t, 64))
        h = self.x_in(tokens) + self.pos
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.final_modulation(nn.functional.silu(cond))[:, None].chunk(2, dim=-1)
        out = self.final(self.final_norm(h) * (1 + scale) + shift)
        out = out.reshape(b, hgt // 2, wid // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, hgt, wid)


# ---------------------------------------------------------------------- measurement helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the current usage in bytes."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        pass
    return _proc_status("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM")


def _proc_status(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _step_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Memory growth during one call of fn above the memory in use before it."""
    before = _reset_peak(device)
    fn()
    _sync(device)
    return max(0, _peak(device) - before)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


# ---------------------------------------------------------------------- the benchmark
def bench(name: str, module: nn.Module, latents: torch.Tensor, cfg: ShortcutConfig, device: torch.device,
          repeats: int, *, velocity=None, extra_args: dict | None = None, batch_args: dict | None = None,
          blocks=(), peaks: bool = True) -> dict[str, object]:
    """Times (median of `repeats` interleaved runs; none when repeats == 0), peaks and state sizes.

    `velocity(x, t, **extra)` defaults to module(x, t); the trainer gets `extra_args` (per latent)
    and `blocks`, the single-pass kinds get `batch_args` (per batch item). peaks=False skips peaks.
    """
    # On a CPU, freed blocks stay with glibc for reuse, so a step's peak would not show in the
    # RSS high-water mark here: a child process with a fixed mmap threshold measures the peaks.
    peaks_in_child = peaks and device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None
    if velocity is None:
        velocity = lambda x, t, **_: module(x, t)  # noqa: E731
        module.to(device)
    one_pass = functools.partial(velocity, **(batch_args or {}))
    base_bytes = _bytes(module.parameters())
    with ShortcutTrainer(module, velocity, latents, cfg, device=device, extra_args=extra_args,
                         blocks=blocks) as trainer:
        params = trainer.adapters.parameters(STUDENT)
        plain_opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        g = torch.Generator().manual_seed(1)
        x0 = latents[torch.randint(latents.shape[0], (cfg.batch_size,), generator=g)].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.rand(cfg.batch_size, generator=g).to(device)
        x_t = interpolate(x0, noise, t)

        def forward() -> None:
            with torch.no_grad():
                one_pass(x_t, t)

        def student_pass():  # as the trainer's student pass: blocks checkpointed / run on cloned inputs
            return checkpoint_blocks(blocks, recompute=cfg.gradient_checkpointing) if blocks else contextlib.nullcontext()

        def forward_backward() -> None:
            with student_pass():
                (one_pass(x_t, t) - (noise - x0)).pow(2).mean().backward()
            for p in params:
                p.grad = None

        def plain_step() -> None:
            with student_pass():
                loss = (one_pass(x_t, t).float() - (noise - x0).float()).pow(2).mean()
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

        def scfm_step() -> None:
            trainer.step()

        kinds = {"forward": forward, "forward+backward": forward_backward, "plain LoRA FM step": plain_step,
                 "SCFM step": scfm_step}
        for fn in kinds.values():  # warm-up: allocator, kernels, optimizer state
            fn()
            fn()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        order = list(kinds.items())
        for r in range(repeats):  # interleaved and rotated, so drift and position hit every kind alike
            for k, fn in order[r % len(order):] + order[:r % len(order)]:
                times[k].append(_timed(fn, device))
        med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}

        peak_kinds = ("plain LoRA FM step", "SCFM step")
        peaks = {} if peaks_in_child or not peaks else {k: _step_peak(kinds[k], device) for k in peak_kinds}

        student = _bytes(params)
        emas = _bytes(trainer.adapters.parameters("ema_slow")) + _bytes(trainer.adapters.parameters("ema_fast"))
        optim = _bytes(v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v))

    if peaks_in_child:
        peaks = _cpu_peaks_in_child(name)
    ideal = 1 + cfg.substeps * med["forward"] / med["forward+backward"]
    measured = med["SCFM step"] / med["plain LoRA FM step"]
    return dict(name=name, med=med, ideal=ideal, measured=measured, peaks=peaks, base=base_bytes, student=student,
                emas=emas, optim=optim)


def _cpu_peaks_in_child(name: str) -> dict[str, int]:
    """Peak RSS growth per step kind, from a child whose glibc hands every large block back to the
    kernel when freed. Timing stays in the parent, where allocation runs at its usual speed."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", "benchmarks.cost", "--peaks-of", name], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--peaks-of", default=None, help=argparse.SUPPRESS)  # internal: the memory child
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    # Paper defaults except what has no meaning here (no guidance input, no resolution shift for toys).
    base = ShortcutConfig(rank=args.rank, alpha=args.rank, guidance_range=None, resolution_shift_prob=0.0,
                          gradient_checkpointing=False)
    cases = [
        ("digits MLP (0.4M params), batch 256", DigitsFlowNet(DigitsNetConfig()), torch.randn(512, 1, 8, 8),
         base.replace(batch_size=256)),
        ("small DiT (4 blocks, width 256, 64 tokens), batch 8", SmallDiT(), torch.randn(64, 16, 16, 16),
         base.replace(batch_size=8)),
    ]
    if args.peaks_of is not None:
        n, m, x, c = next(case for case in cases if case[0] == args.peaks_of)
        print(json.dumps(bench(n, m, x, c, device, repeats=0)["peaks"]))
        return
    print(machine_line())
    print(f"LoRA rank {args.rank} on every linear layer; t_skip {base.substeps}; median of {args.repeats} interleaved runs\n")
    results = [bench(n, m, x, c, device, args.repeats) for n, m, x, c in cases]

    print_tables(results, device)


def print_tables(results: list[dict], device: torch.device) -> None:
    rows = []
    for r in results:
        m = r["med"]
        rows.append([r["name"], f"{m['forward'] * 1e3:.1f}", f"{m['forward+backward'] * 1e3:.1f}",
                     f"{m['plain LoRA FM step'] * 1e3:.1f}", f"{m['SCFM step'] * 1e3:.1f}", f"{r['measured']:.3f}",
                     f"{r['ideal']:.3f}", f"{r['measured'] / r['ideal']:.3f}"])
    print(markdown_table(["model", "F ms", "F+B ms", "plain step ms", "SCFM step ms", "SCFM/plain", "ideal 1+t_skip*F/(F+B)",
                          "measured/ideal"], rows))
    print()
    rows = []
    for r in results:
        extra = r["student"] + r["emas"] + r["optim"]
        peak = lambda kind: mib(r["peaks"][kind]) if kind in r["peaks"] else "-"  # noqa: E731
        rows.append([r["name"], mib(r["base"]), mib(r["student"]), mib(r["emas"]), mib(r["optim"]), mib(extra),
                     f"{extra / r['base']:.2f}", peak("plain LoRA FM step"), peak("SCFM step")])
    peak_kind = "GPU allocated" if device.type == "cuda" else "RSS"
    print(markdown_table(["model", "base MiB", "student LoRA MiB", "2 EMAs MiB", "AdamW state MiB", "extra state MiB",
                          "extra/base", f"peak {peak_kind} plain MiB", f"peak {peak_kind} SCFM MiB"], rows))
    print("\nextra state = student LoRA + slow and fast EMA adapters + AdamW moments (gradients add one student "
          "size during backward). Peaks are the growth during one step above the memory in use before it\n"
          "(on a CPU: RSS, measured in a child process that returns freed blocks to the kernel).")


if __name__ == "__main__":
    main()

"""Does TrainShortcut fit a 16 and a 12 GB card, and how fast is each mode? Full-size Flux.1-dev on one large GPU.

Needs a ComfyUI checkout (found as the host tests find it) and a CUDA device with room for the largest
configuration (an 80+ GB card). ComfyUI's own Flux class at Flux.1-dev's full config (19 double + 38 single
blocks, hidden 3072, T5 context 4096, pooled 768, guidance input) with random weights, stored in bf16 or fp8
as ComfyUI holds them, trains a few steps through the pack's host adapter (`host.training.train_in_graph`: the memory
plan, the loading, the memory modes, the trainer), on 512 or 1024 px latents with 512 text tokens.

The cases (issue #24): fully loaded in bf16 and fp8 at 512 and 1024 px; compiled blocks and fp8 target passes
(not yet together: the trainer refuses it); weights streamed on a simulated 16 and 12 GB card by ComfyUI's copies per layer and block by block a
block ahead, each against the same settings fully loaded. A smaller card is simulated twice over: torch's
allocator is capped at the card's usable memory (`torch.cuda.set_per_process_memory_fraction`: an allocation
past it raises out-of-memory, as on the card), and ComfyUI is told the card's free memory (its
`get_free_memory`, which TrainShortcut's plan and its weight placement read). Usable memory is 94% of the card.

Per case it prints the plan, the real peak (`torch.cuda.max_memory_allocated`, weights included), the predicted
and the median step time after two warm-up steps (the first step's time apart: compilation shows there), the
FLOP utilisation of the step, the ratio to the fully loaded run of the same settings and how far its LoRA is
from that run's.

    python -m benchmarks.gpu_fit              # on a GPU (about 8 minutes on an H200)
    python -m benchmarks.gpu_fit --only 4 5   # some cases
    python -m benchmarks.gpu_fit --smoke      # tiny widths on the CPU: checks that the script runs
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import comfy_host  # noqa: E402

from shortcut_core import ShortcutConfig  # noqa: E402

from .gpu_flux import FLUX_WIDTHS, SMOKE_WIDTHS, build  # noqa: E402
from .report import machine_line, markdown_table  # noqa: E402

FULL_DEPTH = (19, 38)   # Flux.1-dev's double and single blocks
SMOKE_DEPTH = (1, 2)
USABLE = 0.94


@dataclass
class Case:
    card_gb: float | None      # None: the whole device
    weights: str               # "bf16" | "fp8"
    batch: int
    rank: int
    offload_optimizer: bool = False
    lora_layers: str = "all"
    stream_weights: bool = False
    px: int = 1024
    prefetch_blocks: bool = True   # streamed weights a block ahead (False: ComfyUI's lowvram copies per layer)
    compile_blocks: bool = False
    fp8_targets: bool = False

    @property
    def label(self) -> str:
        modes = [m for m, on in (("offload_optimizer", self.offload_optimizer), ("lora_layers blocks",
                                 self.lora_layers == "blocks"),
                                 ("stream_weights" + ("" if self.prefetch_blocks else " (per layer)"), self.stream_weights),
                                 ("compile_blocks", self.compile_blocks), ("fp8_targets", self.fp8_targets)) if on]
        return ", ".join(modes) or "-"

    def same_settings(self, other: "Case") -> bool:
        """The fully loaded run this one is compared with: same weights, size, batch, rank and optimizer."""
        return (other.card_gb is None and not other.stream_weights and not other.compile_blocks
                and not other.fp8_targets and (other.weights, other.px, other.batch, other.rank,
                                               other.offload_optimizer, other.lora_layers)
                == (self.weights, self.px, self.batch, self.rank, self.offload_optimizer, self.lora_layers))


CASES = [
    Case(None, "bf16", 1, 64, px=512),
    Case(None, "bf16", 1, 64),
    Case(None, "fp8", 1, 64, px=512),
    Case(None, "fp8", 1, 64),
    Case(None, "fp8", 1, 64, compile_blocks=True),
    Case(None, "fp8", 1, 64, fp8_targets=True),
    # streaming against the same settings fully loaded: ComfyUI's copies per layer, then a block ahead
    Case(None, "fp8", 1, 16, offload_optimizer=True),
    Case(16, "fp8", 1, 16, offload_optimizer=True, stream_weights=True, prefetch_blocks=False),
    Case(16, "fp8", 1, 16, offload_optimizer=True, stream_weights=True),
    Case(12, "fp8", 1, 16, offload_optimizer=True, stream_weights=True, prefetch_blocks=False),
    Case(12, "fp8", 1, 16, offload_optimizer=True, stream_weights=True),
]


class Card:
    """A smaller card on a larger one: the allocator capped, ComfyUI's free-memory query answered to match."""

    def __init__(self, device: torch.device, gb: float | None):
        self.device, self.gb = device, gb

    def __enter__(self):
        import comfy.model_management as mm
        self._free = mm.get_free_memory
        if self.gb is None or self.device.type != "cuda":
            return self
        total = torch.cuda.get_device_properties(self.device).total_memory
        cap = int(self.gb * 1e9 * USABLE)
        torch.cuda.set_per_process_memory_fraction(cap / total, self.device)

        def free(dev=None, torch_free_too=False):
            left = cap - torch.cuda.memory_allocated(self.device)
            return (left, left) if torch_free_too else left

        mm.get_free_memory = free
        return self

    def __exit__(self, *exc):
        import comfy.model_management as mm
        mm.get_free_memory = self._free
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)


class StepTimes:
    """The run's reporter (host/run.py RunReporter): the time of every step."""

    def __init__(self):
        self.times, self.last = [], time.perf_counter()

    def step(self, report) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    def preview(self, step, picture) -> None:
        pass

    def say(self, text) -> None:
        print("   ", text)
        found = re.search(r"time: about ([0-9.]+) s/step", text)
        if found:
            self.predicted = float(found.group(1))

    predicted: float | None = None


def run_case(case: Case, patcher, side: int, steps: int, device) -> dict:
    """One training run through the host adapter: its plan, predicted and measured step, peak and LoRA."""
    import gc

    import comfy.model_management as mm
    host = comfy_host.pack_module("host.training")
    positive = comfy_host.flux_positive(patcher, tokens=512 if side > 16 else 16)
    latents = torch.randn(4, 16, side, side, generator=torch.Generator().manual_seed(0))
    config = ShortcutConfig(rank=case.rank, alpha=float(case.rank), batch_size=case.batch, steps=steps,
                            checkpoint_every=0, offload_optimizer=case.offload_optimizer, lora_layers=case.lora_layers,
                            compile_blocks=case.compile_blocks, fp8_targets=case.fp8_targets)
    times = StepTimes()
    run = host.TrainingRun(config=config, reporter=times, stream_weights=case.stream_weights,
                           prefetch_blocks=case.prefetch_blocks)
    plans = []
    check = host.check_memory
    host.check_memory = lambda *a, **k: plans.append(check(*a, **k)) or plans[-1]
    mm.unload_all_models()
    gc.collect()
    out = {"case": case}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        out["before"] = torch.cuda.memory_allocated(device)  # what an earlier case left: counted out of the peak
    try:
        with Card(device, case.card_gb):
            times.last = time.perf_counter()
            outcome = host.train_in_graph(patcher, latents, positive, None, run)
        out["lora"] = {k: w.up.flatten().cpu() for k, w in outcome.result.lora.items()}  # up starts at zero
        del outcome
        # the first two steps warm up (allocator, compilation: counted apart as "first step")
        out["first"] = times.times[0]
        out["step"] = statistics.median(times.times[2:] or times.times)
        out["predicted"] = times.predicted
        out["flops"] = step_flops(patcher, config, side, 512 if side > 16 else 16)
    except Exception as e:  # noqa: BLE001 - an out-of-memory is a result here
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        host.check_memory = check
    if plans:
        out["plan"] = plans[-1]
    if device.type == "cuda":
        out["peak"] = torch.cuda.max_memory_allocated(device) - out["before"]
    mm.unload_all_models()
    return out


def step_flops(patcher, config: ShortcutConfig, side: int, text_tokens: int) -> float:
    """FLOPs of one training step of this model (shortcut_core/run_time.py's count, from the model's shapes)."""
    from shortcut_core.run_time import forward_flops, step_forwards
    memory, families = comfy_host.pack_module("host.memory"), comfy_host.pack_module("host.families")
    shape = memory.model_shape(patcher)
    tokens = families.token_count(patcher, (16, side, side)) + text_tokens
    return (step_forwards(config.substeps, config.gradient_checkpointing)
            * forward_flops(shape, tokens, config.batch_size))


def utilisation(flops: float, seconds: float, device) -> str:
    """The step's FLOPs over the card's dense bf16 peak (run_time.CARD_BF16_TFLOPS)."""
    from shortcut_core.run_time import card_peak_flops
    peak = card_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return f"{flops / seconds / peak:.0%}" if peak else "-"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="steps per case; the first two are warm-up")
    ap.add_argument("--only", nargs="*", type=int, default=None, help="case numbers to run (1-based; default all)")
    ap.add_argument("--smoke", action="store_true", help="tiny widths, 64 px, on the CPU")
    args = ap.parse_args(argv)
    path, device = comfy_host.gpu_or_smoke(args.smoke)
    widths, depth = (SMOKE_WIDTHS, SMOKE_DEPTH) if args.smoke else (FLUX_WIDTHS, FULL_DEPTH)
    print(machine_line())
    print(f"ComfyUI at {path}; Flux widths {widths}, {depth[0]} + {depth[1]} blocks; {args.steps} steps per case; "
          f"gradient checkpointing; usable memory {USABLE:.0%} of a card\n", flush=True)
    rows, models, results = [], {}, []
    for number, case in enumerate(CASES, 1):
        if args.only and number not in args.only:
            continue
        side = 8 if args.smoke else case.px // 8
        if case.weights not in models:
            models.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            dtype = torch.bfloat16 if case.weights == "bf16" else torch.float8_e4m3fn
            models[case.weights] = build(widths, *depth, torch.float32 if args.smoke else dtype, device, in_ram=True)
        print(f"{number}. card {case.card_gb or 'whole device'} GB, {case.weights}, {side * 8} px, batch {case.batch}, "
              f"rank {case.rank}, {case.label}", flush=True)
        r = run_case(case, models[case.weights], side, args.steps, device)
        results.append(r)
        plan = r.get("plan")
        reference = next((x for x in results[:-1] if case.same_settings(x["case"]) and "lora" in x), None)
        differs, ratio = "-", "-"
        if reference is not None and "step" in r:
            ratio = f"{r['step'] / reference['step']:.2f}x"
        if reference is not None and "lora" in r:
            # |up - reference up| / |reference up| (up starts at zero): 0 is the same run, 1 as far as training moved
            a, b = (torch.cat([x["lora"][k] for k in sorted(x["lora"])]).double() for x in (r, reference))
            differs = f"{float((a - b).norm() / b.norm()):.2e}"
        rows.append([number, f"{case.card_gb} GB" if case.card_gb else "whole", case.weights, side * 8, case.batch,
                     case.rank, case.label, f"{plan.total / 1e9:.2f}" if plan else "-",
                     f"{plan.streamed / 1e9:.2f} ({plan.streamed_blocks} blocks)" if plan and plan.streamed else "-",
                     f"{r['peak'] / 1e9:.2f}" if "peak" in r else "-",
                     f"{r['predicted']:.2f}" if r.get("predicted") else "-",
                     f"{r['step']:.2f}" if "step" in r else r.get("error", "-"),
                     f"{r['first']:.1f}" if "first" in r else "-",
                     utilisation(r["flops"], r["step"], device) if "step" in r else "-", ratio, differs])
        print("   ", rows[-1], flush=True)
    print()
    print(markdown_table(["#", "card", "weights", "px", "batch", "rank", "modes", "plan GB", "streamed GB",
                          "real peak GB", "predicted s/step", "step s (median)", "first step s", "FLOP utilisation",
                          "step / fully loaded", "LoRA vs the first run of its setting (relative)"], rows))
    print("\nreal peak: torch.cuda.max_memory_allocated during the run (weights loaded, LoRA state, the steps'"
          " transients), less what was allocated before it; FLOP utilisation: the step's FLOPs (run_time.py) over"
          " the card's dense bf16 peak; step / fully loaded: against the whole-device run of the same settings")


if __name__ == "__main__":
    main()

"""A TrainShortcut step on a Flux-width model (real widths, fewer blocks, random weights) on a GPU.

Needs a ComfyUI checkout (found as the host tests find it) and a CUDA device. The model is
ComfyUI's own Flux class at Flux.1's widths (hidden 3072, 24 heads, T5 context 4096, pooled 768,
guidance input), built under inference_mode as ComfyUI builds models, with a few double and
single blocks. Every pass runs through the pack's host adapter, as TrainShortcut runs. For
512 and 1024 px, weights stored in bf16 and in fp8 (cast to bf16 at use, as ComfyUI holds fp8
checkpoints), it times an SCFM step and a plain LoRA flow-matching step (median) and records
the peak GPU memory of a step; three block counts give the cost per double and per single
block, extrapolated to the full 19 + 38 blocks. Beside the real peak (weights, LoRA state and the step's
transient, as the CUDA allocator counts them) it prints TrainShortcut's memory plan and the CPU accounting
of benchmarks.flux_memory for the same model and step, so one run on a borrowed GPU checks both.

    python -m benchmarks.gpu_flux [--batch 1] [--rank 64] [--repeats 5]
    python -m benchmarks.gpu_flux --smoke    # tiny widths on the CPU: checks that the script runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import comfy_host  # noqa: E402

from shortcut_core import ShortcutConfig, ShortcutTrainer, checkpoint_blocks, interpolate  # noqa: E402

from .report import machine_line, markdown_table  # noqa: E402

FLUX_WIDTHS = dict(hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], context_in_dim=4096, vec_in_dim=768)
SMOKE_WIDTHS = dict(hidden_size=64, num_heads=2, axes_dim=[8, 12, 12], context_in_dim=32, vec_in_dim=16)
BLOCK_COUNTS = [(1, 1), (2, 1), (1, 2)]  # (double, single): solves time = a + b_double * D + b_single * S
FULL = (19, 38)


def build(widths: dict, double: int, single: int, weight_dtype: torch.dtype, device: torch.device,
          in_ram: bool = False):
    """ComfyUI's Flux with random weights, made on the device (fast); in_ram: then moved to RAM, as a loader
    leaves a model before anything loads it."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(comfy_host.TINY_FLUX, **widths, depth=double, depth_single_blocks=single)
    mc = comfy.supported_models.Flux(cfg)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    mc.set_inference_dtype(weight_dtype, None if weight_dtype == compute else compute)
    with torch.inference_mode():
        model = mc.get_model({}, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        for p in model.diffusion_model.parameters():
            p.copy_((torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(p.dtype))
        if in_ram:
            model.to(mm.unet_offload_device())
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(widths, double, single, weight_dtype, side, batch, rank, repeats, device):
    """Median SCFM and plain step seconds and the SCFM step's peak memory (bytes above the loaded model)."""
    import comfy.samplers

    host = comfy_host.pack_module("host")
    for concern in ("families", "memory", "sampling", "velocity"):
        comfy_host.pack_module(f"host.{concern}")
    patcher = build(widths, double, single, weight_dtype, device)
    positive = comfy_host.flux_positive(patcher, tokens=512 if widths is FLUX_WIDTHS else 16)
    latents = torch.randn(4, 16, side, side, generator=torch.Generator().manual_seed(0))
    config = ShortcutConfig(rank=rank, alpha=float(rank), batch_size=batch, gradient_checkpointing=True)
    out = {}

    class Measure(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            velocity = host.velocity.ConditionedVelocity(model_wrap.inner_model, model_wrap.conds, latent_image.shape[0], 1.0,
                                                extra_args["model_options"], 0)
            network = model_wrap.inner_model.diffusion_model
            blocks = host.families.repeated_blocks(network)
            data = latent_image.detach().clone().float()
            with ShortcutTrainer(network, velocity, data, config, extra_args={"item": torch.arange(data.shape[0])},
                                 blocks=blocks, device=data.device) as trainer:
                x0, noise_ = data[:batch], torch.randn_like(data[:batch])
                t = torch.rand(batch, device=data.device)
                x_t = interpolate(x0, noise_, t)
                item = torch.zeros(batch, dtype=torch.long)

                def plain():
                    with checkpoint_blocks(blocks, recompute=True):
                        velocity(x_t, t, item=item).float().sub(noise_ - x0).pow(2).mean().backward()
                    trainer.optimizer.step()
                    trainer.optimizer.zero_grad(set_to_none=True)

                kinds = {"scfm": trainer.step, "plain": plain}
                for fn in kinds.values():
                    fn()
                    fn()
                times = {k: [] for k in kinds}
                for _ in range(repeats):
                    for k, fn in kinds.items():
                        _sync(device)
                        start = time.perf_counter()
                        fn()
                        _sync(device)
                        times[k].append(time.perf_counter() - start)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                    trainer.step()
                    _sync(device)
                    out["peak"] = torch.cuda.max_memory_allocated(device) - before
                    out["resident"] = before
                out["scfm"] = statistics.median(times["scfm"])
                out["plain"] = statistics.median(times["plain"])
            return torch.zeros_like(latent_image)

    # What TrainShortcut's memory plan predicts for this model and step, and what the CPU accounting measures.
    from shortcut_core.memory_plan import TrainingShape, plan_training

    from .flux_memory import measure as account
    tokens = (side // 2) ** 2 + positive[0][0].shape[1]
    out["plan"] = plan_training(host.memory.model_shape(patcher, None),
                                TrainingShape(rank=rank, forward_batch=batch, tokens=tokens, checkpointing=True)).total
    if widths is FLUX_WIDTHS:
        out["accounted"] = account(widths, double, single, side, batch, rank, True, weight_dtype).total

    guider = host.sampling.make_guider(patcher, positive, None, 1.0)
    with torch.inference_mode(False):
        guider.sample(torch.zeros(batch, 16, side, side), latents, Measure(), torch.tensor([1.0, 0.0]), seed=0,
                      disable_pbar=True)
    del patcher, guider
    import comfy.model_management
    comfy.model_management.unload_all_models()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _per_block(results: list[dict], key: str) -> tuple[float, float, float]:
    """Solve value = a + b_double * D + b_single * S from the three BLOCK_COUNTS runs."""
    (a11, a21, a12) = (r[key] for r in results)
    b_double, b_single = a21 - a11, a12 - a11
    return a11 - b_double - b_single, b_double, b_single


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny widths, 64 px, on the CPU")
    args = ap.parse_args(argv)
    path, device = comfy_host.gpu_or_smoke(args.smoke)
    widths = SMOKE_WIDTHS if args.smoke else FLUX_WIDTHS
    sizes = [64] if args.smoke else [512, 1024]
    dtypes = [("fp32" if args.smoke else "bf16", torch.float32 if args.smoke else torch.bfloat16),
              ("fp8 stored", torch.float8_e4m3fn)]
    print(machine_line())
    print(f"ComfyUI at {path}; Flux widths {widths}; batch {args.batch}; LoRA rank {args.rank} on every linear layer; "
          f"gradient checkpointing; median of {args.repeats}\n")
    rows = []
    for px in sizes:
        for dtype_name, dtype in dtypes:
            runs = [measure(widths, d, s, dtype, px // 8, args.batch, args.rank, args.repeats, device)
                    for d, s in BLOCK_COUNTS]
            def gib(r, key):
                return f"{r[key] / 2**30:.2f}" if key in r else "-"

            for (d, s), r in zip(BLOCK_COUNTS, runs):
                measured = {"total": r["peak"] + r["resident"]} if "peak" in r else {}
                rows.append([px, dtype_name, f"{d}+{s}", f"{r['plain'] * 1e3:.1f}", f"{r['scfm'] * 1e3:.1f}",
                             f"{r['scfm'] / r['plain']:.3f}", gib(measured, "total"), gib(r, "plan"),
                             gib(r, "accounted")])
            full = {}
            for key in ("scfm", "plain", "peak", "resident", "plan", "accounted"):
                if key in runs[0]:
                    a, bd, bs = _per_block(runs, key)
                    full[key] = a + bd * FULL[0] + bs * FULL[1]
            if "peak" in full:
                full["total"] = full["peak"] + full["resident"]
            rows.append([px, dtype_name, "19+38 (extrapolated)", f"{full['plain'] * 1e3:.0f}",
                         f"{full['scfm'] * 1e3:.0f}", f"{full['scfm'] / full['plain']:.3f}", gib(full, "total"),
                         gib(full, "plan"), gib(full, "accounted")])
    print(markdown_table(["px", "weights", "blocks (double+single)", "plain LoRA FM step ms", "SCFM step ms",
                          "SCFM/plain", "real peak GiB (CUDA)", "TrainShortcut's plan GiB",
                          "CPU accounting GiB (flux_memory)"], rows))
    print("\nThe extrapolated row fits step time (and memory) = a + b_double * D + b_single * S to the three runs;"
          " its memory is resident weights + LoRA state + the step's peak, for the full model.")


if __name__ == "__main__":
    main()

"""An SCFM train step vs a plain LoRA flow-matching step on Flux models built from ComfyUI's classes.

Needs a ComfyUI checkout (found as the host tests find it). The models are built under
inference_mode as ComfyUI builds them, and every pass goes through the pack's host adapter
(ConditionedVelocity: the host's conditioning and sampling_function), exactly as TrainShortcut
runs. Prints the same tables as benchmarks.cost: step times, the ideal ratio
1 + t_skip * F / (F + B), and the extra state (student LoRA + 2 EMAs + AdamW moments).

    python -m benchmarks.host_cost [--repeats 16] [--rank 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import comfy_host  # noqa: E402

from shortcut_core import ShortcutConfig  # noqa: E402

from .cost import bench, print_tables  # noqa: E402
from .report import machine_line  # noqa: E402

CASES = [  # name, Flux overrides, latent side, batch
    ("tiny Flux (w64, 1+2 blocks, 16 tokens), batch 8", dict(), 8, 8),
    ("mid Flux (w512, 2+4 blocks, 256 tokens), batch 4",
     dict(hidden_size=512, num_heads=8, axes_dim=[16, 24, 24], depth=2, depth_single_blocks=4, context_in_dim=256,
          vec_in_dim=64), 32, 4),
]


def run_case(name, overrides, side, batch, config: ShortcutConfig, device, repeats: int, checkpointing: bool):
    import comfy.samplers

    host = comfy_host.pack_module("host")
    for concern in ("families", "memory", "sampling", "velocity"):
        comfy_host.pack_module(f"host.{concern}")
    with torch.inference_mode():
        _, patcher = comfy_host.tiny_flux(seed=0, **overrides)
    positive = comfy_host.flux_positive(patcher)
    latents = torch.randn(16, 16, side, side, generator=torch.Generator().manual_seed(0))
    config = config.replace(batch_size=batch, gradient_checkpointing=checkpointing)
    out = {}

    class Measure(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            count = latent_image.shape[0]
            velocity = host.velocity.ConditionedVelocity(model_wrap.inner_model, model_wrap.conds, count, 1.0,
                                                extra_args["model_options"], 0)
            network = model_wrap.inner_model.diffusion_model
            guidance = torch.full((batch,), 3.5, device=latent_image.device)
            out["result"] = bench(name + (", checkpointing" if checkpointing else ""), network,
                                  latent_image.detach().clone().float(), config, latent_image.device, repeats,
                                  velocity=velocity, extra_args={"item": torch.arange(count)},
                                  batch_args={"item": torch.zeros(batch, dtype=torch.long), "guidance": guidance},
                                  blocks=host.families.repeated_blocks(network), peaks=latent_image.device.type == "cuda")
            return torch.zeros_like(latent_image)

    guider = host.sampling.make_guider(patcher, positive, None, 1.0)
    with torch.inference_mode(False):
        guider.sample(torch.zeros(batch, 16, side, side), latents, Measure(), torch.tensor([1.0, 0.0]), seed=0,
                      disable_pbar=True)
    return out["result"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier timings on a shared machine)")
    args = ap.parse_args(argv)
    path = comfy_host.pack_or_exit()
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    # The paper's Flux recipe (guidance draw, resolution shift); rank from the command line.
    config = ShortcutConfig(rank=args.rank, alpha=float(args.rank))
    print(machine_line())
    print(f"ComfyUI at {path}; LoRA rank {args.rank} on every linear layer; the paper's Flux recipe otherwise; "
          f"median of {args.repeats} interleaved, rotated runs; all passes through the host adapter\n")
    results = [run_case(*case, config, device, args.repeats, checkpointing)
               for case in CASES for checkpointing in (False, True)]
    print_tables(results, device)


if __name__ == "__main__":
    main()

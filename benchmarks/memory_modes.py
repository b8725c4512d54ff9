"""What each memory mode costs and changes, side by side on the digits demo (CPU, no download).

    python -m benchmarks.memory_modes [--steps 400]

The demo's teacher (benchmarks.digits) is distilled with the demo's recipe once per variant, each run from
the same seed: the paper's LoRA (rank 32 here, every linear layer), offload_optimizer, lora_layers "blocks",
and lower ranks. Per variant: LoRA parameters, the LoRA state a GPU would hold (six float32 copies, four with
offload_optimizer), seconds per step and its ratio to the paper's LoRA (measured in this run), and the
3-step samples' RMSE to the teacher's 128-step samples from 2000 fixed noises (strength 1, the recipe's shift).

stream_weights is not here: on a CPU there is nowhere to stream from (its LoRA is bit-identical to a fully
loaded run's: tests/test_host_memory.py); its cost is a GPU figure (benchmarks.gpu_fit).
"""

from __future__ import annotations

import argparse
import time

import torch

from shortcut_core import ShortcutTrainer, lora_applied

from .demo import REFERENCE_STEPS, demo_config
from .digits import load_digits_images, load_or_pretrain_teacher, rmse_to, sample, velocity_of
from .report import machine_line, markdown_table

VARIANTS = [
    ("the paper's LoRA (every linear layer)", {}),
    ("offload_optimizer", {"offload_optimizer": True}),
    ("lora_layers blocks", {"lora_layers": "blocks"}),
    ("rank 32 -> 8", {"rank": 8, "alpha": 8.0}),
    ("lora_layers blocks, rank 8", {"lora_layers": "blocks", "rank": 8, "alpha": 8.0}),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args(argv)
    print(machine_line())
    real = load_digits_images()
    net, where = load_or_pretrain_teacher(real, progress=False)
    print(f"teacher: {where}; {args.steps} SCFM steps per variant\n", flush=True)
    base = demo_config(args.steps)
    noise = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(2025))
    reference = sample(net, noise, REFERENCE_STEPS, base.sample_shift)
    rows, first = [], None
    for name, changes in VARIANTS:
        config = base.replace(**changes)
        with ShortcutTrainer(net, velocity_of(net), real, config, blocks=list(net.blocks)) as trainer:
            start = time.perf_counter()
            result = trainer.run(progress=False)
            per_step = (time.perf_counter() - start) / args.steps
            params = sum(p.numel() for p in trainer.adapters.parameters())
        with lora_applied(net, result.lora, 1.0):
            rmse = rmse_to(sample(net, noise, 3, config.sample_shift), reference)
        copies = 4 if config.offload_optimizer else 6
        if first is None:
            first = dict(step=per_step, rmse=rmse, lora=result.lora)
        same = all(torch.equal(result.lora[k].up, first["lora"][k].up) and torch.equal(result.lora[k].down,
                                                                                      first["lora"][k].down)
                   for k in first["lora"]) if result.lora.keys() == first["lora"].keys() else False
        rows.append([name, f"{params / 1e3:.0f}k", f"{copies * 4 * params / 2**20:.1f}", f"{per_step * 1e3:.0f}",
                     f"{per_step / first['step']:.2f}", f"{rmse:.4f}", f"{rmse / first['rmse']:.3f}",
                     "yes" if same else "no"])
        print("  ", rows[-1], flush=True)
    print()
    print(markdown_table(["variant", "LoRA params", "LoRA state on the device MiB", "ms / step", "time ratio",
                          f"3-step RMSE to teacher {REFERENCE_STEPS}-step", "RMSE ratio",
                          "LoRA bit-identical to the paper's"], rows))


if __name__ == "__main__":
    main()

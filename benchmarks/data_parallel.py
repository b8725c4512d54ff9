"""Data-parallel SCFM on the CPU: steps per second and the all-reduce's share, 1 and 2 processes side by side.

    python -m benchmarks.data_parallel [--steps 20] [--batch 512]

The digits demo's teacher (benchmarks.digits, 0.4M parameters, a rank-32 LoRA of 313k parameters on every
linear layer) trains with the demo's recipe under torch.distributed with gloo, one thread per process: one
process with batch 2b, and two processes with batch b each (the same items per step). Per run: steps per
second, the seconds spent in the gradient all-reduce and its share of the step. On one machine's cores the
ideal speed-up is 2x less what the all-reduce and the duplicated work (draws, optimizer, EMAs) cost.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .report import machine_line, markdown_table


def _worker(rank: int, world: int, port: int, steps: int, batch: int, out: str) -> None:
    from shortcut_core import ShortcutTrainer
    from shortcut_core.data_parallel import DataParallel, close_process_group

    from .demo import demo_config
    from .digits import load_digits_images, load_or_pretrain_teacher, velocity_of

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        real = load_digits_images()
        net, _ = load_or_pretrain_teacher(real, progress=False)
        parallel = DataParallel() if world > 1 else None
        spent = [0.0]
        if parallel is not None:
            average = parallel.average_gradients

            def timed(params):
                start = time.perf_counter()
                average(params)
                spent[0] += time.perf_counter() - start

            parallel.average_gradients = timed
        config = demo_config(steps).replace(batch_size=batch)
        with ShortcutTrainer(net, velocity_of(net), real, config, parallel=parallel) as trainer:
            trainer.run(2, progress=False)  # warm-up
            dist.barrier()
            spent[0] = 0.0
            start = time.perf_counter()
            trainer.run(steps + 2, progress=False)
            elapsed = time.perf_counter() - start
        if rank == 0:
            with open(out, "w") as f:
                f.write(f"{elapsed} {spent[0]}")
    finally:
        close_process_group()


def run(world: int, steps: int, batch: int) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.start_processes(_worker, args=(world, port, steps, batch, out), nprocs=world, join=True,
                           start_method="spawn")
        elapsed, spent = (float(v) for v in open(out).read().split())
    return elapsed, spent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=512, help="items per step in all (split over the processes)")
    args = ap.parse_args(argv)
    print(machine_line(), f"({os.cpu_count()} cores); {args.steps} steps of {args.batch} items per run, "
          f"one thread per process, gloo\n", flush=True)
    rows, first = [], None
    for world in (1, 2):
        elapsed, spent = run(world, args.steps, args.batch // world)
        rate = args.steps / elapsed
        first = first or rate
        rows.append([world, args.batch // world, f"{rate:.2f}", f"{rate / first:.2f}x",
                     f"{1e3 * spent / args.steps:.1f}", f"{spent / elapsed:.1%}"])
        print("  ", rows[-1], flush=True)
    print()
    print(markdown_table(["processes", "batch per process", "steps / s", "speed-up", "all-reduce ms / step",
                          "all-reduce share"], rows))


if __name__ == "__main__":
    main()

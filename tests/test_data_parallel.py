"""Data-parallel SCFM on the CPU: two gloo processes against one process with the whole batch."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from shortcut_core.data_parallel import DataParallel, StateDriftError, close_process_group
from shortcut_core.trainer import ShortcutTrainer

from test_trainer import cfg, make_latents, make_net, snapshot, velocity_of

STEPS = 4


def _worker(rank: int, world: int, init: str, out: str, batch: int, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        net = make_net()
        config = cfg(batch_size=batch, steps=STEPS)
        with ShortcutTrainer(net, velocity_of(net), make_latents(), config, parallel=DataParallel()) as tr:
            if mode == "drift" and rank == 1:
                with torch.no_grad():
                    tr.adapters.parameters()[0].add_(1e-3)
            try:
                tr.run(progress=False, checkpoint_path=os.path.join(out, "run.ckpt"))
            except StateDriftError as e:
                with open(os.path.join(out, f"drift{rank}.txt"), "w") as f:
                    f.write(str(e))
                return
            save_file(snapshot(tr), os.path.join(out, f"rank{rank}.safetensors"))
            with open(os.path.join(out, f"losses{rank}.txt"), "w") as f:
                f.write(json.dumps(tr.losses))
    finally:
        close_process_group()


def _spawn(tmp_path, world: int, batch: int, mode: str = "train") -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_worker, args=(world, init, str(tmp_path), batch, mode), nprocs=world, join=True,
                       start_method="spawn")


def _single(batch: int, steps: int = STEPS):
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(batch_size=batch, steps=steps)) as tr:
        tr.run(progress=False)
        return snapshot(tr), tr.losses


def test_two_processes_with_batch_b_train_as_one_with_batch_2b(tmp_path):
    """Same draws, same items; the only difference is float32 summation order (a batch of 2 per forward and an
    all-reduce of two gradients, against one batch of 4). Rounding of ~1e-7 grows through AdamW, which divides
    each gradient by its own running magnitude: after 4 steps at lr 1e-2 it is ~1.4e-5 of the LoRA's scale
    here; the test allows 1e-4 (a wrong shard or a missing all-reduce moves it by order 1)."""
    _spawn(tmp_path, world=2, batch=2)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for key in ranks[0]:  # identical on every process, bit for bit
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    single, single_losses = _single(batch=4)
    worst = max(float((ranks[0][k] - single[k]).abs().max() / single[k].abs().max().clamp_min(1e-12))
                for k in single if single[k].abs().max() > 0)
    print(f"\nlargest relative difference to one process with batch 4: {worst:.2e}")
    assert worst < 1e-4
    losses = json.loads((tmp_path / "losses0.txt").read_text())
    assert losses == pytest.approx(single_losses, rel=1e-4)
    # only process 0 wrote the checkpoint, and it holds the run
    assert (tmp_path / "run.ckpt").is_file()


def test_a_checkpoint_resumes_on_another_number_of_processes(tmp_path):
    _spawn(tmp_path, world=2, batch=2)
    net = make_net()
    with ShortcutTrainer(net, velocity_of(net), make_latents(), cfg(batch_size=4, steps=STEPS + 2)) as tr:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr.load_checkpoint(str(tmp_path / "run.ckpt"))
        assert any("trained on 2" in str(w.message) and "items instead of" in str(w.message)
                   and w.filename == __file__ for w in caught)  # pointing at the caller of load_checkpoint
        assert tr.step_count == STEPS
        ranks = load_file(str(tmp_path / "rank0.safetensors"))
        for key, value in snapshot(tr).items():
            assert torch.equal(value, ranks[key]), key
        tr.run(progress=False)
        assert tr.step_count == STEPS + 2


def test_processes_that_drift_apart_are_stopped_at_the_checkpoint(tmp_path):
    _spawn(tmp_path, world=2, batch=2, mode="drift")
    for rank in range(2):
        message = (tmp_path / f"drift{rank}.txt").read_text()
        assert "differs between the 2 processes" in message
    assert not (tmp_path / "run.ckpt").exists()  # nothing written from a drifted run


def test_data_parallel_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="torchrun"):
        DataParallel()

"""The training checkpoint: everything a resume needs, in one safetensors file.

Format CHECKPOINT_FORMAT. Tensors: `<role>/<name>` for the student and both EMAs (the adapters'
parameters), `optimizer/<i>/<field>` (the optimizer's per-parameter state, i indexing the student's
parameters), `rng` (the training generator's state) and `losses` (float64, one per step done). The
metadata key "shortcut_flow.checkpoint" holds JSON: format, step, config (ShortcutConfig.to_dict()),
processes (data parallel), param_groups (the optimizer's, without params) and student (the student's
parameter names: the LoRA layout).

These are functions over a run's parts (adapters, optimizer, generator, ...): ShortcutTrainer
calls them from save_checkpoint, load_checkpoint and its loop.
"""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .adapters import EMA_FAST, EMA_SLOW, STUDENT, ShortcutAdapters
from .config import ShortcutConfig
from .knobs import FREE, LAYOUT, resume_fields
from .safetensors_io import SafetensorsFileError, read_safetensors, write_safetensors_atomic

if TYPE_CHECKING:
    from .optimizer_offload import OffloadedAdamW

CHECKPOINT_FORMAT = "shortcut_flow.checkpoint.1"
METADATA_KEY = "shortcut_flow.checkpoint"  # the safetensors metadata entry holding the JSON

# What a resume does with a changed setting, as each knob declares it (config.py): settings that shape the LoRA
# itself refuse the checkpoint; the length of the run and its outputs may change without a warning.
LAYOUT_FIELDS = resume_fields(ShortcutConfig, LAYOUT)
FREE_FIELDS = resume_fields(ShortcutConfig, FREE)

_ROLES = (STUDENT, EMA_SLOW, EMA_FAST)  # the adapters a checkpoint holds, in this order


class CheckpointWriteError(SafetensorsFileError):
    """A checkpoint could not be written (full disk, unwritable folder); training stopped. The
    previous checkpoint file is intact (writes are atomic)."""


def checkpoint_state(adapters: ShortcutAdapters, optimizer: torch.optim.Optimizer | OffloadedAdamW,
                     generator: torch.Generator, losses: Sequence[float], step: int, config: ShortcutConfig,
                     processes: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A run's state as flat tensors plus JSON-able metadata (the tensors share storage with the run)."""
    tensors: dict[str, torch.Tensor] = {}
    for role in _ROLES:
        for name, p in adapters.named_parameters(role):
            tensors[f"{role}/{name}"] = p.detach()
    state = optimizer.state_dict()
    for i, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"optimizer/{i}/{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    tensors["rng"] = generator.get_state()
    tensors["losses"] = torch.tensor(list(losses), dtype=torch.float64)
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "config": config.to_dict(), "processes": processes,
            "param_groups": state["param_groups"],  # their "params": the state's indices, per group
            "student": [name for name, _ in adapters.named_parameters(STUDENT)]}
    return tensors, meta


def write_checkpoint(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a checkpoint atomically (SafetensorsFileError when it cannot be written)."""
    write_safetensors_atomic(path, tensors, {METADATA_KEY: json.dumps(meta)})


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the parsed metadata of a checkpoint; SafetensorsFileError when `path` is not one."""
    tensors, raw = read_safetensors(path, what="training checkpoint")
    if METADATA_KEY not in raw:
        raise SafetensorsFileError(f"training checkpoint {path!r} has no shortcut_flow checkpoint metadata; "
                                   f"it is a LoRA file, not a training checkpoint")
    return tensors, json.loads(raw[METADATA_KEY])


def check_checkpoint_config(path: str, saved: dict, config: ShortcutConfig, *, stacklevel: int = 1) -> None:
    """Refuse a checkpoint whose LAYOUT_FIELDS differ from `config` (SafetensorsFileError); warn of other
    changed settings but FREE_FIELDS. `stacklevel` as warnings.warn's, counted from this function's caller."""
    current = config.to_dict()
    differ = [k for k in current if k in saved and saved[k] != current[k] and k not in FREE_FIELDS]
    layout = [k for k in differ if k in LAYOUT_FIELDS]
    if layout:
        pairs = ", ".join(f"{k} {saved[k]!r} (this run: {current[k]!r})" for k in layout)
        raise SafetensorsFileError(f"training checkpoint {path!r} was made with {pairs}; set the same values to "
                                   f"resume from it, or start a new run")
    if differ:
        warnings.warn(f"resuming {path!r} with changed settings: "
                      + ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in differ)
                      + "; the run will differ from an uninterrupted one", stacklevel=stacklevel + 1)


def load_into(path: str, adapters: ShortcutAdapters, optimizer: torch.optim.Optimizer | OffloadedAdamW,
              generator: torch.Generator, config: ShortcutConfig, processes: int, *,
              stacklevel: int = 1) -> tuple[int, list[float]]:
    """Load checkpoint `path` into a run's adapters, optimizer and generator (same module, same LoRA layout)
    and return its (step, losses). Everything is validated before anything changes: a refused checkpoint
    (SafetensorsFileError) loads nothing. Warns of changed settings and of another number of processes;
    `stacklevel` as warnings.warn's, counted from this function's caller."""
    tensors, meta = read_checkpoint(path)
    check_checkpoint_config(path, meta.get("config") or {}, config, stacklevel=stacklevel + 1)
    names = [name for name, _ in adapters.named_parameters(STUDENT)]
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("student") != names:
        raise SafetensorsFileError(f"training checkpoint {path!r} was written for a different LoRA layout "
                                   f"(rank, target modules or model); start a new run or use the same settings")
    loads = []  # validate everything before changing anything: a refused checkpoint loads nothing
    for role in _ROLES:
        for name, p in adapters.named_parameters(role):
            saved = tensors.get(f"{role}/{name}")
            if saved is None or saved.shape != p.shape:
                raise SafetensorsFileError(f"training checkpoint {path!r}: {role} {name} has shape "
                                           f"{None if saved is None else tuple(saved.shape)}, the run has "
                                           f"{tuple(p.shape)}")
            loads.append((p, saved))
    if "rng" not in tensors or "losses" not in tensors:
        raise SafetensorsFileError(f"training checkpoint {path!r} has no RNG state or loss history; it is incomplete")
    saved_processes = int(meta.get("processes", 1))
    if saved_processes != processes:  # warned before loading: a warning raised as an error loads nothing
        items = config.batch_size * config.grad_accum_steps
        warnings.warn(f"resuming {path!r} on {processes} process(es); it was trained on {saved_processes}: an "
                      f"optimizer step now sees {items * processes} items instead of {items * saved_processes} "
                      f"(batch_size is per process)", stacklevel=stacklevel + 1)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, field = key.split("/", 2)
            opt_state.setdefault(int(index), {})[field] = value
    # checkpoints before up_lr_ratio (one group) did not say which indices a group holds: all of them
    groups = [dict(g, params=g.get("params", list(range(len(names))))) for g in meta["param_groups"]]
    step, losses = int(meta["step"]), [float(v) for v in tensors["losses"]]
    with torch.no_grad():
        for p, saved in loads:
            p.copy_(saved)
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    generator.set_state(tensors["rng"])
    return step, losses

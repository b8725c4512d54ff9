"""Safetensors files written atomically and read with errors a user can act on.

A write goes to a temporary file beside the target, is flushed to disk, then renamed over the
target: an interrupt or a full disk leaves the previous file intact. Reading never unpickles.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping

import torch


class SafetensorsFileError(ValueError):
    """A file could not be read or written; the message names the file and what to do."""


def _file_mode(path: str) -> int:
    """The mode the written file gets: the replaced file's, else what open() would give (mkstemp's is 0o600)."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        pass
    try:
        with open("/proc/self/status") as f:  # reads the umask without changing it (threads)
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_safetensors_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SafetensorsFileError(f"cannot write {path!r}: folder {folder!r} does not exist")
    # safetensors wants contiguous tensors that share no storage; LoRA state is small, so copy.
    payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".partial", dir=folder)
        os.close(fd)
        save_file(payload, tmp, metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, _file_mode(path))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise SafetensorsFileError(f"could not write {path!r} ({e.strerror or e}); the previous file, if any, is "
                                   f"unchanged. Free disk space or choose a writable folder.") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic


def read_safetensors(path: str | os.PathLike, *, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the metadata of a safetensors file."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SafetensorsFileError(f"{what} {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    # A safetensors file starts with its header's length (u64, little-endian) and then the header's "{": its first
    # byte may be 0x80 or "P" for some header lengths, so the pickle/zip signatures count only when that is absent.
    header_length = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    looks_safetensors = head[8:9] == b"{" and 0 < header_length <= os.path.getsize(path) - 8
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise SafetensorsFileError(f"{what} {path!r} is a pickle/zip checkpoint (.ckpt/.pt), not safetensors; it is "
                                   f"not loaded because unpickling can run code. Convert it to .safetensors first.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise SafetensorsFileError(f"{what} {path!r} is not a readable safetensors file ({e}); it may be truncated "
                                   f"or corrupt. Download or save it again.") from e
    return tensors, metadata

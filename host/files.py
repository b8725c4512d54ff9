"""The pack's files in ComfyUI's folders: LoRAs in models/loras, the names a run writes (never over a user's
file) and the training state beside each LoRA."""

from __future__ import annotations

import os

import folder_paths

from .checks import HostInputError


TRAIN_STATE_SUFFIX = ".train_state"  # beside the LoRA; not a LoRA extension, so no LoRA list shows it
_SAVE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. ")


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str, input_name: str = "lora_name") -> str:
    if name not in folder_paths.get_filename_list("loras"):
        raise HostInputError(f"{input_name}: {name!r} is not in models/loras; pick a file from the list "
                             f"(refresh the browser page after copying new files)")
    return folder_paths.get_full_path_or_raise("loras", name)


def output_paths(save_name: str, input_name: str = "save_name") -> tuple[str, str]:
    """(LoRA file, training state) for a save name, always inside the first models/loras folder."""

    name = save_name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if (not name or name.startswith(".") or ".." in name or not set(name) <= _SAVE_NAME_CHARS):
        raise HostInputError(f"{input_name}: {save_name!r} is not a plain file name; use letters, digits, spaces, "
                             f"'_', '-' and '.', without folders or '..' (files are written to models/loras)")
    folder = folder_paths.get_folder_paths("loras")[0]
    path = os.path.join(folder, name + ".safetensors")
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
        raise HostInputError(f"{input_name}: {save_name!r} would leave models/loras")
    return path, os.path.join(folder, name + TRAIN_STATE_SUFFIX)


def free_output_paths(save_name: str, keep: str | None = None) -> tuple[str, str]:
    """output_paths, with _2, _3, ... appended while the LoRA file exists (unless it is `keep`,
    the file being resumed): a new run never overwrites a user's file. The folder is made now, before
    any training, when it does not exist yet (a fresh --base-directory has no models/loras)."""
    lora, state = output_paths(save_name)
    try:
        os.makedirs(os.path.dirname(lora), exist_ok=True)
    except OSError as e:
        raise HostInputError(f"save_name: cannot create the LoRA folder {os.path.dirname(lora)!r} ({e.strerror or e}); "
                             f"create it or point ComfyUI's loras folder at a writable place") from e
    stem, n = lora[: -len(".safetensors")], 1
    while os.path.exists(lora) and (keep is None or os.path.abspath(lora) != os.path.abspath(keep)):
        n += 1
        lora, state = f"{stem}_{n}.safetensors", f"{stem}_{n}{TRAIN_STATE_SUFFIX}"
    return lora, state

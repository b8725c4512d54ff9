"""The headless command's models and data, through ComfyUI's own loader nodes: Load Diffusion Model, the CLIP
loaders and Load VAE for the models; an image folder with captions (VAE-encoded) or a prompts file (the
teacher's own samples, as Shortcut Teacher Latents makes them) for the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .teacher import PromptLatents, check_settings, parse_prompts, sampling_settings


def _model_name(folder: str, value: str, argument: str) -> str:
    """A model folder's file name for a name or a path (a path's folder is added to ComfyUI's search paths)."""
    import folder_paths
    path = Path(value).expanduser()
    if path.is_file():
        folder_paths.add_model_folder_path(folder, str(path.parent.resolve()))
        return path.name
    if value not in folder_paths.get_filename_list(folder):
        raise SystemExit(f"{argument}: {value!r} is neither a file nor in ComfyUI's {folder} folders "
                         f"({', '.join(folder_paths.get_folder_paths(folder))})")
    return value


def load_models(unet: str, weight_dtype: str, clips: Sequence[str], clip_type: str, vae: str | None):
    """(MODEL, CLIP, VAE or None) through ComfyUI's own loader nodes, from names in its folders or paths."""
    import nodes
    (model,) = nodes.UNETLoader().load_unet(_model_name("diffusion_models", unet, "--unet"), weight_dtype)
    names = [_model_name("text_encoders", c, "--clip") for c in clips]
    if len(names) == 2:
        (clip,) = nodes.DualCLIPLoader().load_clip(names[0], names[1], clip_type)
    elif len(names) == 1:
        (clip,) = nodes.CLIPLoader().load_clip(names[0], clip_type)
    else:
        raise SystemExit("--clip: give one text encoder, or two for Flux (clip_l and t5xxl)")
    if vae is None:
        return model, clip, None
    return model, clip, nodes.VAELoader().load_vae(_model_name("vae", vae, "--vae"))[0]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_caption_pairs(folder: Path) -> list[tuple[Path, str]]:
    """Every image in `folder` with the caption in its same-named .txt file (sorted by name)."""
    if not folder.is_dir():
        raise SystemExit(f"--images: {folder} is not a folder")
    pairs, missing = [], []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if caption.is_file():
            pairs.append((image, caption.read_text(encoding="utf-8").strip()))
        else:
            missing.append(image.name)
    if missing:
        raise SystemExit(f"--images: {len(missing)} image(s) have no caption file, e.g. {missing[0]} needs "
                         f"{Path(missing[0]).stem}.txt beside it")
    if not pairs:
        raise SystemExit(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return pairs


def dataset_from_images(folder: Path, clip, vae, guidance: float):
    import numpy as np
    from PIL import Image

    import node_helpers
    import nodes
    pairs = image_caption_pairs(folder)
    if vae is None:
        raise SystemExit("--images needs --vae to encode the images")
    sizes = {Image.open(p).size for p, _ in pairs}
    if len(sizes) > 1:
        raise SystemExit(f"--images: the images have {len(sizes)} sizes {sorted(sizes)}; resize them to one size")
    latents, positive = [], []
    for path, caption in pairs:
        pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)[None]
        latents.append(nodes.VAEEncode().encode(vae, pixels)[0]["samples"])
        (conditioning,) = nodes.CLIPTextEncode().encode(clip, caption)
        positive += node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})
    return torch.cat(latents), positive


def dataset_from_prompts(prompts: Path, teacher: Mapping[str, Any], model, clip, parallel):
    """The teacher's samples of a prompts file, with Shortcut Teacher Latents' widget values (`teacher`): process 0
    makes and caches them, the others read them."""
    settings = sampling_settings(teacher)
    if not prompts.is_file():
        raise SystemExit(f"--prompts: {prompts} is not a file")
    lines = parse_prompts(prompts.read_text(encoding="utf-8"))
    check_settings(lines, settings, model.get_model_object("latent_format"))

    def make():
        return PromptLatents(model, clip, settings, teacher["cache"] or parallel is not None).make(
            lines, teacher["per_prompt"], teacher["batch_size"])

    # the teacher's negative goes on to training when it sampled with true CFG (cfg 0 there: the family's)
    keep_negative = teacher["cfg"] > 1.0
    if parallel is None:
        latents, positive, negative = make()
        return latents, positive, negative if keep_negative else None
    import torch.distributed as dist
    if parallel.rank == 0:
        made = make()
    dist.barrier()
    if parallel.rank != 0:
        made = make()  # every image is in the cache now
    return made[0], made[1], made[2] if keep_negative else None

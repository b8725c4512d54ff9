"""Finding and starting a real ComfyUI checkout for host tests, and ComfyUI-built tiny models.

Lookup order: $COMFYUI_PATH, then ../ComfyUI beside the project, then the ComfyUI tree the pack
sits in (<ComfyUI>/custom_nodes/<pack>). ComfyUI runs in-process on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_state: dict[str, object] = {}


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy").is_dir() and (path / "nodes.py").is_file() and (path / "folder_paths.py").is_file()


def find_comfyui() -> tuple[Path | None, str]:
    """(path, how it was found) or (None, why not)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser().resolve()
        return (p, "COMFYUI_PATH") if _is_comfyui(p) else (None, f"COMFYUI_PATH={env} is not a ComfyUI checkout")
    beside = PROJECT_ROOT.parent / "ComfyUI"
    if _is_comfyui(beside):
        return beside.resolve(), "../ComfyUI beside the project"
    if PROJECT_ROOT.parent.name == "custom_nodes" and _is_comfyui(PROJECT_ROOT.parent.parent):
        return PROJECT_ROOT.parent.parent.resolve(), "the ComfyUI tree the pack sits in"
    return None, "no ComfyUI checkout: set COMFYUI_PATH or clone ComfyUI to ../ComfyUI"


def start_comfyui() -> tuple[Path | None, str]:
    """Import ComfyUI in-process on the CPU (once). Returns (path, '') or (None, why it cannot run)."""
    if "result" in _state:
        return _state["result"]  # type: ignore[return-value]
    path, how = find_comfyui()
    if path is None:
        _state["result"] = (None, how)
        return None, how
    root = str(path)
    if root in sys.path:
        sys.path.remove(root)
    # ComfyUI's `nodes` module must win over this project's `nodes/` package.
    sys.path.insert(0, root)
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args

        # Tests run on the CPU; GPU benchmarks set SHORTCUT_FLOW_DEVICE=gpu to keep ComfyUI's own device choice.
        args.cpu = os.environ.get("SHORTCUT_FLOW_DEVICE", "cpu") == "cpu"
        # main.py imports ComfyUI's `utils` package before nodes.py puts comfy/ first on sys.path, where
        # comfy/utils.py would shadow it: built-in nodes that import the server (ImageStitch, ...) need it.
        import utils.extra_config  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy.supported_models  # noqa: F401
        import folder_paths  # noqa: F401
        import nodes  # noqa: F401
    except Exception as e:  # missing Python requirements of ComfyUI itself
        result = (None, f"ComfyUI at {root} ({how}) cannot be imported here: {type(e).__name__}: {e}. "
                        f"Install its requirements (see docs/testing.md).")
        _state["result"] = result
        return result
    if not str(getattr(sys.modules["nodes"], "__file__", "")).startswith(root):
        raise RuntimeError(f"`nodes` resolved to {sys.modules['nodes'].__file__}, not ComfyUI's; check sys.path")
    _state["result"] = (path, "")
    return path, ""


TINY_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=16, context_in_dim=32,
                 hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[8, 12, 12],
                 theta=10000, qkv_bias=True, guidance_embed=True)


def tiny_flux(seed: int = 0, std: float = 0.05, weight_dtype=None, compute_dtype=None, **overrides):
    """A real ComfyUI Flux (same classes as production) small enough for a CPU test: (BaseModel, ModelPatcher).
    weight_dtype=torch.float8_e4m3fn stores the weights in fp8, cast at use to compute_dtype (float32 unless
    given), as ComfyUI holds an fp8 checkpoint; weight_dtype == compute_dtype computes in the stored dtype."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(TINY_FLUX, **overrides)
    mc = comfy.supported_models.Flux(cfg)
    stored, compute = weight_dtype or torch.float32, compute_dtype or torch.float32
    mc.set_inference_dtype(stored, None if stored == compute else compute)
    model = mc.get_model({}, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():  # get_model leaves torch.empty weights
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return model, patcher


def load_builtin_nodes() -> None:
    """Register ComfyUI's built-in extra nodes (comfy_extras: SamplerCustomAdvanced, SaveLoRA, ...) once."""
    if _state.get("builtins"):
        return
    import asyncio
    import logging

    import nodes

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # optional extras (audio, kornia) log their missing packages
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        logging.getLogger().setLevel(level)
    _state["builtins"] = True


def load_pack():
    """Load this project through ComfyUI's own custom-node loader, as an installed pack: the module.

    The project is linked into a temporary custom_nodes folder as `shortcut-flow` (a clone's usual
    name), so the loader sees what a user's install looks like whatever this checkout is called.
    """
    if "pack" in _state:
        return _state["pack"]
    import asyncio
    import tempfile

    import nodes

    custom_nodes = Path(tempfile.mkdtemp(prefix="shortcut-flow-host-")) / "custom_nodes"
    custom_nodes.mkdir()
    link = custom_nodes / "shortcut-flow"
    link.symlink_to(PROJECT_ROOT, target_is_directory=True)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(link)))
    if not ok:
        raise RuntimeError(f"ComfyUI's custom-node loader refused {link}; see the log above")
    module = sys.modules[str(link).replace(".", "_x_")]
    _state["pack"] = module
    _state["pack_nodes"] = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
    return module


def pack_module(name: str):
    """A submodule of the loaded pack, e.g. pack_module('host.training')."""
    import importlib

    pack = load_pack()
    return importlib.import_module(f"{pack.__name__}.{name}")


def _clear_folder_caches(folder_paths) -> None:
    for cache in ("filename_list_cache", "cache_helper"):
        if hasattr(folder_paths, cache):
            getattr(folder_paths, cache).clear()


@contextlib.contextmanager
def host_folders(*, loras: Path | None = None, models: dict[str, Path] | None = None, input_dir: Path | None = None,
                 output_dir: Path | None = None, temp_dir: Path | None = None):
    """Point ComfyUI's folders at test folders (`loras` replaces models/loras, `models` adds folders
    of other kinds); folder_paths is restored afterwards."""
    import folder_paths

    saved = {k: (list(paths), set(exts)) for k, (paths, exts) in folder_paths.folder_names_and_paths.items()}
    dirs = (folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.get_temp_directory())
    try:
        if loras is not None:
            folder_paths.folder_names_and_paths["loras"] = ([str(loras)], saved["loras"][1])
        for kind, path in (models or {}).items():
            folder_paths.add_model_folder_path(kind, str(path))
        if input_dir is not None:
            folder_paths.set_input_directory(str(input_dir))
        if output_dir is not None:
            folder_paths.set_output_directory(str(output_dir))
        if temp_dir is not None:
            folder_paths.set_temp_directory(str(temp_dir))
        _clear_folder_caches(folder_paths)
        yield
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved)
        folder_paths.set_input_directory(dirs[0])
        folder_paths.set_output_directory(dirs[1])
        folder_paths.set_temp_directory(dirs[2])
        _clear_folder_caches(folder_paths)


TINY_SD3 = {"in_channels": 16, "pos_embed_scaling_factor": None, "depth": 2, "patch_size": 2, "adm_in_channels": 32,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 48, "out_features": 128}},
            "pos_embed_max_size": 16, "num_patches": 256, "out_channels": 16, "qk_norm": "rms",
            "x_block_self_attn_layers": []}


def _random_patcher(model, seed: int, std: float):
    """A ModelPatcher over `model` with random weights: parameters and buffers (MMDiT's pos_embed, ...), which
    ComfyUI leaves uninitialised for a checkpoint to fill (garbage there made a velocity test fail now and then,
    once with NaN)."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*model.diffusion_model.parameters(), *model.diffusion_model.buffers()]:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _tiny(supported_model, config: dict, seed: int, std: float):
    """(BaseModel, ModelPatcher) as ComfyUI builds a checkpoint's model (its supported_models class over the
    detected unet config, fp32 on the CPU), with random weights in place of a checkpoint's."""
    import torch

    mc = supported_model(dict(config))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, device="cpu")
    return model, _random_patcher(model, seed, std)


def tiny_sd3(seed: int = 0, std: float = 0.05):
    """A real ComfyUI SD3 (MMDiT, ModelSamplingDiscreteFlow; width 64 * depth = 128): (BaseModel, ModelPatcher).
    Conditioning: [[context[1, L, 48], {"pooled_output": pooled[1, 32]}]]."""
    import comfy.supported_models

    return _tiny(comfy.supported_models.SD3, TINY_SD3, seed, std)


TINY_WAN = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=64,
                ffn_dim=128, freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2, eps=1e-6)


def tiny_wan(seed: int = 0, std: float = 0.05):
    """A real ComfyUI Wan 2.1 text-to-video model (WAN21_T2V, WanModel, shift 8) at width 64: (BaseModel,
    ModelPatcher). Latents [B, 16, T, H, W]; conditioning [[context[1, L, 32], {}]]."""
    import comfy.supported_models

    return _tiny(comfy.supported_models.WAN21_T2V, TINY_WAN, seed, std)


TINY_WAN22 = dict(TINY_WAN, in_dim=48, out_dim=48)


def tiny_wan22(seed: int = 0, std: float = 0.05):
    """A real ComfyUI Wan 2.2 5B (WAN22_T2V, model_base.WAN22 with its image-to-video timesteps, latent format
    Wan22: 48 channels, shift 8) at width 64, 2 blocks (~0.6 MB): (BaseModel, ModelPatcher).
    Latents [B, 48, T, H, W]; conditioning [[context[1, L, 32], {}]]."""
    import comfy.supported_models

    return _tiny(comfy.supported_models.WAN22_T2V, TINY_WAN22, seed, std)


# axes_dim sums to the head width (64 / 2 heads), each axis even, as EmbedND needs; the text refiner has its
# fixed 2 blocks; patch (1, 2, 2) over T, H, W as the released model
TINY_HUNYUAN_VIDEO = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2],
                          vec_in_dim=16, context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1,
                          depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256, qkv_bias=True,
                          guidance_embed=True, byt5=False, meanflow=False)


def tiny_hunyuan_video(seed: int = 0, std: float = 0.05):
    """A real ComfyUI HunyuanVideo (supported_models.HunyuanVideo, Flux-style double + single blocks with a
    guidance input, shift 7) at width 64, 1 + 1 blocks (~1.4 MB): (BaseModel, ModelPatcher).
    Latents [B, 16, T, H, W] (H, W even); conditioning [[context[1, L, 32], {"pooled_output": pooled[1, 16],
    "guidance": 6.0}]]."""
    import comfy.supported_models

    return _tiny(comfy.supported_models.HunyuanVideo, TINY_HUNYUAN_VIDEO, seed, std)


# inner width = heads x head width = 64 (its rope takes inner // 6 frequencies, padding the rest); the T5 of the
# released model is caption_channels wide
TINY_LTXV = dict(image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=32,
                 num_attention_heads=2, caption_channels=32, num_layers=2)


def tiny_ltxv(seed: int = 0, std: float = 0.05):
    """A real ComfyUI LTX-Video (supported_models.LTXV, LTXVModel: patch 1 x 1 x 1 over 128-channel latents,
    shift 2.37) at width 64, 2 blocks (~0.8 MB): (BaseModel, ModelPatcher).
    Latents [B, 128, T, H, W]; conditioning [[context[1, L, 32], {"attention_mask": ones[1, L] (long)}]]
    (its T5 encoder hands the mask on, and the network takes one)."""
    import comfy.supported_models

    return _tiny(comfy.supported_models.LTXV, TINY_LTXV, seed, std)


# head width 32 = sum(axes_dims_rope); in_channels = 16 latent channels x 2 x 2 patch
TINY_QWEN_IMAGE = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                       attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                       axes_dims_rope=(8, 12, 12))


def tiny_qwen_image(seed: int = 0, std: float = 0.05):
    """A real ComfyUI Qwen-Image (supported_models.QwenImage, an image model with latent format Wan21, shift 1.15)
    at width 64, 1 block (~0.7 MB): (BaseModel, ModelPatcher).
    Latents [B, 16, 1, H, W] (a one-frame video latent, as its VAE makes them); conditioning
    [[context[1, L, 32], {}]]."""
    import comfy.supported_models

    return _tiny(comfy.supported_models.QwenImage, TINY_QWEN_IMAGE, seed, std)


# in/out channels are 16 x 2 x 2 (Chroma's img_in takes patches); the approximator's input is 16 timestep + 16
# guidance + 32 modulation-index features = 64, its output the width
TINY_CHROMA = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=64,
                   mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
                   patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=64, n_layers=1)


def tiny_chroma(seed: int = 0, std: float = 0.05):
    """A real ComfyUI Chroma (supported_models.Chroma: Flux blocks modulated by an approximator instead of a
    pooled vector; its model_base feeds guidance 0 unless the conditioning says otherwise) at width 64,
    1 + 1 blocks (~0.7 MB): (BaseModel, ModelPatcher).
    Latents [B, 16, H, W]; conditioning [[context[1, L, 32], {"pooled_output": None}]] (its T5 has no pooled
    vector; the model's conditioning still asks for the key)."""
    import comfy.supported_models

    return _tiny(comfy.supported_models.Chroma, TINY_CHROMA, seed, std)


# head width 32 = sum(axes_dims); 1 key/value head (grouped-query attention, as the released 24 / 8);
# multiple_of 16 keeps the feed-forward width near 4 x 64 x 2 / 3
TINY_LUMINA2 = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=1, n_refiner_layers=1,
                    n_heads=2, n_kv_heads=1, multiple_of=16, qk_norm=True, cap_feat_dim=32, axes_dims=[8, 12, 12],
                    axes_lens=[300, 512, 512])


def tiny_lumina2(seed: int = 0, std: float = 0.05):
    """A real ComfyUI Lumina 2 (supported_models.Lumina2, NextDiT, shift 6) at width 64, 1 block and 1 + 1
    refiner blocks (~1 MB): (BaseModel, ModelPatcher).
    Latents [B, 16, H, W]; conditioning [[context[1, L, 32], {"attention_mask": ones[1, L] (long)}]] (its
    Gemma encoder hands the mask on; the host makes the network's num_tokens of it)."""
    import comfy.supported_models

    return _tiny(comfy.supported_models.Lumina2, TINY_LUMINA2, seed, std)


def _conditioning(width: int, *, pooled: int | None = None, guidance: float | None = None, mask: bool = False):
    """A maker of random CONDITIONING [[context[1, tokens, width], {extras}]] for one family: (tokens, seed) ->.
    pooled=0: "pooled_output": None, as CLIPTextEncode hands on a T5 alone's (Chroma's model needs the key)."""
    def positive(tokens: int = 6, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        options = {}
        context = torch.randn(1, tokens, width, generator=g)
        if pooled is not None:
            options["pooled_output"] = torch.randn(1, pooled, generator=g) if pooled else None
        if guidance is not None:
            options["guidance"] = guidance
        if mask:
            options["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
        return [[context, options]]

    return positive


class Family(NamedTuple):
    """A flow-model family for host tests: its tiny builder ((seed, std) -> (BaseModel, ModelPatcher)), the
    latent shape of one item [C, (T,) H, W], and a maker of a positive CONDITIONING of its widths
    ((tokens, seed) -> [[context, {extras}]])."""
    build: Callable
    latent: tuple[int, ...]
    positive: Callable


FAMILIES: dict[str, Family] = {
    "flux": Family(tiny_flux, (16, 8, 8), _conditioning(32, pooled=16, guidance=3.5)),
    "sd3": Family(tiny_sd3, (16, 8, 8), _conditioning(48, pooled=32)),
    "wan2.1": Family(tiny_wan, (16, 3, 8, 8), _conditioning(32)),
    "wan2.2": Family(tiny_wan22, (48, 3, 8, 8), _conditioning(32)),
    "hunyuan_video": Family(tiny_hunyuan_video, (16, 3, 8, 8), _conditioning(32, pooled=16, guidance=6.0)),
    "ltxv": Family(tiny_ltxv, (128, 3, 4, 4), _conditioning(32, mask=True)),
    "qwen_image": Family(tiny_qwen_image, (16, 1, 8, 8), _conditioning(32)),
    "chroma": Family(tiny_chroma, (16, 8, 8), _conditioning(32, pooled=0)),
    "lumina2": Family(tiny_lumina2, (16, 8, 8), _conditioning(32, mask=True)),
}


def flux_positive(patcher, tokens: int = 16, seed: int = 0, guidance: float | None = 3.5):
    """Random CONDITIONING shaped for a Flux patcher's widths (context and pooled vector), one entry."""
    import torch

    params = patcher.model.diffusion_model.params
    g = torch.Generator().manual_seed(seed)
    options = {"pooled_output": torch.randn(1, params.vec_in_dim, generator=g)}
    if guidance is not None:
        options["guidance"] = guidance
    return [[torch.randn(1, tokens, params.context_in_dim, generator=g), options]]


def gpu_or_smoke(smoke: bool):
    """For the GPU benchmarks: (ComfyUI's path, its device), ComfyUI choosing the device (tests force the CPU)
    unless `smoke` (a CPU check of the script); without a CUDA device and not `smoke`, exit saying so."""
    if not smoke:
        os.environ.setdefault("SHORTCUT_FLOW_DEVICE", "gpu")
    path = pack_or_exit()
    import comfy.model_management
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = comfy.model_management.get_torch_device()
    if device.type != "cuda" and not smoke:
        raise SystemExit("needs a CUDA device (or --smoke for a CPU check of the script)")
    return path, device


def pack_or_exit() -> Path:
    """For benchmarks: ComfyUI started in-process and this pack loaded, else exit saying why."""
    path, why = start_comfyui()
    if path is None:
        raise SystemExit(f"needs ComfyUI: {why}")
    load_pack()
    return path


def widget_defaults(node_class) -> dict:
    """{input: default} for a node class's required inputs that declare one (its widgets)."""
    return {name: options[0]["default"] for name, (kind, *options) in node_class.INPUT_TYPES()["required"].items()
            if options and "default" in options[0]}


TINY_CLIP = {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
             "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
             "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1}


def tiny_clip(seed: int = 0, std: float = 0.05):
    """A real ComfyUI CLIP (comfy.sd.CLIP over an SD1-style text model at width 32 with the host's own CLIP
    tokenizer): context [1, 77 * chunks, 32] (a prompt over 75 tokens takes two chunks, so prompts give
    conditionings of different lengths, as long T5 prompts do) and pooled [1, 32]. Pairs with
    tiny_flux(vec_in_dim=32)."""
    import functools
    import types

    import torch
    import comfy.sd
    import comfy.sd1_clip

    class TinyClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(TINY_CLIP),
                             model_options=model_options, return_projected_pooled=False)

    class TinyClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyClipModel)

    class TinyTokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=32))

    with torch.inference_mode():
        clip = comfy.sd.CLIP(types.SimpleNamespace(params={}, clip=TinyClip, tokenizer=TinyTokenizer),
                             model_options={"dtype": torch.float32})
        g = torch.Generator().manual_seed(seed)
        for p in clip.cond_stage_model.parameters():  # the host leaves torch.empty weights: fill them
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    return clip

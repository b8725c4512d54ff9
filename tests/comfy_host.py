"""Finding and starting a real ComfyUI checkout for host tests, and ComfyUI-built tiny models.

Lookup order: $COMFYUI_PATH, then ../ComfyUI beside the project, then the ComfyUI tree the pack
sits in (<ComfyUI>/custom_nodes/<pack>). ComfyUI runs in-process on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

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
                        f"Install its requirements (see README, 'Host tests').")
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
    """A submodule of the loaded pack, e.g. pack_module('nodes.host')."""
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


def tiny_sd3(seed: int = 0, std: float = 0.05):
    """A real ComfyUI SD3 (MMDiT, ModelSamplingDiscreteFlow; width 64 * depth = 128): (BaseModel, ModelPatcher).
    Conditioning: [[context[1, L, 48], {"pooled_output": pooled[1, 32]}]]."""
    import torch
    import comfy.supported_models

    mc = comfy.supported_models.SD3(dict(TINY_SD3))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, device="cpu")
    return model, _random_patcher(model, seed, std)


TINY_WAN = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=64,
                ffn_dim=128, freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2, eps=1e-6)


def tiny_wan(seed: int = 0, std: float = 0.05):
    """A real ComfyUI Wan 2.1 text-to-video model (WAN21_T2V, WanModel, shift 8) at width 64: (BaseModel,
    ModelPatcher). Latents [B, 16, T, H, W]; conditioning [[context[1, L, 32], {}]]."""
    import torch
    import comfy.supported_models

    mc = comfy.supported_models.WAN21_T2V(dict(TINY_WAN))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, device="cpu")
    return model, _random_patcher(model, seed, std)


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

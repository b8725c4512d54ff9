"""Train Shortcut off the graph: the node's training, settings and files, from a shell or under torchrun.

    python <ComfyUI>/custom_nodes/shortcut-flow/nodes/headless.py \\
        --unet flux1-dev.safetensors --weight_dtype fp8_e4m3fn \\
        --clip clip_l.safetensors --clip t5xxl_fp16.safetensors --vae ae.safetensors \\
        --prompts prompts.txt --per_prompt 4 --width 1024 --height 1024 \\
        --steps 2000 --batch_size 1 --save_name my_shortcut
    torchrun --nproc-per-node 4 <the same script and arguments>     # data parallel, one GPU per process

Models are loaded with ComfyUI's own loaders (Load Diffusion Model, DualCLIPLoader / CLIPLoader, Load VAE)
from ComfyUI's model folders, or from paths. Data: `--images DIR` (every image with a same-named .txt
caption, VAE-encoded; one size) or `--prompts FILE` (the teacher's own samples, as Shortcut Teacher Latents
makes them, cached in ComfyUI's output folder). Every Train Shortcut and Shortcut Training Options setting
is an argument of the same name and default (`--help`). The LoRA, its metadata and the .train_state file are
written to ComfyUI's loras folder exactly as the node writes them, so a LoRA made here loads in Shortcut
LoRA Loader and resumes in Train Shortcut (`resume_lora`), and the other way round (`--resume_lora`).
Ctrl-C or SIGTERM (to any process) stops every process at the end of the current step and writes a
checkpoint to resume from; a second Ctrl-C stops at once.

Under torchrun (WORLD_SIZE > 1) each process trains on its shard of every batch (NCCL on GPUs, gloo on CPUs):
`batch_size` is per process, as in the authors' trainer, so a step sees batch_size x processes x
grad_accum_steps items; see shortcut_core/data_parallel.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: this folder must not shadow ComfyUI's modules (its `nodes` among them).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

ENV_COMFYUI = "COMFYUI_PATH"


class TrainingStopped(Exception):
    """Ctrl-C or SIGTERM reached a process; every process stopped after the same step, with a checkpoint."""


class StopRequest:
    """Signals set a flag that the training loop reads at the end of each step; a second Ctrl-C interrupts."""

    def __init__(self):
        self.requested = False
        self._before = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to stop now)", file=sys.stderr,
              flush=True)


class HeadlessProgress:
    """Train Shortcut's progress hook off the graph (the trainer's own tqdm bar shows the steps): the plan and
    the calibration printed by process 0, and the stop request of any process, seen by all at the same step."""

    def __init__(self, stop: StopRequest, parallel=None, device: torch.device | None = None):
        self.stop, self.parallel, self.device = stop, parallel, device or torch.device("cpu")

    def __call__(self, report) -> None:
        stop = self.stop.requested
        if self.parallel is not None:
            stop = self.parallel.any(stop, self.device)
        if stop:
            raise TrainingStopped(f"stopped after step {report.step}")

    def preview(self, step, picture) -> None:
        pass

    def say(self, text: str) -> None:
        if self.parallel is None or self.parallel.rank == 0:
            print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- arguments
MODEL_INPUTS = {"model", "clip", "latents", "positive", "negative", "options", "prompts"}
TEACHER_PREFIX = "teacher_"  # Shortcut Teacher Latents settings that share a name with a training setting


def _as_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_widgets(group, input_types: dict, taken: set[str], prefix: str = "") -> list[tuple[str, str]]:
    """One argument per widget of a node, with its name, default and tooltip; (argument dest, input name)."""
    added = []
    for name, (kind, *rest) in input_types.get("required", {}).items():
        if name in MODEL_INPUTS:
            continue
        options = rest[0] if rest else {}
        dest = prefix + name if name in taken else name
        if isinstance(kind, list):
            kwargs = dict(type=str, default=options.get("default", kind[0] if kind else None))
        else:
            kwargs = dict(type={"INT": int, "FLOAT": float, "BOOLEAN": _as_bool, "STRING": str}[kind],
                          default=options.get("default"))
        group.add_argument(f"--{dest}", help=f"{options.get('tooltip', '')} (default: %(default)s)", **kwargs)
        taken.add(dest)
        added.append((dest, name))
    return added


def build_parser():
    """The command's arguments; the node-setting groups are read off the nodes' own INPUT_TYPES."""
    from .teacher_latents import ShortcutTeacherLatents
    from .train import ShortcutTrainingOptions, TrainShortcut

    parser = argparse.ArgumentParser(prog="headless.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    models = parser.add_argument_group("models (a name in ComfyUI's model folders, or a path)")
    models.add_argument("--unet", required=True, help="the diffusion model (Load Diffusion Model)")
    models.add_argument("--weight_dtype", default="default",
                        help="Load Diffusion Model's weight_dtype: default, fp8_e4m3fn, fp8_e4m3fn_fast, fp8_e5m2")
    models.add_argument("--clip", action="append", required=True,
                        help="a text encoder; twice for Flux (clip_l and t5xxl, as DualCLIPLoader)")
    models.add_argument("--clip_type", default="flux", help="the CLIP loaders' type (flux, sd3, ...)")
    models.add_argument("--vae", help="the VAE (needed with --images)")
    data = parser.add_argument_group("data").add_mutually_exclusive_group(required=True)
    data.add_argument("--images", type=Path, help="a folder of images, each with a same-named .txt caption")
    data.add_argument("--prompts", type=Path, help="a text file of prompts, one per line: the teacher samples them")
    taken: set[str] = set()
    train = _add_widgets(parser.add_argument_group("Train Shortcut"), TrainShortcut.INPUT_TYPES(), taken)
    options = _add_widgets(parser.add_argument_group("Shortcut Training Options"),
                           ShortcutTrainingOptions.INPUT_TYPES(), taken)
    teacher = _add_widgets(parser.add_argument_group("Shortcut Teacher Latents (--prompts; guidance also for --images)"),
                           ShortcutTeacherLatents.INPUT_TYPES(), taken, TEACHER_PREFIX)
    parser.set_defaults(_groups={"train": train, "options": options, "teacher": teacher})
    return parser


# ---------------------------------------------------------------------------------------------- models and data
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


def load_models(args):
    """(MODEL, CLIP, VAE or None) through ComfyUI's own loader nodes."""
    import nodes
    (model,) = nodes.UNETLoader().load_unet(_model_name("diffusion_models", args.unet, "--unet"), args.weight_dtype)
    names = [_model_name("text_encoders", c, "--clip") for c in args.clip]
    if len(names) == 2:
        (clip,) = nodes.DualCLIPLoader().load_clip(names[0], names[1], args.clip_type)
    elif len(names) == 1:
        (clip,) = nodes.CLIPLoader().load_clip(names[0], args.clip_type)
    else:
        raise SystemExit("--clip: give one text encoder, or two for Flux (clip_l and t5xxl)")
    vae = None
    if args.vae:
        (vae,) = nodes.VAELoader().load_vae(_model_name("vae", args.vae, "--vae"))
    return model, clip, vae


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


def dataset_from_prompts(args, model, clip, parallel):
    """The teacher's samples (Shortcut Teacher Latents): process 0 makes and caches them, the others read them."""
    from . import host_teacher
    from .host_teacher import SHORTCUT_SCHEDULE, SamplingSettings
    teacher = {name: getattr(args, dest) for dest, name in args._groups["teacher"]}
    settings = SamplingSettings(width=teacher["width"], height=teacher["height"], steps=teacher["steps"],
                                guidance=teacher["guidance"], cfg=teacher["cfg"],
                                negative_prompt=teacher["negative_prompt"], seed=teacher["seed"],
                                schedule=teacher["schedule"],
                                shift=teacher["shift"] if teacher["schedule"] == SHORTCUT_SCHEDULE else 0.0,
                                length=teacher["length"])
    if not args.prompts.is_file():
        raise SystemExit(f"--prompts: {args.prompts} is not a file")
    lines = host_teacher.parse_prompts(args.prompts.read_text(encoding="utf-8"))
    host_teacher.check_settings(lines, settings, model.get_model_object("latent_format"))

    def make():
        return host_teacher.PromptLatents(model, clip, settings, teacher["cache"] or parallel is not None).make(
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


# ---------------------------------------------------------------------------------------------- the run
def start_distributed():
    """A DataParallel when started by torchrun with more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    from ..shortcut_core.data_parallel import DataParallel
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DataParallel()


def main(argv: list[str] | None = None, models=None) -> int:
    """Parse, load, train. `models` = (MODEL, CLIP, VAE) skips the loaders (tests build tiny models)."""
    from . import host
    from .train import TrainShortcut
    args = build_parser().parse_args(argv)
    parallel = start_distributed()
    try:
        model, clip, vae = models if models is not None else load_models(args)
        if args.images is not None:
            latents, positive = dataset_from_images(args.images, clip, vae, args.guidance)
            negative = None
        else:
            latents, positive, negative = dataset_from_prompts(args, model, clip, parallel)
        values = {name: getattr(args, dest) for dest, name in args._groups["train"]}
        options = {name: getattr(args, dest) for dest, name in args._groups["options"]}
        if parallel is not None and parallel.rank != 0:
            import comfy.utils
            comfy.utils.PROGRESS_BAR_ENABLED = False  # one bar, process 0's
        # From here a signal asks for a stop at the end of a step (before, Ctrl-C interrupts as usual: the teacher
        # latents made so far stay cached)
        stop = StopRequest()
        try:
            out = TrainShortcut().train(model=model, latents={"samples": latents}, positive=positive, negative=negative,
                                        options=options,
                                        progress=HeadlessProgress(stop, parallel, model.load_device),
                                        parallel=parallel, files=(args.unet,), **values)
        except TrainingStopped as e:
            if parallel is None or parallel.rank == 0:
                folder = os.path.dirname(host.output_paths(values["save_name"])[0])
                print(f"{e}; the LoRA and its .train_state are in {folder}: resume with --resume_lora <the LoRA's "
                      f"file name>", file=sys.stderr)
            return 130
        finally:
            stop.restore()
        result = out["result"] if isinstance(out, dict) else out
        if parallel is None or parallel.rank == 0:
            print(f"trained {result[4]} steps; recommended recipe: {result[6]} steps, shift {result[7]:.3g}")
        return 0
    finally:
        if parallel is not None:
            import torch.distributed as dist
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- as a script
def _comfyui_root() -> Path:
    pack = Path(__file__).resolve().parent.parent
    for candidate in (os.environ.get(ENV_COMFYUI), pack.parent.parent if pack.parent.name == "custom_nodes" else None):
        if candidate and (Path(candidate) / "comfy").is_dir():
            return Path(candidate).resolve()
    raise SystemExit(f"cannot find ComfyUI: put this pack in ComfyUI/custom_nodes, or set {ENV_COMFYUI}")


def _script() -> int:
    """Start ComfyUI as a library (not its server) and run main() inside this pack, imported as a package."""
    import importlib.util
    root = _comfyui_root()
    sys.path.insert(0, str(root))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before ComfyUI picks its device
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = not torch.cuda.is_available() or os.environ.get("SHORTCUT_FLOW_DEVICE") == "cpu"
    import utils.extra_config  # noqa: F401 - before nodes.py (as ComfyUI's main.py)
    import nodes  # noqa: F401
    pack = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("shortcut_flow_headless", pack / "__init__.py",
                                                  submodule_search_locations=[str(pack)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{spec.name}.nodes.headless").main()


if __name__ == "__main__":
    sys.exit(_script())

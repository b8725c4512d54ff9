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
from tqdm.auto import tqdm

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
    """The command's RunReporter (host/run.py) (the trainer's own tqdm bar shows the steps): the plan and
    the calibration printed by process 0, and the stop request of any process, seen by all at the same step."""

    def __init__(self, stop: StopRequest, parallel=None, device: torch.device | None = None):
        self.stop, self.parallel, self.device = stop, parallel, device or torch.device("cpu")
        self.timed = False

    def step(self, report) -> None:
        if not self.timed:
            from ..host.timing import measured_time_text  # imported with the package, under the host
            measured = measured_time_text(report)
            if measured is not None:  # once, as soon as it is measured; the bar shows the ETA from then on
                self.timed = True
                self.say(f"measured: {measured}")
        stop = self.stop.requested
        if self.parallel is not None:
            stop = self.parallel.any(stop, self.device)
        if stop:
            raise TrainingStopped(f"stopped after step {report.step}")

    def preview(self, step, picture) -> None:
        pass

    def say(self, text: str) -> None:
        if self.parallel is None or self.parallel.rank == 0:
            tqdm.write(text, file=sys.stderr)  # above the trainer's bar, not inside its line


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
    from ..host.loaders import dataset_from_images, dataset_from_prompts, load_models
    from ..host.settle import finish_run, settle_run
    from ..host.training import train_in_graph
    args = build_parser().parse_args(argv)
    parallel = start_distributed()
    group = {name: {input_name: getattr(args, dest) for dest, input_name in pairs}
             for name, pairs in args._groups.items()}
    try:
        model, clip, vae = models if models is not None else load_models(args.unet, args.weight_dtype, args.clip,
                                                                           args.clip_type, args.vae)
        if args.images is not None:
            latents, positive = dataset_from_images(args.images, clip, vae, args.guidance)
            negative = None
        else:
            latents, positive, negative = dataset_from_prompts(args.prompts, group["teacher"], model, clip, parallel)
        if parallel is not None and parallel.rank != 0:
            import comfy.utils
            comfy.utils.PROGRESS_BAR_ENABLED = False  # one bar, process 0's
        # From here a signal asks for a stop at the end of a step (before, Ctrl-C interrupts as usual: the teacher
        # latents made so far stay cached)
        stop = StopRequest()
        try:
            settled = settle_run(model, latents, positive, negative, group["train"], group["options"],
                                 files=(args.unet,), reporter=HeadlessProgress(stop, parallel, model.load_device),
                                 parallel=parallel)
            try:
                outcome = train_in_graph(settled.model, settled.latents, settled.positive, settled.negative,
                                         settled.run)
            except TrainingStopped as e:
                if settled.writer:
                    print(f"{e}; the LoRA and its .train_state are in {os.path.dirname(settled.lora_file)}: resume "
                          f"with --resume_lora <the LoRA's file name>", file=sys.stderr)
                return 130
            outputs = finish_run(settled, outcome)
        finally:
            stop.restore()
        if settled.writer:
            print(f"trained {outputs.steps} steps; recommended recipe: {outputs.sample_steps} steps, shift "
                  f"{outputs.sample_shift:.3g}")
        return 0
    finally:
        if parallel is not None:
            from ..shortcut_core.data_parallel import close_process_group
            close_process_group()


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

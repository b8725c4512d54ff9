"""The headless command (nodes/headless.py) on a real ComfyUI: the node's settings and files, data parallel
under torch.distributed (gloo, 2 CPU processes), and a stop request that reaches every process.

The models are a tiny Flux and a tiny CLIP built from ComfyUI's own classes and handed to `main(models=...)`:
ComfyUI's loaders cannot load a Flux of test size from a file (its model detection fixes Flux's widths)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import comfy_host
from hashing import module_hash

PROMPTS = "a red cube\na blue sphere on grass\n"
SETTINGS = ["--unet", "unused", "--clip", "unused", "--per_prompt", "2", "--width", "64", "--height", "64",
            "--teacher_steps", "4", "--rank", "4", "--alpha", "4", "--learning_rate", "0.001", "--preview_every", "0",
            "--calibrate", "false", "--teacher_min_steps", "8", "--teacher_max_steps", "8", "--batch_size", "2"]


def _models(seed: int = 1):
    with torch.inference_mode():
        _, patcher = comfy_host.tiny_flux(seed=seed, vec_in_dim=32)
    return patcher, comfy_host.tiny_clip(seed=2), None


def _argv(tmp, *more):
    return [*SETTINGS, "--prompts", str(tmp / "prompts.txt"), *more]


@pytest.fixture()
def folders(pack, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    with comfy_host.host_folders(output_dir=tmp_path / "output", loras=tmp_path / "loras"):
        (tmp_path / "loras").mkdir(exist_ok=True)
        yield tmp_path


def _lora(path):
    return load_file(str(path))


def test_every_node_setting_is_an_argument_with_the_nodes_name_and_default(pack):
    headless = comfy_host.pack_module("nodes.headless")
    train = comfy_host.pack_module("nodes.train")
    args = headless.build_parser().parse_args(["--unet", "u", "--clip", "c", "--prompts", "p"])
    for cls in (train.TrainShortcut, train.ShortcutTrainingOptions):
        for name, default in comfy_host.widget_defaults(cls).items():
            assert getattr(args, name) == default, name
    assert args.teacher_steps == 28 and args.per_prompt == 1  # Shortcut Teacher Latents' own, renamed on a clash
    with pytest.raises(SystemExit):
        headless.build_parser().parse_args(["--unet", "u", "--clip", "c"])  # no data
    with pytest.raises(SystemExit):
        headless.build_parser().parse_args(["--unet", "u", "--clip", "c", "--prompts", "p", "--calibrate", "maybe"])


def test_a_headless_lora_resumes_in_the_node_and_a_node_lora_resumes_headless(folders, capsys):
    """Both ways give the LoRA of one uninterrupted 4-step run, bit for bit: same files, same state."""
    headless = comfy_host.pack_module("nodes.headless")
    from test_host_nodes import node, train_node
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    straight = headless.main(_argv(folders, "--steps", "4", "--save_name", "straight"), models=_models())
    assert straight == 0
    # the plan's time, then (once, after two warm-up steps) the measured one
    printed = capsys.readouterr().err
    assert "time: measured from the first steps (cpu)" in printed
    assert len(re.findall(r"(?:^|\r)measured: about [0-9.]+ s/step, .* for 4 steps; ETA \S+ s\n", printed, re.M)) == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # Ctrl-C is the user's again
    expected = _lora(folders / "loras" / "straight.safetensors")

    # headless 2 steps, then Train Shortcut resumes it to 4
    patcher, clip, _ = models = _models()
    before = module_hash(patcher.model.diffusion_model)
    assert headless.main(_argv(folders, "--steps", "2", "--save_name", "half"), models=models) == 0
    assert module_hash(patcher.model.diffusion_model) == before
    (latents, positive, _) = node("ShortcutTeacherLatents").make(patcher, clip, PROMPTS, 2, 64, 64, 4, 3.5, 1.0, "",
                                                                 0, 4, True, "teacher: euler, simple", 3.25)
    out = node("ShortcutLoRALoader").load(patcher, "half.safetensors", 1.0)  # the loader takes it
    assert "half.safetensors" in str(out)
    train_node(patcher, positive, latents, steps=4, resume_lora="half.safetensors", save_name="half", alpha=4.0,
               teacher_min_steps=8, teacher_max_steps=8)
    assert all(torch.equal(v, expected[k]) for k, v in _lora(folders / "loras" / "half.safetensors").items())

    # Train Shortcut 2 steps, then the command resumes it to 4
    train_node(patcher, positive, latents, steps=2, save_name="node_half", alpha=4.0, teacher_min_steps=8,
               teacher_max_steps=8)
    assert headless.main(_argv(folders, "--steps", "4", "--save_name", "node_half", "--resume_lora",
                               "node_half.safetensors"), models=models) == 0
    assert all(torch.equal(v, expected[k]) for k, v in _lora(folders / "loras" / "node_half.safetensors").items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str, argv: list[str]) -> None:
    """One torchrun-like process: its environment, ComfyUI in-process, the command's main()."""
    from pathlib import Path
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    comfy_host.start_comfyui()
    headless = comfy_host.pack_module("nodes.headless")
    tmp = Path(tmp)
    (tmp / f"pid{rank}").write_text(str(os.getpid()))
    with comfy_host.host_folders(output_dir=tmp / "output", loras=tmp / "loras"):
        code = headless.main(argv, models=_models())
    (tmp / f"exit{rank}").write_text(str(code))


def _spawn(tmp, world: int, argv: list[str], during=None):
    context = mp.start_processes(_worker, args=(world, _free_port(), str(tmp), argv), nprocs=world, join=False,
                                 start_method="spawn")
    if during is not None:
        during(context)
    while not context.join():
        pass


def test_two_processes_train_as_one_with_twice_the_batch(folders):
    """Per-process batch 2 on 2 gloo processes against batch 4 on one: the same draws, so the same losses to
    float32 rounding; the LoRA differs only by summation order (two forwards of 2 and an all-reduce against one
    forward of 4), which AdamW amplifies where a gradient is near zero: 1e-3 of what training moved is allowed
    (a missing all-reduce or a wrong shard moves it by order 1)."""
    headless = comfy_host.pack_module("nodes.headless")
    steps = ["--steps", "3", "--checkpoint_every", "0"]
    assert headless.main(_argv(folders, *steps, "--batch_size", "4", "--save_name", "one"), models=_models()) == 0
    _spawn(folders, 2, _argv(folders, *steps, "--batch_size", "2", "--save_name", "two"))
    assert [(folders / f"exit{r}").read_text() for r in range(2)] == ["0", "0"]
    one, two = _lora(folders / "loras" / "one.safetensors"), _lora(folders / "loras" / "two.safetensors")
    assert one.keys() == two.keys() and not (folders / "loras" / "two_2.safetensors").exists()  # one writer
    ups = [k for k in one if k.endswith("lora_up.weight")]  # zero at the start: what training moved
    a, b = (torch.cat([lora[k].flatten() for k in ups]).double() for lora in (one, two))
    moved = float((a - b).norm() / a.norm())
    losses = [load_file(str(folders / "loras" / f"{n}.train_state"))["losses"] for n in ("one", "two")]
    print(f"\n2 processes x batch 2 vs 1 x batch 4: LoRA (up) {moved:.2e} of what training moved; losses "
          f"{losses[0].tolist()} vs {losses[1].tolist()}")
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)  # the same items, the same targets
    assert moved < 1e-3


def test_sigterm_to_one_process_stops_both_with_a_checkpoint_that_resumes_on_one(folders):
    from safetensors import safe_open
    import json
    headless = comfy_host.pack_module("nodes.headless")
    argv = _argv(folders, "--steps", "400", "--checkpoint_every", "0", "--batch_size", "1", "--save_name", "stopped")

    def stop_rank_1(context):
        state = folders / "output"  # the teacher cache appears once both processes are past the data
        deadline = time.monotonic() + 120
        while not (folders / "pid1").exists() or not state.exists():
            assert time.monotonic() < deadline, "the processes did not start"
            time.sleep(0.2)
        time.sleep(3)  # some steps
        os.kill(int((folders / "pid1").read_text()), signal.SIGTERM)

    _spawn(folders, 2, argv, during=stop_rank_1)
    assert [(folders / f"exit{r}").read_text() for r in range(2)] == ["130", "130"]
    with safe_open(str(folders / "loras" / "stopped.train_state"), framework="pt") as f:
        step = json.loads(f.metadata()["shortcut_flow.checkpoint"])["step"]
    assert 0 < step < 400
    # resumed on one process (it says the items per step change), to one step more
    with pytest.warns(UserWarning, match="trained on 2"):
        code = headless.main([*argv[:-6], "--steps", str(step + 1), "--checkpoint_every", "0", "--batch_size", "1",
                              "--save_name", "stopped", "--resume_lora", "stopped.safetensors"], models=_models())
    assert code == 0


def test_the_script_starts_comfyui_and_names_a_model_it_cannot_find(pack, tmp_path):
    """As a user runs it: the file itself, ComfyUI found through COMFYUI_PATH, its loaders' folders searched."""
    import subprocess
    import sys
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    script = comfy_host.PROJECT_ROOT / "nodes" / "headless.py"
    env = dict(os.environ, COMFYUI_PATH=str(comfy_host.find_comfyui()[0]), SHORTCUT_FLOW_DEVICE="cpu")
    shown = subprocess.run([sys.executable, str(script), "--help"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0 and "--offload_optimizer" in shown.stdout and "--teacher_steps" in shown.stdout
    missing = subprocess.run([sys.executable, str(script), "--unet", "no_such_flux.safetensors", "--clip", "x",
                              "--prompts", str(tmp_path / "prompts.txt")], env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0
    assert "--unet: 'no_such_flux.safetensors' is neither a file nor in ComfyUI's diffusion_models folders" in \
        missing.stderr


def _tiny_flux_vae():
    """A real ComfyUI VAE (comfy.sd.VAE, Flux's 16 latent channels) from randomly initialised encoder and decoder."""
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    config = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                  num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    parts = {"encoder": Encoder(**config), "decoder": Decoder(**config)}
    with torch.no_grad():  # ComfyUI's ops leave weights uninitialised (a checkpoint fills them): small random ones
        for part in parts.values():
            for name, p in part.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
                else:  # norm scales 1, every bias 0
                    p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return comfy.sd.VAE(sd={f"{name}.{k}": v for name, part in parts.items() for k, v in part.state_dict().items()})


def test_images_with_captions_are_encoded_and_trained_on(folders):
    import numpy as np
    from PIL import Image
    headless = comfy_host.pack_module("nodes.headless")
    images = folders / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, caption in (("a", "a red cube"), ("b", "a blue sphere on grass")):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(caption)
    patcher, clip, _ = _models()
    argv = [*SETTINGS, "--images", str(images), "--steps", "2", "--save_name", "from_images"]
    assert headless.main(argv, models=(patcher, clip, _tiny_flux_vae())) == 0
    lora = _lora(folders / "loras" / "from_images.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))
    # what a user gets wrong, said plainly
    with pytest.raises(SystemExit, match="needs --vae"):
        headless.main(argv, models=(patcher, clip, None))
    Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(images / "c.png")
    with pytest.raises(SystemExit, match=r"1 image\(s\) have no caption file, e.g. c.png needs c.txt"):
        headless.main(argv, models=(patcher, clip, None))
    (images / "c.txt").write_text("a small image")
    with pytest.raises(SystemExit, match="the images have 2 sizes"):
        headless.main(argv, models=(patcher, clip, _tiny_flux_vae()))

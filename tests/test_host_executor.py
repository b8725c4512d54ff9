"""A whole prompt, our nodes wired to built-in ones, validated and run by ComfyUI's own executor.

The only node that is not ComfyUI's or ours hands out the tiny Flux (a real Flux from ComfyUI's
classes; no loader can make one that small) and its conditioning, as a checkpoint loader and a
text encoder would.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import comfy_host
from hashing import module_hash


class TinyFluxForTests:
    """MODEL + CONDITIONING of a tiny Flux built under inference_mode, as loaders build models."""
    made: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CONDITIONING")
    FUNCTION = "load"
    CATEGORY = "tests"

    def load(self):
        _, patcher = comfy_host.tiny_flux(seed=3)
        g = torch.Generator().manual_seed(1)
        TinyFluxForTests.made.append((patcher, module_hash(patcher.model.diffusion_model)))
        return (patcher, [[torch.randn(1, 6, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g)}]])


class RecordingServer:
    """The websocket side of the executor: what a client would be sent."""

    def __init__(self):
        self.client_id, self.last_node_id, self.messages = None, None, []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def _prompt() -> dict:
    def n(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}
    return {
        "1": n("TinyFluxForTests"),
        "2": n("FluxGuidance", conditioning=["1", 1], guidance=3.5),
        "3": n("EmptySD3LatentImage", width=64, height=64, batch_size=4),
        "4": n("KSampler", model=["1", 0], seed=1, steps=8, cfg=1.0, sampler_name="euler", scheduler="simple",
               positive=["2", 0], negative=["2", 0], latent_image=["3", 0], denoise=1.0),
        "5": n("TrainShortcut", model=["1", 0], latents=["4", 0], positive=["2", 0], steps=3, batch_size=2,
               learning_rate=1e-3, rank=4, seed=0, save_name="executor_test", checkpoint_every=2,
               resume_lora="(none)", cfg=1.0, preview_every=1, calibrate=False, options=["18", 0]),
        "18": n("ShortcutTrainingOptions", alpha=4.0, guidance_min=0.0, guidance_max=7.5, gradient_checkpointing=True,
                sample_steps=3, sample_shift=3.25, sample_strength=1.0, t_skip=2, teacher_ratio=0.4,
                teacher_min_steps=8, teacher_max_steps=8, non_shortcut_ratio=0.0, shift_min=2.5, shift_max=4.5,
                resolution_shift_prob=0.1, ema_slow_decay=0.999, ema_fast_decay=0.99, ema_restart_every=0,
                weight_decay=1e-4, max_grad_norm=10.0, grad_accum_steps=1, export_diffusers=True,
                target_modules="", adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, t_max=1.0 - 1e-5,
                lora_layers="all", offload_optimizer=False, stream_weights=False, recipe="paper",
                compile_blocks=False, fp8_targets=False, centre_shifts=False),
        "6": n("EmptySD3LatentImage", width=64, height=64, batch_size=1),
        "7": n("ShortcutSampler", model=["5", 0], positive=["2", 0], latent_image=["6", 0], seed=5, steps=3,
               shift=3.25, resolution_shift=False, cfg=1.0, denoise=1.0),
        "8": n("SaveLatent", samples=["7", 0], filename_prefix="shortcut"),
        "9": n("SaveLoRANode", lora=["5", 1], prefix="loras/executor_lora", steps=["5", 4]),
        "10": n("LoraModelLoader", model=["1", 0], lora=["5", 1], strength_model=1.0),
        "11": n("ShortcutScheduler", steps=3, shift=3.25, denoise=1.0, resolution_shift=False, width=64, height=64),
        "12": n("SamplerCustomAdvanced", noise=["13", 0], guider=["14", 0], sampler=["15", 0], sigmas=["11", 0],
                latent_image=["6", 0]),
        "13": n("RandomNoise", noise_seed=5),
        "14": n("BasicGuider", model=["10", 0], conditioning=["2", 0]),
        "15": n("KSamplerSelect", sampler_name="euler"),
        "16": n("SaveLatent", samples=["12", 0], filename_prefix="stock"),
        "17": n("PreviewImage", images=["5", 3]),   # teacher | student | teacher comparison
        "19": n("PreviewImage", images=["5", 5]),   # loss curve
    }


@pytest.fixture()
def host_dirs(comfyui, tmp_path):
    import nodes
    comfy_host.load_builtin_nodes()
    comfy_host.load_pack()
    (tmp_path / "loras").mkdir()
    nodes.NODE_CLASS_MAPPINGS["TinyFluxForTests"] = TinyFluxForTests
    try:
        with comfy_host.host_folders(loras=tmp_path / "loras", output_dir=tmp_path / "output",
                                     temp_dir=tmp_path / "temp"):
            yield tmp_path
    finally:
        del nodes.NODE_CLASS_MAPPINGS["TinyFluxForTests"]


def test_a_prompt_with_our_nodes_and_built_ins_runs_through_the_host_executor(host_dirs):
    import comfy.model_management
    import execution
    from safetensors.torch import load_file

    prompt = _prompt()
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("shortcut-test", prompt, None))
    assert valid and not node_errors, (error, node_errors)
    server = RecordingServer()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
    executor.execute(prompt, "shortcut-test", {}, outputs)
    events = [event for event, _ in executor.status_messages]
    assert executor.success, executor.status_messages
    assert "execution_success" in events

    out = host_dirs / "output"
    ours = load_file(next(out.glob("shortcut*.latent")))["latent_tensor"]
    stock = load_file(next(out.glob("stock*.latent")))["latent_tensor"]
    assert ours.shape == (1, 16, 8, 8) and torch.isfinite(ours).all()
    # ShortcutSampler on TrainShortcut's model == stock euler with our schedule on the stock-loaded LoRA
    assert torch.allclose(ours, stock, atol=1e-5)
    assert any(out.glob("loras/executor_lora*.safetensors"))            # stock SaveLoRA took our LORA_MODEL
    assert (host_dirs / "loras" / "executor_test.safetensors").is_file()  # our LoRA, with metadata
    assert (host_dirs / "loras" / "executor_test_diffusers.safetensors").is_file()
    # the shared teacher network is back as it was once the host unloads the LoRA model
    comfy.model_management.unload_all_models()
    patcher, digest = TinyFluxForTests.made[-1]
    assert module_hash(patcher.model.diffusion_model) == digest

"""Bad inputs get errors that name the input and say what to do; failures lose nothing.

Each case runs the pack's nodes on a real ComfyUI with a tiny Flux built under inference_mode
(as ComfyUI builds models). README's "What can go wrong" table lists the same cases.
"""

from __future__ import annotations

import errno

import pytest
import torch

import comfy_host
from hashing import module_hash
from test_host_nodes import cancel_after_step, node, train_node


def latents(count=4, size=8):
    return {"samples": torch.randn(count, 16, size, size, generator=torch.Generator().manual_seed(3))}


def _random_lora(network, rank=2):
    from shortcut_core import LoraWeights
    from shortcut_core.adapters import linear_module_names
    g = torch.Generator().manual_seed(0)
    return {n: LoraWeights(torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g),
                           float(rank)) for n in linear_module_names(network) for m in [network.get_submodule(n)]}


# ------------------------------------------------------------------------------------------ models and data
def test_a_non_flow_model_is_refused_by_the_loader_too(flux, lora_dir):
    import nodes
    patcher, _ = flux
    comfy_host.pack_module("host.lora").save_host_lora(lora_dir / "x.safetensors",
                                                             _random_lora(patcher.model.diffusion_model))
    (eps,) = nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(patcher, "v_prediction", False)
    with pytest.raises(ValueError, match="model: .*predicts V_PREDICTION, not a flow velocity.*Flux, SD3"):
        node("ShortcutLoRALoader").load(eps, "x.safetensors", 1.0)


def test_latent_and_conditioning_counts_that_do_not_match(flux, lora_dir):
    patcher, positive = flux
    with pytest.raises(ValueError, match="positive: has 2 conditionings for 3 latents; give one per latent"):
        train_node(patcher, positive * 2, latents(3), steps=1)


def test_an_empty_dataset(flux, lora_dir):
    patcher, positive = flux
    for empty in (torch.zeros(0, 16, 8, 8), []):
        with pytest.raises(ValueError, match="latents: the dataset is empty; connect at least one latent"):
            train_node(patcher, positive, {"samples": empty}, steps=1)


def test_latents_of_mixed_sizes(flux, lora_dir):
    patcher, positive = flux
    mixed = {"samples": [torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 12)]}
    with pytest.raises(ValueError, match="latents: the latents have 2 sizes .*resize the images to one size"):
        train_node(patcher, positive, mixed, steps=1)


# ------------------------------------------------------------------------------------------ files
def test_a_lora_for_another_architecture_is_refused_and_partial_matches_are_listed(flux, lora_dir):
    from safetensors.torch import load_file, save_file
    patcher, _ = flux
    host_lora = comfy_host.pack_module("host.lora")
    _, sd3 = comfy_host.tiny_sd3()
    host_lora.save_host_lora(lora_dir / "sd3.safetensors", _random_lora(sd3.model.diffusion_model))
    with pytest.raises(ValueError, match="matched nothing in this model"):
        node("ShortcutLoRALoader").load(patcher, "sd3.safetensors", 1.0)
    host_lora.save_host_lora(lora_dir / "flux.safetensors", _random_lora(patcher.model.diffusion_model))
    mixed = dict(load_file(lora_dir / "flux.safetensors"), **load_file(lora_dir / "sd3.safetensors"))
    save_file(mixed, lora_dir / "mixed.safetensors")
    text = node("ShortcutLoRALoader").load(patcher, "mixed.safetensors", 1.0)["ui"]["text"][0]
    assert "keys matched nothing" in text and "joint_blocks" in text


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle"])
def test_damaged_or_foreign_files_are_refused_with_the_file_named(flux, lora_dir, damage, tmp_path):
    patcher, positive = flux
    path = lora_dir / f"{damage}.safetensors"
    if damage == "pickle":
        marker = tmp_path / "unpickled"

        class Trap:
            def __reduce__(self):
                return (open, (str(marker), "w"))
        torch.save({"weights": Trap()}, path)
        expected = "is a pickle/zip checkpoint .*not loaded because unpickling can run code"
    else:
        comfy_host.pack_module("host.lora").save_host_lora(path, _random_lora(patcher.model.diffusion_model))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13" * 64)
        expected = "is not a readable safetensors file .*truncated or corrupt"
    with pytest.raises(ValueError, match=f"{damage}.safetensors.*{expected}"):
        node("ShortcutLoRALoader").load(patcher, f"{damage}.safetensors", 1.0)
    with pytest.raises(ValueError, match=expected):
        train_node(patcher, positive, latents(), steps=1, resume_lora=f"{damage}.safetensors")
    if damage == "pickle":
        assert not marker.exists()


def test_save_names_cannot_leave_models_loras(flux, lora_dir):
    patcher, positive = flux
    for name in ("../escape", "sub/dir", "sub\\dir", "/abs/path", ".hidden", ""):
        with pytest.raises(ValueError, match="save_name: .*plain file name.*models/loras"):
            train_node(patcher, positive, latents(), steps=1, save_name=name)
    assert not list(lora_dir.parent.glob("escape*"))


# ------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps: 0 is out of range; use a value from 1 to 1000"),
    (dict(shift=-1.0), "shift: -1.0 is out of range"),
    (dict(denoise=1.5), "denoise: 1.5 is out of range; use a value from 0.0 to 1.0"),
    (dict(cfg=float("nan")), "cfg: expected a finite number"),
    (dict(steps=2.5), "steps: expected a whole number"),
])
def test_sampler_numbers_out_of_range(flux, change, message):
    patcher, positive = flux
    args = dict(model=patcher, positive=positive, latent_image={"samples": torch.zeros(1, 16, 8, 8)}, seed=0, steps=3,
                shift=3.25, resolution_shift=False, cfg=1.0, denoise=1.0)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        node("ShortcutSampler").sample(**args)


def test_loader_and_trainer_numbers_out_of_range(flux, lora_dir):
    patcher, positive = flux
    comfy_host.pack_module("host.lora").save_host_lora(lora_dir / "x.safetensors",
                                                             _random_lora(patcher.model.diffusion_model))
    with pytest.raises(ValueError, match="strength: 9.0 is out of range; use a value from 0.0 to 4.0"):
        node("ShortcutLoRALoader").load(patcher, "x.safetensors", 9.0)
    with pytest.raises(ValueError, match="learning_rate: 0.0 is out of range"):
        train_node(patcher, positive, latents(), learning_rate=0.0)
    with pytest.raises(ValueError, match="teacher_ratio: 1.5 is out of range"):
        train_node(patcher, positive, latents(), teacher_ratio=1.5)
    with pytest.raises(ValueError, match="shift_max: must be >= shift_min"):  # a rule across inputs: the config's
        train_node(patcher, positive, latents(), shift_min=4.0, shift_max=3.0)


# ------------------------------------------------------------------------------------------ failures mid-run
def _other_models(patcher, lora_dir):
    """Two other MODEL outputs sharing the network: a plain clone and one with a LoRA, and what they sample."""
    comfy_host.pack_module("host.lora").save_host_lora(lora_dir / "other.safetensors",
                                                             _random_lora(patcher.model.diffusion_model))
    with_lora = node("ShortcutLoRALoader").load(patcher, "other.safetensors", 0.5)["result"][0]
    return [patcher.clone(), with_lora]


def _samples(models, positive):
    return [node("ShortcutSampler").sample(m, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 4, 3, 3.25, False, 1.0,
                                           1.0)[0]["samples"] for m in models]


def test_a_nan_loss_stops_training_names_the_step_and_keeps_the_last_checkpoint(flux, lora_dir):
    import comfy.model_management
    from shortcut_core import load_lora
    patcher, positive = flux
    others = _other_models(patcher, lora_dir)
    before_samples = _samples(others, positive)
    net = patcher.model.diffusion_model
    comfy.model_management.unload_all_models()  # sampling the LoRA model left its patches in the shared weights
    before = module_hash(net)
    poisoned = patcher.clone()
    student_passes = []

    def nan_on_the_third_student_pass(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        if torch.is_grad_enabled():
            student_passes.append(1)
            if len(student_passes) == 3:
                return out * float("nan")
        return out

    poisoned.set_model_unet_function_wrapper(nan_on_the_third_student_pass)
    with pytest.raises(FloatingPointError, match="loss became nan at step 3; training stopped"):
        train_node(poisoned, positive, latents(), steps=6, checkpoint_every=2, save_name="nan")
    kept = load_lora(lora_dir / "nan.safetensors")
    assert kept.metadata.config["trained_steps"] == 2 and (lora_dir / "nan.train_state").is_file()
    comfy.model_management.unload_all_models()
    assert module_hash(net) == before
    assert not any(hasattr(m, "lora_A") or m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    assert all(torch.equal(a, b) for a, b in zip(_samples(others, positive), before_samples))


@pytest.mark.parametrize("failure", ["disk full", "unwritable"])
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(flux, lora_dir, monkeypatch, failure):
    import tempfile

    import safetensors.torch
    patcher, positive = flux
    net = patcher.model.diffusion_model
    before = module_hash(net)
    writes = []
    real_save, real_mkstemp = safetensors.torch.save_file, tempfile.mkstemp

    def save_file(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) > 2 and failure == "disk full":  # the third write: the state of step 2
            with open(filename, "wb") as f:
                f.write(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    def mkstemp(*args, **kwargs):
        if len(writes) >= 2 and failure == "unwritable":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(ValueError, match="training stopped after step 2: could not write .*cancelled.train_state.*"
                                         "previous file, if any, is unchanged"):
        train_node(patcher, positive, latents(), steps=4, checkpoint_every=1, save_name="cancelled")
    monkeypatch.undo()
    from shortcut_core import load_lora
    assert load_lora(lora_dir / "cancelled.safetensors").metadata.config["trained_steps"] == 1  # step 1, intact
    assert not [p for p in lora_dir.iterdir() if p.name.startswith(".tmp-")]
    assert module_hash(net) == before
    # and the kept step-1 state resumes
    _, _, _, _, steps, _, _, _ = train_node(patcher, positive, latents(), steps=2, save_name="cancelled",
                                   resume_lora="cancelled.safetensors")
    assert steps == 2


def test_resuming_with_another_rank_names_the_settings(flux, lora_dir):
    patcher, positive = flux
    train_node(patcher, positive, latents(), steps=1, save_name="r4")
    with pytest.raises(ValueError, match=r"made with rank 4 \(this run: 8\), alpha 4.0 \(this run: 8.0\)"):
        train_node(patcher, positive, latents(), steps=2, save_name="r4", resume_lora="r4.safetensors", rank=8, alpha=8.0)


def test_cancel_leaves_other_models_of_the_same_network_unaffected(flux, lora_dir, monkeypatch):
    import comfy.model_management
    patcher, positive = flux
    others = _other_models(patcher, lora_dir)
    before_samples = _samples(others, positive)
    try:
        with monkeypatch.context() as patch, pytest.raises(comfy.model_management.InterruptProcessingException):
            cancel_after_step(patch, 1)
            train_node(patcher, positive, latents(), steps=5, save_name="c")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert all(torch.equal(a, b) for a, b in zip(_samples(others, positive), before_samples))


def test_a_missing_loras_folder_is_made_before_training(flux, tmp_path):
    """A fresh --base-directory has no models/loras: the run must not lose its work at the first write."""
    patcher, positive = flux
    folder = tmp_path / "fresh" / "models" / "loras"
    with comfy_host.host_folders(loras=folder):
        train_node(patcher, positive, latents(), steps=1, save_name="fresh")
    assert (folder / "fresh.safetensors").is_file() and (folder / "fresh.train_state").is_file()


def test_a_loras_folder_that_cannot_be_made_is_refused_before_training(flux, tmp_path):
    patcher, positive = flux
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with comfy_host.host_folders(loras=blocker / "loras"):
        with pytest.raises(ValueError, match="save_name: cannot create the LoRA folder .*a_file/loras"):
            train_node(patcher, positive, latents(), steps=1, save_name="x")

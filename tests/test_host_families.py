"""The pack over ComfyUI's flow-model families beyond Flux (issue #16): tiny instances built from the host's own
classes (comfy_host.FAMILIES: Flux, SD3, Wan 2.1 and 2.2, HunyuanVideo, LTX-Video, Qwen-Image, Chroma, Lumina 2).

Each family trains once (TrainShortcut, 2 steps, a preview every step; a module-scoped fixture) and the tests
check what came of it: finite losses and the shared network untouched, the preview a picture, ShortcutSampler's
latent, and the saved LoRA through our loader and ComfyUI's stock one giving the trained MODEL's output. Beside
them: each network's token count (the resolution shift's), and the guidance draw only into distilled guidance.
Gradients for every family: test_host_gradients.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import comfy_host
from hashing import module_hash
from test_host_nodes import node, train_node

FAMILIES = list(comfy_host.FAMILIES)

# Image (and time) tokens each network makes of its family's latent (comfy_host.FAMILIES[name].latent), by its own
# patchify: 2 x 2 over H, W (Flux, SD3, Qwen-Image (T = 1), Chroma, Lumina 2), 1 x 2 x 2 over T, H, W (Wan,
# HunyuanVideo), 1 x 1 x 1 (LTX-Video's SymmetricPatchifier(1) over 3 x 4 x 4).
TOKENS = {"flux": 16, "sd3": 16, "wan2.1": 48, "wan2.2": 48, "hunyuan_video": 48, "ltxv": 48, "qwen_image": 16,
          "chroma": 16, "lumina2": 16}


def model_inputs(patcher, positive, x: torch.Tensor) -> dict:
    """The network's inputs for a conditioning as the host makes them (the model's extra_conds: c_crossattn, y,
    guidance, attention_mask, num_tokens, frame_rate, ...), for BaseModel.apply_model."""
    context, options = positive[0]
    conds = patcher.model.extra_conds(noise=x, device=x.device, cross_attn=context, **options)
    return {k: c.process_cond(batch_size=x.shape[0], device=x.device).cond for k, c in conds.items()}


def output(patcher, positive, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's denoised output with the patcher's weight patches applied by ComfyUI, then removed again."""
    inputs = model_inputs(patcher, positive, x)
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, t, **inputs)
    finally:
        patcher.unpatch_model()


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, pack, tmp_path_factory):
    """One family trained by TrainShortcut (2 steps, previews on) into its own models/loras."""
    name = request.param
    family = comfy_host.FAMILIES[name]
    with torch.inference_mode():  # as ComfyUI's executor builds every model
        _, patcher = family.build(seed=1)
    positive = family.positive(tokens=6, seed=2)
    net = patcher.model.diffusion_model
    before = module_hash(net)
    loras = tmp_path_factory.mktemp(f"loras_{name}")
    latents = {"samples": torch.randn(2, *family.latent, generator=torch.Generator().manual_seed(3))}
    with comfy_host.host_folders(loras=loras):
        run = SimpleNamespace(name=name, family=family, patcher=patcher, positive=positive, net=net, before=before,
                              loras=loras, error=None)
        try:
            run.model, run.lora, run.loss, run.preview, run.steps, *_ = train_node(
                patcher, positive, latents, steps=2, preview_every=1, save_name=f"{name}_shortcut")
        except Exception as e:  # each test raises it, under its own name
            run.error = e
        yield run


def _ok(run):
    if run.error is not None:
        raise run.error
    return run


def test_train_shortcut_trains_with_finite_losses_and_leaves_the_shared_network_as_it_was(trained):
    run = _ok(trained)
    assert run.steps == 2 and len(run.loss["loss"]) == 2 and torch.isfinite(torch.tensor(run.loss["loss"])).all()
    assert module_hash(run.net) == run.before
    assert not run.patcher.patches and run.model.patches
    assert (run.loras / f"{run.name}_shortcut.safetensors").is_file()


def test_the_preview_is_a_picture(trained):
    """[1, height, width, 3] in [0, 1]: three panels side by side (a video's first frame)."""
    preview = _ok(trained).preview
    assert preview.dim() == 4 and preview.shape[0] == 1 and preview.shape[-1] == 3 and preview.shape[1] > 0
    assert preview.dtype == torch.float32 and 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0
    assert float(preview.std()) > 0  # decoded latents, not a blank canvas


def test_shortcut_sampler_samples_a_latent_of_the_family(trained):
    import comfy.model_management
    run = _ok(trained)
    shape = (1, *run.family.latent)
    (out,) = node("ShortcutSampler").sample(run.model, run.positive, {"samples": torch.zeros(shape)}, 0, 3, 3.25, True,
                                            1.0, 1.0)
    assert out["samples"].shape == shape and torch.isfinite(out["samples"]).all()
    comfy.model_management.unload_all_models()  # sampling the LoRA MODEL left its patches in the loaded weights
    assert module_hash(run.net) == run.before


def test_the_saved_lora_loads_through_our_and_the_stock_loader_alike(trained):
    import comfy.sd
    import comfy.utils
    run = _ok(trained)
    file = f"{run.name}_shortcut.safetensors"
    ours = node("ShortcutLoRALoader").load(run.patcher, file, 1.0)["result"][0]  # the fixture's models/loras
    stock, _ = comfy.sd.load_lora_for_models(run.patcher, None,
                                             comfy.utils.load_torch_file(str(run.loras / file), safe_load=True), 1.0, 0)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(1, *run.family.latent, generator=g), torch.tensor([0.7])
    want = output(run.model, run.positive, x, t)
    assert torch.isfinite(want).all()
    assert not torch.allclose(want, output(run.patcher, run.positive, x, t))  # the LoRA does something
    for other in (ours, stock):
        torch.testing.assert_close(output(other, run.positive, x, t), want, rtol=1e-5, atol=1e-6)
    assert module_hash(run.net) == run.before  # the base, bit for bit, after training, sampling and patching


@pytest.mark.parametrize("name", FAMILIES)
def test_the_token_count_follows_each_networks_own_patch(name, pack):
    """The tokens the resolution shift is taken of (ShortcutSampler, the trainer, the memory plan)."""
    families = comfy_host.pack_module("host.families")
    family = comfy_host.FAMILIES[name]
    with torch.inference_mode():
        _, patcher = family.build(seed=1)
    assert families.token_count(patcher, family.latent) == TOKENS[name]


@pytest.mark.parametrize("name", ["flux", "hunyuan_video", "chroma"])
def test_the_trainer_draws_guidance_only_into_a_distilled_guidance_input(name, pack, lora_dir):
    """Networks that take a guidance argument: Flux dev and HunyuanVideo embed it (guidance_in, distilled guidance:
    the trainer draws it per item); Chroma's model feeds its approximator guidance 0 and has no guidance_in."""
    family = comfy_host.FAMILIES[name]
    with torch.inference_mode():
        _, patcher = family.build(seed=1)
    net = patcher.model.diffusion_model
    seen: set[float] = set()

    def record(module, args, kwargs):
        if kwargs.get("guidance") is not None:
            seen.update(kwargs["guidance"].flatten().tolist())

    handle = net.register_forward_pre_hook(record, with_kwargs=True)
    try:
        train_node(patcher, family.positive(), {"samples": torch.randn(2, *family.latent)}, steps=1,
                   save_name="guidance")
    finally:
        handle.remove()
    guidance_in = getattr(net, "guidance_in", None)
    distilled = guidance_in is not None and not isinstance(guidance_in, torch.nn.Identity)
    assert seen and (len(seen) > 1) == distilled, sorted(seen)[:8]

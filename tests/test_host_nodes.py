"""The pack's nodes on a real ComfyUI (0.3.64 here) with a tiny Flux built from ComfyUI's own classes."""

from __future__ import annotations

import re

import pytest
import torch

import comfy_host
from hashing import module_hash

@pytest.fixture()
def flux(pack):
    with torch.inference_mode():  # as ComfyUI's executor builds every model
        model, patcher = comfy_host.tiny_flux(seed=1)
    g = torch.Generator().manual_seed(7)
    context, pooled = torch.randn(1, 6, 32, generator=g), torch.randn(1, 16, generator=g)
    positive = [[context, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled), "guidance": 3.5}]]
    return patcher, positive, negative


def node(name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]()


def test_the_pack_registers_its_nodes_through_the_host_loader_with_tooltips_on_every_input(pack):
    import nodes
    assert set(comfy_host._state["pack_nodes"]) == {"ShortcutSampler", "ShortcutScheduler", "ShortcutLoRALoader",
                                                   "TrainShortcut", "ShortcutTrainingOptions",
                                                   "ShortcutTeacherLatents"}
    for name in comfy_host._state["pack_nodes"]:
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, (kind, *options) in spec.get(section, {}).items():
                assert options and options[0].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), name
        assert name in nodes.NODE_DISPLAY_NAME_MAPPINGS


def test_scheduler_gives_the_scfm_schedule(pack):
    from shortcut_core import shifted_schedule, resolution_shift
    (sigmas,) = node("ShortcutScheduler").get_sigmas(3, 3.25, 1.0, False, 1024, 1024)
    assert torch.equal(sigmas, shifted_schedule(3, 3.25))
    (partial,) = node("ShortcutScheduler").get_sigmas(3, 3.25, 0.5, False, 1024, 1024)
    assert torch.equal(partial, shifted_schedule(6, 3.25)[-4:])
    (by_size,) = node("ShortcutScheduler").get_sigmas(4, 3.25, 1.0, True, 1024, 1024)
    assert torch.equal(by_size, shifted_schedule(4, resolution_shift(64 * 64)))


def _stock_euler(patcher, positive, negative, latent, seed, sigmas, cfg):
    import comfy.sample
    import comfy.samplers
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    return comfy.sample.sample_custom(patcher, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive,
                                      negative, latent["samples"], disable_pbar=True, seed=seed)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_shortcut_sampler_equals_the_stock_euler_sampler_given_the_same_sigmas(flux, cfg):
    patcher, positive, negative = flux
    latent = {"samples": torch.zeros(2, 16, 8, 8)}
    (ours,) = node("ShortcutSampler").sample(patcher, positive, latent, 11, 3, 3.25, False, cfg, 1.0,
                                              negative=negative if cfg != 1.0 else None)
    (sigmas,) = node("ShortcutScheduler").get_sigmas(3, 3.25, 1.0, False, 64, 64)
    stock = _stock_euler(patcher, positive, negative, latent, 11, sigmas, cfg)
    assert ours["samples"].shape == (2, 16, 8, 8)
    assert torch.equal(ours["samples"], stock)


def test_sampler_reports_progress_and_stops_on_the_ui_cancel(flux):
    import comfy.model_management
    import comfy.utils
    patcher, positive, _ = flux
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    calls = []
    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        node("ShortcutSampler").sample(patcher, positive, latent, 0, 4, 3.25, False, 1.0, 1.0)
        # newer hosts throttle bar updates (at most every 0.1 s and 0.5 %); the last one always comes
        assert calls[-1] == (4, 4) and {total for _, total in calls} == {4} and calls == sorted(calls)
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            node("ShortcutSampler").sample(patcher, positive, latent, 0, 4, 3.25, False, 1.0, 1.0)
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(before)


def test_cfg_without_a_negative_is_a_clear_error(flux):
    patcher, positive, _ = flux
    with pytest.raises(ValueError, match="cfg.*negative"):
        node("ShortcutSampler").sample(patcher, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 0, 3, 3.25, False,
                                       2.0, 1.0)


def test_non_flow_models_are_refused_by_every_node(flux):
    import nodes
    patcher, positive, _ = flux
    # the host's own ModelSamplingDiscrete node turns the model into an eps-prediction model
    (eps_model,) = nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(patcher, "eps", False)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with pytest.raises(ValueError, match="model: .*not a flow velocity"):
        node("ShortcutSampler").sample(eps_model, positive, latent, 0, 3, 3.25, False, 1.0, 1.0)
    with pytest.raises(ValueError, match="not a flow velocity"):
        train_node(eps_model, positive, latent, steps=1)


def train_node(model, positive, latent, **overrides):
    """TrainShortcut with tiny-model settings (no previews, no calibration unless asked); every other input at
    its default. Knobs of Shortcut Training Options go through its node into the options input."""
    cls = type(node("TrainShortcut"))
    options_class = type(node("ShortcutTrainingOptions"))
    values = comfy_host.widget_defaults(cls)
    values.update(resume_lora="(none)", rank=4, batch_size=2, learning_rate=1e-3, steps=3, checkpoint_every=2,
                  save_name="test_shortcut", preview_every=0, calibrate=False)
    knobs = dict(comfy_host.widget_defaults(options_class), alpha=4.0)
    for name in [k for k in overrides if k in knobs]:
        knobs[name] = overrides.pop(name)
    values.update(overrides)
    (options,) = options_class().options(**knobs)
    out = cls().train(model=model, latents=latent, positive=positive, options=options, **values)
    return out["result"] if isinstance(out, dict) else out


def test_train_shortcut_returns_a_working_lora_and_leaves_the_shared_model_untouched(flux, lora_dir):
    import nodes
    from shortcut_core import load_lora
    patcher, positive, _ = flux
    other = patcher.clone()  # another node's MODEL sharing the same network
    net = patcher.model.diffusion_model
    before = module_hash(net)
    latents = {"samples": torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    model, lora, loss, preview, steps, plot, _, _ = train_node(patcher, positive, latents)
    assert steps == 3 and len(loss["loss"]) == 3 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.dtype == torch.float32
    assert any(k.endswith(".lora_up.weight") for k in lora) and all(k.startswith("diffusion_model.") for k in lora)
    # the shared network: same weights, no adapters, no hooks; other clones carry no patches
    assert module_hash(net) == before
    assert not any(hasattr(m, "lora_A") or m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    assert not other.patches and not patcher.patches and model.patches
    # files in models/loras: the LoRA with its recipe and the training state beside it
    written = load_lora(lora_dir / "test_shortcut.safetensors")
    assert written.metadata.steps == 3 and written.metadata.config["trained_steps"] == 3
    assert (lora_dir / "test_shortcut.train_state").is_file()
    # the stock LoraModelLoader applies the LORA_MODEL as TrainShortcut's own MODEL output does
    (stock,) = nodes.NODE_CLASS_MAPPINGS["LoraModelLoader"]().load_lora_model(patcher, lora, 1.0)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    (a,) = node("ShortcutSampler").sample(model, positive, latent, 5, 3, 3.25, False, 1.0, 1.0)
    (b,) = node("ShortcutSampler").sample(stock, positive, latent, 5, 3, 3.25, False, 1.0, 1.0)
    (base,) = node("ShortcutSampler").sample(other, positive, latent, 5, 3, 3.25, False, 1.0, 1.0)
    assert torch.allclose(a["samples"], b["samples"], atol=1e-6)
    assert not torch.allclose(a["samples"], base["samples"])
    assert module_hash(net) == before


def test_train_shortcut_resumes_exactly_from_its_training_state(flux, lora_dir):
    patcher, positive, _ = flux
    latents = {"samples": torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    _, straight, loss_straight, _, _, _, _, _ = train_node(patcher, positive, latents, steps=4, save_name="straight")
    _, _, _, _, steps, _, _, _ = train_node(patcher, positive, latents, steps=2, save_name="part")
    assert steps == 2 and (lora_dir / "part.train_state").is_file()
    _, resumed, loss_resumed, _, steps, _, _, _ = train_node(patcher, positive, latents, steps=4, save_name="part",
                                                    resume_lora="part.safetensors")
    assert steps == 4 and loss_resumed["loss"] == loss_straight["loss"]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bit for bit on the CPU
    assert not (lora_dir / "part_2.safetensors").exists()  # resuming writes on into the resumed file


def test_centre_shifts_trains_around_the_models_best_few_step_shift(flux, lora_dir):
    """With centre_shifts on, the run trains around the shift the model itself samples sample_steps best at (a
    resume finds the same and continues exactly); off, the default, it keeps the shifts it was given."""
    from shortcut_core import load_lora
    patcher, positive, _ = flux
    latents = {"samples": torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    train_node(patcher, positive, latents, steps=2, centre_shifts=True, save_name="centred")
    config = load_lora(lora_dir / "centred.safetensors").metadata.config
    # the family's (the paper's Flux draw 2.5-4.5 at 3.25) moved as one, ratios kept
    assert config["sample_shift"] != 3.25
    assert config["shift_min"] == pytest.approx(config["sample_shift"] * 2.5 / 3.25, rel=1e-3)
    assert config["shift_max"] == pytest.approx(config["sample_shift"] * 4.5 / 3.25, rel=1e-3)

    _, straight, loss_straight, _, _, _, _, _ = train_node(patcher, positive, latents, steps=4, centre_shifts=True,
                                                           save_name="centred_straight")
    train_node(patcher, positive, latents, steps=2, centre_shifts=True, save_name="centred_part")
    _, resumed, loss_resumed, _, _, _, _, _ = train_node(patcher, positive, latents, steps=4, centre_shifts=True,
                                                         save_name="centred_part", resume_lora="centred_part.safetensors")
    assert loss_resumed["loss"] == loss_straight["loss"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    train_node(patcher, positive, latents, steps=2, calibrate=True, save_name="plain")
    plain = load_lora(lora_dir / "plain.safetensors").metadata.config
    assert (plain["shift_min"], plain["shift_max"], plain["sample_shift"]) == (2.5, 4.5, 3.25)


def test_cancel_stops_the_search_for_the_shift_before_the_first_step(flux, lora_dir):
    """The shift search before training has no step to stop at: the UI's Cancel is checked between its samplings,
    and stops the run before anything is written, the shared network as it was."""
    import comfy.model_management
    patcher, positive, _ = flux
    net = patcher.model.diffusion_model
    before = module_hash(net)
    latents = {"samples": torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train_node(patcher, positive, latents, steps=2, centre_shifts=True, save_name="cancelled")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert module_hash(net) == before
    assert not (lora_dir / "cancelled.safetensors").exists() and not (lora_dir / "cancelled.train_state").exists()


def test_train_shortcut_trains_on_from_a_lora_without_state_and_never_overwrites_files(flux, lora_dir):
    patcher, positive, _ = flux
    latents = {"samples": torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    train_node(patcher, positive, latents, steps=2, save_name="first")
    (lora_dir / "first.train_state").unlink()
    first = (lora_dir / "first.safetensors").read_bytes()
    _, _, _, _, steps, _, _, _ = train_node(patcher, positive, latents, steps=2, save_name="first", resume_lora="first.safetensors")
    assert steps == 2 and (lora_dir / "first.safetensors").read_bytes() != first  # trained on, written back
    before = (lora_dir / "first.safetensors").read_bytes()
    train_node(patcher, positive, latents, steps=1, save_name="first")  # a new run with a taken name
    assert (lora_dir / "first.safetensors").read_bytes() == before and (lora_dir / "first_2.safetensors").is_file()
    (lora_dir / "first.train_state").unlink()
    with pytest.raises(ValueError, match="resume_lora: .*rank 4.*rank input is 8"):
        train_node(patcher, positive, latents, steps=1, save_name="x", resume_lora="first.safetensors", rank=8)
    with pytest.raises(ValueError, match="save_name: .*models/loras"):
        train_node(patcher, positive, latents, steps=1, save_name="../escape")


def cancel_after_step(monkeypatch, step: int) -> None:
    """The UI's Cancel pressed while training step `step` finishes: set where the node reports each step,
    not through the progress bar's hook, whose updates newer hosts throttle (a test must not depend on
    when the bar reaches a step)."""
    import comfy.model_management
    progress = comfy_host.pack_module("host.progress").Progress
    report_step = progress.step

    def pressed(self, report):
        if report.step == step:
            comfy.model_management.interrupt_current_processing(True)
        report_step(self, report)

    monkeypatch.setattr(progress, "step", pressed)


def test_cancel_during_training_keeps_a_checkpoint_and_leaves_the_model_untouched(flux, lora_dir, monkeypatch):
    import comfy.model_management
    from shortcut_core import load_lora
    patcher, positive, _ = flux
    net = patcher.model.diffusion_model
    before = module_hash(net)
    latents = {"samples": torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    try:
        with monkeypatch.context() as patch, pytest.raises(comfy.model_management.InterruptProcessingException):
            cancel_after_step(patch, 2)
            train_node(patcher, positive, latents, steps=10, checkpoint_every=0, save_name="cancelled")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    kept = load_lora(lora_dir / "cancelled.safetensors")
    assert kept.metadata.config["trained_steps"] == 2 and (lora_dir / "cancelled.train_state").is_file()
    assert module_hash(net) == before
    assert not any(hasattr(m, "lora_A") or m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    # and it resumes from there to the same LoRA as a run that was never cancelled
    _, resumed, _, _, steps, _, _, _ = train_node(patcher, positive, latents, steps=4, save_name="cancelled",
                                         resume_lora="cancelled.safetensors")
    _, straight, _, _, _, _, _, _ = train_node(patcher, positive, latents, steps=4, save_name="straight")
    assert steps == 4 and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_training_error_leaves_the_model_untouched(flux, lora_dir):
    patcher, positive, _ = flux
    net = patcher.model.diffusion_model
    before = module_hash(net)
    latents = {"samples": torch.full((4, 16, 8, 8), float("nan"))}
    with pytest.raises(ValueError, match="NaN"):
        train_node(patcher, positive, latents, steps=2)
    assert module_hash(net) == before
    assert not any(hasattr(m, "lora_A") or m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_sd3_samples_like_stock_euler_and_trains_with_true_cfg(pack, lora_dir):
    with torch.inference_mode():
        _, patcher = comfy_host.tiny_sd3(seed=2)
    net = patcher.model.diffusion_model
    before = module_hash(net)
    g = torch.Generator().manual_seed(5)
    positive = [[torch.randn(1, 5, 48, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    negative = [[torch.zeros(1, 5, 48), {"pooled_output": torch.zeros(1, 32)}]]
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    (ours,) = node("ShortcutSampler").sample(patcher, positive, latent, 3, 4, 3.0, False, 3.5, 1.0, negative=negative)
    (sigmas,) = node("ShortcutScheduler").get_sigmas(4, 3.0, 1.0, False, 64, 64)
    assert torch.equal(ours["samples"], _stock_euler(patcher, positive, negative, latent, 3, sigmas, 3.5))

    latents = {"samples": torch.randn(3, 16, 8, 8, generator=g)}
    model, lora, loss, _, steps, _, _, _ = train_node(patcher, positive, latents, steps=2, negative=negative, cfg=3.5,
                                             resolution_shift_prob=0.0, max_grad_norm=2.0, save_name="sd3")
    assert steps == 2 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert any(".joint_blocks." in k for k in lora)
    assert module_hash(net) == before


def test_lora_loader_outputs_the_files_recipe_or_the_papers_defaults(flux, lora_dir):
    from safetensors.torch import load_file, save_file
    from shortcut_core import LoraWeights
    from shortcut_core.adapters import linear_module_names
    host_lora = comfy_host.pack_module("host.lora")
    lora_file = comfy_host.pack_module("shortcut_core.lora_file")
    patcher, _, _ = flux
    net = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    lora = {name: LoraWeights(torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g),
                              2.0) for name in linear_module_names(net) for m in [net.get_submodule(name)]}
    host_lora.save_host_lora(lora_dir / "ours.safetensors", lora, lora_file.LoraMetadata(steps=4, shift=2.5, strength=1.5))
    host_lora.save_diffusers_flux(lora_dir / "authors.safetensors", lora, patcher.model)
    tensors = load_file(lora_dir / "authors.safetensors")
    save_file(dict(tensors, **{"transformer.not_a_layer.lora_A.weight": torch.zeros(2, 2)}),
              lora_dir / "authors_plus_junk.safetensors")

    out = node("ShortcutLoRALoader").load(patcher, "ours.safetensors", 1.0)
    model, steps, shift, strength = out["result"]
    assert (steps, shift, strength) == (4, 2.5, 1.5) and model.patches and not patcher.patches
    _, steps, shift, strength = node("ShortcutLoRALoader").load(patcher, "authors.safetensors", 1.0)["result"]
    assert (steps, shift, strength) == (3, 3.25, 1.0)  # no recipe in the file: the paper's
    text = node("ShortcutLoRALoader").load(patcher, "authors_plus_junk.safetensors", 1.0)["ui"]["text"][0]
    assert "1 keys matched nothing" in text and "transformer.not_a_layer.lora_A.weight" in text
    with pytest.raises(ValueError, match="lora_name: 'missing.safetensors' is not in models/loras"):
        node("ShortcutLoRALoader").load(patcher, "missing.safetensors", 1.0)


def test_every_knob_of_the_config_has_exactly_one_input_with_the_papers_default(pack):
    """TrainShortcut shows what a user sets on every run; Shortcut Training Options holds the rest. A knob the
    model family sets for itself defaults to its explicit "auto" value instead (the family's recipe)."""
    import dataclasses
    from shortcut_core import ShortcutConfig
    train = type(node("TrainShortcut")).INPUT_TYPES()["required"]
    options = type(node("ShortcutTrainingOptions")).INPUT_TYPES()["required"]
    assert not set(train) & set(options)
    spec = {**train, **options}
    defaults = ShortcutConfig()
    split = {"guidance_range": ("guidance_min", "guidance_max"), "adam_betas": ("adam_beta1", "adam_beta2")}
    for field in dataclasses.fields(ShortcutConfig):
        if field.name == "extra":
            continue
        names = split.get(field.name, (field.name,))
        assert all(n in spec for n in names), f"ShortcutConfig.{field.name} has no input"
        value = getattr(defaults, field.name)
        if field.name == "target_modules":
            assert value is None and spec[field.name][1]["default"] == ""
        elif field.metadata["knob"].auto is not None:
            auto = field.metadata["knob"].auto
            assert spec[field.name][1]["default"] == auto and spec[field.name][1]["min"] <= auto, field.name
        elif len(names) == 2:
            assert tuple(spec[n][1]["default"] for n in names) == tuple(value)
        else:
            assert spec[field.name][1]["default"] == value, field.name
    widgets = [n for n, (kind, *_) in train.items() if kind in ("INT", "FLOAT", "STRING", "BOOLEAN") or
               isinstance(kind, list)]
    assert len(widgets) <= 16, widgets
    assert {"steps", "batch_size", "learning_rate", "rank", "seed", "save_name", "checkpoint_every", "resume_lora",
            "cfg", "preview_every", "calibrate"} == set(widgets)


def test_a_changed_option_reaches_the_trainer_and_bad_options_are_named(flux, lora_dir):
    from shortcut_core import load_lora
    patcher, positive, _ = flux
    latents = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    train_node(patcher, positive, latents, steps=1, save_name="opts", alpha=2.0, t_skip=4, teacher_min_steps=16,
               sample_steps=4)
    config = load_lora(lora_dir / "opts.safetensors").metadata.config
    assert (config["alpha"], config["t_skip"], config["teacher_min_steps"], config["sample_steps"]) == (2.0, 4, 16, 4)
    train_node(patcher, positive, latents, steps=1, save_name="defaults")
    config = load_lora(lora_dir / "defaults.safetensors").metadata.config
    # unconnected knobs: the paper's, with the sub-steps at "auto" (the recipe's)
    assert (config["t_skip"], config["teacher_min_steps"], config["recipe"]) == (0, 32, "paper")
    train_node(patcher, positive, latents, steps=1, save_name="fast", recipe="fast")
    assert load_lora(lora_dir / "fast.safetensors").metadata.config["recipe"] == "fast"
    with pytest.raises(ValueError, match="t_skip: -2 is out of range"):
        train_node(patcher, positive, latents, steps=1, t_skip=-2)
    with pytest.raises(ValueError, match="recipe"):
        train_node(patcher, positive, latents, steps=1, recipe="fastest")
    with pytest.raises(ValueError, match="options: unknown knobs \\['rnak'\\]"):
        type(node("TrainShortcut"))().train(model=patcher, latents=latents, positive=positive, steps=1, batch_size=2,
                                             learning_rate=1e-3, rank=4, seed=0, save_name="x", checkpoint_every=0,
                                             resume_lora="(none)", cfg=1.0, preview_every=0, calibrate=False,
                                             options={"rnak": 4})


def test_target_modules_limits_the_lora_to_those_layers(flux, lora_dir):
    patcher, positive, _ = flux
    latents = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    _, lora, _, _, _, _, _, _ = train_node(patcher, positive, latents, steps=1, target_modules="img_attn.qkv, linear1")
    layers = {k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in lora}
    assert layers == {"diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.single_blocks.0.linear1",
                      "diffusion_model.single_blocks.1.linear1"}


def test_training_works_on_fp8_stored_weights_cast_at_use(pack, lora_dir):
    with torch.inference_mode():
        _, patcher = comfy_host.tiny_flux(seed=1, weight_dtype=torch.float8_e4m3fn)
    net = patcher.model.diffusion_model
    assert {p.dtype for p in net.parameters()} == {torch.float8_e4m3fn}
    before = module_hash(net)
    positive = [[torch.randn(1, 6, 32), {"pooled_output": torch.randn(1, 16), "guidance": 3.5}]]
    model, lora, loss, _, _, _, _, _ = train_node(patcher, positive, {"samples": torch.randn(2, 16, 8, 8)}, steps=2)
    assert all(torch.isfinite(torch.tensor(loss["loss"]))) and all(v.dtype == torch.float32 for v in lora.values())
    assert module_hash(net) == before and {p.dtype for p in net.parameters()} == {torch.float8_e4m3fn}
    (out,) = node("ShortcutSampler").sample(model, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 0, 3, 3.25, False,
                                             1.0, 1.0)
    assert torch.isfinite(out["samples"]).all()


def test_training_shows_step_and_loss_on_the_node_and_the_progress_bar(flux, lora_dir, monkeypatch):
    import sys
    import types

    import comfy.utils
    patcher, positive, _ = flux
    texts, bars = [], []

    class Server:  # the running PromptServer's side the node talks to
        def send_progress_text(self, text, node_id, sid=None):
            texts.append((node_id, text))

    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=Server())))
    hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: bars.append((value, total, node_id)))
    try:
        train_node(patcher, positive, {"samples": torch.randn(2, 16, 8, 8)}, steps=4, unique_id="42")
    finally:
        comfy.utils.set_progress_bar_global_hook(hook)
    values = [v for v, total, node_id in bars if node_id == "42"]
    assert values[0] == 0 and values[-1] == 4 and values == sorted(values)  # newer hosts throttle the bar
    assert [node_id for node_id, _ in texts] == ["42"] * 5
    # the recipe for the model's family, the memory plan and the time come first (on a CPU: measured as it runs)
    assert texts[0][1].startswith("Flux recipe: training shifts 2.5-4.5 (resolution shift 10%), sampling shift 3.25")
    assert "\nplan: " in texts[0][1] and "weights" in texts[0][1]
    assert texts[0][1].endswith("\ntime: measured from the first steps (cpu)")
    # the seconds per step are measured after two warm-up steps, then shown with the run's total and the ETA
    assert re.fullmatch(r"step 2/4  loss \S+", texts[2][1])
    assert re.fullmatch(r"step 3/4  loss \S+  about [0-9.]+ s/step, \S+ (s|min|h \d+ min) for 4 steps; ETA \S+ s",
                        texts[3][1]), texts[3][1]
    assert texts[-1][1].startswith("step 4/4  loss ") and texts[-1][1].endswith("ETA 0 s")

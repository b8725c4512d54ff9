"""Shortcut Teacher Latents on a real ComfyUI: a tiny Flux and a tiny CLIP built from ComfyUI's own classes."""

from __future__ import annotations

import pytest
import torch

import comfy_host
from test_host_nodes import node, train_node

PROMPTS = "a red cube\n\n# a comment line\na blue sphere on grass\n  a green cone  \n"
LONG = " ".join(["a lighthouse on a rocky coast in a storm"] * 10)  # over 75 tokens: two CLIP chunks


@pytest.fixture()
def teacher(pack, tmp_path):
    with torch.inference_mode():
        _, patcher = comfy_host.tiny_flux(seed=1, vec_in_dim=32)
    clip = comfy_host.tiny_clip(seed=2)
    with comfy_host.host_folders(output_dir=tmp_path / "output", loras=tmp_path / "loras"):
        yield patcher, clip, tmp_path / "output" / "shortcut_teacher_cache"


@pytest.fixture()
def sampler_calls(monkeypatch):
    """Counts the host's sampler calls (both schedules)."""
    import comfy.sample
    calls = []
    for name in ("sample", "sample_custom"):
        original = getattr(comfy.sample, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(comfy.sample, name, counted)
    return calls


def make(model, clip, prompts=PROMPTS, **overrides):
    values = dict(comfy_host.widget_defaults(type(node("ShortcutTeacherLatents"))), width=64, height=64, steps=4,
                  per_prompt=2, batch_size=2, prompts=prompts)
    values.update(overrides)
    return node("ShortcutTeacherLatents").make(model=model, clip=clip, **values)


def test_prompts_are_one_per_line_without_blanks_and_comments(pack):
    parse = comfy_host.pack_module("host.teacher").parse_prompts
    assert parse(PROMPTS) == ["a red cube", "a blue sphere on grass", "a green cone"]
    assert parse("\n # only a comment\n\n") == []


def test_one_conditioning_per_latent_in_order_from_the_hosts_own_encoding_and_sampler(teacher, sampler_calls):
    import nodes
    patcher, clip, _ = teacher
    latents, positive, negative = make(patcher, clip)
    assert latents["samples"].shape == (6, 16, 8, 8) and len(positive) == len(negative) == 6
    assert sampler_calls == ["sample"] * 3  # one batch of 2 per prompt
    for i, prompt in enumerate(["a red cube", "a red cube", "a blue sphere on grass", "a blue sphere on grass",
                                "a green cone", "a green cone"]):
        (encoded,) = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        assert torch.equal(positive[i][0], encoded[0]) and positive[i][1]["guidance"] == 3.5
        assert torch.equal(positive[i][1]["pooled_output"], encoded[1]["pooled_output"])
    # each image is what the stock KSampler makes from its prompt and its own seed
    seed = comfy_host.pack_module("host.teacher").image_seed(0, "a blue sphere on grass", 1)
    (stock,) = nodes.KSampler().sample(patcher, seed, 4, 1.0, "euler", "simple", [positive[3]], [negative[3]],
                                       {"samples": torch.zeros(1, 16, 8, 8)})
    # (sampled in a batch of two here, alone there: float32 kernels round differently with the batch size)
    torch.testing.assert_close(latents["samples"][3:4], stock["samples"], rtol=1e-4, atol=1e-4)


def test_a_second_run_reads_everything_from_the_cache(teacher, sampler_calls):
    patcher, clip, folder = teacher
    first = make(patcher, clip)
    assert len(sampler_calls) == 3 and len(list(folder.glob("*.safetensors"))) == 6
    second = make(patcher, clip)
    assert len(sampler_calls) == 3  # no sampler call
    assert torch.equal(first[0]["samples"], second[0]["samples"])
    assert all(torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() for a, b in zip(first[1], second[1]))
    make(patcher, clip, cache=False)
    assert len(sampler_calls) == 6  # cache off: everything sampled again


def test_a_changed_prompt_model_setting_or_text_encoder_makes_only_what_changed(teacher, sampler_calls):
    patcher, clip, _ = teacher
    make(patcher, clip)
    make(patcher, clip, prompts=PROMPTS.replace("a green cone", "a yellow torus"))
    assert len(sampler_calls) == 3 + 1  # the new prompt's two images, one batch
    lora = patcher.clone()
    net = patcher.model.diffusion_model
    lora.add_patches({"diffusion_model.img_in.weight": (torch.ones_like(net.img_in.weight) * 1e-3,)}, 1.0)
    make(lora, clip)
    assert len(sampler_calls) == 4 + 3  # other weights (a patch): nothing matches
    make(patcher, clip, steps=5)
    assert len(sampler_calls) == 7 + 3  # another setting: nothing matches
    make(patcher, comfy_host.tiny_clip(seed=5))
    assert len(sampler_calls) == 10 + 3  # another text encoder: nothing matches


def test_a_cancel_keeps_the_finished_images_and_the_next_run_makes_the_rest(teacher, monkeypatch):
    import comfy.model_management
    import comfy.sample
    patcher, clip, folder = teacher
    original, calls, pressed = comfy.sample.sample, [], []

    def cancel_after_first_batch(*args, **kwargs):
        calls.append(1)
        out = original(*args, **kwargs)
        if not pressed:
            pressed.append(True)
            comfy.model_management.interrupt_current_processing(True)  # pressed while batch 1 finishes
        return out

    monkeypatch.setattr(comfy.sample, "sample", cancel_after_first_batch)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            make(patcher, clip)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert len(list(folder.glob("*.safetensors"))) == 2
    calls.clear()
    resumed = make(patcher, clip)
    assert len(calls) == 2  # the two prompts not done
    monkeypatch.setattr(comfy.sample, "sample", original)
    straight = make(patcher, clip, cache=False)
    assert torch.equal(resumed[0]["samples"], straight[0]["samples"])


def test_a_corrupt_cache_entry_is_made_again(teacher, sampler_calls, caplog):
    patcher, clip, folder = teacher
    first = make(patcher, clip, per_prompt=1)
    damaged = sorted(folder.glob("*.safetensors"))[0]
    damaged.write_bytes(b"\x00" * 10)
    second = make(patcher, clip, per_prompt=1)
    assert len(sampler_calls) == 3 + 1 and "made again" in caplog.text
    assert torch.equal(first[0]["samples"], second[0]["samples"])


def test_prompts_of_different_lengths_train_and_the_shortcut_schedule_compares(teacher, sampler_calls):
    patcher, clip, _ = teacher
    latents, positive, negative = make(patcher, clip, prompts=f"a red cube\n{LONG}", per_prompt=2)
    assert {p[0].shape[1] for p in positive} == {77, 154}
    model, lora, loss, _, steps, _, _, _ = train_node(patcher, positive, latents, steps=2, rank=4)
    assert steps == 2 and all(torch.isfinite(torch.tensor(loss["loss"])))
    # the trained model on the SCFM schedule, same prompts and seeds: ShortcutSampler's result image for image
    sampling = comfy_host.pack_module("host.sampling")
    host_teacher = comfy_host.pack_module("host.teacher")
    fast, _, _ = make(model, clip, prompts="a red cube", per_prompt=1, steps=3, schedule=host_teacher.SHORTCUT_SCHEDULE,
                      shift=2.0)
    assert sampler_calls[-1] == "sample_custom"
    seed = host_teacher.image_seed(0, "a red cube", 0)
    expected = sampling.sample_shortcut(model, [positive[0]], None, {"samples": torch.zeros(1, 16, 8, 8)},
                                        seed=seed, sigmas=sampling.shortcut_sigmas(3, 2.0))
    assert torch.equal(fast["samples"], expected["samples"])


def test_bad_inputs_are_named(teacher):
    patcher, clip, _ = teacher
    with pytest.raises(ValueError, match="prompts: no prompt"):
        make(patcher, clip, prompts="# nothing\n\n")
    with pytest.raises(ValueError, match="width: 72 is not a multiple of 16"):
        make(patcher, clip, width=72)


def test_video_models_get_clips_of_the_frames_asked_and_train_on_them(teacher, lora_dir):
    """Wan: `length` frames as its Empty Latent Video node counts them (4k + 1 frames: (length - 1) / 4 + 1 latent
    frames); the clips train as they are. An image model refuses frames, a video model a length it cannot make."""
    flux, clip, cache = teacher
    with torch.inference_mode():
        _, wan = comfy_host.tiny_wan(seed=3)  # text width 32, as the tiny CLIP's
    latents, positive, negative = make(wan, clip, prompts="a wave\na flag", per_prompt=1, width=32, height=48,
                                       length=9, cfg=2.0)
    assert latents["samples"].shape == (2, 16, 3, 6, 4) and torch.isfinite(latents["samples"]).all()
    again, _, _ = make(wan, clip, prompts="a wave\na flag", per_prompt=1, width=32, height=48, length=9, cfg=2.0)
    assert torch.equal(again["samples"], latents["samples"])  # read back from the cache
    one, _, _ = make(wan, clip, prompts="a wave", per_prompt=1, width=32, height=48, length=1, cfg=2.0)
    assert one["samples"].shape == (1, 16, 1, 6, 4)  # one frame is a clip too, keyed apart from nine
    _, _, loss, _, _, _, _, _ = train_node(wan, positive, latents, negative=negative, cfg=0.0, steps=1,
                                           save_name="wan_clips")
    assert torch.isfinite(torch.tensor(loss["loss"])).all()
    with pytest.raises(ValueError, match=r"length: 8 frames; this video model takes 4k \+ 1 frames \(1, 5, 9, ...\)"):
        make(wan, clip, length=8)
    with pytest.raises(ValueError, match="length: 5 frames, but this model makes images; set length to 1"):
        make(flux, clip, length=5)

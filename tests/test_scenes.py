"""The procedural-scenes teacher (benchmarks/scenes.py) in the engine alone: data, prompts, network, cache, SCFM."""

from __future__ import annotations

import struct
import zlib

import torch
from torch import nn

from benchmarks import scenes
from benchmarks.digits import write_png
from shortcut_core import ShortcutConfig, ShortcutTrainer, lora_applied

TINY = scenes.ScenesNetConfig(width=32, depth=1, patch_width=16)


def ids(colour: str, shape: str, background: str, count: int) -> torch.Tensor:
    return torch.tensor([[scenes.VOCAB.index(colour), scenes.VOCAB.index(shape), scenes.VOCAB.index(background)]]
                        ).expand(count, 3).contiguous()


def test_scenes_have_their_shape_range_and_are_deterministic_by_seed():
    images, tokens = scenes.make_scenes(64, 0)
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    assert tokens.shape == (64, 3) and tokens.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.3
    assert set(tokens[:, 0].tolist()) <= set(scenes.COLOUR_IDS)
    assert set(tokens[:, 1].tolist()) <= set(scenes.SHAPE_IDS)
    assert set(tokens[:, 2].tolist()) <= set(scenes.BACKGROUND_IDS)
    assert scenes.prompt_text(tokens[0]).count(" ") == 2  # "colour shape, background"
    again, tokens_again = scenes.make_scenes(64, 0)
    assert torch.equal(images, again) and torch.equal(tokens, tokens_again)
    other, _ = scenes.make_scenes(64, 1)
    assert not torch.equal(images, other)


def test_scenes_are_sharp_edged_two_colours_per_row():
    """Background gradient (one colour per row) and one shape colour, no antialiasing: at most 2 colours a row."""
    images, _ = scenes.make_scenes(32, 3)
    for image in images:
        for row in image.permute(1, 2, 0):  # (16 pixels, 3)
            assert torch.unique(row, dim=0).shape[0] <= 2


def test_the_prompt_determines_the_content():
    """Same tokens, other positions and sizes: mean colours stay closer than with another colour word."""
    colours = ("red", "cyan", "yellow", "blue")
    means = {c: [scenes.render_scenes(ids(c, "disc", "night", 24), seed).mean(dim=(0, 2, 3)) for seed in (1, 2)]
             for c in colours}
    for c in colours:
        same = (means[c][0] - means[c][1]).norm()
        others = min((means[c][0] - means[o][1]).norm() for o in colours if o != c)
        assert same < 0.5 * others, (c, float(same), float(others))
    a = scenes.render_scenes(ids("red", "square", "sea", 8), 5)
    b = scenes.render_scenes(ids("red", "square", "sea", 8), 6)
    assert not torch.equal(a, b)  # position and size jitter with the seed
    assert torch.allclose(a[:, :, :, 0].mean(0), b[:, :, :, 0].mean(0), atol=0.35)  # but the content is alike


def test_network_is_conditional_and_all_linear():
    torch.manual_seed(0)
    net = scenes.ScenesFlowNet(TINY)
    for name, module in net.named_modules():
        if not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, (nn.Linear, nn.Embedding)), name
    nn.init.normal_(net.final.weight, std=0.1)  # zero-initialised: make the output depend on the input
    x, t = torch.randn(4, 3, 16, 16), torch.rand(4)
    a = net(x, t, ids("red", "disc", "sea", 4))
    b = net(x, t, ids("blue", "disc", "sea", 4))
    assert a.shape == x.shape and not torch.allclose(a, b)
    padded = torch.cat([ids("red", "disc", "sea", 4), torch.zeros(4, 2, dtype=torch.long)], dim=1)
    assert torch.allclose(net(x, t, padded), a, atol=1e-6)  # padding is left out of the prompt's mean
    assert net(x, t, None).shape == x.shape
    velocity = scenes.velocity_of_scenes(net)
    assert torch.equal(velocity(x, t, tokens=ids("red", "disc", "sea", 4), other=1), a)
    out = scenes.sample_scenes(net, x, ids("red", "disc", "sea", 4), steps=3, shift=1.0, batch=3)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_features_and_fd():
    images, _ = scenes.make_scenes(300, 0)
    features = scenes.scene_features(images)
    assert features.shape == (300, 208)
    assert abs(scenes.scenes_fd(images, images)) < 1e-6
    other, _ = scenes.make_scenes(300, 1)
    blurred = torch.nn.functional.avg_pool2d(other, 3, stride=1, padding=1, count_include_pad=False)
    assert scenes.scenes_fd(other, images) < scenes.scenes_fd(blurred, images)


def test_teacher_cache_and_a_short_scfm_run(tmp_path):
    images, tokens = scenes.make_scenes(64, 0)
    train = scenes.ScenesTeacherTraining(steps=3, batch_size=8)
    net, where = scenes.load_or_pretrain_scenes_teacher(images, tokens, tmp_path, progress=False, net_cfg=TINY,
                                                        train=train)
    assert where.startswith("pre-trained now, cached at")
    again, where = scenes.load_or_pretrain_scenes_teacher(images, tokens, tmp_path, progress=False, net_cfg=TINY,
                                                          train=train)
    assert where.startswith("restored from")
    assert all(torch.equal(p, q) for p, q in zip(net.state_dict().values(), again.state_dict().values()))
    assert not any(p.requires_grad for p in again.parameters())

    cfg = ShortcutConfig(rank=4, alpha=4, learning_rate=1e-3, batch_size=8, steps=2, shift_min=1.0, shift_max=1.0,
                         sample_shift=1.0, guidance_range=None, resolution_shift_prob=0.0,
                         gradient_checkpointing=False, checkpoint_every=0)
    with ShortcutTrainer(net, scenes.velocity_of_scenes(net), images, cfg, extra_args={"tokens": tokens}) as trainer:
        result = trainer.run(progress=False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    noise = torch.randn(4, 3, 16, 16)
    with lora_applied(net, result.lora):
        out = scenes.sample_scenes(net, noise, tokens[:4], steps=3)
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_rgb_png(tmp_path):
    images, _ = scenes.make_scenes(6, 0)
    grid = scenes.scene_grid([images[:3], images[3:]], scale=2)
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    write_png(tmp_path / "g.png", grid)
    png = (tmp_path / "g.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">IIBB", png[16:26]) == (grid.shape[1], grid.shape[0], 8, 2)
    raw = zlib.decompress(png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8])
    assert len(raw) == grid.shape[0] * (1 + grid.shape[1] * 3)

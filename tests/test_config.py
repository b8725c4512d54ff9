"""ShortcutConfig: the paper's released Flux recipe as defaults, validation, (de)serialisation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from shortcut_core.config import ConfigError, ShortcutConfig


def test_defaults_are_the_papers_flux_recipe():
    c = ShortcutConfig(recipe="paper")
    assert c.rank == 64
    assert c.alpha == 64
    assert c.target_modules is None  # every linear layer
    assert c.t_skip == 0 and c.substeps == 2  # auto: the recipe's
    assert ShortcutConfig().recipe == "paper" and ShortcutConfig(recipe="fast").substeps == 4
    assert c.teacher_ratio == 0.4
    assert c.teacher_min_steps == 32 and c.teacher_max_steps == 32
    assert c.non_shortcut_ratio == 0.0
    assert (c.shift_min, c.shift_max) == (2.5, 4.5)
    assert c.resolution_shift_prob == 0.1
    assert c.t_max == 1.0 - 1e-5
    assert c.guidance_range == (0.0, 7.5)
    assert c.ema_slow_decay == 0.999
    assert c.ema_fast_decay == 0.99
    assert c.ema_restart_every == 0
    assert c.learning_rate == 2e-5
    assert c.weight_decay == 1e-4
    assert c.max_grad_norm == 10.0
    assert c.batch_size == 8
    assert c.checkpoint_every == 200
    assert (c.sample_steps, c.sample_shift) == (3, 3.25)


def test_derived_schedule_lengths_of_the_recipe():
    c = ShortcutConfig(recipe="paper")
    assert c.self_schedule_lengths == (2, 4, 8, 16)
    assert c.teacher_schedule_lengths == (32,)


def test_derived_schedule_lengths_other_settings():
    c = ShortcutConfig(t_skip=4, teacher_min_steps=32, teacher_max_steps=48)
    assert c.self_schedule_lengths == (4, 8, 16)
    assert c.teacher_schedule_lengths == (32, 36, 40, 44, 48)
    # every length is a multiple of t_skip, so a start index never runs past the schedule's end
    assert all(n % c.t_skip == 0 for n in c.self_schedule_lengths + c.teacher_schedule_lengths)
    c = ShortcutConfig(teacher_min_steps=8, teacher_max_steps=12, t_skip=2)
    assert c.self_schedule_lengths == (2, 4)
    assert c.teacher_schedule_lengths == (8, 10, 12)


def test_sequences_are_normalised_to_tuples():
    c = ShortcutConfig(guidance_range=[1.0, 2.0], adam_betas=[0.8, 0.9], target_modules=["a", "b"])
    assert c.guidance_range == (1.0, 2.0)
    assert c.adam_betas == (0.8, 0.9)
    assert c.target_modules == ("a", "b")


@pytest.mark.parametrize("changes, field_name", [
    ({"rank": 0}, "rank"),
    ({"rank": 2.0}, "rank"),
    ({"rank": True}, "rank"),
    ({"t_skip": 3}, "t_skip"),
    ({"t_skip": -2}, "t_skip"),
    ({"teacher_ratio": 1.5}, "teacher_ratio"),
    ({"teacher_ratio": -0.1}, "teacher_ratio"),
    ({"non_shortcut_ratio": 2.0}, "non_shortcut_ratio"),
    ({"resolution_shift_prob": float("nan")}, "resolution_shift_prob"),
    ({"ema_slow_decay": 1.0}, "ema_slow_decay"),
    ({"ema_fast_decay": -0.5}, "ema_fast_decay"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"alpha": -1.0}, "alpha"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"batch_size": 0}, "batch_size"),
    ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ({"steps": -5}, "steps"),
    ({"seed": -1}, "seed"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"teacher_min_steps": 31}, "teacher_min_steps"),
    ({"teacher_min_steps": 18, "teacher_max_steps": 24, "t_skip": 4}, "teacher_min_steps"),
    ({"teacher_max_steps": 30}, "teacher_max_steps"),
    ({"teacher_max_steps": 33}, "teacher_max_steps"),
    ({"teacher_min_steps": 2, "teacher_max_steps": 2}, "teacher_min_steps"),  # no self schedule left
    ({"shift_min": 5.0}, "shift_max"),
    ({"shift_min": 0.0}, "shift_min"),
    ({"t_max": 1.5}, "t_max"),
    ({"t_max": 0.3}, "t_max"),
    ({"guidance_range": (7.5, 0.0)}, "guidance_range"),
    ({"guidance_range": (0.0, float("nan"))}, "guidance_range"),
    ({"adam_betas": (0.9, 1.0)}, "adam_betas"),
    ({"target_modules": ()}, "target_modules"),
    ({"target_modules": ("q", "")}, "target_modules"),
    ({"gradient_checkpointing": 1}, "gradient_checkpointing"),
    ({"extra": ["not", "a", "dict"]}, "extra"),
])
def test_config_error_names_the_field(changes, field_name):
    with pytest.raises(ConfigError) as info:
        ShortcutConfig(**changes)
    assert info.value.field == field_name
    assert f"ShortcutConfig.{field_name}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_teacher_only_config_needs_no_self_schedule():
    c = ShortcutConfig(teacher_min_steps=2, teacher_max_steps=2, teacher_ratio=1.0, recipe="paper")
    assert c.self_schedule_lengths == ()
    assert c.teacher_schedule_lengths == (2,)


def test_replace_validates():
    c = ShortcutConfig()
    assert c.replace(rank=8).rank == 8
    with pytest.raises(ConfigError):
        c.replace(rank=0)


def _non_default_config() -> ShortcutConfig:
    return ShortcutConfig(rank=8, alpha=4.0, target_modules=("to_q", "to_k"), t_skip=4, teacher_ratio=0.25,
                          teacher_min_steps=16, teacher_max_steps=24, non_shortcut_ratio=0.5, shift_min=1.5,
                          shift_max=2.0, resolution_shift_prob=0.0, guidance_range=None, ema_slow_decay=0.9,
                          ema_fast_decay=0.5, ema_restart_every=100, learning_rate=1e-3, adam_betas=(0.8, 0.95),
                          batch_size=3, grad_accum_steps=2, steps=17, seed=42, checkpoint_every=0,
                          gradient_checkpointing=False, sample_steps=4, sample_shift=3.0, sample_strength=1.6,
                          extra={"note": "x", "n": 3})


@pytest.mark.parametrize("config", [ShortcutConfig(), _non_default_config()])
def test_to_dict_from_dict_round_trip(config):
    d = config.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(ShortcutConfig)}
    # JSON-able: this is what goes into file metadata and checkpoints
    through_json = json.loads(json.dumps(d))
    for data in (d, through_json):
        again = ShortcutConfig.from_dict(data)
        assert again == config
        assert again.to_dict() == d
        assert type(again.adam_betas) is tuple
        assert again.guidance_range is None or type(again.guidance_range) is tuple


def test_from_dict_strict_rejects_unknown_keys():
    d = ShortcutConfig().to_dict()
    d["rnak"] = 4
    with pytest.raises(ConfigError) as info:
        ShortcutConfig.from_dict(d)
    assert info.value.field == "rnak"
    assert "rnak" in str(info.value)


def test_from_dict_non_strict_ignores_unknown_keys():
    d = _non_default_config().to_dict()
    d["a_field_from_a_newer_version"] = {"anything": 1}
    assert ShortcutConfig.from_dict(d, strict=False) == _non_default_config()


def test_from_dict_partial_uses_defaults_and_validates():
    c = ShortcutConfig.from_dict({"rank": 4})
    assert c.rank == 4 and c.alpha == 64
    with pytest.raises(ConfigError):
        ShortcutConfig.from_dict({"rank": 4, "ema_fast_decay": 1.0})


def test_t_max_default_is_just_below_one():
    c = ShortcutConfig()
    assert c.t_max < 1.0
    assert math.isclose(1.0 - c.t_max, 1e-5, rel_tol=1e-9)

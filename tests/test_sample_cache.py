"""The per-sample disk cache and the weight fingerprints its keys are built from."""

from __future__ import annotations

import logging

import pytest
import torch

from shortcut_core.sample_cache import SampleCache, fingerprint, tensor_fingerprint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int64])
def test_a_fingerprint_sees_values_shape_and_dtype(dtype):
    t = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert tensor_fingerprint(t) == tensor_fingerprint(t.clone())
    changed = t.clone()
    changed.view(-1)[-1] = (changed.view(-1)[-1].float() + 8).to(dtype)  # the last element is always read
    assert tensor_fingerprint(changed) != tensor_fingerprint(t)
    assert tensor_fingerprint(t.reshape(33, 64)) != tensor_fingerprint(t)
    assert tensor_fingerprint(t.to(torch.float64)) != tensor_fingerprint(t)


def test_a_fingerprint_reads_a_bounded_number_of_values():
    big = torch.zeros(10_000_000)
    assert len(tensor_fingerprint(big)) < 400  # 64 values, not 40 MB


def test_a_combined_fingerprint_depends_on_every_part_and_its_order():
    w = torch.ones(3)
    base = fingerprint([("a", w), "prompt", 3, {"steps": 28}])
    assert base == fingerprint([("a", w.clone()), "prompt", 3, {"steps": 28}])
    assert base != fingerprint([("b", w), "prompt", 3, {"steps": 28}])
    assert base != fingerprint([("a", w), "prompt", 4, {"steps": 28}])
    assert base != fingerprint([("a", w), "prompt", 3, {"steps": 27}])
    assert base != fingerprint(["prompt", ("a", w), 3, {"steps": 28}])


def test_the_cache_round_trips_and_a_damaged_file_is_removed_not_raised(tmp_path, caplog):
    cache = SampleCache(tmp_path / "cache")
    assert cache.get("k") is None
    cache.put("k", {"latent": torch.arange(6.0).reshape(2, 3)}, {"note": "x"})
    tensors, metadata = cache.get("k")
    assert torch.equal(tensors["latent"], torch.arange(6.0).reshape(2, 3)) and metadata["note"] == "x"
    cache.path("k").write_bytes(b"\x00\x01 not safetensors")
    with caplog.at_level(logging.WARNING):
        assert cache.get("k") is None
    assert not cache.path("k").exists() and "made again" in caplog.text

"""README command 1 end to end at toy sizes: teacher cache, distillation, LoRA file, table, PNG."""

from __future__ import annotations

import struct
import zlib

import pytest

pytest.importorskip("sklearn", reason="the demo's data ships with scikit-learn (requirements-dev.txt)")

from benchmarks import demo  # noqa: E402
from shortcut_core import load_lora  # noqa: E402


def test_demo_runs_end_to_end_and_reuses_its_teacher_cache(tmp_path, capsys):
    args = ["--steps", "6", "--teacher-steps", "30", "--samples", "64", "--quiet",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    first = demo.main(args)
    out = capsys.readouterr().out
    assert "pre-trained now, cached at" in out
    assert len(list((tmp_path / "cache").glob("digits-teacher-*.safetensors"))) == 1

    names = [row[0] for row in first["rows"]]
    assert names[0] == "teacher, 3 steps, same schedule" and "shortcut LoRA, 3 steps" in names
    assert any(n.startswith("teacher, 3 steps, its best shift") for n in names)
    assert first["rmse"][f"teacher, {demo.REFERENCE_STEPS} steps (reference)"] == 0.0

    assert any(n.startswith("shortcut LoRA, 3 steps, calibrated (strength ") for n in names)
    lora = load_lora(tmp_path / "out" / "digits-shortcut.safetensors")
    assert lora.metadata.steps == 3 and lora.metadata.config["trained_steps"] == 6
    best, _ = first["calibration"].best
    assert (lora.metadata.strength, lora.metadata.shift) == (best.strength, best.shift)
    assert first["calibration"].samples == demo.CALIBRATION_NOISES
    png = (tmp_path / "out" / "digits-grid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 16 * 32 and height > 4 * 32  # 16 samples wide, 4 rows of 8x8 digits at 4x
    zlib.decompress(png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8])  # a well-formed image stream
    assert "shortcut LoRA, 3 steps" in (tmp_path / "out" / "results.md").read_text()

    second = demo.main(args)
    assert "restored from" in capsys.readouterr().out
    assert second["rows"] == first["rows"]  # same seed, same cached teacher: the same table

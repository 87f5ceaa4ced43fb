"""The start-up tip that suggests --mixed_precision bf16 where the device computes it fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.training.precision import bf16_tip, fast_bf16


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_fast_cpu_bf16_is_what_the_cpu_flags_say():
    flags = _cpu_flags()
    assert (fast_bf16("cpu") is not None) == bool({"amx_bf16", "amx_tile", "avx512_bf16"} & flags)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_run_that_chose_half_precision_gets_no_tip(precision):
    assert bf16_tip(precision, "cpu") is None and bf16_tip(precision, "cuda") is None


@pytest.mark.parametrize("precision", [None, "no"])
def test_a_float32_run_gets_the_tip_exactly_where_bf16_is_fast(precision):
    tip = bf16_tip(precision, "cpu")
    assert (tip is not None) == (fast_bf16("cpu") is not None)
    if tip:
        assert "--mixed_precision bf16" in tip and fast_bf16("cpu") in tip
    assert bf16_tip(precision, "mps") is None


def test_the_dry_run_prints_the_tip_where_it_applies(tmp_path, capsys):
    import torch

    import train_network
    from tests.helpers import make_image_folder

    make_image_folder(tmp_path / "train", count=1)
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "train"),
            "--output_dir", str(tmp_path / "out"), "--dry_run"]
    train_network.main(argv)
    expected = bf16_tip("no", "cuda" if torch.cuda.is_available() else "cpu")
    out = capsys.readouterr().out
    assert (expected in out) if expected else "--mixed_precision bf16" not in out
    train_network.main(argv + ["--mixed_precision", "bf16"])
    assert "tip: bfloat16" not in capsys.readouterr().out

"""Sides that are not a multiple of bucket_reso_steps: one warning per setting, and it says the rounding really done."""

from __future__ import annotations

import pytest
import torch

import train_network
from library.data.bucketing import make_buckets, rounding_notes
from tests.helpers import make_image_folder


def _both(resolution, **settings):
    """The warning lines and the Buckets built from the same settings."""
    return rounding_notes(resolution, **settings), make_buckets(resolution, **settings)


def test_min_and_max_bucket_reso_are_rounded_down_and_up_as_the_warning_says():
    notes, buckets = _both((512, 512), enable_bucket=True, min_bucket_reso=300, max_bucket_reso=700,
                           bucket_reso_steps=64)
    assert notes == ["min_bucket_reso 300 is not a multiple of bucket_reso_steps 64: rounded down to 256 (as in "
                     "sd-scripts)",
                     "max_bucket_reso 700 is not a multiple of bucket_reso_steps 64: rounded up to 704 (as in "
                     "sd-scripts)"]
    sides = {side for reso in buckets.predefined for side in reso}
    assert min(sides) == 256 and max(sides) == 704 and (256, 704) in buckets.predefined


def test_a_resolution_off_the_steps_keeps_its_area_and_rounds_bucket_sides_down():
    notes, buckets = _both((500, 500), enable_bucket=True, bucket_reso_steps=64)
    assert notes == ["resolution 500x500 is not a multiple of bucket_reso_steps 64: the buckets keep its area "
                     "(250000 px) with every side rounded down to a multiple of 64 (as in sd-scripts); the square "
                     "bucket is 448x448"]
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 500 * 500 for w, h in buckets.predefined)
    assert (448, 448) in buckets.predefined and (512, 512) not in buckets.predefined
    assert buckets.select_bucket(500, 500).reso == (448, 448)


def test_bucket_no_upscale_rounds_each_image_bucket_down():
    notes, buckets = _both((500, 500), enable_bucket=True, bucket_reso_steps=64, bucket_no_upscale=True,
                           min_bucket_reso=300, max_bucket_reso=700)
    # min/max are not used with bucket_no_upscale, so their rounding is not reported.
    assert notes == ["resolution 500x500 is not a multiple of bucket_reso_steps 64: with bucket_no_upscale only its "
                     "area (250000 px) is used and every bucket side is rounded down to a multiple of 64, the image "
                     "cropped (as in sd-scripts); a 500x500 image gets the 448x448 bucket"]
    assert buckets.select_bucket(500, 500).reso == (448, 448)
    assert buckets.select_bucket(1000, 1000).reso == (448, 448)  # shrunk to the area first


def test_without_buckets_the_resolution_is_used_as_is_and_the_vae_rounds_down(tiny_parts):
    notes, buckets = _both((36, 36), enable_bucket=False, bucket_reso_steps=64)
    assert notes == ["resolution 36x36 is not a multiple of 8: used as is (as in sd-scripts), images are cropped to "
                     "36x36 and the VAE rounds their latents down to 4x4"]
    assert buckets.predefined == ((36, 36),)
    with torch.no_grad():
        latents = tiny_parts["tiny-sd1"].vae.encode(torch.zeros(1, 3, 36, 36)).latent_dist.mean
    assert tuple(latents.shape[-2:]) == (4, 4)


def test_bucket_reso_steps_off_64_is_accepted_with_a_note():
    notes, buckets = _both((64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                           bucket_reso_steps=16)
    assert notes == ["bucket_reso_steps 16 is not a multiple of 64: sd-scripts refuses it for SD 1.x/2.x; accepted "
                     "here, as the UNet takes latent sides that are not a multiple of 8"]
    assert (80, 48) in buckets.predefined


@pytest.mark.parametrize("resolution, settings", [
    ((512, 512), {"enable_bucket": True}),
    ((512, 768), {"enable_bucket": True, "bucket_no_upscale": True}),
    ((64, 64), {"enable_bucket": False}),
    ((504, 504), {"enable_bucket": False, "min_bucket_reso": 300, "bucket_reso_steps": 7}),  # unused without buckets
])
def test_settings_on_the_steps_say_nothing(resolution, settings):
    assert rounding_notes(resolution, **settings) == []


def test_dry_run_prints_one_line_per_setting(tmp_path, capsys):
    make_image_folder(tmp_path / "train", repeats=1, count=2, caption_extension=".txt")
    train_network.main(["--dry_run", "--train_data_dir", str(tmp_path / "train"), "--caption_extension", ".txt",
                        "--resolution", "500", "--enable_bucket", "--min_bucket_reso", "300",
                        "--max_bucket_reso", "700"])
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert "- resolution 500x500 is not a multiple of bucket_reso_steps 64: the buckets keep its area (250000 px) " \
           "with every side rounded down to a multiple of 64 (as in sd-scripts); the square bucket is 448x448" in lines
    assert "- min_bucket_reso 300 is not a multiple of bucket_reso_steps 64: rounded down to 256 (as in sd-scripts)" \
        in lines
    assert "- max_bucket_reso 700 is not a multiple of bucket_reso_steps 64: rounded up to 704 (as in sd-scripts)" \
        in lines
    assert sum("is not a multiple of" in line for line in lines) == 3
    assert any(line.startswith("448 x 448") for line in lines)  # the square 64x64 demo images went there

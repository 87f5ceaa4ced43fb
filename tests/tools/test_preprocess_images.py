"""tools/preprocess_images.py: AUTOMATIC1111's image preprocessing (fit-and-crop, split, flip, focal crop, multicrop,
captions), resumable, corrupt files skipped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from library.data import preprocess as pp
from tools import preprocess_images


def _halves(size, left=(255, 0, 0), right=(0, 255, 0)) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def test_fill_crop_covers_the_target_and_keeps_the_centre():
    out = pp.fill_crop(_halves((200, 100)), 64, 64)
    pixels = np.asarray(out)
    assert out.size == (64, 64)
    assert tuple(pixels[32, 2]) == (255, 0, 0) and tuple(pixels[32, 61]) == (0, 255, 0)  # the split is centred


def test_a_tall_image_splits_into_overlapping_tiles_flush_with_both_ends():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 100, 3), dtype=np.uint8))
    ratio, wide = pp.split_ratio(image, 64, 64)
    assert ratio == 0.25 and not wide
    tiles = list(pp.split_tiles(image, wide, 64, 64, 0.2))
    resized = image.resize((64, 256), Image.Resampling.LANCZOS)  # short side to the target: 400·64/100 = 256
    assert len(tiles) == 5  # ceil((256 − 12.8) / 51.2)
    assert all(t.size == (64, 64) for t in tiles)
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(resized.crop((0, 0, 64, 64))))
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(resized.crop((0, 192, 64, 256))))


def test_multicrop_picks_the_size_a1111_picks():
    # 900×500 (1.8): within 10 %, (768, 448) has the largest area and (704, 384) the smallest aspect error.
    assert pp.multicrop_size((900, 500), 384, 768, 64 * 64, 640 * 640, "Maximize area", 0.1) == (768, 448)
    assert pp.multicrop_size((900, 500), 384, 768, 64 * 64, 640 * 640, "Minimize error", 0.1) == (704, 384)
    assert pp.multicrop_size((3000, 100), 384, 768, 64 * 64, 640 * 640, "Maximize area", 0.1) is None


def test_corner_points_find_a_square_s_corners():
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    image.paste((255, 255, 255), (30, 30, 60, 60))
    points = pp.corner_points(image)
    corners = [(30, 30), (59, 30), (30, 59), (59, 59)]
    assert 4 <= len(points) <= 8
    for cx, cy in corners:
        assert min((x - cx) ** 2 + (y - cy) ** 2 for x, y in points) <= 4  # within 2 px


def test_focal_crop_follows_the_detail():
    rng = np.random.default_rng(1)
    pixels = np.full((100, 400, 3), 128, dtype=np.uint8)
    pixels[20:80, 300:380] = rng.integers(0, 255, (60, 80, 3))  # all the detail is on the right
    crops = pp.focal_crop(Image.fromarray(pixels), pp.FocalSettings(100, 100, face_weight=0))
    assert len(crops) == 1 and crops[0].size == (100, 100)
    x, _ = pp.focal_point(Image.fromarray(pixels), pp.FocalSettings(100, 100, face_weight=0))
    assert 290 <= x <= 390
    assert np.asarray(crops[0]).std() > 30  # the crop holds the detailed patch, not the flat grey


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    _halves((150, 100)).save(src / "00012-my_char photo.png")  # 1.5:1, not long enough to split
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 100, 3), dtype=np.uint8)).save(src / "tall.png")
    (src / "tall.txt").write_text("mychar, standing")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return src


def test_the_tool_writes_a1111_names_flips_splits_and_captions(sources, tmp_path, capsys):
    dst = tmp_path / "out"
    run = preprocess_images.main([str(sources), str(dst), "--width", "64", "--height", "64", "--flip", "--split",
                                  "--caption_from_filename", "--caption_action", "prepend"])
    out = capsys.readouterr()
    names = sorted(p.name for p in dst.glob("*.png"))
    # my_char (index 0): one fit-and-crop + its mirror; broken.png (index 1) is reported and skipped; tall (index 2):
    # five tiles, each with its mirror.
    assert names == ["00000-0-00012-my_char photo.png", "00000-1-00012-my_char photo.png",
                     *sorted(f"00002-{i}-tall.png" for i in range(10))]
    first = Image.open(dst / "00000-0-00012-my_char photo.png")
    assert np.array_equal(np.asarray(Image.open(dst / "00000-1-00012-my_char photo.png")),
                          np.asarray(ImageOps.mirror(first)))
    assert (dst / "00000-0-00012-my_char photo.txt").read_text() == "my char photo"
    assert (dst / "00002-3-tall.txt").read_text() == "mychar, standing tall"
    assert "broken.png" in out.err and run.written == 12 and len(run.corrupt) == 1
    assert "12 written, 0 already done" in out.out


def test_a_second_run_resumes_and_overwrite_redoes(sources, tmp_path, capsys):
    dst = tmp_path / "out"
    args = [str(sources), str(dst), "--width", "64", "--height", "64"]
    preprocess_images.main(args)
    again = preprocess_images.main(args)
    assert again.written == 0 and len(again.skipped_done) == 2
    assert preprocess_images.main(args + ["--overwrite"]).written == 2


def test_mistakes_are_one_line_errors(sources, capsys):
    with pytest.raises(SystemExit) as err:
        preprocess_images.main([str(sources), str(sources)])
    assert err.value.code == 2 and "the same folder as src" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        preprocess_images.main([str(sources / "nope"), str(sources.parent / "o")])
    assert err.value.code == 2 and "no such folder" in capsys.readouterr().err

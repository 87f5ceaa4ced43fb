"""Image loading, header sizes, resize-and-crop and augmentations, on images generated in tmp_path."""

from __future__ import annotations

import colorsys
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, features

from library.data import images
from library.data.bucketing import make_buckets
from library.data.images import (
    IMAGE_EXTENSIONS, RESIZE_INTERPOLATIONS, CorruptImageError, color_aug, crop_ltrb, flip_horizontal, image_size,
    load_image, resize_and_crop, resize_image, should_flip, verify_image,
)


def _halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: any rotation or flip is visible."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


def _noise(size, mode="RGB", seed=0) -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels if channels > 1 else pixels[..., 0], mode)


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test."""
    def refuse(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --- sizes and loading --------------------------------------------------------------------------------------------

def test_exif_rotated_jpeg_is_swapped_and_rotated(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display after turning 90 degrees clockwise
    _halves().save(path, exif=exif, quality=95)
    assert image_size(path) == (20, 40)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    pixels = np.asarray(loaded).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # the left (red) half is now on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60
    with Image.open(path) as reference:
        np.testing.assert_array_equal(pixels, np.asarray(ImageOps.exif_transpose(reference).convert("RGB")))


def test_image_size_reads_headers_only(tmp_path, no_decoding):
    exif = Image.Exif()
    exif[0x0112] = 8
    _halves().save(tmp_path / "a.png", exif=exif)
    _halves().save(tmp_path / "b.jpg", exif=exif)
    _halves().save(tmp_path / "c.webp")
    assert image_size(tmp_path / "a.png") == (20, 40)
    assert image_size(tmp_path / "b.jpg") == (20, 40)
    assert image_size(tmp_path / "c.webp") == (40, 20)


def test_png_orientation_agrees_between_size_and_load(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves().save(tmp_path / "r.png", exif=exif)
    assert load_image(tmp_path / "r.png").size == image_size(tmp_path / "r.png") == (20, 40)


def test_rgba_drops_alpha_without_compositing_like_sd_scripts(tmp_path):
    image = Image.new("RGBA", (4, 2), (10, 20, 30, 0))  # fully transparent but with a stored colour
    image.putpixel((3, 1), (200, 100, 50, 255))
    image.save(tmp_path / "a.png")
    rgb = np.asarray(load_image(tmp_path / "a.png"))
    assert rgb.shape == (2, 4, 3) and tuple(rgb[0, 0]) == (10, 20, 30) and tuple(rgb[1, 3]) == (200, 100, 50)
    rgba = np.asarray(load_image(tmp_path / "a.png", alpha=True))
    assert rgba.shape == (2, 4, 4) and rgba[0, 0, 3] == 0 and rgba[1, 3, 3] == 255


def test_grayscale_cmyk_and_palette_convert_as_pil_does(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert (np.asarray(load_image(tmp_path / "l.png")) == 77).all()
    assert load_image(tmp_path / "l.png", alpha=True).mode == "RGBA"

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    loaded = load_image(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as original:
        assert original.mode == "CMYK"
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(original.convert("RGB")))
    assert loaded.mode == "RGB" and np.asarray(loaded)[4, 4, 0] > 200

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[255, 0, 0], [0, 255, 0]]]
    assert np.asarray(load_image(tmp_path / "p.png", alpha=True)).tolist() == [[[255, 0, 0, 0], [0, 255, 0, 255]]]


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 100 * 257, 65535, 300]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
        assert np.asarray(raw.convert("RGB"))[0, :, 0].tolist() == [0, 255, 255, 255]  # what sd-scripts gets
    assert np.asarray(load_image(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 100, 255, 1]


@pytest.mark.parametrize("loader", [image_size, load_image])
def test_random_bytes_and_missing_files_are_corrupt(tmp_path, loader):
    junk = tmp_path / "junk.png"
    junk.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(2000)))
    with pytest.raises(CorruptImageError, match="junk.png") as err:
        loader(junk)
    assert err.value.path == str(junk) and err.value.reason
    with pytest.raises(CorruptImageError, match="missing.png"):
        loader(tmp_path / "missing.png")


def test_truncated_png_fails_to_load_but_its_header_still_has_a_size(tmp_path):
    full = tmp_path / "full.png"
    _noise((64, 64)).save(full)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert image_size(truncated) == (64, 64)
    with pytest.raises(CorruptImageError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(CorruptImageError, match="truncated.png"):
        verify_image(truncated)
    assert verify_image(full) is None


def test_huge_header_is_sized_without_decoding(tmp_path, monkeypatch, no_decoding):
    small = tmp_path / "small.png"
    Image.new("L", (1, 1)).save(small)
    data = bytearray(small.read_bytes())
    struct.pack_into(">II", data, 16, 20000, 20000)  # IHDR width/height, then fix its CRC
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    huge = tmp_path / "huge.png"
    huge.write_bytes(bytes(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89478485)  # PIL's default
    with pytest.raises(Image.DecompressionBombError):
        Image.open(huge)
    assert image_size(huge) == (20000, 20000)


def test_image_extensions_are_sd_scripts_plus_what_pil_opens(tmp_path):
    assert IMAGE_EXTENSIONS[:10] == (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP")
    assert (".avif" in IMAGE_EXTENSIONS) == features.check("avif")
    assert ".jxl" not in IMAGE_EXTENSIONS
    if ".avif" in IMAGE_EXTENSIONS:
        Image.new("RGB", (16, 8), (0, 128, 255)).save(tmp_path / "x.avif")
        assert image_size(tmp_path / "x.avif") == (16, 8) and load_image(tmp_path / "x.avif").size == (16, 8)


# --- resize and crop ----------------------------------------------------------------------------------------------

def _coordinates(width, height) -> Image.Image:
    """R = column, G = row: a crop's offset can be read off its first pixel."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def test_centre_crop_and_crop_ltrb():
    pixels, original, ltrb = resize_and_crop(_coordinates(101, 51), (64, 48), (101, 51), random_crop=False,
                                             rng=random.Random(0))
    assert pixels.shape == (48, 64, 3) and original == (101, 51)
    # Odd excess (37, 3): sd-scripts floors the half, so the extra pixel is cut on the right/bottom.
    assert pixels[0, :, 0].tolist() == list(range(18, 82)) and pixels[:, 0, 1].tolist() == list(range(1, 49))
    assert ltrb == (0, 7.0, 64, 7.0 + 64 / (101 / 51))  # fitted height 32.3 centred in 48, floored
    assert crop_ltrb((512, 512), (1000, 600)) == (0, 102.0, 512, 409.2)  # sd-scripts' get_crop_ltrb, fitted inside
    assert crop_ltrb((640, 384), (600, 1000)) == (204.0, 0, 434.4, 384)


def test_random_crop_is_drawn_from_the_rng_width_first():
    offsets = set()
    for seed in range(20):
        pixels, _, _ = resize_and_crop(_coordinates(101, 51), (64, 48), (101, 51), random_crop=True,
                                       rng=random.Random(seed))
        expected = random.Random(seed)
        assert (pixels[0, 0, 0], pixels[0, 0, 1]) == (expected.randint(0, 37), expected.randint(0, 3))
        offsets.add(int(pixels[0, 0, 0]))
    assert len(offsets) > 5


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (1000, 600), (50, 50), (2000, 100), (640, 384)])
def test_output_is_always_the_bucket_size(size):
    buckets = make_buckets((512, 512), enable_bucket=True)
    reso, resized, _ = buckets.select_bucket(*size)
    pixels, original, _ = resize_and_crop(_noise(size), reso, resized, random_crop=False, rng=random.Random(0))
    assert pixels.shape == (reso[1], reso[0], 3) and pixels.dtype == np.uint8 and original == size
    pixels[0, 0] = 0  # callers augment in place


def test_area_when_shrinking_lanczos_otherwise():
    source = _noise((90, 60))
    shrunk, _, _ = resize_and_crop(source, (60, 40), (60, 40), random_crop=False, rng=random.Random(0))
    np.testing.assert_array_equal(shrunk, resize_image(source, (60, 40), "area"))
    assert not np.array_equal(shrunk, np.asarray(source.resize((60, 40), Image.Resampling.LANCZOS)))
    for target in [(180, 120), (100, 50)]:  # enlarging, and one side growing
        grown, _, _ = resize_and_crop(source, target, target, random_crop=False, rng=random.Random(0))
        np.testing.assert_array_equal(grown, np.asarray(source.resize(target, Image.Resampling.LANCZOS)))


def _naive_area(pixels: np.ndarray, size) -> np.ndarray:
    """Every output pixel is the overlap-weighted mean of the source pixels under it, one at a time."""
    height, width = pixels.shape[:2]
    sx, sy = width / size[0], height / size[1]
    out = np.zeros((size[1], size[0], pixels.shape[2]))
    for oy in range(size[1]):
        for ox in range(size[0]):
            total = np.zeros(pixels.shape[2])
            for y in range(int(oy * sy), min(height, int(np.ceil((oy + 1) * sy)))):
                wy = min(y + 1, (oy + 1) * sy) - max(y, oy * sy)
                for x in range(int(ox * sx), min(width, int(np.ceil((ox + 1) * sx)))):
                    wx = min(x + 1, (ox + 1) * sx) - max(x, ox * sx)
                    total += pixels[y, x] * wx * wy
            out[oy, ox] = total / (sx * sy)
    return np.rint(out)


@pytest.mark.parametrize("source, target", [((23, 17), (7, 5)), ((40, 30), (20, 15)), ((64, 48), (27, 31)),
                                            ((5, 4), (13, 9))])
def test_area_equals_exact_pixel_area_averages(source, target):
    pixels = _noise(source)
    ours = resize_image(pixels, target, "area").astype(int)
    assert np.abs(ours - _naive_area(np.asarray(pixels).astype(float), target)).max() <= 1


def test_area_on_integer_factors_matches_pil_block_means():
    pixels = _noise((48, 36))
    ours = resize_image(pixels, (16, 12), "area").astype(int)
    assert np.abs(ours - np.asarray(pixels.reduce(3))).max() <= 1
    assert np.abs(ours - np.asarray(pixels.resize((16, 12), Image.Resampling.BOX))).max() <= 1


def test_opencv_linear_and_cubic_kernels():
    row = Image.fromarray(np.array([[[0] * 3, [100] * 3]], dtype=np.uint8))
    assert resize_image(row, (4, 1), "bilinear")[0, :, 0].tolist() == [0, 25, 75, 100]  # cv2.INTER_LINEAR
    step = Image.fromarray(np.array([[[0] * 3, [0] * 3, [100] * 3, [100] * 3]], dtype=np.uint8))
    # cv2.INTER_CUBIC (A = -0.75, no antialiasing): taps -0.09375, 0.59375, 0.59375, -0.09375 overshoot to 109.
    assert resize_image(step, (2, 1), "cubic")[0, :, 0].tolist() == [0, 109]
    source = _noise((40, 30))
    np.testing.assert_array_equal(resize_image(source, (20, 15), "linear"), resize_image(source, (20, 15), "area"))


def test_every_sd_scripts_interpolation_name_is_accepted():
    source = _noise((30, 20), "RGBA")
    for name in RESIZE_INTERPOLATIONS:
        for target in [(12, 8), (45, 30)]:
            assert resize_image(source, target, name).shape == (target[1], target[0], 4)
    np.testing.assert_array_equal(resize_image(source, (12, 8), "box"), np.asarray(source.resize((12, 8), Image.BOX)))
    np.testing.assert_array_equal(resize_image(source, (45, 30), "nearest"),
                                  np.asarray(source.resize((45, 30), Image.NEAREST)))
    with pytest.raises(ValueError, match="lanczos4"):
        resize_image(source, (12, 8), "lanczos4")


def test_rgba_keeps_its_alpha_channel_and_other_modes_are_refused():
    pixels, _, _ = resize_and_crop(Image.new("RGBA", (100, 80), (1, 2, 3, 255)), (64, 64), (80, 64),
                                   random_crop=False, rng=random.Random(0))
    assert pixels.shape == (64, 64, 4) and (pixels[..., 3] == 255).all()
    with pytest.raises(ValueError, match="mode L"):
        resize_and_crop(Image.new("L", (8, 8)), (8, 8), (8, 8), random_crop=False, rng=random.Random(0))


# --- augmentations ------------------------------------------------------------------------------------------------

def _seed_where(predicate) -> int:
    return next(seed for seed in range(1000) if predicate(random.Random(seed)))


def test_flip_draw_and_flip():
    assert [should_flip(random.Random(s)) for s in range(8)] == [random.Random(s).random() < 0.5 for s in range(8)]
    pixels = np.asarray(_coordinates(5, 2))
    flipped = flip_horizontal(pixels)
    assert flipped[0, :, 0].tolist() == [4, 3, 2, 1, 0] and flipped.flags.writeable


def test_color_aug_usually_does_nothing():
    seed = _seed_where(lambda r: r.random() > 0.33)
    pixels = np.asarray(_noise((8, 8)))
    out = color_aug(pixels, random.Random(seed))
    assert out is not pixels and np.array_equal(out, pixels)


def test_color_aug_consumes_draws_like_sd_scripts():
    # p 0.33 to augment (one draw), then a branch draw and one uniform(): the rng must end where sd-scripts' does.
    pixels = np.asarray(_noise((4, 4)))
    for seed in range(200):
        rng, reference = random.Random(seed), random.Random(seed)
        color_aug(pixels, rng)
        if reference.random() <= 0.33:
            reference.random(), reference.random()
        assert rng.random() == reference.random(), seed


def test_color_aug_gamma_is_on_raw_values_and_spares_alpha():
    seed = _seed_where(lambda r: r.random() <= 0.33 and r.random() <= 0.5)
    draws = random.Random(seed)
    draws.random(), draws.random()
    gamma = draws.uniform(0.95, 1.05)
    pixels = np.asarray(_noise((16, 16), "RGBA"))
    out = color_aug(pixels, random.Random(seed))
    expected = np.minimum(pixels[..., :3].astype(float) ** gamma, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., :3], expected)
    np.testing.assert_array_equal(out[..., 3], pixels[..., 3])


def test_color_aug_hue_shift_rotates_hue_of_the_pixels_read_as_bgr():
    seed = _seed_where(lambda r: r.random() <= 0.33 and r.random() > 0.5)
    draws = random.Random(seed)
    draws.random(), draws.random()
    shift = draws.uniform(-8, 8) % 180  # OpenCV hue units of 2 degrees
    pixels = np.array(_noise((32, 32), seed=3))
    pixels[0, 0] = (90, 90, 90)  # grey has no hue: unchanged
    out = color_aug(pixels, random.Random(seed)).astype(int)
    assert out[0, 0].tolist() == [90, 90, 90]
    # Independent expectation with colorsys: channel 0 is "blue" for OpenCV's BGR2HSV, as in sd-scripts.
    for y, x in [(3, 4), (10, 20), (31, 0), (17, 17)]:
        b, g, r = pixels[y, x] / 255.0
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        r2, g2, b2 = colorsys.hsv_to_rgb((h + shift * 2 / 360) % 1.0, s, v)
        assert np.abs(out[y, x] - np.array([b2, g2, r2]) * 255).max() <= 6


def test_hsv_conversion_matches_known_opencv_values():
    bgr = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 255], [128, 128, 128]]], dtype=np.uint8)
    hsv = images._bgr_to_hsv(bgr)
    assert hsv[0].tolist() == [[120, 255, 255], [60, 255, 255], [0, 255, 255], [30, 255, 255], [0, 0, 128]]
    np.testing.assert_array_equal(images._hsv_to_bgr(hsv), bgr)

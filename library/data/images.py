"""Training images: header-only sizes, robust loading, resize-and-crop into a bucket, flip and colour augmentation."""

from __future__ import annotations

import contextlib
import math
import random
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, features

Reso = tuple[int, int]  # (width, height)

# sd-scripts' train_util.IMAGE_EXTENSIONS; it adds .avif/.jxl only when a plugin is importable, we add .avif when
# this Pillow decodes it natively. No Pillow here opens .jxl without a third-party plugin, so it is not listed.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP",
) + ((".avif", ".AVIF") if features.check("avif") else ())

# Names accepted by sd-scripts' validate_interpolation_fn (--resize_interpolation, dataset `resize_interpolation`).
RESIZE_INTERPOLATIONS: tuple[str, ...] = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

# PIL refuses images above 2 x MAX_IMAGE_PIXELS (~179 Mpx) as decompression bombs, but training sets hold real scans
# and panoramas above that. We raise (never lower) the process-wide limit to 1 Gpx: a header claiming more than
# 2 Gpx still fails as a bomb instead of exhausting memory.
_TRAINING_MAX_PIXELS = 1 << 30

_ORIENTATION_TAG = 0x0112
# The table ImageOps.exif_transpose uses, applied by hand (see load_image for why).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class CorruptImageError(Exception):
    """An image file that cannot be identified or decoded. Callers decide: skip and report, or fail (--strict)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _allow_large_images() -> None:
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < _TRAINING_MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = _TRAINING_MAX_PIXELS


@contextlib.contextmanager
def _reading(path: str | Path) -> Iterator[None]:
    """Turn every way PIL reports a bad file into CorruptImageError(path, reason)."""
    _allow_large_images()
    try:
        yield
    except CorruptImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError) as err:
        reason = str(err) or type(err).__name__
        raise CorruptImageError(path, reason) from err


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1..8) from metadata already read with the header; 1 when absent or unreadable."""
    try:
        # Image.getexif, not PngImageFile.getexif: the PNG override decodes the whole file looking for an eXIf
        # chunk after the pixels; image_size cannot afford that, and load_image must agree with image_size.
        value = Image.Image.getexif(image).get(_ORIENTATION_TAG, 1)
    except Exception:  # EXIF is optional metadata: a broken block must not make a decodable image unusable.
        return 1
    return value if value in _TRANSPOSE else 1


def image_size(path: str | Path) -> Reso:
    """(width, height) as the image will be loaded (EXIF-rotated), from the header only; no pixels are decoded."""
    with _reading(path), Image.open(path) as image:
        width, height = image.size
        if _orientation(image) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def verify_image(path: str | Path) -> None:
    """Decode every pixel once, without converting, so truncated or damaged data is found before training."""
    with _reading(path), Image.open(path) as image:
        image.load()


def load_image(path: str | Path, *, alpha: bool = False) -> Image.Image:
    """Decode an image as RGB (RGBA with `alpha`), EXIF orientation applied.

    Conversion is sd-scripts' load_image: `.convert("RGB")`, which drops an alpha channel without compositing
    (transparent pixels keep whatever colour they store), maps palettes (P with transparency too) and CMYK with
    PIL's plain formulas; `.convert("RGBA")` when alpha masks are wanted. Two deliberate differences: sd-scripts
    ignores EXIF orientation (its sizes come from imagesize, which does not either) and its convert("RGB") clips
    16-bit greyscale at 255 (almost white); we scale 16-bit values to 8 bits instead.
    """
    with _reading(path), Image.open(path) as image:
        orientation = _orientation(image)
        image.load()
        converted = _convert(image, "RGBA" if alpha else "RGB")
    # Transposed by hand with exif_transpose's table and the header-only orientation, so the size always
    # matches image_size (exif_transpose could see an eXIf chunk stored after the pixels that image_size cannot).
    if orientation in _TRANSPOSE:
        converted = converted.transpose(_TRANSPOSE[orientation])
    return converted


def _convert(image: Image.Image, mode: str) -> Image.Image:
    # A PNG can only hold 16-bit integers, so a PNG opened as "I" (older Pillow) is 16-bit too.
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    # convert() always returns a new image, detached from the file that is about to close.
    return image.convert(mode)


def crop_ltrb(bucket_reso: Reso, original_size: Reso) -> tuple[float, float, float, float]:
    """sd-scripts' get_crop_ltrb: the image fitted *inside* the bucket, centred (SDXL crop conditioning).

    It ignores the actual (possibly random) crop; values are ints or floats exactly as sd-scripts computes them,
    and they are what its latent cache stores as `crop_ltrb`.
    """
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = original_size[0] / original_size[1]
    if bucket_ar > image_ar:
        resized_width, resized_height = bucket_reso[1] * image_ar, bucket_reso[1]
    else:
        resized_width, resized_height = bucket_reso[0], bucket_reso[0] / image_ar
    left = (bucket_reso[0] - resized_width) // 2
    top = (bucket_reso[1] - resized_height) // 2
    return left, top, left + resized_width, top + resized_height


def resize_and_crop(image: Image.Image, bucket_reso: Reso, resized_size: Reso, *, random_crop: bool,
                    rng: random.Random, interpolation: str | None = None) -> tuple[np.ndarray, Reso, tuple]:
    """sd-scripts' trim_and_resize_if_required: resize to `resized_size`, then crop to the bucket.

    Returns (uint8 HxWxC array of the bucket size, original (w, h), crop_ltrb). The crop is centred, or with
    `random_crop` drawn as rng.randint(0, excess), width first, then height (sd-scripts' draw order).
    """
    if image.mode not in ("RGB", "RGBA"):
        raise ValueError(f"resize_and_crop needs an RGB or RGBA image, got mode {image.mode}")
    original_size = image.size
    if tuple(resized_size) != original_size:
        array = resize_image(image, tuple(resized_size), interpolation)
    else:
        array = np.asarray(image)
    height, width = array.shape[:2]
    if width > bucket_reso[0]:
        excess = width - bucket_reso[0]
        left = rng.randint(0, excess) if random_crop else excess // 2
        array = array[:, left:left + bucket_reso[0]]
    if height > bucket_reso[1]:
        excess = height - bucket_reso[1]
        top = rng.randint(0, excess) if random_crop else excess // 2
        array = array[top:top + bucket_reso[1]]
    if array.shape[:2] != (bucket_reso[1], bucket_reso[0]):
        raise ValueError(f"resized size {resized_size} does not cover bucket {bucket_reso}")
    # A fresh writable array: callers augment it in place, as sd-scripts does.
    return np.array(array), original_size, crop_ltrb(bucket_reso, original_size)


def resize_image(image: Image.Image, size: Reso, interpolation: str | None = None) -> np.ndarray:
    """sd-scripts' utils.resize_image: default AREA when neither side grows, else LANCZOS; returns uint8 HxWxC.

    lanczos and box go through PIL as in sd-scripts (identical output), nearest through PIL's NEAREST (which
    OpenCV documents its INTER_NEAREST_EXACT to equal). area, linear and cubic are OpenCV filters in sd-scripts;
    we have no OpenCV, so they are written here with OpenCV's formulas and agree with it up to rounding (+-1).
    """
    width, height = image.size
    if interpolation is None:
        interpolation = "area" if width >= size[0] and height >= size[1] else "lanczos"
    if interpolation not in RESIZE_INTERPOLATIONS:
        raise ValueError(f"unknown resize interpolation {interpolation!r}; "
                         f"use one of {', '.join(RESIZE_INTERPOLATIONS)}")
    pil_filters = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
                   "nearest": Image.Resampling.NEAREST}
    if interpolation in pil_filters:
        return np.asarray(image.resize(size, resample=pil_filters[interpolation]))
    scale_x, scale_y = width / size[0], height / size[1]
    if interpolation in ("linear", "bilinear") and scale_x == scale_y == 2:
        interpolation = "area"  # cv2.resize switches an exact 2x INTER_LINEAR reduction to INTER_AREA
    if interpolation == "area":
        # cv2 averages exact pixel areas only when no side grows; otherwise it uses its area-linear weights.
        weights = _area_weights if scale_x >= 1 and scale_y >= 1 else _area_enlarge_weights
    elif interpolation in ("linear", "bilinear"):
        weights = _linear_weights
    else:
        weights = _cubic_weights
    return _resample(np.asarray(image), weights(height, size[1]), weights(width, size[0]))


AxisWeights = tuple[np.ndarray, np.ndarray]  # (source indices [n_out, taps], weights [n_out, taps])


def _area_weights(n_in: int, n_out: int) -> AxisWeights:
    # Output pixel i averages source interval [i*s, (i+1)*s), each source pixel weighted by its overlap.
    s = n_in / n_out
    start = np.arange(n_out) * s
    first = np.floor(start).astype(np.int64)
    index = first[:, None] + np.arange(math.ceil(s) + 1)[None, :]
    overlap = np.minimum(index + 1, start[:, None] + s) - np.maximum(index, start[:, None])
    return np.minimum(index, n_in - 1), np.clip(overlap, 0, None) / s


def _area_enlarge_weights(n_in: int, n_out: int) -> AxisWeights:
    # cv2 INTER_AREA when a side grows: nearest pixel, blended with the next where an output pixel straddles two.
    inv_scale = n_out / n_in
    dx = np.arange(n_out)
    sx = np.floor(dx * (n_in / n_out)).astype(np.int64)
    fx = ((dx + 1) - (sx + 1) * inv_scale).astype(np.float32)
    fx = np.where(fx <= 0, 0, fx - np.floor(fx))
    return _two_taps(sx, fx, n_in)


def _linear_weights(n_in: int, n_out: int) -> AxisWeights:
    # cv2 INTER_LINEAR: half-pixel centres, two taps, no antialiasing when shrinking, edges replicated.
    fx = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    return _two_taps(sx, fx - sx, n_in)


def _two_taps(sx: np.ndarray, fx: np.ndarray, n_in: int) -> AxisWeights:
    index = np.clip(np.stack([sx, sx + 1], axis=1), 0, n_in - 1)
    return index, np.stack([1 - fx, fx], axis=1)


def _cubic_weights(n_in: int, n_out: int) -> AxisWeights:
    # cv2 INTER_CUBIC: Keys kernel with A = -0.75 (PIL's BICUBIC uses -0.5 and antialiases), edges replicated.
    a = np.float32(-0.75)
    fx = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    x = (fx - sx).astype(np.float32)
    c0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    c1 = ((a + 2) * x - (a + 3)) * x * x + 1
    c2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
    index = np.clip(sx[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    return index, np.stack([c0, c1, c2, 1 - c0 - c1 - c2], axis=1)


def _resample(array: np.ndarray, rows: AxisWeights, cols: AxisWeights) -> np.ndarray:
    """Separable resampling written by hand because no installed library has OpenCV's area/linear/cubic filters."""
    index, weight = rows
    weight = weight.astype(np.float32)
    tall = np.zeros((index.shape[0],) + array.shape[1:], np.float32)
    # Gathering uint8 rows tap by tap keeps memory at one output-sized float buffer even for huge images.
    for tap in range(index.shape[1]):
        tall += array[index[:, tap]] * weight[:, tap, None, None]
    index, weight = cols
    weight = weight.astype(np.float32)
    out = np.zeros((tall.shape[0], index.shape[0]) + array.shape[2:], np.float32)
    for tap in range(index.shape[1]):
        out += tall[:, index[:, tap]] * weight[None, :, tap, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def should_flip(rng: random.Random) -> bool:
    """sd-scripts' flip_aug draw (`random.random() < 0.5`), made only for subsets with flip_aug on."""
    return rng.random() < 0.5


def flip_horizontal(array: np.ndarray) -> np.ndarray:
    return array[:, ::-1].copy()


def color_aug(array: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' AugHelper.color_aug on the RGB channels (alpha untouched); returns a new array.

    With p 0.33: half the time a hue shift of uniform(-8, 8) OpenCV hue units (2 degrees each), else
    `pixel ** uniform(0.95, 1.05)` on raw 0-255 values, not a normalised gamma: it brightens or darkens by up to
    ~25% and clips at 255. Draw order and arithmetic follow sd-scripts so the same rng gives the same image.
    """
    if not rng.random() <= 0.33:
        return array.copy()
    rgb = array[..., :3]
    if rng.random() > 0.5:
        shift = rng.uniform(-8, 8)
        if shift < 0:
            shift += 180
        hsv = _bgr_to_hsv(rgb)
        # float64 sum, modulo, then truncation on the store into uint8, as numpy does in sd-scripts.
        hsv[..., 0] = ((hsv[..., 0] + shift) % 180).astype(np.uint8)
        changed = _hsv_to_bgr(hsv)
    else:
        gamma = rng.uniform(0.95, 1.05)
        changed = np.clip(rgb.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    out = array.copy()
    out[..., :3] = changed
    return out


# sd-scripts hands RGB pixels to cv2.COLOR_BGR2HSV and back with COLOR_HSV2BGR, so channel 0 plays "blue" here too;
# the hue shift therefore turns the other way than on true RGB, which the symmetric draw makes equally likely.
_HSV_SHIFT = 12
_SDIV = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=np.int64)
_HDIV_180 = np.array([0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=np.int64)


def _bgr_to_hsv(bgr: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit BGR2HSV (hue 0..179) with its integer division tables, written out in numpy."""
    b, g, r = (bgr[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV_180[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def _hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV2BGR as its SIMD path computes it: float32 sectors, x255, truncated."""
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * (f32(6.0) / f32(180))
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    sector = np.trunc(h)
    h = h - sector
    tab = [v, v * (1 - s), v * (1 - s * h), v * (1 - s * (1 - h))]
    # (b, g, r) = tab[...] per sector 0..5, OpenCV's sector_data table.
    order = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
    sector = np.clip(sector.astype(np.int64), 0, 5)
    stacked = np.stack(tab, axis=-1)
    out = np.take_along_axis(stacked, order[sector], axis=-1) * f32(255.0)
    return np.clip(np.trunc(out), 0, 255).astype(np.uint8)


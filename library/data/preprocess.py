"""AUTOMATIC1111's "Preprocess images" (modules/textual_inversion/preprocess.py and autocrop.py, removed from the WebUI
in 1.8 but still used): fit-and-crop, splitting oversized images into overlapping tiles, focal-point crops, multicrop.

Re-derived from A1111's behaviour; two differences, both because we have no OpenCV: the corner points of the focal
crop come from a Shi-Tomasi detector written here (A1111 calls cv2.goodFeaturesToTrack with the same settings), and
faces count only when OpenCV is installed (its bundled Haar cascades; A1111 first downloads a YuNet model, which we
never do).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

LANCZOS = Image.Resampling.LANCZOS


def fill_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize mode 1 ("crop and resize"): scaled to cover width × height, then cut to it around the centre."""
    ratio, src_ratio = width / height, image.width / image.height
    if ratio > src_ratio:
        size = (width, image.height * width // image.width)
    else:
        size = (image.width * height // image.height, height)
    resized = image.resize(size, LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - size[0] // 2, height // 2 - size[1] // 2))
    return out


def split_ratio(image: Image.Image, width: int, height: int) -> tuple[float, bool]:
    """(how much shorter than the target the image's short side is, relative to its long side; whether it is wide).
    A1111 splits when this is below 1 and at most --split_threshold."""
    if image.height > image.width:
        return (image.width * height) / (image.height * width), False
    return (image.height * width) / (image.width * height), True


def split_tiles(image: Image.Image, wide: bool, width: int, height: int, overlap: float) -> Iterator[Image.Image]:
    """A1111's split_pic: scaled so the short side fits, then cut along the long side into tiles overlapping by
    about `overlap` of a tile, first and last flush with the ends."""
    from_w, from_h = (image.height, image.width) if wide else (image.width, image.height)
    to_w, to_h = (height, width) if wide else (width, height)
    long = from_h * to_w // from_w
    image = image.resize((long, to_w) if wide else (to_w, long), LANCZOS)
    count = math.ceil((long - to_h * overlap) / (to_h * (1.0 - overlap)))
    step = (long - to_h) / (count - 1) if count > 1 else 0
    for i in range(count):
        y = int(step * i)
        yield image.crop((y, 0, y + to_h, to_w)) if wide else image.crop((0, y, to_w, y + to_h))


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The largest centred region of the target's aspect ratio, resized (float box) to width × height."""
    iw, ih = image.size
    if ih / height < iw / width:
        sw = width * ih / height
        box = ((iw - sw) / 2, 0, iw - (iw - sw) / 2, ih)
    else:
        sh = height * iw / width
        box = (0, (ih - sh) / 2, iw, ih - (ih - sh) / 2)
    return image.resize((width, height), LANCZOS, box)


def multicrop_size(size: tuple[int, int], mindim: int, maxdim: int, minarea: int, maxarea: int, objective: str,
                   threshold: float) -> tuple[int, int] | None:
    """A1111's multicrop: the multiple-of-64 size within the dimension and area limits whose aspect ratio is within
    `threshold` of the image's, the largest area first ("Maximize area") or the smallest error ("Minimize error")."""
    iw, ih = size

    def error(w: int, h: int) -> float:
        x = iw / ih / (w / h)
        return 1 - (x if x < 1 else 1 / x)

    candidates = [(w, h) for w in range(mindim, maxdim + 1, 64) for h in range(mindim, maxdim + 1, 64)
                  if minarea <= w * h <= maxarea and error(w, h) <= threshold]
    if not candidates:
        return None
    if objective == "Maximize area":
        return max(candidates, key=lambda wh: (wh[0] * wh[1], -error(*wh)))
    return max(candidates, key=lambda wh: (-error(*wh), wh[0] * wh[1]))


# ---------------------------------------------------------------- focal-point crop (autocrop.py)

@dataclass(frozen=True)
class FocalSettings:
    width: int
    height: int
    face_weight: float = 0.9
    entropy_weight: float = 0.15
    edges_weight: float = 0.5
    debug: bool = False


def focal_crop(image: Image.Image, settings: FocalSettings) -> list[Image.Image]:
    """The crop centred (as far as the frame allows) on the weighted mean of the edge, entropy and face points,
    after scaling the image so its short side fits; with `debug`, also the scaled image with the crop drawn."""
    scale = _focal_scale(image.size, (settings.width, settings.height))
    image = image.resize((int(image.width * scale), int(image.height * scale)))
    x, y = focal_point(image, settings)
    x1 = min(max(x - settings.width // 2, 0), image.width - settings.width)
    y1 = min(max(y - settings.height // 2, 0), image.height - settings.height)
    box = (x1, y1, x1 + settings.width, y1 + settings.height)
    out = [image.crop(box)]
    if settings.debug:
        annotated = image.copy()
        ImageDraw.Draw(annotated).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline="#0F0")
        out.append(annotated)
    return out


def _focal_scale(size: tuple[int, int], crop: tuple[int, int]) -> float:
    (w, h), (cw, ch) = size, crop
    if w > h:
        return ch / h
    if h > w:
        return cw / w
    return cw / w if cw >= ch else ch / h


def focal_point(image: Image.Image, settings: FocalSettings) -> tuple[int, int]:
    """Centroids of each kind of point, averaged with the kinds' weights (kinds that found nothing left out)."""
    kinds = [(settings.edges_weight, corner_points), (settings.entropy_weight, entropy_points),
             (settings.face_weight, face_points)]
    found = [(weight, points) for weight, find in kinds if weight > 0 and (points := find(image, settings))]
    total = sum(weight for weight, _ in found)
    if not total:
        return image.width // 2, image.height // 2
    x = sum(weight / total * (sum(p[0] for p in pts) / len(pts)) for weight, pts in found)
    y = sum(weight / total * (sum(p[1] for p in pts) / len(pts)) for weight, pts in found)
    return round(x), round(y)


def corner_points(image: Image.Image, settings: FocalSettings | None = None, *, most: int = 100,
                  quality: float = 0.04) -> list[tuple[float, float]]:
    """Shi-Tomasi corners as cv2.goodFeaturesToTrack(maxCorners=100, qualityLevel=0.04, minDistance=6 % of the
    short side) finds them, on the greyscale image with its bottom tenth greyed out (A1111: watermarks)."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    grey = grey.copy()
    grey[int(image.height * 0.9):, :] = 0x99
    gy, gx = np.gradient(grey)
    # Structure tensor summed over 3×3 windows (OpenCV's default blockSize), smallest eigenvalue per pixel.
    xx, yy, xy = (_box3(a) for a in (gx * gx, gy * gy, gx * gy))
    response = (xx + yy) / 2 - np.sqrt(((xx - yy) / 2) ** 2 + xy ** 2)
    if response.max() <= 0:
        return []
    peak = response == _max3(response)
    ys, xs = np.nonzero(peak & (response >= quality * response.max()))
    order = np.argsort(-response[ys, xs], kind="stable")
    spacing = min(image.width, image.height) * 0.06
    kept: list[tuple[float, float]] = []
    for i in order:
        x, y = float(xs[i]), float(ys[i])
        if all((x - kx) ** 2 + (y - ky) ** 2 >= spacing ** 2 for kx, ky in kept):
            kept.append((x, y))
            if len(kept) == most:
                break
    return kept


def _box3(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, 1, mode="reflect")
    return sum(p[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3))


def _max3(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, 1, mode="constant", constant_values=-np.inf)
    return np.max([p[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3)], axis=0)


def entropy_points(image: Image.Image, settings: FocalSettings) -> list[tuple[float, float]]:
    """The centre of the crop-sized window, slid 4 px at a time along the long side, whose 1-bit image has the
    highest (A1111's) entropy; none for a square image."""
    if image.width == image.height:
        return []
    along = 0 if image.width > image.height else 1
    limit = image.size[along]
    box = [0, 0, settings.width, settings.height]
    best, best_box = 0.0, list(box)
    while box[along + 2] < limit:
        value = _entropy(image.crop(tuple(box)))
        if value > best:
            best, best_box = value, list(box)
        box[along] += 4
        box[along + 2] += 4
    return [(best_box[0] + settings.width / 2, best_box[1] + settings.height / 2)]


def _entropy(image: Image.Image) -> float:
    band = np.asarray(image.convert("1"), dtype=np.uint8)
    hist, _ = np.histogram(band, bins=range(0, 256))
    hist = hist[hist > 0]
    return float(-np.log2(hist / hist.sum()).sum())


def face_points(image: Image.Image, settings: FocalSettings) -> list[tuple[float, float]]:
    """Face centres from OpenCV's bundled Haar cascades (the first that finds any), when OpenCV is installed."""
    try:
        import cv2
    except ImportError:
        return []
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    for name, share in (("haarcascade_eye.xml", 0.01), ("haarcascade_frontalface_default.xml", 0.05),
                        ("haarcascade_profileface.xml", 0.05), ("haarcascade_frontalface_alt.xml", 0.05)):
        side = int(min(image.size) * share)
        faces = cv2.CascadeClassifier(cv2.data.haarcascades + name).detectMultiScale(
            grey, scaleFactor=1.1, minNeighbors=7, minSize=(side, side))
        if len(faces):
            return [(x + w / 2, y + h / 2) for x, y, w, h in faces]
    return []


def has_face_detector() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True

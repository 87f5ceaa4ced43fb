#!/usr/bin/env python
"""AUTOMATIC1111-style image preprocessing: every image of SRC resized and cropped to --width × --height into DST as
`<index>-<n>-<name>.png` (A1111's names), with flipped copies, oversized images split into overlapping tiles,
focal-point crops, multicrop, and captions copied, merged or taken from the file names.

    python tools/preprocess_images.py raw/ data/10_mychar --width 512 --height 512 --flip --split --focal_crop
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/preprocess_images.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageOps  # noqa: E402

from library.data import preprocess as pp  # noqa: E402
from library.data.prep import PrepRun, frequency_lines, list_images, sidecar, tag_counts, write_text  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402

CAPTION_ACTIONS = ("ignore", "copy", "prepend", "append")
OBJECTIVES = ("Maximize area", "Minimize error")
# A1111's [filewords]: leading numbers ("00012-0-") are not part of the name.
_LEADING_NUMBERS = re.compile(r"^[\d\-_ ]+")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder of source images")
    p.add_argument("dst", help="folder for the processed images (created; not the source folder)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--caption_action", choices=CAPTION_ACTIONS, default="ignore",
                   help="an existing caption file beside a source image: ignore it, copy it to every output, or put "
                        "it before/after the file-name caption (A1111's 'existing caption txt action')")
    p.add_argument("--caption_extension", default=".txt", help="caption files read and written (.txt)")
    p.add_argument("--caption_from_filename", action="store_true",
                   help="caption each output with its source file's name (leading numbers dropped, _ as spaces)")
    p.add_argument("--keep_original_size", action="store_true", help="save the image as it is (no resize)")
    p.add_argument("--flip", action="store_true", help="also save a mirrored copy of every output")
    p.add_argument("--split", action="store_true", help="split images much longer than the target into tiles")
    p.add_argument("--split_threshold", type=float, default=0.5,
                   help="split when the short/long ratio relative to the target's is at most this (0..1)")
    p.add_argument("--overlap_ratio", type=float, default=0.2, help="how much split tiles overlap (0..0.9)")
    p.add_argument("--focal_crop", action="store_true", help="crop non-square images around their focal point")
    p.add_argument("--focal_crop_face_weight", type=float, default=0.9,
                   help="weight of faces (needs OpenCV: pip install opencv-python-headless)")
    p.add_argument("--focal_crop_entropy_weight", type=float, default=0.15)
    p.add_argument("--focal_crop_edges_weight", type=float, default=0.5)
    p.add_argument("--focal_crop_debug", action="store_true", help="also save the image with the crop drawn")
    p.add_argument("--multicrop", action="store_true", help="one crop at the best multiple-of-64 size (A1111's "
                   "auto-sized crop)")
    p.add_argument("--multicrop_mindim", type=int, default=384)
    p.add_argument("--multicrop_maxdim", type=int, default=768)
    p.add_argument("--multicrop_minarea", type=int, default=64 * 64)
    p.add_argument("--multicrop_maxarea", type=int, default=640 * 640)
    p.add_argument("--multicrop_objective", choices=OBJECTIVES, default="Maximize area")
    p.add_argument("--multicrop_threshold", type=float, default=0.1)
    p.add_argument("--recursive", action="store_true", help="also the images in SRC's subfolders")
    p.add_argument("--overwrite", action="store_true", help="redo sources whose first output already exists")
    return p


@exit_on_user_error
def main(argv=None) -> PrepRun:
    args = _parser().parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    _check(args, src, dst)
    sources = list_images(src, recursive=args.recursive, flag="src")
    index = {path: i for i, path in enumerate(sources)}
    # A source is done when its first output exists: an interrupted run resumes at the next one.
    run = PrepRun("preprocess", sources, overwrite=args.overwrite,
                  outputs=lambda p: [dst / f"{index[p]:05}-0-{p.stem}.png"])
    dst.mkdir(parents=True, exist_ok=True)
    if args.focal_crop and args.focal_crop_face_weight > 0 and not pp.has_face_detector():
        print("note: --focal_crop finds faces only with OpenCV installed (pip install opencv-python-headless); "
              "edges and entropy decide the crop")
    captions: list[str] = []
    for source in run.progress():
        image = run.load(source)
        if image is None:
            continue
        caption = _caption(source, args)
        captions.append(caption)
        outputs = list(_outputs(image, args))
        for sub, out in enumerate(o for img in outputs for o in ([img, ImageOps.mirror(img)] if args.flip else [img])):
            _save(out, dst / f"{index[source]:05}-{sub}-{source.stem}.png", caption, args)
            run.written += 1
    print(run.summary(frequency_lines(tag_counts(captions), what="caption tags")))
    return run


def _check(args, src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        raise UserError(f"dst {dst}: the same folder as src; give another folder for the processed images")
    for name in ("width", "height"):
        if getattr(args, name) < 8:
            raise UserError(f"--{name} {getattr(args, name)}: give at least 8 pixels (e.g. 512)")
    if not 0 <= args.split_threshold <= 1 or not 0 <= args.overlap_ratio <= 0.9:
        raise UserError("--split_threshold must be within 0..1 and --overlap_ratio within 0..0.9")
    if args.multicrop and args.multicrop_mindim > args.multicrop_maxdim:
        raise UserError(f"--multicrop_mindim {args.multicrop_mindim} is above --multicrop_maxdim "
                        f"{args.multicrop_maxdim}")


def _outputs(image: Image.Image, args):
    """A1111's order: split tiles, focal crops, the multicrop, the original size; the plain fit-and-crop when none
    of them applied."""
    width, height = args.width, args.height
    done = False
    ratio, wide = pp.split_ratio(image, width, height)
    if args.split and ratio < 1.0 and ratio <= args.split_threshold:
        yield from pp.split_tiles(image, wide, width, height, args.overlap_ratio)
        done = True
    if args.focal_crop and image.height != image.width:
        settings = pp.FocalSettings(width, height, args.focal_crop_face_weight, args.focal_crop_entropy_weight,
                                    args.focal_crop_edges_weight, args.focal_crop_debug)
        yield from pp.focal_crop(image, settings)
        done = True
    if args.multicrop:
        size = pp.multicrop_size(image.size, args.multicrop_mindim, args.multicrop_maxdim, args.multicrop_minarea,
                                 args.multicrop_maxarea, args.multicrop_objective, args.multicrop_threshold)
        if size is None:
            print(f"skipped multicrop of a {image.width}x{image.height} image: no size within the error threshold")
        else:
            yield pp.center_crop(image, *size)
        done = True
    if args.keep_original_size:
        yield image
        done = True
    if not done:
        yield pp.fill_crop(image, width, height)


def _caption(source: Path, args) -> str:
    """The file-name caption (with --caption_from_filename) combined with the source's caption file per
    --caption_action."""
    caption = ""
    if args.caption_from_filename:
        caption = _LEADING_NUMBERS.sub("", source.stem).replace("_", " ").strip()
    existing_file = sidecar(source, args.caption_extension)
    existing = existing_file.read_text(encoding="utf-8").strip() if existing_file.is_file() else ""
    if existing and args.caption_action == "copy":
        caption = existing
    elif existing and args.caption_action == "prepend":
        caption = f"{existing} {caption}"
    elif existing and args.caption_action == "append":
        caption = f"{caption} {existing}"
    return caption.strip()


def _save(image: Image.Image, path: Path, caption: str, args) -> None:
    from library.safe_write import atomic_file

    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    if caption:
        write_text(sidecar(path, args.caption_extension), caption)


if __name__ == "__main__":
    main()

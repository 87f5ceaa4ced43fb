#!/usr/bin/env python
"""Assign fine-tuning images to aspect-ratio buckets and encode their latents ahead of training (sd-scripts'
finetune/prepare_buckets_latents.py).

    python tools/prepare_buckets_latents.py TRAIN_DATA_DIR IN_JSON OUT_JSON MODEL [--max_resolution 512,512] ...

For each image it writes, atomically:
  * `<key>.npz` in TRAIN_DATA_DIR (with --full_path beside the image): sd-scripts' layout — `latents`,
    `original_size`, `crop_ltrb`, `latents_flipped` (--flip_aug), `alpha_mask` (--alpha_mask) — which sd-scripts'
    fine-tuning dataset (fine_tune.py, sdxl_train.py --in_json) loads instead of encoding;
  * its entry in the latent cache beside the image (`<stem>_<W>x<H>_sd.npz`, SDXL `_sdxl.npz`) that our train_*.py
    --cache_latents_to_disk reuses: the same latents, with the key our cache checks (image file, bucket, model and
    precision, flip, mask), so training encodes nothing when it buckets the images as this run did (same
    --resolution, --enable_bucket and bucket settings, --flip_aug, --mixed_precision, model path);
and records each entry's bucket as `train_resolution` in OUT_JSON.

Images are bucketed exactly as our training buckets them (library/data/bucketing.py) and encoded by its latent cache,
so with the same --seed and --batch_size (= --vae_batch_size) the latents are bit for bit what training would cache.
A latent cache entry that is already current is reused, not encoded again; --skip_existing also keeps every
`<key>.npz` that already fits its bucket (sd-scripts' check). Unreadable images are reported, skipped and left out of
OUT_JSON (sd-scripts ignores every npz of a metadata file with an entry lacking train_resolution).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as `python tools/prepare_buckets_latents.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm.auto import tqdm  # noqa: E402

from library.data import finetune_metadata as fm  # noqa: E402
from library.data.bucketing import assign_buckets, make_buckets  # noqa: E402
from library.data.dataset import latent_request  # noqa: E402
from library.data.images import CorruptImageError, image_size  # noqa: E402
from library.data.latent_cache import LatentCache, LatentRequest  # noqa: E402
from library.data.prep import PrepRun, list_images, write_json  # noqa: E402
from library.data.specs import SubsetSpec  # noqa: E402
from library.data.subsets import ImageEntry  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402

TOOL = "prepare_buckets_latents"


@dataclass
class Prepared:
    """What a run did (returned by main for callers and tests)."""

    metadata: dict
    images: int = 0  # images found in train_data_dir
    requests: dict[str, LatentRequest] = field(default_factory=dict)  # key -> request, every readable image
    npz_files: dict[str, Path] = field(default_factory=dict)  # key -> its sd-scripts `<key>.npz`
    encoded: int = 0  # images the VAE encoded in this run
    written: int = 0  # `<key>.npz` files written
    skipped: list[str] = field(default_factory=list)  # --skip_existing: keys whose `<key>.npz` was kept
    kept_uncached: int = 0  # of those, how many have no current latent cache entry (training will encode them)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the training images")
    p.add_argument("in_json", help="metadata file to read (merge_captions_to_metadata.py writes one)")
    p.add_argument("out_json", help="metadata file to write, with each entry's train_resolution")
    p.add_argument("model_name_or_path", help="model whose VAE encodes the latents: .safetensors/.ckpt, diffusers "
                                              "folder, hub id, or tiny-sd1")
    p.add_argument("--v2", action="store_true", help="not used: the model's family is read from the model")
    p.add_argument("--batch_size", type=int, default=1, help="images per VAE call (training's --vae_batch_size)")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="accepted for sd-scripts command lines; images are decoded batch by batch in this process")
    p.add_argument("--max_resolution", default="512,512", help="training resolution WIDTH,HEIGHT (default 512,512)")
    p.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    p.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this (64)")
    p.add_argument("--bucket_no_upscale", action="store_true", help="a bucket per image size, never enlarging")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="VAE precision, as training's --mixed_precision sets it")
    p.add_argument("--full_path", action="store_true", help="metadata keys are image paths (as the merge tools' "
                                                             "--full_path wrote them), npz files beside the images")
    p.add_argument("--flip_aug", action="store_true", help="also encode the mirrored images (training's --flip_aug)")
    p.add_argument("--alpha_mask", nargs="?", const="true", default="",
                   help="store each image's alpha channel as its loss mask (sd-scripts takes a value: any but "
                        "''/false/0/no/off turns it on)")
    p.add_argument("--skip_existing", action="store_true",
                   help="keep each <key>.npz that already fits its bucket (a resumed run redoes only the rest)")
    p.add_argument("--recursive", action="store_true", help="look in the subfolders of TRAIN_DATA_DIR too")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the VAE's sampling noise (ours; training's --seed gives the same latents)")
    return p


@exit_on_user_error
def main(argv=None) -> Prepared:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: give 1 or more")
    alpha_mask = fm.flag_is_on(args.alpha_mask)
    buckets = make_buckets(_max_resolution(args.max_resolution), enable_bucket=True,
                           min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
                           bucket_reso_steps=args.bucket_reso_steps, bucket_no_upscale=args.bucket_no_upscale)
    metadata = fm.read_metadata(args.in_json)
    images = list_images(args.train_data_dir, recursive=args.recursive)
    if not images:
        raise UserError(f"train_data_dir {args.train_data_dir}: no images (.png, .jpg, .jpeg, .webp, .bmp)"
                        + ("" if args.recursive else "; add --recursive to look in its subfolders"))
    keys = fm.check_unique_keys(images, full_path=args.full_path)
    run = PrepRun(TOOL, images)
    sizes = _image_sizes(keys, run)
    print(f"found {len(images)} images; {len(sizes)} readable")
    if args.recursive and not args.full_path and any(p.parent != Path(args.train_data_dir) for p in images):
        print("warning: images in subfolders keyed by stem (no --full_path): sd-scripts finds them only through "
              "their npz files and train_*.py not at all; add --full_path (and to the merge tools)")
    vae, identity, stride, suffix, bucket_step = _load_vae(args)
    for note in _step_notes(args.bucket_reso_steps, bucket_step):
        print(f"warning: {note}")
    cache = LatentCache(to_disk=True, vae_identity=identity, latent_stride=stride, npz_suffix=suffix)
    assignment = assign_buckets(buckets, ((key, size, 1) for key, size in sizes.items()))
    subset = SubsetSpec(image_dir=str(args.train_data_dir), metadata_file=str(args.in_json), flip_aug=args.flip_aug,
                        alpha_mask=alpha_mask)
    result = Prepared(metadata, images=len(images), unreadable=run.corrupt)
    for key, size in sizes.items():
        choice = assignment.choices[key]
        entry = ImageEntry(keys[key], "", subset, False, 1)
        result.requests[key] = latent_request(entry, choice.reso, choice.resized_size, size)
        result.npz_files[key] = fm.sd_scripts_npz_path(args.train_data_dir, key, full_path=args.full_path,
                                                       recursive=args.recursive)
    todo = _todo(result, args, stride)
    result.kept_uncached = len(cache.missing(result.requests[k] for k in result.skipped))
    result.encoded = _encode(cache, [result.requests[k] for k in todo], vae, args, run)
    _write_npz_files(cache, result, todo)
    unreadable = set(keys) - set(sizes) | {k for k, r in result.requests.items() if r.image_path in cache.failed}
    _record(result, unreadable, assignment)
    write_json(Path(args.out_json), metadata)
    _print_summary(args, result, assignment)
    return result


def _max_resolution(text: str) -> tuple[int, int]:
    """--max_resolution "W,H" (or one number for a square), as training's --resolution reads it."""
    from library.config.dataset_config import parse_size

    size = parse_size(text)
    if size is None or min(size) < 1:
        raise UserError(f"--max_resolution {text!r}: give the size as WIDTH,HEIGHT (e.g. 512,512)")
    return size[0], size[1]


def _image_sizes(keys: dict[str, Path], run: PrepRun) -> dict[str, tuple[int, int]]:
    """key -> (width, height) as training sizes it (EXIF orientation applied, header only); unreadable ones reported."""
    sizes = {}
    for key, image in keys.items():
        try:
            sizes[key] = image_size(image)
        except CorruptImageError as err:
            _report_unreadable(run, image, err.reason)
    return sizes


def _report_unreadable(run: PrepRun, image, reason: str) -> None:
    run.corrupt.append((Path(image), reason))
    tqdm.write(f"skipped unreadable image {image}: {reason}", file=sys.stderr)


def _load_vae(args):
    """The model's VAE on the device in the precision training gives it; its cache identity, stride, file suffix."""
    import torch

    from library.models.loading import load_components
    from library.training.latents import vae_identity
    from library.training.loop import weight_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = weight_dtype(SimpleNamespace(mixed_precision=args.mixed_precision), device)
    parts = load_components(args.model_name_or_path, dtype=dtype)
    vae = parts.vae.to(device).eval()  # load_components gave it the dtype already
    # The same identity and stride train_*.py give their latent cache (library/training/latents.py), so the
    # entries written here are the ones training finds current.
    identity = vae_identity(parts.source, vae.dtype)
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae, identity, stride, parts.family.latent_cache_suffix, parts.family.bucket_step


def _step_notes(steps: int, family_step: int) -> list[str]:
    notes = []
    if steps % 8:
        notes.append(f"--bucket_reso_steps {steps} is not a multiple of 8: training rounds each bucket's latents "
                     "down to multiples of 8 pixels")
    if steps % family_step:
        notes.append(f"--bucket_reso_steps {steps}: train_*.py refuses steps that are not a multiple of "
                     f"{family_step} for this model; these buckets will not match training's")
    return notes


def _todo(result: Prepared, args, stride: int) -> list[str]:
    """The keys to prepare: all of them, or with --skip_existing those whose `<key>.npz` does not fit its bucket."""
    if not args.skip_existing:
        return list(result.requests)
    todo = []
    for key, request in result.requests.items():
        fits = fm.sd_scripts_npz_valid(result.npz_files[key], request.bucket_reso, flip_aug=request.flip_aug,
                                       alpha_mask=request.alpha_mask, stride=stride)
        (result.skipped if fits else todo).append(key)
    return todo


def _encode(cache: LatentCache, requests: list[LatentRequest], vae, args, run: PrepRun) -> int:
    """Encode the requests whose cache entry is absent or stale, as training's cache would (same batches, seeds)."""
    missing = cache.missing(requests)
    if not missing:
        return 0
    with tqdm(total=len(missing), desc=f"{TOOL}: encoding", disable=run.quiet) as bar:
        return cache.encode_missing(missing, vae, batch_size=args.batch_size, seed=args.seed, device=vae.device,
                                    dtype=vae.dtype, progress=bar.update,
                                    on_failure=lambda err: _report_unreadable(run, err.path, err.reason))


def _write_npz_files(cache: LatentCache, result: Prepared, todo: list[str]) -> None:
    """Each prepared image's sd-scripts `<key>.npz`, holding exactly the latents of its cache entry."""
    for key in todo:
        request = result.requests[key]
        if request.image_path in cache.failed:
            continue
        cached = cache.get(request)
        fm.write_sd_scripts_npz(result.npz_files[key], latents=cached.latents.numpy(),
                                original_size=request.original_size, crop_ltrb=request.crop_ltrb,
                                latents_flipped=None if cached.flipped is None else cached.flipped.numpy(),
                                alpha_mask=None if cached.alpha_mask is None else cached.alpha_mask.numpy())
        result.written += 1


def _record(result: Prepared, unreadable_keys: set[str], assignment) -> None:
    """train_resolution of every prepared entry; unreadable images leave the metadata (sd-scripts would otherwise
    ignore every npz of the file: it uses them only when all entries have a train_resolution)."""
    for key in unreadable_keys:
        result.metadata.pop(key, None)
    for key in result.requests:
        if key not in unreadable_keys:
            result.metadata.setdefault(key, {})["train_resolution"] = fm.train_resolution(assignment.choices[key].reso)


def _print_summary(args, result: Prepared, assignment) -> None:
    print(f"{TOOL}: {result.images} images: {result.written} prepared ({result.encoded} encoded, "
          f"{result.written - result.encoded} from the latent cache), {len(result.skipped)} kept (--skip_existing), "
          f"{len(result.unreadable)} unreadable (skipped, left out of {args.out_json})")
    for path, reason in result.unreadable[:10]:
        print(f"  unreadable: {path} ({reason})")
    if result.kept_uncached:
        print(f"  {result.kept_uncached} kept images have no current latent cache entry for train_*.py, which will "
              "encode them; run without --skip_existing to prepare them now")
    info = assignment.bucket_info()
    shown = ", ".join(f"{b['resolution'][0]}x{b['resolution'][1]}: {b['count']}" for b in info["buckets"].values())
    print(f"  buckets: {shown or 'none'}; mean aspect-ratio error {info['mean_img_ar_error']:.4f}")
    stale = [k for k, entry in result.metadata.items() if "train_resolution" not in entry]
    if stale:
        print(f"  {len(stale)} entries of {args.in_json} have no image in {args.train_data_dir} (e.g. '{stale[0]}'): "
              "sd-scripts uses no npz file while any entry lacks train_resolution; remove them or add the images")
    # The buckets travel in the metadata (train_resolution): training takes them from there, as sd-scripts does.
    print(f"  wrote {result.written} <key>.npz files and {args.out_json} ({len(result.metadata)} entries); train with "
          f"--in_json {args.out_json} --train_data_dir {args.train_data_dir}"
          + (" --flip_aug" if args.flip_aug else "") + " --cache_latents --cache_latents_to_disk")


if __name__ == "__main__":
    main()

"""VAE latent cache: encode prepared bucket images once; keep the latents in memory or in sd-scripts' `_sd.npz` files.

Latents are stored UNSCALED, exactly as `vae.encode(x).latent_dist.sample()` returns them: the training step multiplies
by the model family's `latent_scale` (`vae.config.scaling_factor`), as sd-scripts does, so its cache files and ours are
interchangeable.

On disk one file per image and original size sits beside the image (sd-scripts' naming), holding one entry per latent
size (`_<h>x<w>` key suffix, sd-scripts' multi-resolution layout):
    <stem>_<W:04d>x<H:04d>_sd.npz:  latents_<h>x<w>          float32 (4, h, w)
                                    original_size_<h>x<w>    int64 (W, H)
                                    crop_ltrb_<h>x<w>        int64 or float64 (L, T, R, B)
                                    latents_flipped_<h>x<w>  float32 (4, h, w)   only with flip_aug
                                    alpha_mask_<h>x<w>       float32 (H, W) in [0, 1]   only with alpha_mask
                                    sd_trainer_key_<h>x<w>   str: digest of everything the entry depends on (ours)
The in-memory cache keeps the same key -> array mapping in a dict, so both modes share every rule.

Each planned VAE batch samples from its own generator (`vae_batch_seed`), so encoding everything before training
(`encode_missing`) and encoding each batch when training first asks for one of its images (`plan_lazily`, then `get`)
store the same latents bit for bit, in any order and on any DDP rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from library.data.images import CorruptImageError
from library.errors import UserError
from library.safe_write import atomic_file

# sd-scripts' SdSdxlLatentsCachingStrategy.SD_LATENTS_NPZ_SUFFIX.
NPZ_SUFFIX = "_sd.npz"
OUR_KEY = "sd_trainer_key"
# Bump when the digest covers something new, so caches written before are re-encoded rather than trusted.
KEY_VERSION = 1
SD_LATENT_STRIDE = 8
_HASH_CHUNK = 1 << 20
# What np.load raises on an absent file or one cut short by a crash (sd-scripts writes its npz in place).
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


@dataclass(frozen=True)
class LatentRequest:
    """One image at one bucket: how to get its prepared pixels and everything its cached latents depend on.

    `load_pixels` returns the uint8 (h, w, 3 or 4) array already resized and cropped to `bucket_reso`; it is a
    callable so that checking the cache never decodes an image that is already cached. With `alpha_mask`, a 4th
    channel is the mask; without one the mask is all ones (sd-scripts' load_images_and_masks_for_caching).
    """

    image_path: Path
    bucket_reso: tuple[int, int]  # (w, h)
    original_size: tuple[int, int]  # (w, h) of the image file
    crop_ltrb: tuple[float, float, float, float]  # images.crop_ltrb: ints or floats, stored as np.array makes them
    load_pixels: Callable[[], np.ndarray]
    flip_aug: bool = False
    alpha_mask: bool = False
    # --masked_loss with conditioning_data_dir: the mask file the 4th channel comes from (part of the cache key)
    mask_path: Path | None = None


class CachedLatents(NamedTuple):
    latents: torch.Tensor  # float32 (4, h, w), unscaled
    flipped: torch.Tensor | None  # float32 (4, h, w): the VAE's encoding of the mirrored pixels
    alpha_mask: torch.Tensor | None  # float32 (H, W) in [0, 1], at pixel resolution


def npz_path(image_path: str | os.PathLike, original_size: tuple[int, int], suffix: str = NPZ_SUFFIX) -> Path:
    """sd-scripts' SdSdxlLatentsCachingStrategy.get_latents_npz_path: named by the image's ORIGINAL (w, h); the
    suffix is the model family's (`_sd.npz`, SDXL's `_sdxl.npz`)."""
    image_path = Path(image_path)
    w, h = original_size
    return image_path.with_name(f"{image_path.stem}_{w:04d}x{h:04d}{suffix}")


def key_suffix(bucket_reso: tuple[int, int], latent_stride: int = SD_LATENT_STRIDE) -> str:
    """`_<h>x<w>` of the latent size, as sd-scripts' _default_is_disk_cached_latents_expected(multi_resolution=True)."""
    w, h = bucket_reso
    return f"_{h // latent_stride}x{w // latent_stride}"


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (h, w, 3) -> float32 (3, h, w) in [-1, 1]: sd-scripts' IMAGE_TRANSFORMS (ToTensor, Normalize(0.5, 0.5))."""
    x = torch.tensor(pixels[:, :, :3]).permute(2, 0, 1).float()
    # Same operations in the same order as torchvision, so the values match bit for bit.
    return x.div(255).sub(0.5).div(0.5)


def alpha_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """float32 (h, w) in [0, 1] from a 4th channel, or all ones without one (sd-scripts' behaviour)."""
    if pixels.shape[2] == 4:
        return pixels[:, :, 3].astype(np.float32) / 255.0
    return np.ones(pixels.shape[:2], dtype=np.float32)


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Size, mtime_ns and sha1 of a file. The hash catches same-size rewrites within one timestamp tick or with a
    restored mtime (cp -p, unzip); it costs ~0.5 ms for a 0.6 MB PNG and ~1.4 ms for a 2 MB JPEG when the file is in
    the page cache, so huge datasets on slow disks should set skip_cache_check, as with sd-scripts."""
    stat = os.stat(path)
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha1": digest.hexdigest()}


def request_key(request: LatentRequest, vae_identity: str) -> str:
    """Digest of everything the cached entry depends on; any change means the entry is encoded again."""
    payload = {
        "version": KEY_VERSION,
        "image": file_fingerprint(request.image_path),
        "bucket_reso": list(request.bucket_reso),
        "original_size": list(request.original_size),
        "crop_ltrb": list(request.crop_ltrb),
        "flip_aug": bool(request.flip_aug),
        "alpha_mask": bool(request.alpha_mask),
        "vae": vae_identity,
    }
    if request.mask_path is not None:  # only then: the keys of entries without a mask file stay what they were
        payload["mask"] = file_fingerprint(request.mask_path)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_batches(requests: Iterable[LatentRequest], batch_size: int) -> list[list[LatentRequest]]:
    """Batches of at most `batch_size` sharing one bucket (tensor shape) and one flip setting, in first-seen order."""
    if batch_size < 1:
        raise UserError(f"vae_batch_size is {batch_size}; set it to 1 or more")
    groups: dict[tuple, list[LatentRequest]] = {}
    for request in requests:
        groups.setdefault((tuple(request.bucket_reso), bool(request.flip_aug)), []).append(request)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def vae_batch_seed(seed: int, batch: Sequence[LatentRequest]) -> int:
    """The seed of one planned VAE batch's generator, from the run seed and the batch's first image (file name, size,
    bucket, flip): a batch draws the same noise whenever it is encoded (before training or when first needed), on
    every DDP rank, and wherever the dataset folder is (a copy elsewhere trains the same). Two images of one name in
    two folders may share noise draws; the posterior's noise is tiny and that harms nothing."""
    first = batch[0]
    w, h = first.bucket_reso
    ow, oh = first.original_size
    name = Path(first.image_path).name
    return random.Random(f"{seed}/latents/{name}/{ow}x{oh}/{w}x{h}/{bool(first.flip_aug)}").getrandbits(63)


@contextlib.contextmanager
def channels_last(vae) -> Iterator[None]:
    """The VAE in channels_last while it encodes: oneDNN/cuDNN convolutions skip a layout reorder per layer (~15%
    faster VAE encodes on a CPU); contiguous again afterwards for training and sampling. Both the upfront and the lazy
    path encode this way, so their latents match bit for bit."""
    if not isinstance(vae, torch.nn.Module):  # a stand-in (tests) that only has encode()
        yield
        return
    vae.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        vae.to(memory_format=torch.contiguous_format)


def _identity(request: LatentRequest) -> tuple:
    """What makes two requests the same cache entry to encode (the dataset builds a new request object each time)."""
    return Path(request.image_path), tuple(request.bucket_reso), bool(request.flip_aug), bool(request.alpha_mask)


def _ignore_failure(err: CorruptImageError) -> None:
    """Lazy mode: a broken image is only remembered in `failed`; get() raises it to the dataset, which names it."""


@dataclass
class _LazyPlan:
    """What get() needs to encode a planned VAE batch the first time training asks for one of its images."""

    vae: object
    seed: int
    device: torch.device | str
    dtype: torch.dtype
    batches: list[list[LatentRequest]]
    keys: dict[int, str | None]  # id(request) -> its key (None where skip_check spared computing it)
    waiting: dict[tuple, int]  # _identity(request) -> index in `batches`, until that batch is encoded


class LatentCache:
    """Options `cache_latents` (memory), `cache_latents_to_disk` (to_disk), `skip_cache_check` (skip_check).

    `vae_identity` names the VAE and its precision (e.g. model path + dtype); it is part of every entry's key.
    `latent_stride` is the VAE's downscale factor (8 for SD and for the tiny models).
    """

    def __init__(self, *, to_disk: bool, vae_identity: str, skip_check: bool = False,
                 latent_stride: int = SD_LATENT_STRIDE, npz_suffix: str = NPZ_SUFFIX) -> None:
        self.to_disk = to_disk
        self.npz_suffix = npz_suffix
        self.vae_identity = vae_identity
        self.skip_check = skip_check
        self.latent_stride = latent_stride
        self._memory: dict[Path, dict[str, np.ndarray]] = {}
        # Images that could not be decoded while encoding (path -> reason): get() refuses them, nothing is stored.
        self.failed: dict[Path, str] = {}
        self.encoded = 0  # images this cache has encoded so far (both modes)
        self._lazy: _LazyPlan | None = None
        self._completed = False  # lazy encoding stored its last batch; just_completed() has not said so yet

    def missing(self, requests: Iterable[LatentRequest]) -> list[LatentRequest]:
        """The requests whose entry is absent or stale, in order."""
        return [request for request, _ in self._missing_with_keys(requests)]

    def encode_missing(self, requests: Iterable[LatentRequest], vae, *, batch_size: int, seed: int,
                       device: torch.device | str, dtype: torch.dtype,
                       progress: Callable[[int], None] | None = None,
                       on_failure: Callable[[CorruptImageError], None] | None = None) -> int:
        """Encode every absent or stale entry and store it; returns how many images were encoded.

        Each VAE call samples `latent_dist` once (sd-scripts samples, it does not take the mean) from its batch's own
        generator (`vae_batch_seed`); with flip_aug the mirrored batch is encoded right after its batch, drawing the
        next noise from the same generator. `progress` (e.g. tqdm's update) is called with the size of each finished
        batch. An image that cannot be decoded raises CorruptImageError, or with `on_failure` is left out of its
        batch, remembered in `failed` and passed to `on_failure` (which may raise to stop).
        """
        todo = self._missing_with_keys(requests)
        keys = {id(request): key for request, key in todo}
        encoded = 0
        with channels_last(vae):
            for batch in plan_batches([request for request, _ in todo], batch_size):
                encoded += self._encode_planned(batch, keys, vae, seed, device, dtype, on_failure)
                if progress is not None:
                    progress(len(batch))
        return encoded

    def plan_lazily(self, requests: Iterable[LatentRequest], vae, *, batch_size: int, seed: int,
                    device: torch.device | str, dtype: torch.dtype) -> int:
        """Plan the VAE batches of every absent or stale entry as encode_missing would, but encode none: get() of a
        planned request encodes its whole batch (in the calling process, which must hold the VAE). Returns how many
        images wait; with none, the cache is complete and keeps no VAE."""
        todo = self._missing_with_keys(requests)
        batches = plan_batches([request for request, _ in todo], batch_size)
        waiting = {_identity(request): index for index, batch in enumerate(batches) for request in batch}
        self._lazy = _LazyPlan(vae, seed, device, dtype, batches, {id(r): key for r, key in todo},
                               waiting) if waiting else None
        return len(waiting)

    @property
    def waiting(self) -> int:
        """Images planned by plan_lazily and not encoded yet; 0 once every planned batch is stored."""
        return len(self._lazy.waiting) if self._lazy is not None else 0

    def just_completed(self) -> bool:
        """True once: at the first call after lazy encoding stored its last planned batch (the VAE may go now)."""
        completed, self._completed = self._completed, False
        return completed

    def _encode_planned(self, batch: Sequence[LatentRequest], keys: Mapping[int, str | None], vae, seed: int, device,
                        dtype, on_failure: Callable[[CorruptImageError], None] | None) -> int:
        """Encode one planned batch with its own generator; store each readable image; how many were encoded."""
        loaded = self._load_batch(batch, on_failure)
        if not loaded:
            return 0
        readable = [request for request, _ in loaded]
        # Seeded by the planned batch (broken images included), so leaving one out changes no other batch's noise.
        generator = torch.Generator(device).manual_seed(vae_batch_seed(seed, batch))
        arrays_list = self._encode_batch(readable, [pixels for _, pixels in loaded], vae, generator, device, dtype)
        for request, arrays in zip(readable, arrays_list):
            arrays[OUR_KEY + self._suffix(request)] = np.array(keys[id(request)] or self._key(request))
            self._store(request, arrays)
            self.failed.pop(Path(request.image_path), None)  # fixed since an earlier call
        self.encoded += len(readable)
        return len(readable)

    def _encode_waiting(self, request: LatentRequest) -> None:
        """Lazy mode: encode the planned batch holding `request`, unless it is stored already."""
        plan = self._lazy
        index = plan.waiting.get(_identity(request))
        if index is None:
            return
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("latents planned lazily must be encoded in the main process: the DataLoader of such a "
                               "cache runs without workers (see library/training/latents.py loader_workers)")
        batch = plan.batches[index]
        with channels_last(plan.vae):
            self._encode_planned(batch, plan.keys, plan.vae, plan.seed, plan.device, plan.dtype, _ignore_failure)
        for member in batch:
            plan.waiting.pop(_identity(member), None)
        if not plan.waiting:
            # Drop the VAE and the plan at once: the caller releases the VAE after its step (just_completed).
            self._lazy, self._completed = None, True

    def _load_batch(self, batch: Sequence[LatentRequest],
                    on_failure: Callable[[CorruptImageError], None] | None) -> list[tuple[LatentRequest, np.ndarray]]:
        loaded = []
        for request in batch:
            try:
                loaded.append((request, _checked_pixels(request)))
            except CorruptImageError as err:
                if on_failure is None:
                    raise
                self.failed[Path(request.image_path)] = err.reason
                on_failure(err)
        return loaded

    def get(self, request: LatentRequest) -> CachedLatents:
        """The cached entry of `request` (call encode_missing first, or plan_lazily: then its batch is encoded now if
        it was not yet); float32 copies the caller may modify. A broken image raises CorruptImageError."""
        if self._lazy is not None:
            self._encode_waiting(request)
        if Path(request.image_path) in self.failed:
            raise CorruptImageError(request.image_path, self.failed[Path(request.image_path)])
        sfx = self._suffix(request)
        with self._entries(request) as entries:
            if entries is None or f"latents{sfx}" not in entries:
                raise KeyError(f"no cached latents{sfx} for {request.image_path}; call encode_missing first")
            flipped = torch.tensor(entries[f"latents_flipped{sfx}"]) if request.flip_aug else None
            alpha = torch.tensor(entries[f"alpha_mask{sfx}"]) if request.alpha_mask else None
            return CachedLatents(torch.tensor(entries[f"latents{sfx}"]), flipped, alpha)

    def _suffix(self, request: LatentRequest) -> str:
        return key_suffix(request.bucket_reso, self.latent_stride)

    def _key(self, request: LatentRequest) -> str:
        return request_key(request, self.vae_identity)

    def _missing_with_keys(self, requests: Iterable[LatentRequest]) -> list[tuple[LatentRequest, str | None]]:
        """(request, its key) for each request to encode; the key is None where skip_check spared computing it."""
        todo = []
        seen = set()
        for request in requests:
            # The same image listed twice (two subsets of one folder) is one entry: encoded once, by one batch.
            if _identity(request) in seen:
                continue
            seen.add(_identity(request))
            try:
                key = None if self.skip_check else self._key(request)
            except OSError:  # the image went away or cannot be read: encoding it reports that, as a decode failure
                todo.append((request, None))
                continue
            if not self._is_cached(request, key):
                todo.append((request, key))
        return todo

    def _is_cached(self, request: LatentRequest, key: str | None) -> bool:
        """sd-scripts' checks (the entry's keys exist, flipped/alpha when asked), then ours: the stored key matches."""
        sfx = self._suffix(request)
        needed = [f"latents{sfx}"]
        needed += [f"latents_flipped{sfx}"] if request.flip_aug else []
        needed += [f"alpha_mask{sfx}"] if request.alpha_mask else []
        try:
            with self._entries(request) as entries:
                if entries is None or any(name not in entries for name in needed):
                    return False
                if key is None:  # skip_cache_check: trust any entry of the right latent size
                    return True
                return OUR_KEY + sfx in entries and entries[OUR_KEY + sfx].item() == key
        except _READ_ERRORS:
            return False

    def _encode_batch(self, batch: Sequence[LatentRequest], pixels: Sequence[np.ndarray], vae, generator, device,
                      dtype) -> list[dict]:
        """Encode one batch of prepared pixels (and its mirror with flip_aug); the arrays to store for each request."""
        x = torch.stack([pixels_to_tensor(p) for p in pixels]).to(device=device, dtype=dtype)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator=generator).float().cpu()
            flipped = None
            if batch[0].flip_aug:  # plan_batches keeps flip settings apart
                flipped = vae.encode(torch.flip(x, dims=[3])).latent_dist.sample(generator=generator).float().cpu()
        self._check_latents(batch, latents, flipped, dtype)
        out = []
        for i, (request, image) in enumerate(zip(batch, pixels)):
            sfx = self._suffix(request)
            arrays = {
                f"latents{sfx}": latents[i].numpy(),
                f"original_size{sfx}": np.array(request.original_size),
                f"crop_ltrb{sfx}": np.array(request.crop_ltrb),
            }
            if flipped is not None:
                arrays[f"latents_flipped{sfx}"] = flipped[i].numpy()
            if request.alpha_mask:
                arrays[f"alpha_mask{sfx}"] = alpha_from_pixels(image)
            out.append(arrays)
        return out

    def _check_latents(self, batch, latents: torch.Tensor, flipped: torch.Tensor | None, dtype) -> None:
        w, h = batch[0].bucket_reso
        expected = (h // self.latent_stride, w // self.latent_stride)
        if tuple(latents.shape[-2:]) != expected:
            raise ValueError(f"VAE gave latents {tuple(latents.shape[-2:])} for bucket {(w, h)}, expected {expected}: "
                             f"latent_stride {self.latent_stride} does not match this VAE")
        for i, request in enumerate(batch):
            if torch.isnan(latents[i]).any() or (flipped is not None and torch.isnan(flipped[i]).any()):
                raise UserError(f"the VAE produced NaN latents for {request.image_path} in {dtype}; "
                                "run the VAE in float32 (--no_half_vae) or use a VAE that is stable in half precision")

    def _store(self, request: LatentRequest, arrays: dict[str, np.ndarray]) -> None:
        """Replace this latent size's entry; keep the file's other sizes (sd-scripts' save_latents_to_disk merges)."""
        sfx = self._suffix(request)
        path = npz_path(request.image_path, request.original_size, self.npz_suffix)
        if not self.to_disk:
            kept = self._memory.get(path, {})
            self._memory[path] = {k: v for k, v in kept.items() if not k.endswith(sfx)} | arrays
            return
        kept = {k: v for k, v in _read_all(path).items() if not k.endswith(sfx)}
        with atomic_file(path) as tmp:
            # A file object, not a name: np.savez would append ".npz" to the temporary name.
            with open(tmp, "wb") as f:
                np.savez(f, **(kept | arrays))

    @contextlib.contextmanager
    def _entries(self, request: LatentRequest) -> Iterator[Mapping[str, np.ndarray] | None]:
        """The stored key -> array mapping of the request's npz (lazily read on disk), or None."""
        path = npz_path(request.image_path, request.original_size, self.npz_suffix)
        if not self.to_disk:
            yield self._memory.get(path)
            return
        try:
            npz = np.load(path, allow_pickle=False)
        except _READ_ERRORS:
            npz = None
        if npz is None:
            yield None
            return
        with npz:
            yield npz


def _checked_pixels(request: LatentRequest) -> np.ndarray:
    pixels = request.load_pixels()
    w, h = request.bucket_reso
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[:2] != (h, w) or pixels.shape[2] not in (3, 4):
        raise ValueError(f"{request.image_path}: prepared pixels are {pixels.dtype} {pixels.shape}, "
                         f"expected uint8 ({h}, {w}, 3 or 4) for bucket {(w, h)}")
    return pixels


def _read_all(path: Path) -> dict[str, np.ndarray]:
    """Every array of an existing npz; an unreadable file counts as empty, it is about to be replaced."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except _READ_ERRORS:
        return {}

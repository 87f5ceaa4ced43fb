"""Latent cache: sd-scripts file layout, re-encoding exactly what changed, flip/alpha, batching, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import latent_cache
from library.data.latent_cache import (
    LatentCache, LatentRequest, key_suffix, npz_path, pixels_to_tensor, plan_batches, vae_batch_seed,
)
from library.errors import UserError

STRIDE = 8  # the tiny VAE has SD's four levels: three 2x downsamples
VAE_ID = "tiny-sd1/vae float32"


class CountingVAE:
    """The real tiny VAE, recording the input shape of every encode call."""

    def __init__(self, vae):
        self.vae = vae
        self.calls: list[tuple[int, ...]] = []

    def encode(self, x):
        self.calls.append(tuple(x.shape))
        return self.vae.encode(x)


@pytest.fixture
def vae(tiny_parts):
    return CountingVAE(tiny_parts["tiny-sd1"].vae)


def write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


def request(path: Path, *, bucket=None, crop=None, flip=False, alpha=False) -> LatentRequest:
    """A request whose pixels are the image resized to the bucket (the real resize/crop lives elsewhere)."""
    with Image.open(path) as image:
        size = image.size
    bucket = bucket or size
    mode = "RGBA" if alpha else "RGB"

    def load():
        with Image.open(path) as image:
            return np.asarray(image.convert(mode).resize(bucket))

    return LatentRequest(path, bucket, size, crop or (0, 0, *size), load, flip_aug=flip, alpha_mask=alpha)


def new_cache(to_disk=True, **kwargs) -> LatentCache:
    return LatentCache(to_disk=to_disk, vae_identity=kwargs.pop("vae_identity", VAE_ID), latent_stride=STRIDE, **kwargs)


def encode(cache: LatentCache, requests, vae, *, batch_size=2, seed=0) -> int:
    return cache.encode_missing(requests, vae, batch_size=batch_size, seed=seed, device="cpu", dtype=torch.float32)


def expected_latents(vae, requests, seed=0, flip=False):
    """What sd-scripts computes for one batch: sample once, then the mirrored batch from the same generator (the
    batch's own, seeded from the run seed and its first image)."""
    generator = torch.Generator().manual_seed(vae_batch_seed(seed, requests))
    x = torch.stack([pixels_to_tensor(r.load_pixels()) for r in requests])
    with torch.no_grad():
        plain = vae.encode(x).latent_dist.sample(generator=generator)
        mirrored = vae.encode(torch.flip(x, dims=[3])).latent_dist.sample(generator=generator) if flip else None
    return plain, mirrored


@pytest.fixture
def images(tmp_path):
    """Three PNGs: two 32x32 (one bucket) and one 48x32."""
    return [write_image(tmp_path / "a.png", (32, 32), 1), write_image(tmp_path / "b.png", (32, 32), 2),
            write_image(tmp_path / "c.png", (48, 32), 3)]


def test_names_and_keys_match_sd_scripts(images, vae):
    # Pinned against sd-scripts' SdSdxlLatentsCachingStrategy / LatentsCachingStrategy.save_latents_to_disk.
    assert npz_path("/data/img.png", (640, 480)) == Path("/data/img_0640x0480_sd.npz")
    assert key_suffix((640, 480)) == "_60x80"  # latent HxW for SD's stride 8
    encode(new_cache(), [request(images[2], flip=True, alpha=True)], vae)
    with np.load(images[2].with_name("c_0048x0032_sd.npz")) as npz:
        arrays = {name: npz[name] for name in npz.files}
    assert sorted(arrays) == ["alpha_mask_4x6", "crop_ltrb_4x6", "latents_4x6", "latents_flipped_4x6",
                              "original_size_4x6", "sd_trainer_key_4x6"]
    assert arrays["latents_4x6"].dtype == np.float32 and arrays["latents_4x6"].shape == (4, 4, 6)
    assert arrays["latents_flipped_4x6"].dtype == np.float32 and arrays["latents_flipped_4x6"].shape == (4, 4, 6)
    assert arrays["alpha_mask_4x6"].dtype == np.float32 and arrays["alpha_mask_4x6"].shape == (32, 48)
    assert arrays["original_size_4x6"].tolist() == [48, 32] and arrays["original_size_4x6"].dtype == np.int64
    assert arrays["crop_ltrb_4x6"].tolist() == [0, 0, 48, 32] and arrays["crop_ltrb_4x6"].dtype == np.int64


def test_pixels_normalised_like_sd_scripts_image_transforms():
    pixels = np.array([[[0, 128, 255]]], dtype=np.uint8)
    expected = torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0])
    assert torch.allclose(pixels_to_tensor(pixels)[:, 0, 0], expected, atol=1e-7)


@pytest.mark.parametrize("to_disk", [True, False])
def test_round_trip_gives_the_unscaled_sampled_latents(images, vae, to_disk):
    requests = [request(p) for p in images[:2]]  # one batch of two
    cache = new_cache(to_disk)
    assert encode(cache, requests, vae) == 2
    plain, _ = expected_latents(vae.vae, requests)
    reloaded = new_cache(to_disk) if to_disk else cache  # on disk a fresh cache reads the files back
    for i, r in enumerate(requests):
        got = reloaded.get(r)
        assert torch.equal(got.latents, plain[i])
        assert got.flipped is None and got.alpha_mask is None


@pytest.mark.parametrize("to_disk", [True, False])
def test_second_run_encodes_nothing(images, vae, to_disk):
    cache = new_cache(to_disk)
    encode(cache, [request(p) for p in images], vae)
    vae.calls.clear()
    again = new_cache() if to_disk else cache
    assert again.missing([request(p) for p in images]) == []
    assert encode(again, [request(p) for p in images], vae) == 0
    assert vae.calls == []


def _npz_mtimes(images):
    return {p: npz_path(p, Image.open(p).size).stat().st_mtime_ns for p in images}


def test_touching_an_image_re_encodes_only_that_image(images, vae):
    encode(new_cache(), [request(p) for p in images], vae)
    before = _npz_mtimes(images)
    stat = images[0].stat()
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert [r.image_path for r in new_cache().missing([request(p) for p in images])] == [images[0]]
    assert encode(new_cache(), [request(p) for p in images], vae) == 1
    after = _npz_mtimes(images)
    assert [p for p in images if after[p] != before[p]] == [images[0]]


def test_growing_an_image_re_encodes_it(images, vae):
    encode(new_cache(), [request(p) for p in images], vae)
    with open(images[1], "ab") as f:  # trailing bytes after IEND: a different file, the same picture
        f.write(b"\0" * 16)
    assert [r.image_path for r in new_cache().missing([request(p) for p in images])] == [images[1]]


def test_same_size_same_mtime_new_content_is_re_encoded(tmp_path, vae):
    # BMP size depends only on the dimensions, so only the content hash can see this change.
    path = write_image(tmp_path / "d.bmp", (32, 32), 4)
    encode(new_cache(), [request(path)], vae)
    stat = path.stat()
    write_image(path, (32, 32), 5)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    cache = new_cache()
    assert encode(cache, [request(path)], vae) == 1
    plain, _ = expected_latents(vae.vae, [request(path)])
    assert torch.equal(cache.get(request(path)).latents, plain[0])


def test_changed_settings_re_encode_exactly_that_entry(images, vae):
    base = [request(p) for p in images]
    encode(new_cache(), base, vae)
    changed = {
        "crop": request(images[0], crop=(1, 0, 33, 32)),
        "flip": request(images[1], flip=True),
        "bucket": request(images[2], bucket=(32, 32)),
    }
    for index, (name, new) in enumerate(changed.items()):
        requests = base[:index] + [new] + base[index + 1:]
        assert new_cache().missing(requests) == [new], name
    assert new_cache(vae_identity="tiny-sd1/vae float16").missing(base) == base


def test_a_new_bucket_adds_an_entry_and_keeps_the_other(images, vae):
    encode(new_cache(), [request(images[2])], vae)
    encode(new_cache(), [request(images[2], bucket=(32, 32))], vae)
    with np.load(npz_path(images[2], (48, 32))) as npz:
        assert {"latents_4x6", "latents_4x4", "sd_trainer_key_4x6", "sd_trainer_key_4x4"} <= set(npz.files)
    assert new_cache().missing([request(images[2]), request(images[2], bucket=(32, 32))]) == []


def test_flip_turned_off_drops_the_stale_flipped_latents(images, vae):
    encode(new_cache(), [request(images[0], flip=True)], vae)
    assert encode(new_cache(), [request(images[0])], vae) == 1
    with np.load(npz_path(images[0], (32, 32))) as npz:
        assert "latents_flipped_4x4" not in npz.files


def _write_sd_scripts_file(image: Path, latents: np.ndarray) -> Path:
    """An npz as sd-scripts' save_latents_to_disk writes it: its keys, none of ours."""
    path = npz_path(image, (32, 32))
    np.savez(path, latents_4x4=latents, original_size_4x4=np.array([32, 32]),
             crop_ltrb_4x4=np.array([0, 0, 32, 32]))
    return path


def test_a_file_without_our_key_is_re_encoded(images, vae):
    foreign = np.zeros((4, 4, 4), dtype=np.float32)
    path = _write_sd_scripts_file(images[0], foreign)
    cache = new_cache()
    assert encode(cache, [request(images[0])], vae) == 1
    with np.load(path) as npz:
        assert "sd_trainer_key_4x4" in npz.files
    assert not torch.equal(cache.get(request(images[0])).latents, torch.from_numpy(foreign))


def test_skip_cache_check_trusts_existing_entries(images, vae):
    foreign = np.full((4, 4, 4), 0.5, dtype=np.float32)
    _write_sd_scripts_file(images[0], foreign)
    cache = new_cache(skip_check=True)
    assert encode(cache, [request(images[0]), request(images[1])], vae) == 1  # only b.png had no file
    assert torch.equal(cache.get(request(images[0])).latents, torch.from_numpy(foreign))
    stat = images[1].stat()
    os.utime(images[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert new_cache(skip_check=True).missing([request(images[1])]) == []
    # The right latent size is still required: a new bucket is a new entry.
    assert len(new_cache(skip_check=True).missing([request(images[0], bucket=(16, 16))])) == 1


def test_a_truncated_file_is_re_encoded(images, vae):
    encode(new_cache(), [request(images[0])], vae)
    path = npz_path(images[0], (32, 32))
    path.write_bytes(path.read_bytes()[:100])
    assert encode(new_cache(), [request(images[0])], vae) == 1
    assert new_cache().missing([request(images[0])]) == []


def test_flipped_latents_are_the_encoding_of_the_mirrored_pixels(images, vae):
    # sd-scripts' _default_cache_batch_latents: encode+sample the batch, then encode+sample the mirrored batch with the
    # generator where the first sample left it. So the flipped latents are not the mirrored latents.
    requests = [request(p, flip=True) for p in images[:2]]
    cache = new_cache()
    encode(cache, requests, vae, seed=7)
    plain, mirrored = expected_latents(vae.vae, requests, seed=7, flip=True)
    for i, r in enumerate(requests):
        got = cache.get(r)
        assert torch.equal(got.latents, plain[i]) and torch.equal(got.flipped, mirrored[i])
        assert not torch.allclose(got.flipped, torch.flip(got.latents, dims=[2]), atol=1e-3)


def test_alpha_mask_from_the_fourth_channel_or_ones(tmp_path, vae):
    rgba = write_image(tmp_path / "m.png", (32, 32), 6, mode="RGBA")
    rgb = write_image(tmp_path / "n.png", (32, 32), 7)
    cache = new_cache(to_disk=False)
    encode(cache, [request(rgba, alpha=True), request(rgb, alpha=True)], vae)
    alpha = np.asarray(Image.open(rgba))[:, :, 3].astype(np.float32) / 255
    assert torch.equal(cache.get(request(rgba, alpha=True)).alpha_mask, torch.from_numpy(alpha))
    assert torch.equal(cache.get(request(rgb, alpha=True)).alpha_mask, torch.ones(32, 32))


def test_batches_group_by_bucket_and_respect_vae_batch_size(tmp_path, vae):
    square = [write_image(tmp_path / f"s{i}.png", (32, 32), i) for i in range(3)]
    wide = [write_image(tmp_path / f"w{i}.png", (48, 32), 10 + i) for i in range(2)]
    mixed = [square[0], wide[0], square[1], wide[1], square[2]]
    assert encode(new_cache(to_disk=False), [request(p) for p in mixed], vae, batch_size=2) == 5
    assert vae.calls == [(2, 3, 32, 32), (1, 3, 32, 32), (2, 3, 32, 48)]
    vae.calls.clear()
    encode(new_cache(to_disk=False), [request(square[0], flip=True), request(square[1])], vae, batch_size=4)
    # Flip settings are batched apart; a flipped batch costs a second call for its mirror.
    assert vae.calls == [(1, 3, 32, 32), (1, 3, 32, 32), (1, 3, 32, 32)]


def test_plan_batches_refuses_zero():
    with pytest.raises(UserError, match="vae_batch_size"):
        plan_batches([], 0)


def test_progress_reports_each_batch(images, vae):
    done = []
    new_cache().encode_missing([request(p) for p in images], vae, batch_size=1, seed=0,
                               device="cpu", dtype=torch.float32, progress=done.append)
    assert done == [1, 1, 1]


def test_writes_are_atomic(images, vae, monkeypatch):
    encode(new_cache(), [request(images[0])], vae)
    path = npz_path(images[0], (32, 32))
    good = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(latent_cache.np, "savez", crash)
    stat = images[0].stat()
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    # a failed write is one line naming the file (library.safe_write), never a traceback
    with pytest.raises(UserError, match=r"^could not write .*_sd(_te_outputs)?\.npz: disk full"):
        encode(new_cache(), [request(images[0])], vae)
    assert path.read_bytes() == good
    assert sorted(p.name for p in images[0].parent.iterdir()) == ["a.png", "a_0032x0032_sd.npz", "b.png", "c.png"]


def test_get_before_encoding_says_what_to_do(images):
    with pytest.raises(KeyError, match="encode_missing"):
        new_cache().get(request(images[0]))


def test_wrong_pixel_shape_is_a_bug_report(images, vae):
    bad = LatentRequest(images[0], (32, 32), (32, 32), (0, 0, 32, 32), lambda: np.zeros((16, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="expected uint8"):
        encode(new_cache(), [bad], vae)

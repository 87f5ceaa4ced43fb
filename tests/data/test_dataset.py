"""Training batches: bucket-pure, repeats as entries, reproducible per-epoch shuffles, augmentations, cached latents."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from library.config.declarations import OPTIONS
from library.config.options import NETWORK
from library.config.resolve import resolve
from library.data.dataset import TrainingDataset, latent_requests, prepare_pixels
from library.data.latent_cache import LatentCache
from library.data.plan import plan_run
from tests.helpers import make_image_folder

BUCKETS = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
           "--bucket_reso_steps", "16"]


def _plan(tmp_path, *flags, count=5, repeats=3):
    make_image_folder(tmp_path / "train", repeats=repeats, class_tokens="sks dog", count=count, caption_extension=".txt")
    config = resolve(["--train_data_dir", str(tmp_path / "train"), "--caption_extension", ".txt",
                      "--train_batch_size", "2", *BUCKETS, *flags], NETWORK, OPTIONS)
    return plan_run(config)


def _epoch(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_batches_never_mix_buckets_and_repeats_are_entries(tmp_path):
    dataset = TrainingDataset(_plan(tmp_path), seed=0)
    batches = _epoch(dataset)
    assert all(len({tuple(img.shape) for img in b.images}) == 1 for b in batches)
    seen = Counter(path for b in batches for path in b.image_paths)
    assert set(seen.values()) == {3} and len(seen) == 5  # every image exactly `repeats` times per epoch
    # 3 buckets (64x64 x2 images, 80x48 x2, 48x80 x1 → 6, 6, 3 entries) → 3 + 3 + 2 batches of at most 2
    assert len(batches) == 8 and max(len(b.captions) for b in batches) == 2


def test_shuffle_is_reproducible_for_seed_and_epoch_and_differs_between_epochs(tmp_path):
    plan = _plan(tmp_path, "--shuffle_caption")
    first, second = TrainingDataset(plan, seed=7), TrainingDataset(plan, seed=7)
    orders = []
    for epoch in (1, 2):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        a, b = _epoch(first), _epoch(second)
        assert [x.image_paths for x in a] == [y.image_paths for y in b]
        assert [x.captions for x in a] == [y.captions for y in b]
        assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
        orders.append([x.image_paths for x in a])
    assert orders[0] != orders[1]
    other_seed = TrainingDataset(plan, seed=8)
    other_seed.set_epoch(1)
    assert [x.image_paths for x in _epoch(other_seed)] != orders[0]


def test_same_index_twice_gives_the_same_batch(tmp_path):
    dataset = TrainingDataset(_plan(tmp_path, "--flip_aug", "--color_aug", "--random_crop"), seed=3)
    a, b = dataset[1], dataset[1]
    assert a.captions == b.captions and torch.equal(a.images, b.images)


def test_flip_aug_mirrors_some_images(tmp_path):
    plan = _plan(tmp_path, "--flip_aug")
    dataset = TrainingDataset(plan, seed=0)
    flipped = plain = 0
    for batch in _epoch(dataset):
        for path, image in zip(batch.image_paths, batch.images):
            entry = next(e for d in plan.datasets for e in d.entries if str(e.path) == path)
            key = next(k for k, e in enumerate(plan.datasets[0].entries) if e is entry)
            choice = plan.datasets[0].assignment.choices[key]
            reference = torch.from_numpy(prepare_pixels(entry, choice.reso, choice.resized_size)).permute(2, 0, 1)
            reference = reference.float() / 127.5 - 1
            if torch.allclose(image, reference):
                plain += 1
            else:
                assert torch.allclose(image, reference.flip(-1))
                flipped += 1
    assert flipped and plain


def test_captions_are_processed_per_step(tmp_path):
    plan = _plan(tmp_path, "--shuffle_caption", "--keep_tokens", "1")
    dataset = TrainingDataset(plan, seed=0)
    captions = [c for b in _epoch(dataset) for c in b.captions]
    assert all(c.startswith("sks dog, ") for c in captions)  # keep_tokens=1 keeps the first tag in place
    assert len(set(captions)) > 5  # and the rest is shuffled


def test_caption_transform_sees_each_processed_caption_with_its_image(tmp_path):
    from library.data.caption_templates import CaptionTemplates

    plan = _plan(tmp_path)
    templates = CaptionTemplates(["[name] in [filewords]"], name="mytok")
    batches = _epoch(TrainingDataset(plan, seed=0, caption_transform=templates))
    plain = _epoch(TrainingDataset(plan, seed=0))
    for batch, reference in zip(batches, plain):
        assert batch.captions == [f"mytok in {c}" for c in reference.captions]


def test_filewords_of_an_image_without_a_caption_file_are_its_file_name_words(tmp_path):
    # A1111's rule even in a class-token folder: class tokens are not a caption of the image's own.
    from PIL import Image

    from library.data.caption_templates import CaptionTemplates

    folder = tmp_path / "train" / "3_mychar"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "001-red dress.png")
    Image.new("RGB", (64, 64), (10, 10, 200)).save(folder / "002.png")
    (folder / "002.txt").write_text("blue coat")
    config = resolve(["--train_data_dir", str(tmp_path / "train"), "--caption_extension", ".txt",
                      "--resolution", "64"], NETWORK, OPTIONS)
    dataset = TrainingDataset(plan_run(config), seed=0,
                              caption_transform=CaptionTemplates(["[name], [filewords]"], name="mychar"))
    assert sorted(c for b in _epoch(dataset) for c in b.captions) == sorted(["mychar, blue coat", "mychar, red dress"] * 3)


def test_cached_latents_replace_pixels(tmp_path):
    from library.models.tiny import build_tiny

    plan = _plan(tmp_path, "--flip_aug", count=3)
    vae = build_tiny("tiny-sd1").vae
    cache = LatentCache(to_disk=True, vae_identity="tiny-sd1/fp32")
    requests = latent_requests(plan)
    assert cache.encode_missing(requests, vae, batch_size=2, seed=0,
                                device="cpu", dtype=torch.float32) == 3
    assert cache.missing(requests) == []  # a second run encodes nothing
    dataset = TrainingDataset(plan, seed=0, latent_cache=cache)
    batches = _epoch(dataset)
    assert all(b.images is None and b.latents.shape[1] == 4 for b in batches)
    stored = {str(r.image_path): cache.get(r) for r in requests}
    for batch in batches:
        for path, latents in zip(batch.image_paths, batch.latents):
            assert torch.equal(latents, stored[path].latents) or torch.equal(latents, stored[path].flipped)


def test_image_that_fails_to_decode_is_skipped_and_reported(tmp_path):
    plan = _plan(tmp_path, count=2, repeats=1)
    broken = plan.datasets[0].entries[0].path
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # header intact (it was sized), pixels cut short
    batches = _epoch(TrainingDataset(plan, seed=0))
    assert any(str(broken) in s for b in batches for s in b.skipped)
    assert str(broken) not in [p for b in batches for p in b.image_paths]


@pytest.mark.parametrize("flag", ["--random_crop", "--color_aug"])
def test_pixel_augmentations_change_with_the_epoch(tmp_path, flag):
    plan = _plan(tmp_path, flag, count=2, repeats=4)
    dataset = TrainingDataset(plan, seed=0)
    views = {}
    for epoch in range(1, 4):
        dataset.set_epoch(epoch)
        for batch in _epoch(dataset):
            for path, image in zip(batch.image_paths, batch.images):
                views.setdefault(path, set()).add(image.numpy().tobytes())
    assert any(len(v) > 1 for v in views.values())

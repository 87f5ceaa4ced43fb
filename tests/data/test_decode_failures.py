"""Images that fail to decode after the plan: named once, their slots filled from their bucket, --strict fatal."""

from __future__ import annotations

import sys

import pytest
import torch
from torch._utils import ExceptionWrapper

from library.config.declarations import OPTIONS
from library.config.options import NETWORK
from library.config.resolve import resolve
from library.data.dataset import TrainingDataset, latent_requests
from library.data.decode_failures import DataLoadingError, DecodeFailures
from library.data.images import CorruptImageError
from library.data.latent_cache import LatentCache
from library.data.plan import plan_run
from library.errors import UserError
from tests.helpers import make_image_folder

BUCKETS = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
           "--bucket_reso_steps", "16"]
# img000/img002 are 64x64 (bucket 64x64), img001/img003 96x64 (bucket 80x48).
SIZES = ((64, 64), (96, 64))


def truncate(path):
    """Keep the header (the plan sizes the image from it) and cut the pixel data short."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _plan(tmp_path, *flags, count=4, repeats=2, batch_size=2):
    folder = make_image_folder(tmp_path / "train", repeats=repeats, class_tokens="sks dog", count=count,
                               caption_extension=".txt", sizes=SIZES)
    config = resolve(["--train_data_dir", str(tmp_path / "train"), "--caption_extension", ".txt",
                      "--train_batch_size", str(batch_size), *BUCKETS, *flags], NETWORK, OPTIONS)
    return plan_run(config), folder


def _epoch(dataset, epoch=1):
    dataset.set_epoch(epoch)
    return [dataset[i] for i in range(len(dataset))]


def _warnings(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipped image")]


# ---- the record


def test_each_failure_is_named_once_and_then_known(tmp_path, capsys):
    failures = DecodeFailures([tmp_path / "a.png", tmp_path / "b.png"])
    err = CorruptImageError(tmp_path / "a.png", "image file is truncated")
    failures.record(err)
    failures.record(err)
    assert tmp_path / "a.png" in failures and str(tmp_path / "a.png") in failures
    assert tmp_path / "b.png" not in failures
    assert _warnings(capsys) == [
        f"warning: skipped image {tmp_path / 'a.png'}: it cannot be decoded (image file is truncated); other images "
        "of its bucket take its place in each batch. Replace or delete the file (--strict stops the run instead)"]
    assert failures.example() == (tmp_path / "a.png", "image file is truncated")


def test_failures_known_before_are_not_named_again(tmp_path, capsys):
    failures = DecodeFailures([tmp_path / "a.png"], known={tmp_path / "a.png": "broken"})
    failures.record(CorruptImageError(tmp_path / "a.png", "broken"))
    assert tmp_path / "a.png" in failures and _warnings(capsys) == []


def test_strict_stops_at_the_first_failure_with_one_line(tmp_path):
    failures = DecodeFailures([tmp_path / "a.png"], strict=True)
    with pytest.raises(UserError) as info:
        failures.record(CorruptImageError(tmp_path / "a.png", "image file is truncated"))
    assert str(info.value) == (f"{tmp_path / 'a.png'}: the image cannot be decoded (image file is truncated); --strict "
                               "stops the run on a bad image: replace or delete the file, or drop --strict to skip it")


def test_a_loading_error_keeps_its_one_line_when_a_dataloader_worker_re_raises_it():
    try:
        raise DataLoadingError("x.png: the image cannot be decoded (truncated); replace it")
    except DataLoadingError:
        wrapper = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(DataLoadingError) as info:
        wrapper.reraise()  # what torch's DataLoader does in the main process
    assert str(info.value) == "x.png: the image cannot be decoded (truncated); replace it"


def test_the_failure_record_is_shared_with_worker_processes(tmp_path):
    failures = DecodeFailures([tmp_path / "a.png", tmp_path / "b.png"])
    # fork, as the DataLoader's workers start on Linux: without shared memory the child's write would stay its own.
    context = torch.multiprocessing.get_context("fork")
    worker = context.Process(target=_record_in_worker, args=(failures, str(tmp_path / "b.png")))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0
    assert tmp_path / "b.png" in failures and tmp_path / "a.png" not in failures


def _record_in_worker(failures, path):
    failures.record(CorruptImageError(path, "truncated"))


# ---- batches without the latent cache


def test_a_broken_image_gives_its_slots_to_its_bucket_and_is_named_once(tmp_path, capsys):
    plan, folder = _plan(tmp_path, repeats=3)
    broken = truncate(folder / "img000.png")
    dataset = TrainingDataset(plan, seed=0)
    clean_batches = len(dataset)
    for epoch in (1, 2):
        batches = _epoch(dataset, epoch)
        assert len(batches) == clean_batches  # batches per epoch, so steps and epochs, are the plan's
        assert all(len(b.image_paths) == 2 and b.images.shape[0] == 2 for b in batches)
        assert str(broken) not in [p for b in batches for p in b.image_paths]
        assert sum(b.skipped.count(str(broken)) for b in batches) == 3  # its 3 repeats, each filled
        # its slots went to the other image of its bucket (64x64), never to another bucket
        for batch in batches:
            if batch.skipped:
                assert batch.image_paths == [str(folder / "img002.png")] * 2
    assert len(_warnings(capsys)) == 1


def test_a_filled_batch_does_not_depend_on_what_the_process_already_knew(tmp_path):
    # Workers, DDP ranks and a resumed run each meet the broken file at a different time: same batches regardless.
    plan, folder = _plan(tmp_path, "--flip_aug", "--random_crop", "--color_aug", "--shuffle_caption", repeats=3)
    truncate(folder / "img001.png")
    fresh = TrainingDataset(plan, seed=5)
    seasoned = TrainingDataset(plan, seed=5)
    _epoch(seasoned, 1)
    batches = _epoch(fresh, 2)
    assert any(b.skipped for b in batches) and all(len(b.image_paths) == 2 for b in batches)
    for one, other in zip(batches, _epoch(seasoned, 2)):
        assert one.image_paths == other.image_paths and one.captions == other.captions
        assert torch.equal(one.images, other.images) and one.skipped == other.skipped


def test_a_batch_whose_whole_bucket_is_broken_is_made_from_another_bucket(tmp_path, capsys):
    plan, folder = _plan(tmp_path, repeats=1)
    truncate(folder / "img001.png")
    truncate(folder / "img003.png")  # the whole 80x48 bucket
    batches = _epoch(TrainingDataset(plan, seed=0))
    assert len(batches) == 2
    whole = [b for b in batches if b.skipped]
    assert len(whole) == 1 and sorted(whole[0].skipped) == [str(folder / "img001.png"), str(folder / "img003.png")]
    assert sorted(whole[0].image_paths) == [str(folder / "img000.png"), str(folder / "img002.png")]
    assert whole[0].images.shape == (2, 3, 64, 64)
    assert len(_warnings(capsys)) == 2


def test_a_broken_image_of_a_bucket_is_replaced_by_the_same_kind_first(tmp_path):
    make_image_folder(tmp_path / "reg", repeats=1, class_tokens="dog", count=2, caption_extension=".txt",
                      sizes=((64, 64),), seed=3)
    plan, folder = _plan(tmp_path, "--reg_data_dir", str(tmp_path / "reg"), count=3, repeats=1, batch_size=5)
    broken = truncate(folder / "img000.png")
    batches = _epoch(TrainingDataset(plan, seed=0))
    batch = next(b for b in batches if b.skipped)
    # one batch holds the 64x64 bucket: img000 and img002 (training) and the reg images (balanced to 3 entries);
    # img002, not a reg image, takes the broken training image's slot
    assert str(broken) not in batch.image_paths and batch.is_reg.tolist().count(False) == 2
    assert batch.image_paths.count(str(folder / "img002.png")) == 2


def test_when_no_image_decodes_loading_stops_with_one_line(tmp_path):
    plan, folder = _plan(tmp_path, repeats=1)
    for path in sorted(folder.glob("*.png")):
        truncate(path)
    with pytest.raises(UserError) as info:
        TrainingDataset(plan, seed=0)[0]
    message = str(info.value)
    assert message.startswith("none of the 4 images of the run can be decoded (e.g. ") and "\n" not in message
    assert "--dry_run decodes every image" in message


def test_strict_stops_when_a_batch_meets_a_broken_image(tmp_path):
    plan, folder = _plan(tmp_path, "--strict", repeats=1)
    broken = truncate(folder / "img000.png")
    with pytest.raises(UserError, match=r"--strict stops the run") as info:
        _epoch(TrainingDataset(plan, seed=0))
    assert str(info.value).startswith(f"{broken}: the image cannot be decoded (")


# ---- the latent cache


def _vae():
    from library.models.tiny import build_tiny

    return build_tiny("tiny-sd1").vae


def _encode(cache, requests, **kwargs):
    return cache.encode_missing(requests, _vae(), batch_size=2, seed=0,
                                device="cpu", dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("to_disk", [False, True])
def test_the_latent_cache_leaves_out_a_broken_image_and_the_dataset_fills_its_slots(tmp_path, capsys, to_disk):
    plan, folder = _plan(tmp_path, "--flip_aug", repeats=2)
    broken = truncate(folder / "img002.png")
    cache = LatentCache(to_disk=to_disk, vae_identity="tiny-sd1/fp32")
    with pytest.raises(CorruptImageError):  # callers that do not handle failures still see them
        _encode(LatentCache(to_disk=False, vae_identity="tiny-sd1/fp32"), latent_requests(plan))
    failures = DecodeFailures([])
    assert _encode(cache, latent_requests(plan), on_failure=failures.record) == 3
    assert cache.failed == {broken: "image file is truncated"}
    assert not (folder / "img002_0064x0064_sd.npz").exists()
    request = next(r for r in latent_requests(plan) if r.image_path == broken)
    with pytest.raises(CorruptImageError):
        cache.get(request)
    assert len(_warnings(capsys)) == 1
    dataset = TrainingDataset(plan, seed=0, latent_cache=cache)
    batches = _epoch(dataset) + _epoch(dataset, 2)
    assert all(b.latents.shape[0] == 2 for b in batches) and any(b.skipped for b in batches)
    assert str(broken) not in [p for b in batches for p in b.image_paths]
    assert _warnings(capsys) == []  # named while caching; the dataset knows it already


def test_an_image_deleted_after_the_plan_is_a_decode_failure_for_the_cache(tmp_path):
    plan, folder = _plan(tmp_path, repeats=1)
    (folder / "img000.png").unlink()
    cache = LatentCache(to_disk=True, vae_identity="tiny-sd1/fp32")
    seen = []
    assert _encode(cache, latent_requests(plan), on_failure=seen.append) == 3
    assert [err.path for err in seen] == [str(folder / "img000.png")]

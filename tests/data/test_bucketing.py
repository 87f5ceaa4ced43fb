"""Bucketing and batching against sd-scripts: a golden from a line-by-line transcription, and batch invariants.

Regenerate the golden (a reviewed diff) with: python -m tests.data.test_bucketing --update-golden
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from library.data.bucketing import (
    BucketChoice, Buckets, adjust_bucket_reso_range, assign_buckets, make_batches, make_bucket_resolutions,
    make_buckets,
)
from library.errors import UserError

GOLDEN_PATH = Path(__file__).resolve().parent.parent / "golden" / "buckets.json"

# (resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps): sd-scripts' defaults, max 2048 for 1024 as
# users run it (max_bucket_reso must be >= the resolution).
CONFIGS = [(512, 256, 1024, 64), (768, 256, 1024, 64), (1024, 256, 2048, 64)]
IMAGE_SIZES = [
    (512, 512), (768, 768), (1024, 1024), (2048, 2048),  # squares, some exact buckets
    (640, 384), (384, 640), (832, 1216), (1216, 832), (768, 512), (512, 768),  # exact bucket sizes for some configs
    (1000, 600), (600, 1000), (1920, 1080), (1080, 1920), (960, 540), (3000, 2000), (800, 801), (513, 511),
    (4000, 1000), (1000, 4000), (100, 400), (2000, 100),  # 4:1, 1:4 and 20:1 extremes
    (50, 50), (64, 64), (333, 777),  # tiny and odd
    (6000, 4000), (4000, 6000),  # huge
]


# --- Independent transcription of sd-scripts (kohya-ss/sd-scripts), kept apart from library code ---------------
# library/model_util.py make_bucket_resolutions @ 036907ee976ed0dc6c0cc32ffd24da9860d7fb3e and
# library/train_util.py BucketManager (__init__ asserts, make_buckets, set_predefined_resos, add_if_new_reso,
# round_to_steps, select_bucket) and BaseDataset.adjust_min_max_bucket_reso_by_steps
# @ 6edbe00547bac6c2efb2d6952eb910851662cdf2. Statement order and arithmetic follow the originals.

def _ref_make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    resos = list(resos)
    resos.sort()
    return resos


class _RefBucketManager:
    def __init__(self, no_upscale, max_reso, min_size, max_size, reso_steps):
        if max_size is not None:
            if max_reso is not None:
                assert max_size >= max_reso[0]
                assert max_size >= max_reso[1]
            if min_size is not None:
                assert max_size >= min_size
        self.no_upscale = no_upscale
        self.max_reso = max_reso
        self.max_area = max_reso[0] * max_reso[1]
        self.min_size = min_size
        self.max_size = max_size
        self.reso_steps = reso_steps
        self.resos = []
        self.reso_to_id = {}
        self.buckets = []

    def make_buckets(self):
        resos = _ref_make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.reso_steps)
        self.set_predefined_resos(resos)

    def set_predefined_resos(self, resos):
        self.predefined_resos = resos.copy()
        self.predefined_resos_set = set(resos)
        self.predefined_aspect_ratios = np.array([w / h for w, h in resos])

    def add_if_new_reso(self, reso):
        if reso not in self.reso_to_id:
            bucket_id = len(self.resos)
            self.reso_to_id[reso] = bucket_id
            self.resos.append(reso)
            self.buckets.append([])

    def round_to_steps(self, x):
        x = int(x + 0.5)
        return x - x % self.reso_steps

    def select_bucket(self, image_width, image_height):
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso in self.predefined_resos_set:
                pass
            else:
                ar_errors = self.predefined_aspect_ratios - aspect_ratio
                predefined_bucket_id = np.abs(ar_errors).argmin()
                reso = self.predefined_resos[predefined_bucket_id]
            ar_reso = reso[0] / reso[1]
            if aspect_ratio > ar_reso:
                scale = reso[1] / image_height
            else:
                scale = reso[0] / image_width
            resized_size = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if image_width * image_height > self.max_area:
                resized_width = math.sqrt(self.max_area * aspect_ratio)
                resized_height = self.max_area / resized_width
                assert abs(resized_width / resized_height - aspect_ratio) < 1e-2, "aspect is illegal"
                b_width_rounded = self.round_to_steps(resized_width)
                b_height_in_wr = self.round_to_steps(b_width_rounded / aspect_ratio)
                ar_width_rounded = b_width_rounded / b_height_in_wr
                b_height_rounded = self.round_to_steps(resized_height)
                b_width_in_hr = self.round_to_steps(b_height_rounded * aspect_ratio)
                ar_height_rounded = b_width_in_hr / b_height_rounded
                if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
                    resized_size = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
                else:
                    resized_size = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
            else:
                resized_size = (image_width, image_height)
            bucket_width = resized_size[0] - resized_size[0] % self.reso_steps
            bucket_height = resized_size[1] - resized_size[1] % self.reso_steps
            reso = (bucket_width, bucket_height)
        self.add_if_new_reso(reso)
        ar_error = (reso[0] / reso[1]) - aspect_ratio
        return reso, resized_size, ar_error


def _ref_adjust_min_max(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps):
    if min_bucket_reso % bucket_reso_steps != 0:
        min_bucket_reso = min_bucket_reso - min_bucket_reso % bucket_reso_steps
    if max_bucket_reso % bucket_reso_steps != 0:
        max_bucket_reso = max_bucket_reso + bucket_reso_steps - max_bucket_reso % bucket_reso_steps
    assert min(resolution) >= min_bucket_reso
    assert max(resolution) <= max_bucket_reso
    return min_bucket_reso, max_bucket_reso


def _sd_scripts_reference() -> dict:
    """The golden's content computed only with the transcription above (never with library code)."""
    configs, selections = [], []
    for res, min_reso, max_reso, steps in CONFIGS:
        resolution = (res, res)
        min_reso, max_reso = _ref_adjust_min_max(resolution, min_reso, max_reso, steps)
        buckets = _ref_make_bucket_resolutions(resolution, min_reso, max_reso, steps)
        configs.append({"resolution": list(resolution), "min_bucket_reso": min_reso, "max_bucket_reso": max_reso,
                        "bucket_reso_steps": steps, "buckets": [list(b) for b in buckets]})
        for no_upscale in (False, True):
            manager = _RefBucketManager(no_upscale, resolution, min_reso, max_reso, steps)
            if not no_upscale:
                manager.make_buckets()
            for width, height in IMAGE_SIZES:
                row = {"resolution": res, "bucket_no_upscale": no_upscale, "image": [width, height]}
                try:
                    reso, resized, ar_error = manager.select_bucket(width, height)
                    row.update(bucket=list(reso), resized=list(resized), ar_error=ar_error)
                except ZeroDivisionError:  # sd-scripts crashes on these; we must refuse them too
                    row["error"] = "ZeroDivisionError"
                selections.append(row)
    return {"source": "kohya-ss/sd-scripts library/model_util.py@036907ee make_bucket_resolutions, "
                      "library/train_util.py@6edbe005 BucketManager.select_bucket; tests/data/test_bucketing.py",
            "configs": configs, "selections": selections}


# --- tests --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN_PATH.read_text())


def test_reference_reproduces_golden(golden):
    assert json.loads(json.dumps(_sd_scripts_reference())) == golden


def test_golden_covers_the_required_table(golden):
    sizes = {tuple(row["image"]) for row in golden["selections"]}
    assert len(sizes) >= 20 and {(50, 50), (6000, 4000), (1000, 4000), (512, 512)} <= sizes
    assert [c["resolution"][0] for c in golden["configs"]] == [512, 768, 1024]
    assert {row["bucket_no_upscale"] for row in golden["selections"]} == {False, True}


def test_bucket_sets_match_golden(golden):
    for config in golden["configs"]:
        resolution = tuple(config["resolution"])
        args = (config["min_bucket_reso"], config["max_bucket_reso"], config["bucket_reso_steps"])
        expected = [tuple(b) for b in config["buckets"]]
        assert make_bucket_resolutions(resolution, *args) == expected
        buckets = make_buckets(resolution, enable_bucket=True, min_bucket_reso=args[0], max_bucket_reso=args[1],
                               bucket_reso_steps=args[2])
        assert list(buckets.predefined) == expected


def test_selections_match_golden(golden):
    configs = {c["resolution"][0]: c for c in golden["configs"]}
    for row in golden["selections"]:
        config = configs[row["resolution"]]
        buckets = make_buckets(tuple(config["resolution"]), enable_bucket=True,
                               bucket_no_upscale=row["bucket_no_upscale"], min_bucket_reso=config["min_bucket_reso"],
                               max_bucket_reso=config["max_bucket_reso"], bucket_reso_steps=config["bucket_reso_steps"])
        if "error" in row:
            with pytest.raises(UserError, match="bucket_no_upscale"):
                buckets.select_bucket(*row["image"])
            continue
        choice = buckets.select_bucket(*row["image"])
        assert choice == BucketChoice(tuple(row["bucket"]), tuple(row["resized"]), row["ar_error"]), row


def test_default_512_set_worked_out_by_hand():
    # Independent of both implementations: h = min(1024, (512*512 // w) // 64 * 64) for w = 256..1024, both ways,
    # plus the 512 square, computed on paper.
    assert make_bucket_resolutions((512, 512)) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]


def test_exact_size_wins_over_an_earlier_bucket_with_the_same_ratio():
    buckets = Buckets((512, 512), False, 64, ((256, 256), (512, 512)))
    assert buckets.select_bucket(512, 512).reso == (512, 512)
    assert buckets.select_bucket(1024, 1024).reso == (256, 256)  # not a bucket size: first least error wins


def test_equal_errors_pick_the_first_bucket_in_sorted_order():
    buckets = Buckets((512, 512), False, 64, ((256, 256), (384, 256)))  # ratios 1.0 and 1.5
    choice = buckets.select_bucket(500, 400)  # ratio 1.25: both errors are exactly 0.25
    assert choice.reso == (256, 256) and choice.resized_size == (320, 256) and choice.ar_error == -0.25


def test_resized_size_covers_the_bucket_and_keeps_the_ratio():
    buckets = make_buckets((512, 512), enable_bucket=True)
    for width, height in IMAGE_SIZES:
        reso, resized, _ = buckets.select_bucket(width, height)
        assert resized[0] >= reso[0] and resized[1] >= reso[1]
        assert resized[0] == reso[0] or resized[1] == reso[1]  # one side matches, the other is cropped
        assert abs(resized[0] / resized[1] - width / height) < 0.02 * width / height + 1 / min(resized)


def test_disabled_bucketing_is_one_bucket_at_the_resolution():
    buckets = make_buckets((512, 768), enable_bucket=False, bucket_no_upscale=True, min_bucket_reso=10**6)
    for width, height in [(512, 768), (1000, 600), (50, 50)]:
        reso, resized, _ = buckets.select_bucket(width, height)
        assert reso == (512, 768) and resized[0] >= 512 and resized[1] >= 768


def test_no_upscale_buckets_come_from_the_image_size():
    buckets = make_buckets((512, 512), enable_bucket=True, bucket_no_upscale=True)
    assert buckets.select_bucket(300, 200) == BucketChoice((256, 192), (300, 200), 256 / 192 - 1.5)
    reso, resized, _ = buckets.select_bucket(6000, 4000)
    assert resized[0] * resized[1] <= 512 * 512 * 1.05 and reso == (resized[0] // 64 * 64, resized[1] // 64 * 64)


def test_min_max_are_rounded_to_steps_and_checked_against_the_resolution():
    assert adjust_bucket_reso_range((512, 512), 300, 1000, 64) == (256, 1024)
    with pytest.raises(UserError, match="min_bucket_reso"):
        adjust_bucket_reso_range((512, 512), 576, 1024, 64)
    with pytest.raises(UserError, match="max_bucket_reso"):
        adjust_bucket_reso_range((1024, 1024), 256, 960, 64)
    # below one step it would round to a bucket of 0 pixels (a ZeroDivisionError once)
    with pytest.raises(UserError, match="min_bucket_reso 32 is smaller than bucket_reso_steps 64"):
        adjust_bucket_reso_range((32, 32), 32, 64, 64)


def test_assignment_counts_repeats_and_bucket_info_has_sd_scripts_shape():
    buckets = make_buckets((512, 512), enable_bucket=True)
    images = [("a", (1000, 600), 3), ("b", (600, 1000), 1), ("c", (512, 512), 2), ("d", (1001, 601), 1)]
    assignment = assign_buckets(buckets, images)
    assert list(assignment.entries) == sorted(assignment.entries)
    landscape = buckets.select_bucket(1000, 600).reso
    assert assignment.entries[landscape] == ["a", "a", "a", "d"]
    info = assignment.bucket_info()
    assert [b["count"] for b in info["buckets"].values()] == [1, 2, 4]
    assert list(info["buckets"]) == [0, 1, 2] and info["buckets"][2]["resolution"] == list(landscape)
    errors = [abs(buckets.select_bucket(*size).ar_error) for _, size, _ in images]
    assert info["mean_img_ar_error"] == pytest.approx(sum(errors) / 4, abs=1e-15)  # per image, not per repeat
    assert json.loads(json.dumps(info))["buckets"]["0"]["resolution"] == list(buckets.select_bucket(600, 1000).reso)
    assert assign_buckets(buckets, []).bucket_info() == {"buckets": {}, "mean_img_ar_error": 0}


# --- batching -----------------------------------------------------------------------------------------------------

def _entries() -> dict:
    buckets = make_buckets((512, 512), enable_bucket=True)
    images = [(f"img{i}", size, 1 + i % 3) for i, size in enumerate([(1000, 600), (600, 1000), (512, 512)] * 5)]
    return assign_buckets(buckets, images).entries


def test_batches_never_mix_buckets_and_keep_every_repeat():
    entries = _entries()
    bucket_of = {key: reso for reso, keys in entries.items() for key in keys}
    batches = make_batches(entries, batch_size=4, seed=42, epoch=1)
    assert all(len({bucket_of[key] for key in batch}) == 1 for batch in batches)
    assert sorted(k for batch in batches for k in batch) == sorted(k for keys in entries.values() for k in keys)
    assert len(batches) == sum(math.ceil(len(keys) / 4) for keys in entries.values())
    flat = [k for batch in batches for k in batch]
    assert flat.count("img2") == 3 and flat.count("img0") == 1  # repeats are separate entries


def test_shuffle_is_per_epoch_and_reproducible():
    entries = _entries()
    assert make_batches(entries, 2, seed=7, epoch=3) == make_batches(entries, 2, seed=7, epoch=3)
    epochs = [make_batches(entries, 2, seed=7, epoch=e) for e in range(4)]
    assert all(a != b for i, a in enumerate(epochs) for b in epochs[i + 1:])
    assert make_batches(entries, 2, seed=8, epoch=3) != epochs[3]
    assert make_batches(entries, 2, seed=8, epoch=0) == epochs[0]  # epoch 0 always uses seed 0, as in sd-scripts


def test_batches_follow_sd_scripts_in_place_cumulative_shuffles():
    # sd-scripts' object flow: make_buckets shuffles with the default seed 0, set_seed comes later, and every
    # set_current_epoch increment reseeds with seed + epoch and shuffles the already shuffled lists again.
    entries, batch_size, seed = _entries(), 3, 1234
    rng = random.Random()
    buckets = [list(keys) for keys in entries.values()]
    indices = [(b, i) for b, keys in enumerate(buckets) for i in range(math.ceil(len(keys) / batch_size))]

    def shuffle_buckets(dataset_seed, current_epoch):
        rng.seed(dataset_seed + current_epoch)
        rng.shuffle(indices)
        for bucket in buckets:
            rng.shuffle(bucket)

    shuffle_buckets(0, 0)
    for epoch in range(1, 4):
        shuffle_buckets(seed, epoch)
        expected = [buckets[b][i * batch_size:(i + 1) * batch_size] for b, i in indices]
        assert make_batches(entries, batch_size, seed, epoch) == expected


def test_batching_does_not_touch_the_global_rng():
    state = random.getstate()
    make_batches(_entries(), 2, seed=1, epoch=2)
    assert random.getstate() == state


def _update_golden() -> None:
    from library.safe_write import atomic_file

    golden = _sd_scripts_reference()
    # One config or selection per line, so a change shows up as a readable diff.
    lines = ["{", f' "source": {json.dumps(golden["source"])},', ' "configs": [']
    lines += [f"  {json.dumps(c)}," for c in golden["configs"]]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" ],", ' "selections": [']
    lines += [f"  {json.dumps(row)}," for row in golden["selections"]]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" ]", "}"]
    with atomic_file(GOLDEN_PATH) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {GOLDEN_PATH}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-golden"]:
        sys.exit("usage: python -m tests.data.test_bucketing --update-golden")
    _update_golden()

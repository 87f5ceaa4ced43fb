"""A plan that could not fit in memory, and metadata nested too deep to parse, end in one line before any work."""

from __future__ import annotations

import pytest

from library.data import plan as plan_module
from library.data.demo import make_demo_dataset
from library.data.plan import plan_run
from library.data.specs import SubsetSpec
from library.data.subsets import list_subset_images
from library.errors import UserError


def test_an_epoch_too_large_to_plan_is_refused_naming_num_repeats(tmp_path, monkeypatch):
    make_demo_dataset(tmp_path / "data", count=3, size=32, folder="40_sks shape")
    options = {"train_data_dir": str(tmp_path / "data"), "caption_extension": ".txt", "resolution": "32"}
    assert len(plan_run(options).datasets[0].train) == 3  # 120 per epoch: fine under the real limit
    monkeypatch.setattr(plan_module, "MOST_EPOCH_ENTRIES", 100)  # the same check, at a size a test can build
    with pytest.raises(UserError, match=r"^3 images with their num_repeats make 120 images per epoch, more than 100 "
                                        r".*lower num_repeats"):
        plan_run(options)


def test_metadata_json_nested_thousands_deep_is_one_line(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"meta\.json: .*nested too deeply"):
        list_subset_images(SubsetSpec(metadata_file=str(meta), image_dir=str(tmp_path)))

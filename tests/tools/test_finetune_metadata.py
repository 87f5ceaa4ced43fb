"""sd-scripts' fine-tuning preparation as our tools: merge_captions_to_metadata.py, merge_dd_tags_to_metadata.py,
clean_captions_and_tags.py and prepare_buckets_latents.py, then train_db.py --in_json training on the prepared
latents without encoding a single image again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import finetune_metadata as fm
from library.data.bucketing import make_buckets
from library.data.latent_cache import LatentCache
from tools import (
    clean_captions_and_tags,
    merge_captions_to_metadata,
    merge_dd_tags_to_metadata,
    prepare_buckets_latents,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Three aspect ratios that land in three buckets at 64x128 (area 8192, steps 64): 64x64, 128x64 and 64x128.
SIZES = {"square": (64, 64), "wide": (150, 60), "tall": (50, 120)}
BUCKETS = ["--max_resolution", "64,128", "--min_bucket_reso", "64", "--max_bucket_reso", "128"]
TRAIN_BUCKETS = ["--resolution", "64,128", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
                 "--bucket_reso_steps", "64"]


def _images(folder: Path, sizes=SIZES, *, tags=True, captions=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        if captions:
            (folder / f"{name}.caption").write_text(f"  a {name} anime woman\n", encoding="utf-8")
        if tags:
            (folder / f"{name}.txt").write_text(f"1girl, {name}_shape, rating:safe", encoding="utf-8")
    return folder


def _user_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- merging


def test_captions_then_tags_merge_into_one_json_keyed_by_stem(tmp_path, capsys):
    folder = _images(tmp_path / "imgs")
    (folder / "nocap.png").write_bytes((folder / "square.png").read_bytes())  # no caption, no tags: skipped
    meta = tmp_path / "meta.json"
    merge_captions_to_metadata.main([str(folder), str(meta)])
    # Without --in_json the existing OUT_JSON is read and extended (sd-scripts' rule).
    merge_dd_tags_to_metadata.main([str(folder), str(meta), "--caption_extension", ".txt"])
    out = capsys.readouterr().out
    assert json.loads(meta.read_text()) == {
        name: {"caption": f"a {name} anime woman", "tags": f"1girl, {name}_shape, rating:safe"}
        for name in sorted(SIZES)}
    assert "1 images without a .caption file (skipped)" in out and "nocap.png" in out
    assert "most frequent: 1girl (3)" in out
    # sd-scripts' layout: indent 2, keys in the order the images were listed (sorted by path).
    assert meta.read_text().startswith('{\n  "square": {\n    "caption": "a square anime woman",\n')
    assert list(json.loads(meta.read_text())) == ["square", "tall", "wide"]


def test_in_json_keeps_other_entries_and_fields_and_the_misspelt_flag_works(tmp_path):
    folder = _images(tmp_path / "imgs", {"square": (64, 64)}, tags=False)
    (folder / "square.cap").write_text("a new caption", encoding="utf-8")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"square": {"caption": "old", "tags": "t1", "train_resolution": [64, 64]},
                               "gone": {"caption": "kept"}}))
    out = tmp_path / "new.json"
    merge_captions_to_metadata.main([str(folder), str(out), "--in_json", str(old), "--caption_extention", ".cap"])
    assert json.loads(out.read_text()) == {"square": {"caption": "a new caption", "tags": "t1",
                                                      "train_resolution": [64, 64]},
                                           "gone": {"caption": "kept"}}
    assert json.loads(old.read_text())["square"]["caption"] == "old"  # the input is not touched


def test_full_path_keys_are_paths_with_extension_and_recursive_needs_them(tmp_path, capsys):
    folder = _images(tmp_path / "imgs", {"top": (64, 64)})
    _images(folder / "sub", {"deep": (64, 64)})
    meta = tmp_path / "meta.json"
    err = _user_error(merge_captions_to_metadata.main, [str(folder), str(meta), "--recursive"], capsys)
    assert "--recursive needs --full_path" in err and not meta.exists()
    merge_captions_to_metadata.main([str(folder), str(meta), "--recursive", "--full_path"])
    assert json.loads(meta.read_text()) == {str(folder / "sub" / "deep.png"): {"caption": "a deep anime woman"},
                                            str(folder / "top.png"): {"caption": "a top anime woman"}}
    flat = tmp_path / "flat.json"
    merge_captions_to_metadata.main([str(folder), str(flat)])  # without --recursive the subfolder is not read
    assert list(json.loads(flat.read_text())) == ["top"]


def test_merge_user_errors_exit_2(tmp_path, capsys):
    folder = _images(tmp_path / "imgs", {"a": (64, 64)})
    assert "no such folder" in _user_error(merge_captions_to_metadata.main,
                                           [str(tmp_path / "missing"), str(tmp_path / "m.json")], capsys)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "cannot be read as JSON" in _user_error(merge_dd_tags_to_metadata.main,
                                                   [str(folder), str(tmp_path / "o.json"), "--in_json", str(bad)],
                                                   capsys)
    assert "no such metadata file" in _user_error(merge_dd_tags_to_metadata.main,
                                                  [str(folder), str(tmp_path / "o.json"), "--in_json",
                                                   str(tmp_path / "nope.json")], capsys)


# ---------------------------------------------------------------- cleaning


@pytest.mark.parametrize("raw, cleaned", [
    # underscores to spaces, the ^_^ emoticon kept, DeepDanbooru's rating tags dropped
    ("1girl, long_hair, ^_^, smile, rating:safe, rating:questionable", "1girl, long hair, ^_^, smile"),
    # a tag that a longer tag ends with is dropped (hair ornament is matched as one word)
    ("1girl, white shirt, shirt, skirt, red hair ornament, hair ornament",
     "1girl, white shirt, skirt, red hair ornament"),
    # several girls: conflicting hair lengths, eye colours and hair colours are all dropped
    ("2girls, long hair, short hair, blue eyes, red eyes, blonde hair, black hair, smile", "2girls, smile"),
    # ...but one shared hair length stays, while two hair colours still go
    ("2girls, long hair, blonde hair, black hair, ponytail, twintails", "2girls, long hair"),
    # one girl: nothing conflicts, nothing is dropped
    ("1girl, blonde hair, black hair, blue eyes, red eyes", "1girl, blonde hair, black hair, blue eyes, red eyes"),
    ("", ""),
])
def test_clean_tags_rules(raw, cleaned):
    assert fm.clean_tags(raw) == cleaned


@pytest.mark.parametrize("raw, cleaned", [
    ("anime anime girl with a cartoon woman", "girl with a girl"),
    ("a cartoon drawing of a young lady and two people", "a drawing of a girl and two girls"),
    ("an anime cartoon image of a person", "an image of a girl"),
    ("a dog on grass", "a dog on grass"),
])
def test_clean_caption_rules(raw, cleaned):
    assert fm.clean_caption(raw) == cleaned


def test_clean_tool_rewrites_in_place_and_takes_the_old_three_argument_form(tmp_path, capsys):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "a cartoon woman", "tags": "1girl, long_hair, rating:safe"},
                                "b": {"caption": "a dog"}}))
    clean_captions_and_tags.main([str(tmp_path / "imgs"), str(meta), str(meta), "--debug"])
    out = capsys.readouterr()
    assert json.loads(meta.read_text()) == {"a": {"caption": "a girl", "tags": "1girl, long hair"},
                                            "b": {"caption": "a dog"}}
    assert "FROM: 1girl, long_hair, rating:safe" in out.out and "1 entries with no tags: b" in out.out
    assert "no longer used" in out.err
    assert "no such metadata file" in _user_error(clean_captions_and_tags.main,
                                                  [str(tmp_path / "x.json"), str(meta)], capsys)


# ---------------------------------------------------------------- prepare_buckets_latents


def _prepare(folder, meta_in, meta_out, *extra):
    return prepare_buckets_latents.main([str(folder), str(meta_in), str(meta_out), "tiny-sd1", *BUCKETS, *extra])


def _sd_scripts_read(image_dir: Path, key: str, train_resolution) -> dict[str, np.ndarray]:
    """What sd-scripts' FineTuningDataset loads for a stem key: image_key_to_npz_file finds `<image_dir>/<key>.npz`,
    is_disk_cached_latents_is_expected checks its keys and shapes against train_resolution (stride 8)."""
    path = os.path.join(image_dir, key + ".npz")
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    w, h = train_resolution
    assert {"latents", "original_size", "crop_ltrb"} <= set(arrays)
    assert arrays["latents"].shape[1:] == (h // 8, w // 8)
    return arrays


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, one_torch_thread):
    """merge captions -> merge tags -> prepare_buckets_latents (--flip_aug, seed 3) on three images, one unreadable
    and one truncated (its header reads, its pixels do not)."""
    root = tmp_path_factory.mktemp("prepared")
    folder = _images(root / "imgs")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    (folder / "broken.caption").write_text("broken")
    whole = (folder / "square.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    (folder / "cut.caption").write_text("cut")
    merge_captions_to_metadata.main([str(folder), str(root / "meta.json")])
    merge_dd_tags_to_metadata.main([str(folder), str(root / "meta.json"), "--caption_extension", ".txt"])
    result = _prepare(folder, root / "meta.json", root / "meta_lat.json", "--flip_aug", "--seed", "3")
    return root, folder, result


def test_prepare_writes_sd_scripts_npz_and_train_resolution_matching_our_buckets(prepared):
    root, folder, result = prepared
    metadata = json.loads((root / "meta_lat.json").read_text())
    buckets = make_buckets((64, 128), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128,
                           bucket_reso_steps=64)
    assert sorted(metadata) == sorted(SIZES)  # the unreadable and the truncated image left the metadata
    assert {tuple(metadata[k]["train_resolution"]) for k in SIZES} == {(64, 64), (128, 64), (64, 128)}
    for key, size in SIZES.items():
        entry = metadata[key]
        assert entry["caption"] == f"a {key} anime woman" and entry["tags"].startswith("1girl")  # fields kept
        assert entry["train_resolution"] == list(buckets.select_bucket(*size).reso)
        arrays = _sd_scripts_read(folder, key, entry["train_resolution"])
        assert set(arrays) == {"latents", "original_size", "crop_ltrb", "latents_flipped"}
        assert arrays["latents"].dtype == np.float32 and arrays["latents"].shape[0] == 4
        assert arrays["latents_flipped"].shape == arrays["latents"].shape
        assert not np.array_equal(arrays["latents_flipped"], arrays["latents"])
        assert tuple(arrays["original_size"]) == size
        # our latent cache entry beside the image holds the very same latents
        ours = folder / f"{key}_{size[0]:04d}x{size[1]:04d}_sd.npz"
        w, h = entry["train_resolution"]
        with np.load(ours) as npz:
            assert np.array_equal(npz[f"latents_{h // 8}x{w // 8}"], arrays["latents"])
            assert np.array_equal(npz[f"latents_flipped_{h // 8}x{w // 8}"], arrays["latents_flipped"])
    assert not (folder / "broken.npz").exists() and not (folder / "cut.npz").exists()
    assert {p.name for p, _ in result.unreadable} == {"broken.png", "cut.png"}
    assert result.encoded == 3 and result.written == 3


def test_prepared_latents_are_what_training_would_cache_itself(prepared, tmp_path):
    """Bit for bit: the same images, seed and VAE batch size give training's own cache the same latents."""
    _, folder, _ = prepared
    copy = tmp_path / "imgs"
    copy.mkdir()
    for name in SIZES:
        shutil.copy2(folder / f"{name}.png", copy / f"{name}.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({name: {"caption": "x"} for name in SIZES}))
    import train_db

    # --strict: every image encoded before the first step (lazily, only the batches one step needs would be)
    train_db.main(_train_flags(meta, copy, tmp_path / "out", "--strict", steps=1))
    for name, size in SIZES.items():
        cache_name = f"{name}_{size[0]:04d}x{size[1]:04d}_sd.npz"
        with np.load(copy / cache_name) as trained, np.load(folder / cache_name) as ours:
            assert sorted(trained.files) == sorted(ours.files)
            for array in trained.files:
                assert np.array_equal(trained[array], ours[array]), (name, array)


def _train_flags(meta, folder, out, *extra, steps=2, buckets=TRAIN_BUCKETS):
    return [*extra, "--pretrained_model_name_or_path", "tiny-sd1", "--in_json", str(meta), "--train_data_dir", str(folder),
            *buckets, "--flip_aug", "--cache_latents", "--cache_latents_to_disk", "--output_dir", str(out),
            "--output_name", "ft", "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--seed", "3",
            "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors"]


def test_train_db_in_json_trains_on_the_prepared_latents_without_encoding(prepared, tmp_path, monkeypatch, capsys):
    """The whole flow's point: training with --in_json reads the prepared latents; the VAE encodes nothing and
    every batch's latents are the npz contents (or their flipped version). As in sd-scripts, the metadata's
    train_resolution decides the buckets: training needs none of the bucket flags prepare was given."""
    root, folder, _ = prepared
    from diffusers import AutoencoderKL

    import train_db

    def no_encoding(*args, **kwargs):
        raise AssertionError("the VAE encoded an image although its latents were prepared")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encoding)
    used = []
    original_get = LatentCache.get

    def recording_get(self, request):
        cached = original_get(self, request)
        used.append((Path(request.image_path).stem, cached))
        return cached

    monkeypatch.setattr(LatentCache, "get", recording_get)
    capsys.readouterr()
    result = train_db.main(_train_flags(root / "meta_lat.json", folder, tmp_path / "out", buckets=[]))
    out = capsys.readouterr().out
    assert "using the buckets in the metadata (every image's train_resolution: 3 buckets)" in out
    assert result.global_step == 2 and result.final_file.is_file()
    assert "fine-tuning" in out and "3 training images" in out
    assert "latents: 3 images cached in disk (0 encoded now)" in out
    assert used
    for stem, cached in used:
        with np.load(folder / f"{stem}.npz") as npz:
            assert torch.equal(cached.latents, torch.from_numpy(npz["latents"]))
            assert torch.equal(cached.flipped, torch.from_numpy(npz["latents_flipped"]))


def test_skip_existing_keeps_fitting_npz_and_redoes_the_rest(tmp_path, capsys):
    folder = _images(tmp_path / "imgs", {"square": (64, 64), "wide": (150, 60)}, tags=False)
    meta = tmp_path / "meta.json"
    merge_captions_to_metadata.main([str(folder), str(meta)])
    first = _prepare(folder, meta, tmp_path / "lat.json")
    assert first.encoded == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    (folder / "wide.npz").unlink()
    again = _prepare(folder, meta, tmp_path / "lat.json", "--skip_existing")
    out = capsys.readouterr().out
    assert again.skipped == ["square"] and again.written == 1
    assert again.encoded == 0  # wide's latent cache entry is current: written from it, not encoded
    assert (folder / "square.npz").stat().st_mtime_ns == stamps["square.npz"]
    assert "1 kept (--skip_existing)" in out and again.kept_uncached == 0
    # a kept <key>.npz whose latent cache entry is gone: kept all the same (sd-scripts' rule), and said so
    (folder / "square_0064x0064_sd.npz").unlink()
    kept = _prepare(folder, meta, tmp_path / "lat.json", "--skip_existing")
    assert kept.skipped == ["square", "wide"] and kept.encoded == 0 and kept.kept_uncached == 1
    assert "1 kept images have no current latent cache entry" in capsys.readouterr().out
    # --flip_aug needs flipped latents the kept files lack: nothing fits, both are encoded again
    flipped = _prepare(folder, meta, tmp_path / "lat.json", "--skip_existing", "--flip_aug")
    assert flipped.skipped == [] and flipped.encoded == 2
    with np.load(folder / "square.npz") as npz:
        assert "latents_flipped" in npz.files
    # a changed image is encoded again even without --skip_existing's help: its cache entry is stale
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "square.png")
    changed = _prepare(folder, meta, tmp_path / "lat.json", "--flip_aug")
    assert changed.encoded == 1 and changed.written == 2


def test_alpha_mask_is_stored_with_the_latents(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, :32, 3] = 0  # left half transparent
    Image.fromarray(rgba, "RGBA").save(folder / "masked.png")
    (folder / "masked.caption").write_text("x")
    meta = tmp_path / "meta.json"
    merge_captions_to_metadata.main([str(folder), str(meta)])
    _prepare(folder, meta, meta, "--alpha_mask", "true")
    with np.load(folder / "masked.npz") as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "alpha_mask"}
        mask = npz["alpha_mask"]
    assert mask.shape == (64, 64) and mask.dtype == np.float32
    assert mask[:, :32].max() == 0 and mask[:, 32:].min() == 1
    assert json.loads(meta.read_text())["masked"]["train_resolution"] == [64, 64]  # in_json == out_json is fine


def test_prepare_full_path_puts_npz_beside_the_images(tmp_path):
    folder = _images(tmp_path / "imgs", {"top": (64, 64)}, tags=False)
    _images(folder / "sub", {"deep": (64, 64)}, tags=False)
    meta = tmp_path / "meta.json"
    merge_captions_to_metadata.main([str(folder), str(meta), "--recursive", "--full_path"])
    _prepare(folder, meta, meta, "--recursive", "--full_path")
    metadata = json.loads(meta.read_text())
    assert set(metadata) == {str(folder / "top.png"), str(folder / "sub" / "deep.png")}
    assert all(entry["train_resolution"] == [64, 64] for entry in metadata.values())
    # sd-scripts' image_key_to_npz_file for a full-path key: splitext(key) + ".npz"
    for key in metadata:
        assert Path(os.path.splitext(key)[0] + ".npz").is_file()


def test_prepare_user_errors_exit_2(tmp_path, capsys):
    folder = _images(tmp_path / "imgs", {"a": (64, 64)}, tags=False)
    meta = tmp_path / "meta.json"
    merge_captions_to_metadata.main([str(folder), str(meta)])
    not_a_model = tmp_path / "notes.safetensors"
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(not_a_model))
    err = _user_error(prepare_buckets_latents.main, [str(folder), str(meta), str(meta), str(not_a_model)], capsys)
    assert str(not_a_model) in err
    err = _user_error(prepare_buckets_latents.main, [str(folder), str(tmp_path / "none.json"), str(meta), "tiny-sd1"],
                      capsys)
    assert "no such metadata file" in err
    err = _user_error(prepare_buckets_latents.main,
                      [str(folder), str(meta), str(meta), "tiny-sd1", "--max_resolution", "64x64"], capsys)
    assert "WIDTH,HEIGHT" in err
    (tmp_path / "empty").mkdir()
    err = _user_error(prepare_buckets_latents.main, [str(tmp_path / "empty"), str(meta), str(meta), "tiny-sd1"],
                      capsys)
    assert "no images" in err

"""Latents encoded as training first needs them: the same adapter and cache files as encoding all before the first
step, training starting after one VAE batch, the VAE released after the last, broken images skipped."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.data.images import CorruptImageError
from library.data.latent_cache import LatentCache, LatentRequest
from library.training import latents as latents_module
from library.training import loop as loop_module
from tests.helpers import assert_same_tensors, make_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two buckets of four images: with batch size 2, four training batches per epoch; with vae_batch_size 1, 8 VAE batches.
SIZES = ((32, 32), (48, 32))
COUNT = 8
LAZY_LINE = "encoded as training first needs them"


@pytest.fixture
def data(tmp_path):
    make_image_folder(tmp_path / "data", repeats=1, class_tokens="sks dog", count=COUNT, sizes=SIZES)
    return tmp_path / "data" / "1_sks dog"


class Watch:
    """Records the run's latent cache and, at each optimizer step, what it had encoded and whether the VAE was kept."""

    def __init__(self, monkeypatch, *, lazy: bool | None = None):
        self.cache: LatentCache | None = None
        self.steps: list[tuple[int, int, bool]] = []  # (encoded, waiting, VAE still loaded)
        self.released = 0  # latents_ready(all_cached=True) calls
        build = functools.partial(latents_module.build_latent_cache, lazy=lazy)

        def build_and_keep(config, plan, parts, accelerator):
            self.cache = build(config, plan, parts, accelerator)
            return self.cache

        original_step, original_ready = loop_module._Loop._step, None

        def step(loop):
            vae = loop.method.parts.vae
            self.steps.append((self.cache.encoded, self.cache.waiting, vae is not None))
            assert vae is None or vae.decoder is None  # nothing samples: only the encoder is kept while latents wait
            nonlocal original_ready
            if original_ready is None:
                original_ready = loop.method.latents_ready

                def counted(*, all_cached):
                    self.released += all_cached
                    return original_ready(all_cached=all_cached)

                loop.method.latents_ready = counted
            return original_step(loop)

        monkeypatch.setattr(loop_module, "build_latent_cache", build_and_keep)
        monkeypatch.setattr(loop_module._Loop, "_step", step)


def _run(folder, out, *extra, steps=4):
    return train_network.main([
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(folder.parent),
        "--caption_extension", ".txt", "--resolution", "32", "--enable_bucket", "--min_bucket_reso", "16",
        "--max_bucket_reso", "64", "--bucket_reso_steps", "8", "--output_dir", str(out), "--output_name", "net",
        "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--network_dim", "4",
        "--network_alpha", "2", "--seed", "1", "--max_data_loader_n_workers", "0", *extra])


def _lora(out):
    return load_file(str(out / "net.safetensors"))


def _npz_files(folder) -> dict[str, dict[str, np.ndarray]]:
    files = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as npz:
            files[path.name] = {name: npz[name] for name in npz.files}
    return files


@pytest.mark.parametrize("extra", [[], ["--flip_aug"], ["--vae_batch_size", "2"]],
                         ids=["plain", "flip_aug", "vae_batch_size 2"])
def test_a_lora_trained_with_lazy_latents_equals_the_upfront_one(data, tmp_path, monkeypatch, capsys, extra):
    Watch(monkeypatch, lazy=False)
    _run(data, tmp_path / "upfront", *extra)
    assert "encoded now" in capsys.readouterr().out
    watch = Watch(monkeypatch)  # the default: lazy
    _run(data, tmp_path / "lazy", *extra)
    assert LAZY_LINE in capsys.readouterr().out
    # Really lazy: images still waited at the first step (with VAE batches of 2, the two training batches fetched
    # by then may touch all four VAE batches).
    assert watch.steps[0][1] > 0 or "--vae_batch_size" in extra
    assert_same_tensors(_lora(tmp_path / "upfront"), _lora(tmp_path / "lazy"))


def test_strict_encodes_upfront_and_trains_the_same_lora(data, tmp_path, monkeypatch, capsys):
    watch = Watch(monkeypatch)
    _run(data, tmp_path / "strict", "--strict")
    assert "(8 encoded now)" in capsys.readouterr().out and watch.steps[0][:2] == (8, 0)
    _run(data, tmp_path / "lazy")
    assert_same_tensors(_lora(tmp_path / "strict"), _lora(tmp_path / "lazy"))


def test_lazy_disk_cache_writes_the_files_an_upfront_run_writes(data, tmp_path, monkeypatch, capsys):
    Watch(monkeypatch, lazy=False)
    _run(data, tmp_path / "upfront", "--cache_latents_to_disk", "--flip_aug")
    upfront = _npz_files(data)
    assert len(upfront) == COUNT
    for path in data.glob("*.npz"):
        path.unlink()
    capsys.readouterr()
    watch = Watch(monkeypatch)
    _run(data, tmp_path / "lazy", "--cache_latents_to_disk", "--flip_aug")
    assert "latents: 8 images to cache in disk, " + LAZY_LINE in capsys.readouterr().out
    lazy = _npz_files(data)
    assert lazy.keys() == upfront.keys()
    for name, arrays in upfront.items():
        assert arrays.keys() == lazy[name].keys(), name
        for key, value in arrays.items():
            assert value.dtype == lazy[name][key].dtype and np.array_equal(value, lazy[name][key]), (name, key)
    assert_same_tensors(_lora(tmp_path / "upfront"), _lora(tmp_path / "lazy"))
    # A third run finds every file valid: nothing waits, the VAE goes before the first step.
    watch = Watch(monkeypatch)
    _run(data, tmp_path / "again", "--cache_latents_to_disk", "--flip_aug", steps=1)
    assert "latents: 8 images cached in disk (0 encoded now)" in capsys.readouterr().out
    assert watch.steps == [(0, 0, False)]


def test_training_starts_before_every_latent_is_encoded_and_the_vae_goes_after_the_last(data, tmp_path,
                                                                                       monkeypatch):
    watch = Watch(monkeypatch)
    result = _run(data, tmp_path / "out", steps=6)  # 4 batches of 2 images per epoch
    # accelerate's loader fetches one batch ahead: the first step had the latents of two batches (4 images).
    assert watch.steps[0] == (4, 4, True)
    complete = next(i for i, (_, waiting, _) in enumerate(watch.steps) if waiting == 0)
    assert all(vae for _, _, vae in watch.steps[: complete + 1])  # kept until the step after the last encode
    assert not any(vae for _, _, vae in watch.steps[complete + 1:]) and complete + 1 < len(watch.steps)
    assert watch.cache.encoded == COUNT and watch.released == 1
    assert result.method.parts.vae is None  # as after an upfront cache when nothing samples


def test_a_broken_image_is_named_once_and_skipped_while_latents_are_encoded_lazily(data, tmp_path, monkeypatch,
                                                                                    capfd):
    data_bytes = (data / "img000.png").read_bytes()
    (data / "img000.png").write_bytes(data_bytes[: len(data_bytes) // 2])
    watch = Watch(monkeypatch)
    result = _run(data, tmp_path / "out", steps=6)
    assert result.global_step == 6 and (tmp_path / "out" / "net.safetensors").is_file()
    out, err = capfd.readouterr()
    assert LAZY_LINE in out and "Traceback" not in err
    warnings = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("warning: skipped image")]
    assert len(warnings) == 1 and str(data / "img000.png") in warnings[0]
    assert watch.cache.failed.keys() == {data / "img000.png"} and watch.cache.encoded == COUNT - 1
    assert watch.released == 1 and result.method.parts.vae is None


# ---- the cache alone


def _request(path, bucket=(32, 32)):
    """A request for a file of its own (its key hashes the file) whose prepared pixels are flat grey."""
    if not path.exists():
        path.write_bytes(b"x")
    pixels = np.full((bucket[1], bucket[0], 3), 128, np.uint8)
    return LatentRequest(path, bucket, bucket, (0, 0, *bucket), lambda: pixels)


def test_get_encodes_the_whole_vae_batch_of_a_waiting_image(tmp_path, tiny_parts):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    vae = tiny_parts["tiny-sd1"].vae
    settings = {"batch_size": 2, "seed": 3, "device": "cpu", "dtype": torch.float32}
    lazy = LatentCache(to_disk=False, vae_identity="v")
    assert lazy.plan_lazily([_request(p) for p in paths], vae, **settings) == 3
    lazy.get(_request(paths[1]))
    assert (lazy.encoded, lazy.waiting, lazy.just_completed()) == (2, 1, False)  # paths[0] came with it
    lazy.get(_request(paths[2]))
    assert (lazy.waiting, lazy.just_completed(), lazy.just_completed()) == (0, True, False)
    upfront = LatentCache(to_disk=False, vae_identity="v")
    assert upfront.encode_missing([_request(p) for p in paths], vae, **settings) == 3
    for path in paths:
        assert torch.equal(lazy.get(_request(path)).latents, upfront.get(_request(path)).latents)


def test_a_broken_image_raises_corrupt_image_error_from_get(tmp_path, tiny_parts):
    def broken():
        raise CorruptImageError(tmp_path / "b.png", "image file is truncated")

    good = _request(tmp_path / "a.png")
    # b.png does not exist: its key cannot be computed and its pixels cannot be read, as a file deleted after the plan
    bad = LatentRequest(tmp_path / "b.png", (32, 32), (32, 32), (0, 0, 32, 32), broken)
    cache = LatentCache(to_disk=False, vae_identity="v")
    cache.plan_lazily([good, bad], tiny_parts["tiny-sd1"].vae, batch_size=2, seed=0, device="cpu",
                      dtype=torch.float32)
    assert cache.get(good).latents.shape == (4, 4, 4)
    with pytest.raises(CorruptImageError, match="truncated"):
        cache.get(bad)
    assert cache.waiting == 0 and cache.failed == {tmp_path / "b.png": "image file is truncated"}


def test_lazy_encoding_refuses_to_run_in_a_data_loader_worker(tmp_path, tiny_parts, monkeypatch):
    cache = LatentCache(to_disk=False, vae_identity="v")
    cache.plan_lazily([_request(tmp_path / "a.png")], tiny_parts["tiny-sd1"].vae, batch_size=1, seed=0,
                      device="cpu", dtype=torch.float32)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=0))
    with pytest.raises(RuntimeError, match="main process"):
        cache.get(_request(tmp_path / "a.png"))


def test_loader_workers_are_dropped_only_while_latents_wait(tmp_path, tiny_parts):
    config = SimpleNamespace(max_data_loader_n_workers=2)
    said = []
    cache = LatentCache(to_disk=False, vae_identity="v")
    assert latents_module.loader_workers(config, cache, said.append) == 2  # nothing planned: complete
    cache.plan_lazily([_request(tmp_path / "a.png")], tiny_parts["tiny-sd1"].vae, batch_size=1, seed=0,
                      device="cpu", dtype=torch.float32)
    assert latents_module.loader_workers(config, cache, said.append) == 0
    assert latents_module.loader_workers(config, None, said.append) == 2
    assert len(said) == 1 and "max_data_loader_n_workers 2 ignored" in said[0]


def test_the_cache_identity_is_the_resolved_model_and_its_vae(tmp_path, monkeypatch):
    """`./m.safetensors` and its absolute path share cached latents; a --vae file replacing the VAE does not."""
    from library.training.latents import vae_identity

    (tmp_path / "m.safetensors").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert vae_identity("m.safetensors", torch.float32) == vae_identity(str(tmp_path / "m.safetensors"), torch.float32)
    assert vae_identity("m.safetensors", torch.float32, "vae.pt") != vae_identity("m.safetensors", torch.float32)
    assert vae_identity("m.safetensors", torch.float16) != vae_identity("m.safetensors", torch.float32)
    assert vae_identity("tiny-sd1", torch.float16) == "tiny-sd1:torch.float16"

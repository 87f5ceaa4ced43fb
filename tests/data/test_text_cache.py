"""Text-encoder output cache: unchanged captions are not encoded again, changed ones are; memory and disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from library.data import text_cache
from library.data.text_cache import TextEncoderCache, TextRequest, npz_path
from library.errors import UserError

IDENTITY = "tiny-sd1 clip_skip=1 max_token_length=75 float32"


class CountingEncoder:
    """The real tiny CLIP text encoder behind `encode(captions) -> [B, 77, C]`, recording every batch it gets."""

    def __init__(self, parts):
        self.parts = parts
        self.batches: list[list[str]] = []

    def __call__(self, captions: list[str]) -> torch.Tensor:
        self.batches.append(list(captions))
        ids = self.parts.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
        return self.parts.text_encoder(ids)[0]

    @property
    def captions(self) -> list[str]:
        return [c for batch in self.batches for c in batch]


@pytest.fixture
def encoder(tiny_parts):
    return CountingEncoder(tiny_parts["tiny-sd1"])


@pytest.fixture
def requests(tmp_path):
    captions = ["sks dog, photo 0", "sks dog, photo 1", "sks dog, photo 0"]  # two images share a caption
    return [TextRequest(tmp_path / f"img{i}.png", c) for i, c in enumerate(captions)]


def new_cache(to_disk, **kwargs) -> TextEncoderCache:
    return TextEncoderCache(to_disk=to_disk, encoder_identity=kwargs.pop("identity", IDENTITY), **kwargs)


@pytest.mark.parametrize("to_disk", [True, False])
def test_outputs_round_trip_and_match_the_encoder(requests, encoder, to_disk):
    cache = new_cache(to_disk)
    assert cache.encode_missing(requests, encoder, batch_size=8) == 2  # the shared caption is encoded once
    reread = new_cache(to_disk) if to_disk else cache
    with torch.no_grad():
        direct = encoder(["sks dog, photo 0", "sks dog, photo 1"])
    assert reread.get(requests[0]).shape == (77, 32) and reread.get(requests[0]).dtype == torch.float32
    assert torch.equal(reread.get(requests[0]), direct[0])
    assert torch.equal(reread.get(requests[1]), direct[1])
    assert torch.equal(reread.get(requests[2]), direct[0])


@pytest.mark.parametrize("to_disk", [True, False])
def test_unchanged_captions_are_not_encoded_again(requests, encoder, to_disk):
    cache = new_cache(to_disk)
    cache.encode_missing(requests, encoder, batch_size=8)
    encoder.batches.clear()
    again = new_cache(to_disk) if to_disk else cache
    assert again.missing(requests) == []
    assert again.encode_missing(requests, encoder, batch_size=8) == 0
    assert encoder.batches == []


@pytest.mark.parametrize("to_disk", [True, False])
def test_a_changed_caption_is_encoded_alone(requests, encoder, to_disk):
    cache = new_cache(to_disk)
    cache.encode_missing(requests, encoder, batch_size=8)
    encoder.batches.clear()
    edited = [requests[0], TextRequest(requests[1].image_path, "sks dog, photo 1, blue"), requests[2]]
    again = new_cache(to_disk) if to_disk else cache
    assert again.missing(edited) == [edited[1]]
    assert again.encode_missing(edited, encoder, batch_size=8) == 1
    assert encoder.captions == ["sks dog, photo 1, blue"]
    with torch.no_grad():
        assert torch.equal(again.get(edited[1]), encoder(["sks dog, photo 1, blue"])[0])


def test_another_encoder_identity_re_encodes_everything(requests, encoder):
    new_cache(True).encode_missing(requests, encoder, batch_size=8)
    other = new_cache(True, identity=IDENTITY.replace("clip_skip=1", "clip_skip=2"))
    assert other.missing(requests) == requests
    assert new_cache(True).missing(requests) == []


def test_batches_respect_batch_size(requests, encoder, tmp_path):
    more = requests + [TextRequest(tmp_path / "img9.png", "a cat")]
    new_cache(False).encode_missing(more, encoder, batch_size=2)
    assert encoder.batches == [["sks dog, photo 0", "sks dog, photo 1"], ["a cat"]]
    with pytest.raises(UserError, match="batch size"):
        new_cache(False).encode_missing(more, encoder, batch_size=0)


def test_disk_file_name_and_keys(requests, encoder):
    new_cache(True).encode_missing(requests[:1], encoder, batch_size=1)
    path = npz_path(requests[0].image_path)
    assert path.name == "img0_sd_te_outputs.npz"
    with np.load(path) as npz:
        assert sorted(npz.files) == ["hidden_state", "sd_trainer_key"]
        assert npz["hidden_state"].dtype == np.float32
    assert sorted(p.name for p in path.parent.iterdir()) == ["img0_sd_te_outputs.npz"]  # no temporary left


def test_a_file_without_our_key_is_re_encoded_unless_skip_cache_check(requests, encoder):
    path = npz_path(requests[0].image_path)
    np.savez(path, hidden_state=np.zeros((77, 32), np.float32))
    assert new_cache(True).missing(requests[:1]) == requests[:1]
    trusting = new_cache(True, skip_check=True)
    assert trusting.missing(requests[:1]) == []
    assert torch.equal(trusting.get(requests[0]), torch.zeros(77, 32))


def test_a_truncated_file_is_re_encoded(requests, encoder):
    cache = new_cache(True)
    cache.encode_missing(requests[:1], encoder, batch_size=1)
    path = npz_path(requests[0].image_path)
    path.write_bytes(path.read_bytes()[:50])
    assert cache.missing(requests[:1]) == requests[:1]


def test_a_failed_write_keeps_the_old_file(requests, encoder, monkeypatch):
    new_cache(True).encode_missing(requests[:1], encoder, batch_size=1)
    path = npz_path(requests[0].image_path)
    good = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(text_cache.np, "savez", crash)
    # a failed write is one line naming the file (library.safe_write), never a traceback
    with pytest.raises(UserError, match=r"^could not write .*_sd(_te_outputs)?\.npz: disk full"):
        new_cache(True).encode_missing([TextRequest(requests[0].image_path, "new words")], encoder, batch_size=1)
    assert path.read_bytes() == good
    assert [p.name for p in Path(path.parent).iterdir()] == [path.name]


def test_get_before_encoding_says_what_to_do(requests):
    for to_disk in (True, False):
        with pytest.raises(KeyError, match="encode_missing"):
            new_cache(to_disk).get(requests[0])

"""Textual-inversion embedding files: round trips in three layouts, diffusers interop, shorthash, bad input."""

from __future__ import annotations

import copy
import hashlib
import os
import random

import pytest
import safetensors
import safetensors.torch
import torch

from library.errors import UserError
from library.formats.embedding_files import (a1111_shorthash, is_embedding_file, load_embedding, save_a1111,
                                             save_diffusers, save_kohya)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A1111_KEYS = {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
DIM = 32  # the tiny text encoder's hidden size


def vectors(n: int = 2, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def assert_user_error(err: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(err.value)


# ---- round trips ------------------------------------------------------------------------------------------------

def test_a1111_round_trip(tmp_path):
    vecs = vectors(3)
    path = save_a1111(tmp_path / "mything.pt", vecs, name="mything", step=1200, sd_checkpoint="0123456789",
                      sd_checkpoint_name="model")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == A1111_KEYS
    assert raw["string_to_token"] == {"*": 265} and raw["sd_checkpoint"] == "0123456789"
    assert raw["sd_checkpoint_name"] == "model"
    emb = load_embedding(path)
    assert torch.equal(emb.vectors, vecs)
    assert (emb.step, emb.name, emb.layout) == (1200, "mything", "a1111")


def test_a1111_stores_compact_cpu_copy(tmp_path):
    # A view of a big matrix must not drag the whole storage into the file.
    big = torch.randn(1000, DIM, requires_grad=True)
    path = save_a1111(tmp_path / "view.pt", big[-2:], name="view", step=0, dtype=torch.float16)
    stored = torch.load(path, weights_only=True)["string_to_param"]["*"]
    assert stored.dtype == torch.float16 and not stored.requires_grad
    assert stored.untyped_storage().nbytes() == 2 * DIM * 2
    assert os.path.getsize(path) < 10_000
    assert load_embedding(path).vectors.dtype == torch.float32


def test_kohya_safetensors_round_trip(tmp_path):
    vecs = vectors(4)
    path = save_kohya(tmp_path / "kohya.safetensors", vecs, metadata={"ss_steps": "500", "ss_output_name": "x"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"]
        assert f.metadata() == {"ss_steps": "500", "ss_output_name": "x"}
    emb = load_embedding(path)
    assert torch.equal(emb.vectors, vecs)
    assert (emb.step, emb.name, emb.layout) == (500, None, "kohya")


def test_kohya_pickle_round_trip(tmp_path):
    vecs = vectors(2)
    path = save_kohya(tmp_path / "kohya.pt", vecs, metadata={"ss_steps": "9"})
    assert set(torch.load(path, weights_only=True)) == {"emb_params"}
    emb = load_embedding(path)
    assert torch.equal(emb.vectors, vecs)
    assert (emb.step, emb.name, emb.layout) == (0, None, "kohya")


def test_diffusers_round_trip(tmp_path):
    vecs = vectors(3)
    folder = save_diffusers(tmp_path / "emb", vecs, token="<cat>", metadata={"ss_steps": "42"})
    assert sorted(p.name for p in folder.iterdir()) == ["learned_embeds.safetensors"]
    with safetensors.safe_open(str(folder / "learned_embeds.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["<cat>"]
        assert f.metadata() == {"format": "pt", "ss_steps": "42"}
    for path in (folder, folder / "learned_embeds.safetensors"):
        emb = load_embedding(path)
        assert torch.equal(emb.vectors, vecs)
        assert (emb.step, emb.name, emb.layout) == (42, "<cat>", "diffusers")


def test_old_diffusers_bin_with_1d_tensor(tmp_path):
    vec = vectors(1)[0]
    (tmp_path / "old").mkdir()
    torch.save({"<old>": vec}, tmp_path / "old" / "learned_embeds.bin")
    emb = load_embedding(tmp_path / "old")
    assert emb.vectors.shape == (1, DIM) and torch.equal(emb.vectors[0], vec)
    assert (emb.name, emb.layout) == ("<old>", "diffusers")


def test_diffusers_save_refuses_folder_with_other_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"keep me")
    with pytest.raises(UserError, match="other files") as err:
        save_diffusers(tmp_path / "out", vectors(), token="t")
    assert_user_error(err)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"keep me"


def test_diffusers_save_replaces_old_embedding(tmp_path):
    save_diffusers(tmp_path / "emb", vectors(seed=1), token="t")
    new = vectors(seed=2)
    save_diffusers(tmp_path / "emb", new, token="t")
    assert torch.equal(load_embedding(tmp_path / "emb").vectors, new)


# ---- diffusers interop ------------------------------------------------------------------------------------------

@pytest.fixture
def pipe(tiny_parts):
    import diffusers

    from library.models.tokenizer import load_tokenizer

    parts = tiny_parts["tiny-sd1"]
    return diffusers.StableDiffusionPipeline(
        vae=copy.deepcopy(parts.vae), text_encoder=copy.deepcopy(parts.text_encoder), tokenizer=load_tokenizer(False),
        unet=copy.deepcopy(parts.unet), scheduler=diffusers.DDIMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def rows(pipe, tokens: list[str]) -> torch.Tensor:
    ids = [pipe.tokenizer.convert_tokens_to_ids(token) for token in tokens]
    assert pipe.tokenizer.unk_token_id not in ids, tokens
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach()


def test_diffusers_loads_a1111_file(pipe, tmp_path):
    vecs = vectors(1)
    path = save_a1111(tmp_path / "a1.pt", vecs, name="a1thing", step=10)
    pipe.load_textual_inversion(str(path))
    assert torch.equal(rows(pipe, ["a1thing"]), vecs)


def test_diffusers_loads_kohya_file(pipe, tmp_path):
    vecs = vectors(1)
    path = save_kohya(tmp_path / "k.safetensors", vecs, metadata={"ss_steps": "3"})
    pipe.load_textual_inversion(str(path), token="mytok")
    assert torch.equal(rows(pipe, ["mytok"]), vecs)


def test_diffusers_loads_multi_vector_folder(pipe, tmp_path):
    # "<tok>", not "tok": diffusers refuses a token already in CLIP's vocabulary, and "tok" is a BPE piece there.
    vecs = vectors(3)
    folder = save_diffusers(tmp_path / "tok-folder", vecs, token="<tok>")
    pipe.load_textual_inversion(str(folder))
    assert torch.equal(rows(pipe, ["<tok>", "<tok>_1", "<tok>_2"]), vecs)


# ---- shorthash --------------------------------------------------------------------------------------------------

def test_a1111_shorthash(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert a1111_shorthash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert a1111_shorthash(tmp_path / "missing.safetensors") is None
    assert a1111_shorthash(tmp_path) is None
    assert a1111_shorthash("runwayml/stable-diffusion-v1-5") is None


# ---- bad input --------------------------------------------------------------------------------------------------

def check_refused(path, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        load_embedding(path)
    assert_user_error(err)
    assert is_embedding_file(path) is False


def test_missing_path(tmp_path):
    check_refused(tmp_path / "nope.pt", "does not exist")


def test_folder_without_embedding(tmp_path):
    check_refused(tmp_path, "neither learned_embeds")


def test_lora_like_safetensors(tmp_path):
    lora = {f"lora_unet_block_{i}.lora_down.weight": torch.zeros(4, 8) for i in range(3)}
    safetensors.torch.save_file(lora, str(tmp_path / "lora.safetensors"))
    check_refused(tmp_path / "lora.safetensors", r"not a textual-inversion embedding: it holds 3 tensors \(lora_unet_")


def test_checkpoint_like_pickle(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(2)}, "global_step": 1}, tmp_path / "model.ckpt")
    check_refused(tmp_path / "model.ckpt", r"holds 2 entries \(state_dict")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_sdxl_embedding(tmp_path, suffix):
    data = {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}
    path = tmp_path / f"xl{suffix}"
    if suffix == ".pt":
        torch.save(data, path)
    else:
        safetensors.torch.save_file(data, str(path))
    check_refused(path, "SDXL.*SD 1.x/2.x")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(random.Random(0).randbytes(4096))  # seeded: some byte strings are pickles of a global
    check_refused(path, "could not be read")


def test_pickled_modules_are_refused(tmp_path):
    # The original textual-inversion code pickled an nn.ParameterDict, which weights_only loading refuses.
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors())})
    torch.save({"string_to_param": params, "name": "old"}, tmp_path / "old.pt")
    check_refused(tmp_path / "old.pt", "safe loading refuses.*ParameterDict")


def test_3d_tensor(tmp_path):
    safetensors.torch.save_file({"emb_params": torch.zeros(1, 2, DIM)}, str(tmp_path / "3d.safetensors"))
    check_refused(tmp_path / "3d.safetensors", r"shape \(1, 2, 32\)")


def test_non_tensor_value(tmp_path):
    torch.save({"<tok>": [1.0, 2.0]}, tmp_path / "list.pt")
    check_refused(tmp_path / "list.pt", "holds a list under '<tok>', not a tensor")


def test_a1111_with_several_terms(tmp_path):
    torch.save({"string_to_param": {"a": vectors(), "b": vectors()}, "name": "x"}, tmp_path / "two.pt")
    check_refused(tmp_path / "two.pt", "has several embeddings")


def test_is_embedding_file_true_for_every_layout(tmp_path):
    assert is_embedding_file(save_a1111(tmp_path / "a.pt", vectors(), name="a", step=1))
    assert is_embedding_file(save_kohya(tmp_path / "k.safetensors", vectors()))
    assert is_embedding_file(save_diffusers(tmp_path / "d", vectors(), token="d"))

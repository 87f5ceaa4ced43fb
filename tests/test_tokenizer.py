"""The bundled CLIP tokenizer: ids match OpenAI's SimpleTokenizer, loading is offline, bad input is a UserError."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import socket

import pytest

from library.errors import UserError
from library.models.tokenizer import BUNDLED_DIR, load_tokenizer
from tools import build_tokenizer

BOS, EOS = 49406, 49407

# Expected ids came from OpenAI's original clip/simple_tokenizer.py SimpleTokenizer (openai-clip==1.0.1 sdist,
# unpacked in /tmp, ftfy installed) run once while developing: [BOS] + SimpleTokenizer().encode(caption) + [EOS].
REFERENCE_IDS = {
    "a photo of a cat": [BOS, 320, 1125, 539, 320, 2368, EOS],
    "masterpiece, best quality, 1girl, solo, looking at viewer":
        [BOS, 12066, 267, 949, 3027, 267, 272, 1611, 267, 5797, 267, 1312, 536, 15061, EOS],
    "A DSLR photo of sks dog, 8k!!": [BOS, 320, 33740, 1125, 539, 48136, 1929, 267, 279, 330, 748, EOS],
    "an emoji 🐶 and café": [BOS, 550, 16327, 10631, 537, 15304, EOS],
    "The QUICK brown fox's tail: 3.5m long; isn't it?!":
        [BOS, 518, 3712, 2866, 3240, 568, 4132, 281, 274, 269, 276, 332, 1538, 282, 2923, 713, 585, 2835, EOS],
    "  Hello,   WORLD!\tIt's a <lora:foo:0.8> (cat:1.2) [dog] 12345 — \"quotes\" 日本語 naïve  ":
        [BOS, 3306, 267, 1002, 256, 585, 568, 320, 283, 2179, 320, 281, 23435, 281, 271, 269, 279, 285, 263, 2368,
         281, 272, 269, 273, 264, 314, 1929, 316, 272, 273, 274, 275, 276, 2005, 257, 5808, 257, 39121, 44353,
         34002, 508, 1097, 35689, 563, EOS],
}
# Not listed on purpose: SimpleTokenizer runs ftfy.fix_text + html.unescape, HF's CLIPTokenizer only NFC, so
# "&amp;", curly quotes, ligatures, full-width letters and mojibake tokenize differently (HF matches diffusers).


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here must pass offline: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_bundled_load_is_offline(monkeypatch):
    # The socket guard is active here (the module-scoped fixture below loads before it); offline mode on top.
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for v2 in (False, True):
        assert load_tokenizer(v2=v2)("a photo of a cat")["input_ids"] == REFERENCE_IDS["a photo of a cat"]


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sd2"])
def bundled(request):
    return request.param, load_tokenizer(v2=request.param)


@pytest.mark.parametrize("caption", list(REFERENCE_IDS))
def test_matches_openai_simple_tokenizer(bundled, caption):
    _, tokenizer = bundled
    assert tokenizer(caption)["input_ids"] == REFERENCE_IDS[caption]


def test_vocab_and_specials(bundled):
    _, tokenizer = bundled
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    assert tokenizer.model_max_length == 77


def test_pad_to_max_length(bundled):
    v2, tokenizer = bundled
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length)["input_ids"]
    pad = 0 if v2 else EOS
    assert tokenizer.pad_token_id == pad
    assert ids == REFERENCE_IDS["a photo of a cat"] + [pad] * (77 - 7)


def test_truncation_keeps_eos(bundled):
    _, tokenizer = bundled
    ids = tokenizer("cat " * 100, padding="max_length", truncation=True, max_length=77)["input_ids"]
    assert len(ids) == 77 and ids[0] == BOS and ids[-1] == EOS


def test_empty_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        load_tokenizer(source=str(tmp_path))


def test_missing_folder_is_user_error(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match="nope"):
        load_tokenizer(source=missing)


def test_file_instead_of_folder_is_user_error(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(UserError, match="not a folder"):
        load_tokenizer(source=str(tmp_path / "vocab.json"))


def test_corrupt_folder_is_user_error(tmp_path):
    (tmp_path / "vocab.json").write_text("not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        load_tokenizer(source=str(tmp_path))


def test_unreachable_hub_id_is_user_error(monkeypatch):
    # Offline mode stands in for "no network"; transformers 5 would otherwise hand back an empty tokenizer.
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="sd-trainer-tests/no-such-tokenizer"):
        load_tokenizer(source="sd-trainer-tests/no-such-tokenizer")


def test_diffusers_model_folder_loads_its_tokenizer_subfolder(tmp_path):
    shutil.copytree(BUNDLED_DIR, tmp_path / "tokenizer")
    tokenizer = load_tokenizer(v2=True, source=str(tmp_path))
    assert tokenizer("a photo of a cat")["input_ids"] == REFERENCE_IDS["a photo of a cat"]
    assert tokenizer.pad_token_id == EOS  # a user-provided tokenizer keeps its own pad token


def _gz(text: str) -> bytes:
    return gzip.compress(text.encode("utf-8"), mtime=0)


def test_derivation_on_tiny_bpe_file():
    files = build_tokenizer.derive_tokenizer_files(_gz('"bpe#version: 0.2\ni n\nt h\nth e</w>\n'))
    assert files["merges.txt"] == b"#version: 0.2\ni n\nt h\nth e</w>\n"
    vocab = json.loads(files["vocab.json"])
    byte_chars = list(build_tokenizer.bytes_to_unicode().values())
    expected = [*byte_chars, *(c + "</w>" for c in byte_chars), "in", "th", "the</w>", build_tokenizer.BOS,
                build_tokenizer.EOS]
    assert list(vocab) == expected and list(vocab.values()) == list(range(len(expected)))
    assert (vocab["!"], vocab["a"], vocab["Ā"], vocab["!</w>"]) == (0, 64, 188, 256)  # CLIP's byte order


def test_derivation_rejects_malformed_merges():
    with pytest.raises(ValueError, match="malformed"):
        build_tokenizer.derive_tokenizer_files(_gz("#version: 0.2\ni n\nthree part line\n"))


def test_committed_files_are_reproducible():
    # The real .gz's lines past the kept merges are ignored, so header + committed merges must re-derive
    # the committed folder byte for byte (vocab.json included: it is computed, not copied).
    merges = (BUNDLED_DIR / "merges.txt").read_bytes()
    files = build_tokenizer.derive_tokenizer_files(gzip.compress(merges))
    for name, data in files.items():
        assert (BUNDLED_DIR / name).read_bytes() == data, name
    assert sorted(p.name for p in BUNDLED_DIR.iterdir()) == sorted(files)


@pytest.mark.slow
def test_build_script_from_pypi_sdist(tmp_path):
    # Needs PyPI: pip (a subprocess, so the socket guard does not apply) downloads openai-clip==1.0.1's sdist.
    build_tokenizer.main(["--out", str(tmp_path)])
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "NOTICE.txt"):
        assert (tmp_path / name).read_bytes() == (BUNDLED_DIR / name).read_bytes(), name


def test_build_script_writes_where_the_loader_reads():
    assert build_tokenizer.DEFAULT_OUT == BUNDLED_DIR.resolve()

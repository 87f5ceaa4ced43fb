"""Tokenisation and text encoding: chunk layouts, clip_skip and chunk joining pinned to sd-scripts' strategy_sd."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models.tiny import build_tiny
from library.training.text_encoding import PromptEncoder, encode, tokenize

BOS, EOS, V2_PAD = 49406, 49407, 0
CAT = "a photo of a cat"
CAT_IDS = [320, 1125, 539, 320, 2368]  # CLIP ids of CAT without BOS/EOS (see tests/test_tokenizer.py)
WORDS = ["red", "cat", "blue", "dog", "green", "tree", "house", "sky"]  # each one CLIP token


def words(count: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(count))


def content_ids(tokenizer, caption: str) -> list[int]:
    """The caption's ids without BOS/EOS and without any truncation."""
    return tokenizer(caption, truncation=False).input_ids[1:-1]


@pytest.fixture(scope="module")
def sd1(tiny_parts):
    return tiny_parts["tiny-sd1"]


@pytest.fixture(scope="module")
def sd2(tiny_parts):
    return tiny_parts["tiny-sd2"]


# ---- tokenize: chunk layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("max_token_length, n", [(150, 2), (225, 3)])
@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_long_caption_fills_every_chunk_and_is_truncated(tiny_parts, name, max_token_length, n):
    tokenizer = tiny_parts[name].tokenizer
    caption = words(300)
    flat = content_ids(tokenizer, caption)
    ids = tokenize(tokenizer, [caption], max_token_length=max_token_length)
    assert ids.shape == (1, n, 77) and ids.dtype == torch.long
    for k in range(n):
        # Both versions: every window is full, so it closes with the real EOS kept by truncation.
        assert ids[0, k].tolist() == [BOS] + flat[75 * k: 75 * (k + 1)] + [EOS]


def test_short_caption_225_sd1_pads_later_chunks_with_eos(sd1):
    ids = tokenize(sd1.tokenizer, [CAT], max_token_length=225)
    assert ids.shape == (1, 3, 77)
    assert ids[0, 0].tolist() == [BOS] + CAT_IDS + [EOS] * 71
    assert ids[0, 1].tolist() == [BOS] + [EOS] * 76
    assert ids[0, 2].tolist() == [BOS] + [EOS] * 76


def test_short_caption_225_sd2_marks_empty_chunks_bos_eos_pad(sd2):
    ids = tokenize(sd2.tokenizer, [CAT], max_token_length=225)
    assert ids[0, 0].tolist() == [BOS] + CAT_IDS + [EOS] + [V2_PAD] * 70
    assert ids[0, 1].tolist() == [BOS, EOS] + [V2_PAD] * 75
    assert ids[0, 2].tolist() == [BOS, EOS] + [V2_PAD] * 75


def test_mid_length_caption_150_sd1_vs_sd2(sd1, sd2):
    caption = words(100)
    flat = content_ids(sd1.tokenizer, caption)
    assert len(flat) == 100
    v1 = tokenize(sd1.tokenizer, [caption], max_token_length=150)[0]
    v2 = tokenize(sd2.tokenizer, [caption], max_token_length=150)[0]
    assert v1[0].tolist() == [BOS] + flat[:75] + [EOS]
    assert v1[1].tolist() == [BOS] + flat[75:] + [EOS] * 51
    # v2: the first window was closed with PAD (the caption's last id), then fixed to EOS because it runs to its end.
    assert v2[0].tolist() == [BOS] + flat[:75] + [EOS]
    assert v2[1].tolist() == [BOS] + flat[75:] + [EOS] + [V2_PAD] * 50


def test_sd2_caption_of_exactly_75_tokens_leaves_second_chunk_bos_eos_pad(sd2):
    caption = words(75)
    flat = content_ids(sd2.tokenizer, caption)
    assert len(flat) == 75
    ids = tokenize(sd2.tokenizer, [caption], max_token_length=150)[0]
    assert ids[0].tolist() == [BOS] + flat + [EOS]
    assert ids[1].tolist() == [BOS, EOS] + [V2_PAD] * 75


def test_sd2_real_bang_token_at_chunk_start_becomes_eos_as_in_sd_scripts(sd2):
    # "!??" is ids [0, 2197]: id 0 is also SD2's PAD, so sd-scripts' "<BOS> <PAD>" fixup rewrites the real "!".
    caption = words(75) + " !??"
    flat = content_ids(sd2.tokenizer, caption)
    assert flat[75:] == [V2_PAD, 2197]
    ids = tokenize(sd2.tokenizer, [caption], max_token_length=150)[0]
    assert ids[1].tolist() == [BOS, EOS, 2197, EOS] + [V2_PAD] * 73


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_no_max_token_length_is_one_plain_77_window(tiny_parts, name):
    parts = tiny_parts[name]
    ids = tokenize(parts.tokenizer, [CAT, words(100)], max_token_length=None)
    plain = parts.tokenizer([CAT, words(100)], padding="max_length", truncation=True, max_length=77,
                            return_tensors="pt").input_ids
    assert ids.shape == (2, 1, 77)
    assert torch.equal(ids[:, 0], plain)
    assert torch.equal(tokenize(parts.tokenizer, [CAT, words(100)], max_token_length=75), ids)


def test_batch_tokenize_equals_one_caption_at_a_time(sd2):
    captions = [CAT, words(100), "", words(300, offset=3)]
    batch = tokenize(sd2.tokenizer, captions, max_token_length=225)
    singles = torch.cat([tokenize(sd2.tokenizer, [c], max_token_length=225) for c in captions])
    assert torch.equal(batch, singles)


@pytest.mark.parametrize("bad", [0, 76, 77, 100, 151, 300, -75])
def test_bad_max_token_length_is_a_user_error(sd1, bad):
    with pytest.raises(UserError, match="--max_token_length must be 75 \\(None\\), 150 or 225"):
        tokenize(sd1.tokenizer, [CAT], max_token_length=bad)
    with pytest.raises(UserError, match="--max_token_length"):
        encode(sd1.text_encoder, torch.zeros(1, 1, 77, dtype=torch.long), clip_skip=None,
               max_token_length=bad)
    with pytest.raises(UserError, match="--max_token_length"):
        PromptEncoder(sd1.tokenizer, sd1.text_encoder, clip_skip=None, max_token_length=bad)


# ---- encode: clip_skip and joining -----------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_clip_skip_none_and_1_are_hf_last_hidden_state(sd1, clip_skip):
    ids = tokenize(sd1.tokenizer, [CAT, words(20)], max_token_length=None)
    out = encode(sd1.text_encoder, ids, clip_skip=clip_skip, max_token_length=None)
    assert torch.equal(out, sd1.text_encoder(ids[:, 0]).last_hidden_state)


@torch.no_grad()
def test_clip_skip_2_is_final_layer_norm_of_penultimate_layer(sd1):
    te = sd1.text_encoder
    ids = tokenize(sd1.tokenizer, [CAT, words(20)], max_token_length=None)
    states = te(ids[:, 0], output_hidden_states=True).hidden_states
    assert len(states) == 3  # embeddings, after layer 1, after layer 2: -2 is after layer 1 of 2
    norm = te.final_layer_norm
    expected = torch.nn.functional.layer_norm(states[1], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    out = encode(te, ids, clip_skip=2, max_token_length=None)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, te(ids[:, 0]).last_hidden_state)


@pytest.mark.parametrize("clip_skip", [0, 3, -1])
def test_clip_skip_outside_the_layers_is_a_user_error(sd1, clip_skip):
    ids = tokenize(sd1.tokenizer, [CAT], max_token_length=None)
    with pytest.raises(UserError, match="--clip_skip must be between 1 and 2"):
        encode(sd1.text_encoder, ids, clip_skip=clip_skip, max_token_length=None)


@torch.no_grad()
@pytest.mark.parametrize("max_token_length, n, length", [(150, 2, 152), (225, 3, 227)])
@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
@pytest.mark.parametrize("clip_skip", [None, 2])
def test_chunks_join_to_first_bos_inner_states_and_last_state(tiny_parts, name, clip_skip, max_token_length, n,
                                                              length):
    parts = tiny_parts[name]
    captions = [words(300), CAT]  # two different captions catch batch/chunk order mix-ups
    ids = tokenize(parts.tokenizer, captions, max_token_length=max_token_length)
    out = encode(parts.text_encoder, ids, clip_skip=clip_skip, max_token_length=max_token_length)
    assert out.shape == (2, length, 32)
    # Each window encoded on its own, then sd-scripts' joining done by hand.
    windows = [encode(parts.text_encoder, ids[:, k: k + 1], clip_skip=clip_skip,
                      max_token_length=None) for k in range(n)]
    torch.testing.assert_close(out[:, 0], windows[0][:, 0])
    for k in range(n):
        torch.testing.assert_close(out[:, 1 + 75 * k: 76 + 75 * k], windows[k][:, 1:76])
    torch.testing.assert_close(out[:, -1], windows[-1][:, 76])


@torch.no_grad()
def test_sd2_join_keeps_empty_chunk_eos_state_as_sd_scripts_does(sd2):
    # sd-scripts' v2 branch means to copy the next PAD state over an empty window's EOS, but its guard compares a
    # tensor with the string "<|endoftext|>" and is never true: the EOS state stays.
    ids = tokenize(sd2.tokenizer, [CAT], max_token_length=225)
    out = encode(sd2.text_encoder, ids, clip_skip=None, max_token_length=225)
    window = sd2.text_encoder(ids[:, 1]).last_hidden_state
    torch.testing.assert_close(out[:, 76], window[:, 1])  # window 1's EOS
    assert not torch.allclose(out[:, 76], window[:, 2])  # not its following PAD
    assert torch.equal(out, encode(sd2.text_encoder, ids, clip_skip=None, max_token_length=225))


def test_encode_rejects_ids_of_another_max_token_length(sd1):
    ids = tokenize(sd1.tokenizer, [CAT], max_token_length=150)
    with pytest.raises(ValueError, match="expected \\(B, 3, 77\\)"):
        encode(sd1.text_encoder, ids, clip_skip=None, max_token_length=225)


def test_encode_keeps_text_encoder_dtype_and_lets_gradients_through():
    parts = build_tiny("tiny-sd1", seed=0)
    te = parts.text_encoder.to(torch.bfloat16)
    ids = tokenize(parts.tokenizer, [CAT, words(100)], max_token_length=225)
    out = encode(te, ids, clip_skip=2, max_token_length=225)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grad = te.embeddings.token_embedding.weight.grad
    assert grad is not None and grad[CAT_IDS].abs().sum() > 0


@torch.no_grad()
def test_results_are_reproducible_across_calls_and_rebuilt_models(sd2):
    captions = [CAT, words(100)]
    first = PromptEncoder(sd2.tokenizer, sd2.text_encoder, clip_skip=2, max_token_length=150)(captions)
    again = PromptEncoder(sd2.tokenizer, sd2.text_encoder, clip_skip=2, max_token_length=150)(captions)
    rebuilt = build_tiny("tiny-sd2", seed=0)
    other = PromptEncoder(rebuilt.tokenizer, rebuilt.text_encoder, clip_skip=2, max_token_length=150)
    assert torch.equal(first, again)
    assert torch.equal(first, other(captions))


# ---- PromptEncoder ---------------------------------------------------------------------------------------------

class CountingTokenizer:
    """The real tokenizer, recording every caption it is asked to tokenize."""

    def __init__(self, tokenizer):
        self._tokenizer, self.seen = tokenizer, []

    def __call__(self, text, **kwargs):
        self.seen.extend([text] if isinstance(text, str) else text)
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):
        return len(self._tokenizer)


@torch.no_grad()
def test_prompt_encoder_tokenizes_each_caption_once_and_matches_encode(sd1):
    counting = CountingTokenizer(sd1.tokenizer)
    encoder = PromptEncoder(counting, sd1.text_encoder, clip_skip=None, max_token_length=225)
    captions = [CAT, "", CAT, words(100), "", CAT]
    out = encoder(captions)
    assert sorted(counting.seen) == sorted({CAT, "", words(100)})
    ids = tokenize(sd1.tokenizer, captions, max_token_length=225)
    assert torch.equal(out, encode(sd1.text_encoder, ids, clip_skip=None, max_token_length=225))
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[4])


def test_encoder_identity_names_what_the_outputs_depend_on(sd1):
    def identity(parts=sd1, **kwargs):
        settings = {"clip_skip": None, "max_token_length": None, "source": "tiny-sd1", **kwargs}
        return PromptEncoder(parts.tokenizer, parts.text_encoder, **settings).encoder_identity()

    base = identity()
    assert base == identity()
    assert "source=tiny-sd1" in base and "clip_skip=1" in base and "max_token_length=75" in base
    assert "dtype=float32" in base
    # Settings that give identical states share an identity; everything else changes it.
    assert identity(clip_skip=1) == base and identity(max_token_length=75) == base
    assert len({base, identity(clip_skip=2), identity(max_token_length=150), identity(max_token_length=225),
                identity(source="other"), identity(parts=build_tiny("tiny-sd1", seed=1))}) == 6
    half = build_tiny("tiny-sd1", seed=0)
    half.text_encoder.to(torch.float16)
    assert "dtype=float16" in identity(parts=half)

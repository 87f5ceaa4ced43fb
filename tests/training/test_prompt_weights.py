"""Prompt weights ("(cat:1.5)", "(cat)", "[cat]"): parsing as sd-scripts' parse_prompt_attention, token layout as its
tokenize_with_weights, hidden states scaled as its encode_tokens_with_weights, in training and in sample images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import train_network
from library.data.demo import make_demo_dataset
from library.training.prompt_weights import has_weights, parse_attention, tokenize_weighted
from library.training.sampling import SamplePrompt, sample_images
from library.training.text_encoding import tokenize

BOS, EOS = 49406, 49407
CAT_ID = 2368  # one CLIP token


def runs(text):
    return [(piece, round(weight, 6)) for piece, weight in parse_attention(text)]


@pytest.mark.parametrize("text, expected", [
    # The examples sd-scripts' parse_prompt_attention documents.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("[dim]", [("dim", round(1 / 1.1, 6))]),
    ("", [("", 1.0)]),
    ("ratio 16:9, (cat:1.5)", [("ratio 16:9, ", 1.0), ("cat", 1.5)]),
])
def test_parse_attention_reads_sd_scripts_examples(text, expected):
    assert runs(text) == expected


def test_has_weights_only_when_the_syntax_does_something():
    assert not has_weights("a photo of a cat, 16:9")
    assert has_weights("a (cat:1.2)") and has_weights("[cat]") and has_weights("\\(cat\\)")


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_plain_captions_tokenize_exactly_as_unweighted_with_unit_weights(tiny_parts, name, max_token_length):
    tokenizer = tiny_parts[name].tokenizer
    captions = ["a photo of a cat", " ".join(["red cat blue dog"] * 50), ""]
    ids, weights = tokenize_weighted(tokenizer, captions, max_token_length=max_token_length)
    assert torch.equal(ids, tokenize(tokenizer, captions, max_token_length=max_token_length))
    assert torch.equal(weights, torch.ones_like(weights))


def test_weights_follow_their_tokens_into_later_windows(tiny_parts):
    tokenizer = tiny_parts["tiny-sd1"].tokenizer
    caption = " ".join(["dog"] * 80) + " (cat:1.5) [cat]"
    ids, weights = tokenize_weighted(tokenizer, [caption], max_token_length=150)
    assert ids.shape == weights.shape == (1, 2, 77)
    # 80 dogs: the first window's 75 and five in the second, then the two cats at positions 6 and 7 of window 2.
    assert ids[0, 1, 6].item() == ids[0, 1, 7].item() == CAT_ID
    assert weights[0, 1, 6].item() == pytest.approx(1.5) and weights[0, 1, 7].item() == pytest.approx(1 / 1.1)
    others = torch.ones(2, 77, dtype=torch.bool)
    others[1, 6:8] = False
    assert torch.all(weights[0][others] == 1.0)


@pytest.mark.parametrize("max_token_length", [None, 150])
def test_weighted_hidden_states_scale_the_weighted_tokens_only(tiny_parts, max_token_length):
    parts = tiny_parts["tiny-sd1"]
    encoder = parts.family.prompt_encoder(parts, clip_skip=None, max_token_length=max_token_length, weighted=True)
    with torch.no_grad():
        plain = encoder(["a cat on a mat"], weighted=False)
        weighted = encoder(["a (cat:1.5) on a mat"])
    # "a " "cat" " on a mat" tokenize as the plain caption: the same ids, so the same states before weighting.
    assert weighted.shape == plain.shape
    cat = 2  # BOS, "a", "cat"
    torch.testing.assert_close(weighted[0, cat], plain[0, cat] * 1.5, rtol=0, atol=0)
    rest = torch.ones(plain.shape[1], dtype=torch.bool)
    rest[cat] = False
    assert torch.equal(weighted[0, rest], plain[0, rest])


def test_sdxl_weights_both_encoders_states_but_not_the_pooled_output(tiny_parts):
    parts = tiny_parts["tiny-sdxl"]
    encoder = parts.family.prompt_encoder(parts, clip_skip=None, max_token_length=None, weighted=True)
    with torch.no_grad():
        plain = encoder.conditioning(["a cat"], weighted=False)
        weighted = encoder.conditioning(["a (cat:0.5)"])
    torch.testing.assert_close(weighted.hidden[0, 2], plain.hidden[0, 2] * 0.5, rtol=0, atol=0)
    assert torch.equal(weighted.hidden[0, 3:], plain.hidden[0, 3:])
    assert torch.equal(weighted.pooled, plain.pooled)


def test_weighted_outputs_have_their_own_cache_identity(tiny_parts):
    parts = tiny_parts["tiny-sd1"]
    identities = {parts.family.prompt_encoder(parts, clip_skip=None, max_token_length=None,
                                              weighted=w).encoder_identity() for w in (False, True)}
    assert len(identities) == 2


def _image(parts, tmp_path, prompt, negative=None):
    small = {"width": 64, "height": 64, "steps": 2, "scale": 3.0, "seed": 5}
    path, = sample_images(parts, [SamplePrompt(prompt, negative_prompt=negative, enum=0, **small)],
                          output_dir=tmp_path / prompt.replace(":", "_"), output_name="t", step=0, epoch=None,
                          default_sampler="ddim", device="cpu")
    return np.asarray(Image.open(path))


def test_sample_prompts_read_weights_always(tiny_parts, tmp_path):
    parts = tiny_parts["tiny-sd1"]
    plain = _image(parts, tmp_path, "a cat")
    # "(cat:1)" read as weights is "cat" at weight 1: the same image; read as text, the brackets would change it.
    assert np.array_equal(_image(parts, tmp_path, "a (cat:1)"), plain)
    assert not np.array_equal(_image(parts, tmp_path, "a (cat:1.8)"), plain)
    assert not np.array_equal(_image(parts, tmp_path, "a cat", negative="(dog:1.8)"), plain)


def _train(data, out, *extra):
    return train_network.main([
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
        "--resolution", "32", "--output_dir", str(out), "--output_name", "net", "--max_train_steps", "2",
        "--learning_rate", "1e-3", "--network_dim", "4", "--seed", "3", "--max_data_loader_n_workers", "0", *extra])


def test_weighted_captions_train_on_the_weighted_states(tmp_path):
    make_demo_dataset(tmp_path / "plain", count=2, size=32)
    captions = sorted((tmp_path / "plain").rglob("*.txt"))
    make_demo_dataset(tmp_path / "unit", count=2, size=32)
    for path in sorted((tmp_path / "unit").rglob("*.txt")):
        path.write_text(f"({path.read_text()}:1)")  # weight 1 everywhere: the plain captions' states
    plain = _train(tmp_path / "plain", tmp_path / "a").losses
    assert _train(tmp_path / "unit", tmp_path / "b", "--weighted_captions").losses == plain
    assert _train(tmp_path / "unit", tmp_path / "c").losses != plain  # read as text, the brackets are tokens
    for path in captions:
        path.write_text(f"({path.read_text()}:1.5)")
    assert _train(tmp_path / "plain", tmp_path / "d", "--weighted_captions").losses != plain

"""Preview sampling: sd-scripts prompt files, the when-to-sample rule, every sampler, and PNGs from real tiny models."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.declarations import SAMPLERS as DECLARED_SAMPLERS
from library.errors import UserError
from library.models.tiny import build_tiny
from library.training.sampling import (
    BETA_END,
    BETA_START,
    PNDM_MIN_STEPS,
    SAMPLERS,
    SamplePrompt,
    load_prompts,
    make_sampler,
    parse_prompt_line,
    sample_file_name,
    sample_images,
    should_sample,
    with_defaults,
)
from networks.lora import create_network

SMALL = dict(width=64, height=64, steps=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts():
    """A private tiny SD1 model: these tests patch it with a LoRA (and restore it)."""
    return build_tiny("tiny-sd1", seed=0)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def sample(parts, tmp_path, prompts, **kwargs):
    options = dict(output_dir=tmp_path, output_name="test", step=5, epoch=None, default_sampler="ddim",
                   device="cpu") | kwargs
    return sample_images(parts, prompts, **options)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------------------------- prompt files
def test_txt_every_option_comments_and_blank_lines(tmp_path):
    path = write(tmp_path, "p.txt", "\n".join([
        "# a comment",
        "",
        "masterpiece, 1girl --n low quality, blurry --w 768 --h 640 --d 42 --s 20 --l 5.5 --ss euler_a",
        "   ",
        "  # an indented comment",
        "plain prompt",
        "CAPS --W 64 --H 72 --SS K_DPM_2_A --S 5000 --L 1",
        "only steps --s 0",
        "spaced   --w   96  --ss  dpmsolver++  --n  bad  ",
    ]))
    full, plain, caps, clamped, spaced = load_prompts(path)
    assert full == SamplePrompt(prompt="masterpiece, 1girl", negative_prompt="low quality, blurry", width=768,
                                height=640, seed=42, steps=20, scale=5.5, sample_sampler="euler_a", enum=0)
    # sd-scripts' defaults: 512x512, 30 steps, CFG 7.5, random seed, the run's sampler.
    assert plain == SamplePrompt(prompt="plain prompt", width=512, height=512, steps=30, scale=7.5, seed=None,
                                 sample_sampler=None, negative_prompt=None, enum=1)
    assert (caps.prompt, caps.width, caps.height, caps.sample_sampler, caps.steps, caps.scale) == (
        "CAPS", 64, 72, "k_dpm_2_a", 1000, 1.0)  # flags are case-insensitive; --s is clamped to 1..1000
    assert clamped.steps == 1
    assert (spaced.prompt, spaced.width, spaced.sample_sampler, spaced.negative_prompt) == (
        "spaced", 96, "dpmsolver++", "bad")
    assert [p.enum for p in (full, plain, caps, clamped, spaced)] == [0, 1, 2, 3, 4]


def test_line_options_of_other_families_are_ignored():
    p = parse_prompt_line("a cat --cn control.png --g 3.5 --ctr 0.2 --rcfg 1 --w 64")
    assert (p.prompt, p.width) == ("a cat", 64)


def test_line_may_start_with_an_option():
    assert parse_prompt_line("--n ugly --w 64") == SamplePrompt(prompt="", negative_prompt="ugly", width=64)


def test_toml_sd_scripts_schema_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "p.toml", """
[prompt]
negative_prompt = "lowres"
width = 640
height = 512
scale = 7
sample_steps = 28
seed = 1

[[prompt.subset]]
prompt = "first"

[[prompt.subset]]
prompt = "second"
width = 768
seed = 2
sample_sampler = "Euler_A"
""")
    first, second = load_prompts(path)
    assert first == SamplePrompt(prompt="first", negative_prompt="lowres", width=640, height=512, scale=7.0,
                                 steps=28, seed=1, enum=0)
    assert second == SamplePrompt(prompt="second", negative_prompt="lowres", width=768, height=512, scale=7.0,
                                  steps=28, seed=2, sample_sampler="euler_a", enum=1)
    assert isinstance(first.scale, float)


def test_toml_array_of_prompt_tables_and_lone_table(tmp_path):
    many = write(tmp_path, "many.toml", '[[prompt]]\nprompt = "a"\nwidth = 64\n\n[[prompt]]\nprompt = "b"\n'
                                        'clip_skip = 2\nguidance_scale = 3.5\n')
    assert load_prompts(many) == [SamplePrompt(prompt="a", width=64, enum=0),
                                  SamplePrompt(prompt="b", clip_skip=2, enum=1)]
    lone = write(tmp_path, "lone.toml", '[prompt]\nprompt = "only"\nseed = 3\n')
    assert load_prompts(lone) == [SamplePrompt(prompt="only", seed=3)]


def test_json_objects_and_prompt_lines(tmp_path):
    path = write(tmp_path, "p.json", json.dumps([
        {"prompt": "a", "negative_prompt": "b", "width": 64, "height": 80, "sample_steps": 3, "scale": 4,
         "seed": 9, "sample_sampler": "heun", "enum": 7, "controlnet_image": "x.png"},
        "c --w 96 --d 4",
        {"prompt": "d", "seed": None},
    ]))
    a, c, d = load_prompts(path)
    assert a == SamplePrompt(prompt="a", negative_prompt="b", width=64, height=80, steps=3, scale=4.0, seed=9,
                             sample_sampler="heun", enum=0)  # the file's "enum" is ignored, position counts
    assert c == SamplePrompt(prompt="c", width=96, seed=4, enum=1)
    assert d == SamplePrompt(prompt="d", enum=2)


def test_utf8_bom_and_non_ascii(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff猫 --n 犬\n".encode("utf-8"))
    assert load_prompts(path) == [SamplePrompt(prompt="猫", negative_prompt="犬")]


@pytest.mark.parametrize("line, message", [
    ("a cat --x 3", "unknown option '--x'"),
    ("a cat --steps 20", "unknown option '--steps'"),
    ("a cat --w abc", "'--w abc' needs a whole number"),
    ("a cat --d -1", "'--d -1' needs a whole number"),
    ("a cat --l 7.5.5", "'--l 7.5.5' needs a number"),
    ("a cat --n", "option '--n' needs a value"),
    ("a cat --ss euler_x", "unknown sampler 'euler_x' (did you mean 'euler_a'?)"),
    ("a cat --ss ddpm", "unknown sampler 'ddpm'"),
    ("a cat --d 18446744073709551616", "seed 18446744073709551616 is too large"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path, "p.txt", f"# header\n\ngood prompt\n{line}\n")
    with pytest.raises(UserError) as err:
        load_prompts(path)
    assert str(err.value).startswith(f"{path}:4: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, text, message", [
    ("p.toml", '[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nsteps = 3\n',
     "[[prompt.subset]] #2: unknown key 'steps'"),
    ("p.toml", '[prompt]\nwidth = "wide"\n[[prompt.subset]]\nprompt = "a"\n',
     "[[prompt.subset]] #1: 'width' must be a whole number >= 0, got 'wide'"),
    ("p.toml", '[prompts]\nprompt = "a"\n', "expected a [prompt] table"),
    ("p.toml", '[prompt]\nprompt = "a\n', ":2:"),  # TOML syntax error: line named
    ("p.json", '[{"prompt": "a"}, {"prompt": "b", "seed": true}]', "entry #2: 'seed' must be a whole number"),
    ("p.json", '{"prompt": "a"}', "expected a JSON list"),
    ("p.json", '[{"prompt": "a"},\n 3]', "entry #2: a prompt must be"),
    ("p.json", '[{"prompt": "a"},\n {"prompt": }]', ":2:"),
    ("p.json", '["a --w x"]', "entry #1: '--w x' needs a whole number"),
    ("p.yaml", "prompt: a", "must end in .txt, .toml or .json"),
])
def test_bad_toml_and_json(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(UserError) as err:
        load_prompts(path)
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist; check --sample_prompts"):
        load_prompts(tmp_path / "nope.txt")


def test_with_defaults_fills_only_unset_fields():
    kept, filled = with_defaults([SamplePrompt("a", clip_skip=1), SamplePrompt("b")], clip_skip=2)
    assert (kept.clip_skip, filled.clip_skip) == (1, 2)


# ------------------------------------------------------------------------------------------- when to sample
@pytest.mark.parametrize("opts, step, epoch, at_first, expected", [
    ({"sample_at_first": True}, 0, 0, True, True),
    ({"sample_at_first": False, "sample_every_n_steps": 1}, 0, 0, True, False),  # at first: only sample_at_first
    ({"sample_at_first": True}, 0, None, False, True),  # sd-scripts treats step 0 as "at first"
    ({}, 10, None, False, False),
    ({"sample_every_n_steps": 5}, 10, None, False, True),
    ({"sample_every_n_steps": 5}, 11, None, False, False),
    ({"sample_every_n_steps": 5}, 10, 2, False, False),  # epoch-end call: steps alone never sample there
    ({"sample_every_n_epochs": 2}, 10, 2, False, True),
    ({"sample_every_n_epochs": 2}, 10, 3, False, False),
    ({"sample_every_n_epochs": 2}, 10, None, False, False),  # mid-epoch: epochs rule never samples
    ({"sample_every_n_epochs": 2, "sample_every_n_steps": 5}, 10, None, False, False),  # epochs win
    ({"sample_every_n_epochs": 2, "sample_every_n_steps": 5}, 12, 2, False, True),
    ({"sample_every_n_epochs": 1}, 7, 1, False, True),
])
def test_should_sample(opts, step, epoch, at_first, expected):
    assert should_sample(opts, step=step, epoch=epoch, at_first=at_first) is expected


def test_should_sample_reads_attribute_options():
    from argparse import Namespace

    options = Namespace(sample_every_n_steps=3, sample_every_n_epochs=None, sample_at_first=False)
    assert should_sample(options, step=6, epoch=None, at_first=False)


# ------------------------------------------------------------------------------------------- samplers
def test_sampler_names_match_the_declared_choices():
    assert set(SAMPLERS) == set(DECLARED_SAMPLERS)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("v_param", [False, True])
def test_make_sampler_uses_sd_noise_schedule(name, v_param):
    scheduler = make_sampler(name, v_parameterization=v_param)
    assert isinstance(scheduler, SAMPLERS[name])
    config = scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule, config.num_train_timesteps) == (
        BETA_START, BETA_END, "scaled_linear", 1000)
    assert config.prediction_type == ("v_prediction" if v_param else "epsilon")
    if name.startswith("dpmsolver"):
        assert config.algorithm_type == name
    assert make_sampler(name, v_parameterization=v_param) is not scheduler  # fresh state per image


def test_unknown_sampler_is_a_user_error():
    with pytest.raises(UserError, match="unknown sampler 'euler_b'"):
        make_sampler("euler_b", v_parameterization=False)


def test_every_sampler_runs_two_steps(parts, tmp_path):
    # PNDM's order-4 warm-up needs 4 steps in diffusers (checked below); every other sampler runs 2.
    prompts = [SamplePrompt("a red cat", seed=1, sample_sampler=name, enum=i, scale=1.0,
                            **SMALL | {"steps": PNDM_MIN_STEPS if name == "pndm" else 2})
               for i, name in enumerate(SAMPLERS)]
    paths = sample(parts, tmp_path, prompts)
    assert len(paths) == len(SAMPLERS)
    for path in paths:
        image = pixels(path)
        assert image.shape == (64, 64, 3)
        assert image.std() > 1  # a real decoded picture, not a constant fill
    # The per-prompt sampler really changed the scheduler: ddim and euler_a do not agree.
    assert not np.array_equal(pixels(paths[0]), pixels(paths[list(SAMPLERS).index("euler_a")]))


def test_pndm_below_four_steps_is_refused_before_sampling(parts, tmp_path):
    path = write(tmp_path, "p.txt", "a\nb --ss pndm --s 3\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:2: the pndm sampler needs at least 4 steps"):
        load_prompts(path)
    prompts = [SamplePrompt("a", seed=1, enum=0, **SMALL), SamplePrompt("b", seed=1, enum=1, **SMALL)]
    with pytest.raises(UserError, match="sample prompt #1: the pndm sampler needs at least 4 steps, got 2"):
        sample(parts, tmp_path, prompts, default_sampler="pndm")
    assert not (tmp_path / "sample").exists()  # nothing generated before the check


def test_v_parameterization_model_samples(parts, tmp_path):
    v_parts = dataclasses.replace(parts, v_parameterization=True)
    eps, v = (sample(p, tmp_path / str(i), [SamplePrompt("a", seed=3, **SMALL)])[0]
              for i, p in enumerate((parts, v_parts)))
    assert not np.array_equal(pixels(eps), pixels(v))


# ------------------------------------------------------------------------------------------- images
def test_file_names_and_sizes(parts, tmp_path):
    prompts = [SamplePrompt("a", seed=42, enum=0, **SMALL),
               SamplePrompt("b", seed=None, width=100, height=70, steps=1, enum=1)]
    paths = sample(parts, tmp_path, prompts, step=123)
    assert [p.parent for p in paths] == [tmp_path / "sample"] * 2
    assert re.fullmatch(r"test_000123_00_\d{14}_42\.png", paths[0].name)
    assert re.fullmatch(r"test_000123_01_\d{14}\.png", paths[1].name)  # no seed, no seed suffix
    assert Image.open(paths[0]).size == (64, 64)
    assert Image.open(paths[1]).size == (96, 64)  # rounded down to multiples of 8, at least 64
    assert sorted(p.name for p in (tmp_path / "sample").iterdir()) == sorted(p.name for p in paths)  # no temp files

    by_epoch = sample(parts, tmp_path, prompts[:1], output_name=None, step=7, epoch=3)
    assert re.fullmatch(r"e000003_00_\d{14}_42\.png", by_epoch[0].name)


def test_sample_file_name_format():
    when = (2024, 5, 6, 7, 8, 9, 0, 0, 0)
    assert sample_file_name("lora", step=12, epoch=None, enum=3, seed=7, when=when) == \
        "lora_000012_03_20240506070809_7.png"
    assert sample_file_name(None, step=12, epoch=0, enum=10, seed=None, when=when) == \
        "e000000_10_20240506070809.png"


def test_same_seed_same_pixels_other_seed_other_pixels(parts, tmp_path):
    first = sample(parts, tmp_path / "1", [SamplePrompt("a cat", seed=5, sample_sampler="euler_a", **SMALL)])
    torch.manual_seed(999)  # the training RNG moving on must not matter
    again = sample(parts, tmp_path / "2", [SamplePrompt("a cat", seed=5, sample_sampler="euler_a", **SMALL)])
    other = sample(parts, tmp_path / "3", [SamplePrompt("a cat", seed=6, sample_sampler="euler_a", **SMALL)])
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert not np.array_equal(pixels(first[0]), pixels(other[0]))


def test_negative_prompt_and_scale_matter(parts, tmp_path):
    base = SamplePrompt("a cat", seed=5, **SMALL)
    variants = [base, dataclasses.replace(base, negative_prompt="a dog"), dataclasses.replace(base, scale=1.0)]
    images = [pixels(sample(parts, tmp_path / str(i), [p])[0]) for i, p in enumerate(variants)]
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_lora_changes_the_image_and_restore_brings_it_back(parts, tmp_path):
    prompt = [SamplePrompt("a cat", seed=11, **SMALL)]
    base = pixels(sample(parts, tmp_path / "base", prompt)[0])
    network = create_network(1.0, 4, 2, None, parts.text_encoder, parts.unet)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(param.numel()))
    network.apply_to(parts.text_encoder, parts.unet)
    try:
        with_lora = pixels(sample(parts, tmp_path / "lora", prompt)[0])
    finally:
        network.restore()
    assert not np.array_equal(base, with_lora)
    assert np.array_equal(base, pixels(sample(parts, tmp_path / "after", prompt)[0]))


def test_adapter_dropout_is_off_while_sampling(parts, tmp_path):
    network = create_network(1.0, 4, 2, None, parts.text_encoder, parts.unet, neuron_dropout=0.5)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(param.numel()))
    network.apply_to(parts.text_encoder, parts.unet)
    network.train()
    prompt = [SamplePrompt("a cat", seed=11, **SMALL)]
    try:
        one = pixels(sample(parts, tmp_path / "1", prompt, extra_modules=[network])[0])
        two = pixels(sample(parts, tmp_path / "2", prompt, extra_modules=[network])[0])
    finally:
        network.restore()
    assert np.array_equal(one, two)  # dropout would draw new masks from the global RNG each time
    assert network.training and all(m.training for m in network.modules())


def test_caller_rng_state_is_untouched(parts, tmp_path):
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    sample(parts, tmp_path, [SamplePrompt("a", seed=None, sample_sampler="euler_a", **SMALL),
                             SamplePrompt("b", seed=4, sample_sampler="dpm_2_a", **SMALL)])
    assert (torch.equal(torch.rand(3), expected[0]), random.random(), np.random.rand()) == (
        True, expected[1], expected[2])


def test_training_flags_are_restored_and_eval_during_sampling(parts, tmp_path):
    parts.unet.train()
    parts.text_encoder.train()
    parts.text_encoder.get_input_embeddings().eval()  # a mixed state must come back exactly
    parts.vae.eval()
    before = {name: [m.training for m in module.modules()]
              for name, module in (("unet", parts.unet), ("te", parts.text_encoder), ("vae", parts.vae))}
    seen = []
    hook = parts.unet.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        sample(parts, tmp_path, [SamplePrompt("a", seed=1, **SMALL)])
    finally:
        hook.remove()
        after = {name: [m.training for m in module.modules()]
                 for name, module in (("unet", parts.unet), ("te", parts.text_encoder), ("vae", parts.vae))}
        for module in (parts.unet, parts.text_encoder, parts.vae):
            module.eval()
    assert seen and not any(seen)
    assert after == before


def test_encode_callable_is_used_for_prompt_embeddings(parts, tmp_path):
    tokenizer, text_encoder = parts.tokenizer, parts.text_encoder
    calls = []

    def ids(captions):
        return tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids

    def last_layer(captions):
        calls.append(list(captions))
        return text_encoder(ids(captions))[0]

    def penultimate(captions):
        out = text_encoder(ids(captions), output_hidden_states=True)
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out.hidden_states[-2])

    prompt = SamplePrompt("a cat", negative_prompt="a dog", seed=2, **SMALL)
    own = pixels(sample(parts, tmp_path / "own", [prompt])[0])
    given = pixels(sample(parts, tmp_path / "given", [prompt], encode=last_layer)[0])
    assert calls == [["a cat", "a dog"]]
    assert np.array_equal(own, given)
    # clip_skip counts as sd-scripts does: 2 = the penultimate layer (then the final layer norm).
    skipped = pixels(sample(parts, tmp_path / "skip", [dataclasses.replace(prompt, clip_skip=2)])[0])
    by_encode = pixels(sample(parts, tmp_path / "skip_enc", [prompt], encode=penultimate)[0])
    assert np.array_equal(skipped, by_encode)
    assert not np.array_equal(own, skipped)
    # An `encode` callable wins over the prompt's clip_skip: the run's encoder already applies its own.
    given_skip = pixels(sample(parts, tmp_path / "given_skip", [dataclasses.replace(prompt, clip_skip=2)],
                               encode=last_layer)[0])
    assert np.array_equal(own, given_skip)


def test_bfloat16_autocast_keeps_weights_float32(parts, tmp_path):
    path = sample(parts, tmp_path, [SamplePrompt("a", seed=1, steps=1, width=64, height=64)], dtype=torch.bfloat16)
    assert pixels(path[0]).shape == (64, 64, 3)
    assert {p.dtype for m in (parts.unet, parts.vae, parts.text_encoder) for p in m.parameters()} == {torch.float32}


def test_images_logged_to_tensorboard_under_sd_scripts_tags(parts, tmp_path):
    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    prompts = [SamplePrompt("a", seed=1, enum=0, **SMALL), SamplePrompt("b", seed=2, enum=1, **SMALL)]
    writer = SummaryWriter(tmp_path / "writer")
    sample(parts, tmp_path, prompts, tracker=writer, step=40)
    writer.close()
    tracker = TensorBoardTracker("run", tmp_path / "accel")
    tracker.start()
    sample(parts, tmp_path, prompts[:1], tracker=tracker, step=41)
    tracker.writer.close()

    for folder, tags, step in ((tmp_path / "writer", ["sample_0", "sample_1"], 40),
                               (tmp_path / "accel" / "run", ["sample_0"], 41)):
        events = EventAccumulator(str(folder))
        events.Reload()
        assert sorted(events.Tags()["images"]) == tags
        image = events.Images("sample_0")[0]
        assert (image.step, image.width, image.height) == (step, 64, 64)

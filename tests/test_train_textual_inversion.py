"""train_textual_inversion.py end to end on the tiny model: only the new rows learn, the files load in diffusers with
the same text-encoder output as ours, the three layouts, --weights continuing the step count, templates, errors."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from safetensors import safe_open

import train_textual_inversion
from library.data.demo import make_demo_dataset
from library.formats.embedding_files import load_embedding
from library.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data(tmp_path):
    make_demo_dataset(tmp_path / "train", count=4, size=32, folder="2_mychar shape")
    for caption in (tmp_path / "train" / "2_mychar shape").glob("*.txt"):
        caption.write_text(caption.read_text().replace("sks shape", "mychar"))
    return tmp_path


def _flags(data, out, *extra, steps=2, lr="1e-2", token="mychar", init_word="circle shape", resolution="32"):
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data / "train"),
            "--caption_extension", ".txt", "--resolution", resolution, "--output_dir", str(out), "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--learning_rate", lr, "--seed", "3",
            "--max_data_loader_n_workers", "0", "--token_string", token, "--init_word", init_word, *extra]


def _pipeline(parts):
    """A diffusers pipeline over copies of the base model, with a fresh tokenizer (nothing of ours in it)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=copy.deepcopy(parts.vae), text_encoder=copy.deepcopy(parts.text_encoder),
                                   tokenizer=load_tokenizer(False), unet=copy.deepcopy(parts.unet),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _diffusers_hidden(pipe, prompt: str) -> torch.Tensor:
    prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)  # "mychar" -> "mychar mychar_1", as diffusers does
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_only_the_new_rows_learn_and_the_pt_file_gives_diffusers_our_text_encoder_output(data, tiny_parts, tmp_path):
    base = tiny_parts["tiny-sd1"]
    # AdamW's default weight decay would shrink every row it sees; only the new ones may change.
    result = train_textual_inversion.main(_flags(data, tmp_path / "out", "--num_vectors_per_token", "2"))
    method = result.method
    assert result.final_file == tmp_path / "out" / "mychar.pt"
    base_rows = base.text_encoder.get_input_embeddings().weight
    assert torch.equal(method.embedding.base.weight, base_rows)
    # Initialised from "circle shape" (cycled), then trained away from it.
    ids = load_tokenizer(False).encode("circle shape", add_special_tokens=False)
    initial = torch.stack([base_rows[ids[0]], base_rows[ids[1]]])
    assert method.vectors.shape == (2, 32) and not torch.equal(method.vectors, initial)

    saved = torch.load(result.final_file, weights_only=True)
    assert set(saved) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert saved["name"] == "mychar" and saved["step"] == 2
    assert torch.equal(saved["string_to_param"]["*"], method.vectors)

    pipe = _pipeline(base)
    pipe.load_textual_inversion(str(result.final_file))
    prompt = "a photo of mychar, red circle"
    with torch.no_grad():
        ours = method.encode_prompts([prompt])
    assert torch.equal(_diffusers_hidden(pipe, prompt), ours)
    # The token matters: without it the two encoders agree on something else.
    assert not torch.equal(_diffusers_hidden(pipe, "a photo of red circle"), ours)


def test_safetensors_and_diffusers_layouts_and_weights_continue_the_step_count(data, tiny_parts, tmp_path):
    first = train_textual_inversion.main(_flags(data, tmp_path / "a", "--save_model_as", "safetensors"))
    file = tmp_path / "a" / "mychar.safetensors"
    with safe_open(str(file), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"]
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert metadata["ss_steps"] == "2" and "ss_network_module" not in metadata

    second = train_textual_inversion.main(_flags(data, tmp_path / "b", "--weights", str(file), "--save_model_as",
                                                 "diffusers", "--output_name", "cont", steps=3))
    folder = tmp_path / "b" / "cont"
    assert (folder / "learned_embeds.safetensors").is_file()
    loaded = load_embedding(folder)
    assert loaded.step == 5 and loaded.name == "mychar" and torch.equal(loaded.vectors, second.method.vectors)
    assert not torch.equal(loaded.vectors, first.method.vectors)

    pipe = _pipeline(tiny_parts["tiny-sd1"])
    pipe.load_textual_inversion(str(folder))
    with torch.no_grad():
        assert torch.equal(_diffusers_hidden(pipe, "mychar"), second.method.encode_prompts(["mychar"]))


def test_templates_replace_captions_and_a_caption_without_the_token_is_refused(data, tmp_path, capsys):
    folder = data / "train" / "2_mychar shape"
    for caption in folder.glob("*.txt"):
        caption.write_text("a red shape")
    with pytest.raises(SystemExit) as exit_info:
        train_textual_inversion.main(_flags(data, tmp_path / "x"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no training caption contains 'mychar'" in err and "Traceback" not in err

    # SGD without weight decay: vectors that no caption reaches would stay exactly as initialised
    result = train_textual_inversion.main(_flags(data, tmp_path / "y", "--use_object_template",
                                                 "--optimizer_type", "SGD", steps=1))
    caption = result.method.caption_transform("a red shape", _Entry(folder / "000.png"), random.Random(0))
    assert "mychar" in caption and "red shape" not in caption
    # The captions on disk never say "mychar": the vectors moved only because the loop's batches used the templates.
    circle = load_tokenizer(False).encode("circle", add_special_tokens=False)[0]
    assert not torch.equal(result.method.vectors[0], result.method.embedding.base.weight[circle].float())

    template = tmp_path / "subject_filewords.txt"
    template.write_text("a photo of [name], [filewords]\n")
    result = train_textual_inversion.main(_flags(data, tmp_path / "z", "--ti_template_file", str(template), steps=1))
    caption = result.method.caption_transform("a red shape", _Entry(folder / "000.png"), random.Random(0))
    assert caption == "a photo of mychar, a red shape"


class _Entry:
    def __init__(self, path):
        self.path, self.caption = path, "a red shape"


@pytest.mark.parametrize("extra, message", [
    ({"token": "a"}, "is already a token of the tokenizer"),
    (["--use_object_template", "--use_style_template"], "both replace the captions"),
    (["--save_model_as", "ckpt"], "a textual inversion is saved as pt or safetensors or diffusers"),
    (["--ti_lr_schedule", "0.01:1"], "ends at step 1"),
    (["--ti_lr_schedule", "0.01", "--lr_scheduler", "cosine"], "both set the learning rate"),
])
def test_mistakes_end_with_one_line(data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train_textual_inversion.main(_flags(data, tmp_path / "out", **extra) if isinstance(extra, dict)
                                     else _flags(data, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def test_refuses_to_overwrite_a_file_that_is_not_an_embedding(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mychar.pt").write_bytes(b"not an embedding")
    with pytest.raises(SystemExit):
        train_textual_inversion.main(_flags(data, out))
    assert "not a textual-inversion embedding" in capsys.readouterr().err
    assert (out / "mychar.pt").read_bytes() == b"not an embedding"


def test_training_lowers_the_loss_against_an_untrained_twin(data, tmp_path):
    # Noise and timesteps depend only on (seed, epoch, batch), so a run at lr 0 sees exactly the same draws: any
    # difference in its losses is what the embedding learnt. The tiny random model barely listens to its captions,
    # so the gain is small, but it is the same every run.
    # 128 px images: 16x16 latents (the tiny VAE downsamples 8x, like SD's), enough positions to learn from.
    make_demo_dataset(data / "train", count=4, size=128, folder="2_mychar shape")
    for caption in (data / "train" / "2_mychar shape").glob("*.txt"):
        caption.write_text(caption.read_text().replace("sks shape", "mychar"))
    flags = ["--cache_latents", "--optimizer_type", "AdamW"]
    trained = train_textual_inversion.main(_flags(data, tmp_path / "a", *flags, lr="5e-2", steps=50, resolution="128"))
    control = train_textual_inversion.main(_flags(data, tmp_path / "b", *flags, lr="0", steps=50, resolution="128"))
    last = slice(-12, None)
    ratio = sum(trained.losses[last]) / sum(control.losses[last])
    # 0.9982 after 50 steps (0.9979 after 100, 0.9983 after 200) with the 8x tiny VAE; exactly 1.0 if nothing is learnt
    assert ratio < 0.999, ratio


def test_init_word_may_contain_the_token_and_the_token_matches_in_any_case(data, tiny_parts, tmp_path):
    base_rows = tiny_parts["tiny-sd1"].text_encoder.get_input_embeddings().weight
    ids = load_tokenizer(False).encode("mycharacter", add_special_tokens=False)  # read before "mychar" exists
    result = train_textual_inversion.main(_flags(data, tmp_path / "a", "--num_vectors_per_token", "2", lr="0",
                                                 token="MyChar", init_word="mycharacter", steps=1))
    assert torch.equal(result.method.vectors, torch.stack([base_rows[ids[0]], base_rows[ids[1]]]))
    # captions say "mychar": CLIP lower-cases, so they hold the token, and all its vectors are written out
    expanded = []
    result.method.encode_prompts.encode = lambda captions: expanded.extend(captions)
    result.method.encode_prompts(["a MYCHAR photo"])
    assert expanded == ["a MyChar MyChar1 photo"]


def test_save_state_and_resume_continue_the_vectors_exactly(data, tmp_path):
    whole = train_textual_inversion.main(_flags(data, tmp_path / "whole", steps=4))
    first = train_textual_inversion.main(_flags(data, tmp_path / "half", "--save_state", "--save_every_n_steps", "2",
                                                steps=4))
    assert torch.equal(first.method.vectors, whole.method.vectors)
    resumed = train_textual_inversion.main(_flags(data, tmp_path / "resumed", "--resume",
                                                  str(tmp_path / "half" / "mychar-step00000002-state"), steps=4))
    assert resumed.global_step == 4 and torch.equal(resumed.method.vectors, whole.method.vectors)
    assert resumed.losses == whole.losses[2:]

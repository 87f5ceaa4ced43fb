"""sdxl_train_textual_inversion.py end to end on tiny-sdxl: one vector set per text encoder learns while every other
row stays bit-identical, the {"clip_l", "clip_g"} file loads in diffusers' SDXL pipeline with our prompt embeddings,
the diffusers layout and --weights, resume parity, sd-scripts' documented command line, the example config, and the
refusals (SD 1.x models both ways, .pt, text-encoder caching)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sdxl_train_textual_inversion
import train_textual_inversion
from library.data.demo import make_demo_dataset
from library.errors import UserError
from library.formats.embedding_files import is_any_embedding_file, load_sdxl_embedding, save_kohya, save_sdxl
from library.models.tokenizer import load_tokenizer
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 49408  # CLIP's vocabulary: the new tokens' ids start here in both tokenizers


def _demo(root, *, count=4, size=32, folder="2_mychar shape"):
    make_demo_dataset(root, count=count, size=size, folder=folder)
    for caption in (root / folder).glob("*.txt"):
        caption.write_text(caption.read_text().replace("sks shape", "mychar"))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _demo(tmp_path_factory.mktemp("sdxl-ti") / "train")


def _flags(data, out, *extra, steps=2, lr="1e-2", vectors="2", resolution="32"):
    return ["--pretrained_model_name_or_path", "tiny-sdxl", "--train_data_dir", str(data), "--caption_extension",
            ".txt", "--resolution", resolution, "--output_dir", str(out), "--train_batch_size", "2", "--max_train_steps",
            str(steps), "--learning_rate", lr, "--seed", "3", "--max_data_loader_n_workers", "0", "--token_string",
            "mychar", "--init_word", "circle shape", "--num_vectors_per_token", vectors, *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Two steps, two vectors, sd-scripts' safetensors layout (the default for SDXL)."""
    out = tmp_path_factory.mktemp("trained")
    return sdxl_train_textual_inversion.main(_flags(data, out))


def _refusal(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------ 1. what trains, what is saved
def test_both_encoders_vectors_learn_and_every_other_row_stays_bit_identical(trained, tiny_parts):
    base = tiny_parts["tiny-sdxl"]
    method = trained.method
    ids = load_tokenizer(False).encode("circle shape", add_special_tokens=False)
    assert len(method.embeddings) == 2 and method.tokens == ["mychar", "mychar1"]
    for key, embedding, base_encoder in zip(("clip_l", "clip_g"), method.embeddings, base.text_encoders):
        base_rows = base_encoder.get_input_embeddings().weight
        assert embedding.first_id == VOCAB
        # The frozen matrix is the base model's, bit for bit; the full matrix is it plus the trained rows.
        assert torch.equal(embedding.base.weight, base_rows)
        assert torch.equal(embedding.weight[:VOCAB], base_rows) and torch.equal(embedding.weight[VOCAB:],
                                                                              embedding.vectors.detach())
        # Initialised from "circle shape" in this encoder's own rows (cycled), then trained away from it.
        initial = torch.stack([base_rows[ids[0]], base_rows[ids[1]]])
        vectors = method.vectors_by_key[key]
        assert vectors.shape == (2, base_rows.shape[1]) and not torch.equal(vectors, initial), key
    # The two encoders have their own widths (SDXL: 768 and 1280; tiny-sdxl: 32 and 64).
    assert [v.shape[1] for v in method.vectors_by_key.values()] == [32, 64]


def test_the_file_is_sd_scripts_clip_l_clip_g_safetensors_with_sdxl_metadata(trained):
    assert trained.final_file.name == "mychar.safetensors"
    with safe_open(str(trained.final_file), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    assert tensors["clip_l"].shape == (2, 32) and tensors["clip_g"].shape == (2, 64)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # no --save_precision: float32
    for key, vectors in trained.method.vectors_by_key.items():
        assert torch.equal(tensors[key], vectors), key
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_steps"] == "2"
    assert not any(key.startswith("ss_network") for key in metadata)


def _pipeline(parts):
    """diffusers' SDXL pipeline over copies of the base text encoders and fresh tokenizers (nothing of ours)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    te1, te2 = (copy.deepcopy(te) for te in parts.text_encoders)
    return StableDiffusionXLPipeline(vae=parts.vae, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=load_tokenizer(False), tokenizer_2=load_tokenizer(True),
                                     unet=parts.unet, scheduler=EulerDiscreteScheduler())


def _diffusers_embeddings(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompt, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False)
    return hidden, pooled


def _ours(method, prompt: str):
    with torch.no_grad():
        text = method.encode_prompts.conditioning([prompt])
    return text.hidden, text.pooled


def test_diffusers_loads_the_file_for_both_encoders_and_gets_our_prompt_embeddings(trained, tiny_parts):
    pipe = _pipeline(tiny_parts["tiny-sdxl"])
    # As diffusers' docs load an SDXL embedding: once per text encoder, with that encoder's key.
    state_dict = load_file(str(trained.final_file))
    pipe.load_textual_inversion(state_dict["clip_g"], token="mychar", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state_dict["clip_l"], token="mychar", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    prompt = "a photo of mychar, red circle"
    hidden, pooled = _diffusers_embeddings(pipe, prompt)
    ours_hidden, ours_pooled = _ours(trained.method, prompt)
    assert hidden.shape == ours_hidden.shape == (1, 77, 96)  # clip_l's 32 + clip_g's 64 features
    assert torch.equal(hidden, ours_hidden) and torch.equal(pooled, ours_pooled)
    # The token matters: without it the two agree on something else.
    assert not torch.equal(_diffusers_embeddings(pipe, "a photo of red circle")[0], ours_hidden)


def test_diffusers_layout_and_weights_continue_an_sdxl_embedding(trained, data, tiny_parts, tmp_path):
    second = sdxl_train_textual_inversion.main(_flags(data, tmp_path, "--weights", str(trained.final_file),
                                                      "--save_model_as", "diffusers", "--output_name", "cont",
                                                      steps=1))
    folder = tmp_path / "cont"
    assert sorted(p.name for p in folder.iterdir()) == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    loaded = load_sdxl_embedding(folder)
    assert loaded.step == 3 and loaded.layout == "diffusers"  # 2 steps before, 1 now
    for key, vectors in second.method.vectors_by_key.items():
        assert torch.equal(loaded.vectors[key], vectors)
        assert not torch.equal(vectors, trained.method.vectors_by_key[key])  # it went on from the first file

    pipe = _pipeline(tiny_parts["tiny-sdxl"])
    pipe.load_textual_inversion(str(folder), weight_name="learned_embeds_2.safetensors", token="mychar",
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(str(folder), weight_name="learned_embeds.safetensors", token="mychar",
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    hidden, pooled = _diffusers_embeddings(pipe, "mychar")
    ours_hidden, ours_pooled = _ours(second.method, "mychar")
    assert torch.equal(hidden, ours_hidden) and torch.equal(pooled, ours_pooled)


def test_save_precision_and_intermediate_files(data, tmp_path):
    sdxl_train_textual_inversion.main(_flags(data, tmp_path, "--save_precision", "fp16", "--save_every_n_steps", "1",
                                             steps=2))
    assert sorted(p.name for p in tmp_path.glob("mychar*.safetensors")) == [
        "mychar-step00000001.safetensors", "mychar.safetensors"]
    tensors = load_file(str(tmp_path / "mychar.safetensors"))
    assert {key: t.dtype for key, t in tensors.items()} == {"clip_l": torch.float16, "clip_g": torch.float16}


def test_a_run_replaces_its_own_embedding_but_never_a_foreign_file(trained, data, tmp_path, capsys):
    import shutil

    shutil.copy(trained.final_file, tmp_path / "mychar.safetensors")
    sdxl_train_textual_inversion.main(_flags(data, tmp_path, steps=1))
    assert not torch.equal(load_file(str(tmp_path / "mychar.safetensors"))["clip_g"],
                           load_file(str(trained.final_file))["clip_g"])
    (tmp_path / "mychar.safetensors").write_bytes(b"not an embedding")
    capsys.readouterr()  # the first run's progress
    err = _refusal(sdxl_train_textual_inversion.main, _flags(data, tmp_path, steps=1), capsys)
    assert "not a textual-inversion embedding" in err
    assert (tmp_path / "mychar.safetensors").read_bytes() == b"not an embedding"


def test_sdxl_embedding_files_read_and_refused(tmp_path):
    pair = {"clip_l": torch.randn(3, 32), "clip_g": torch.randn(3, 64)}
    # sd-scripts writes the same dict with torch.save when --save_model_as is not safetensors: --weights reads it.
    torch.save(pair, tmp_path / "sd_scripts.pt")
    loaded = load_sdxl_embedding(tmp_path / "sd_scripts.pt")
    assert loaded.layout == "kohya" and all(torch.equal(loaded.vectors[k], pair[k]) for k in pair)
    assert is_any_embedding_file(tmp_path / "sd_scripts.pt")
    save_sdxl(tmp_path / "xl.safetensors", pair, metadata={"ss_steps": "7"})
    assert load_sdxl_embedding(tmp_path / "xl.safetensors").step == 7
    cases = {"only_l.safetensors": ({"clip_l": pair["clip_l"]}, "not an SDXL embedding"),
             "uneven.safetensors": ({"clip_l": pair["clip_l"], "clip_g": torch.randn(2, 64)},
                                    "different vector counts per text encoder (clip_l 3, clip_g 2)")}
    for name, (tensors, message) in cases.items():
        from safetensors.torch import save_file

        save_file(tensors, str(tmp_path / name))
        with pytest.raises(UserError, match=re.escape(message)):
            load_sdxl_embedding(tmp_path / name)
    with pytest.raises(UserError, match="must end in .safetensors"):
        save_sdxl(tmp_path / "xl.pt", pair)


# ------------------------------------------------------------------------------------------------------ 2. resume
def test_save_state_and_resume_continue_both_encoders_vectors_exactly(data, tmp_path):
    common = ["--save_state", "--save_every_n_steps", "2", "--optimizer_type", "AdamW"]
    whole = sdxl_train_textual_inversion.main(_flags(data, tmp_path / "whole", *common, steps=4))
    state = tmp_path / "whole" / "mychar-step00000002-state"
    resumed = sdxl_train_textual_inversion.main(_flags(data, tmp_path / "resumed", *common, "--resume", str(state),
                                                       steps=4))
    assert resumed.global_step == 4 and resumed.losses == whole.losses[2:]
    for key, vectors in whole.method.vectors_by_key.items():
        assert torch.equal(resumed.method.vectors_by_key[key], vectors), key
    a, b = (load_file(str(tmp_path / run / "mychar.safetensors")) for run in ("whole", "resumed"))
    assert a.keys() == b.keys() == {"clip_l", "clip_g"} and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- 3. sd-scripts' documented command line
# sd-scripts docs/train_textual_inversion.md, "2.2. For SDXL Models" (kohya-ss/sd-scripts, commit ddfb38e5016878d7):
#   accelerate launch --num_cpu_threads_per_process 1 sdxl_train_textual_inversion.py
#     --pretrained_model_name_or_path="path/to/sdxl_model.safetensors" --dataset_config="dataset_config.toml"
#     --output_dir="output" --output_name="my_sdxl_textual_inversion" --save_model_as="safetensors"
#     --token_string="mychar" --init_word="girl" --num_vectors_per_token=4 --max_train_steps=1600
#     --learning_rate=1e-6 --optimizer_type="AdamW8bit" --mixed_precision="fp16" --cache_latents --sdpa
# with the dataset TOML of its section 4.1. Run here as written but for the model path (tiny-sdxl), the paths, the
# dataset's sizes (64 px for the tiny model) and --max_train_steps (3, not 1600: the tiny model on a CPU).
DOC_COMMAND = ["--save_model_as=safetensors", "--token_string=mychar", "--init_word=girl",
               "--num_vectors_per_token=4", "--max_train_steps=3", "--learning_rate=1e-6",
               "--optimizer_type=AdamW8bit", "--mixed_precision=fp16", "--cache_latents", "--sdpa"]


def test_sd_scripts_documented_command_line_runs_on_tiny_sdxl(data, tmp_path):
    (tmp_path / "dataset_config.toml").write_text(
        "[general]\nshuffle_caption = false\ncaption_extension = \".txt\"\nkeep_tokens = 1\n\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 4\nenable_bucket = true\nmin_bucket_reso = 64\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(data / '2_mychar shape').as_posix()}'\n"
        "  caption_extension = \".txt\"\n  num_repeats = 10\n")
    result = sdxl_train_textual_inversion.main([
        "--pretrained_model_name_or_path=tiny-sdxl", f"--dataset_config={tmp_path / 'dataset_config.toml'}",
        f"--output_dir={tmp_path / 'output'}", "--output_name=my_sdxl_textual_inversion", *DOC_COMMAND])
    assert result.global_step == 3
    tensors = load_file(str(tmp_path / "output" / "my_sdxl_textual_inversion.safetensors"))
    assert {key: tuple(t.shape) for key, t in tensors.items()} == {"clip_l": (4, 32), "clip_g": (4, 64)}
    # lr 1e-6 for 3 steps: the vectors still moved off "girl" (cycled over the 4 vectors), in both encoders.
    girl = load_tokenizer(False).encode("girl", add_special_tokens=False)
    for key, embedding in zip(("clip_l", "clip_g"), result.method.embeddings):
        assert not torch.equal(tensors[key], embedding.base.weight[girl * 4]), key


# ------------------------------------------------------------------------------------------ 4. the example config
def test_example_config_trains_on_tiny_sdxl(tmp_path):
    import toml

    flat = {k: v for table in toml.load(ROOT / "configs" / "sdxl_ti.toml").values() for k, v in table.items()}
    assert flat["save_model_as"] == "safetensors" and flat["bucket_reso_steps"] % 32 == 0
    assert flat["token_string"] == flat["output_name"] == "mychar" and "cache_text_encoder_outputs" not in flat
    _demo(tmp_path / "data", count=2, folder="1_mychar")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of mychar --w 64 --h 64 --d 1 --s 2\n")
    result = sdxl_train_textual_inversion.main([
        "--config_file", str(ROOT / "configs" / "sdxl_ti.toml"), "--pretrained_model_name_or_path", "tiny-sdxl",
        "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--logging_dir",
        str(tmp_path / "logs"), "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
        "--resolution", "32", "--max_train_steps", "2", "--optimizer_type", "AdamW", "--mixed_precision", "no",
        "--min_bucket_reso", "32", "--max_bucket_reso", "64", "--bucket_reso_steps", "32",
        "--max_data_loader_n_workers", "0"])
    assert result.global_step == 2 and result.final_file == tmp_path / "out" / "mychar.safetensors"
    tensors = load_file(str(result.final_file))
    assert {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()} == {
        "clip_l": ((4, 32), torch.float16), "clip_g": ((4, 64), torch.float16)}
    # sample_every_n_steps = 2 with the embedding in the prompt: the preview at the last step is drawn.
    assert list((tmp_path / "out" / "sample").glob("mychar_*.png"))


# ------------------------------------------------------------------------------------------------------ 5. refusals
@pytest.mark.parametrize("extra, message", [
    (["--save_model_as", "pt"], "an SDXL textual inversion is saved as safetensors or diffusers"),
    (["--save_model_as", "ckpt"], "an SDXL textual inversion is saved as safetensors or diffusers"),
    # sd-scripts registers no text-encoder caching for TI (the text encoders train): the option does not exist.
    (["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs"),
    (["--v2"], "--v2 cannot be used with SDXL"),
    (["--enable_bucket", "--bucket_reso_steps", "48", "--min_bucket_reso", "48", "--max_bucket_reso", "192"],
     "bucket_reso_steps 48 must be a multiple of 32 for SDXL"),
])
def test_mistakes_end_with_one_line(data, tmp_path, capsys, extra, message):
    err = _refusal(sdxl_train_textual_inversion.main, _flags(data, tmp_path, *extra, resolution="96"), capsys)
    assert message in err
    assert not list(tmp_path.glob("mychar*"))


def test_sd1_models_and_embeddings_are_refused_naming_the_other_script(data, tmp_path, capsys):
    argv = _flags(data, tmp_path)
    argv[argv.index("tiny-sdxl")] = "tiny-sd1"
    err = _refusal(sdxl_train_textual_inversion.main, argv, capsys)
    assert "SD 1.x model" in err and "use train_textual_inversion.py" in err
    # ... and the SD 1.x/2.x script refuses SDXL, naming this one.
    err = _refusal(train_textual_inversion.main, _flags(data, tmp_path), capsys)
    assert "SDXL model" in err and "use sdxl_train_textual_inversion.py" in err
    # An SD 1.x/2.x embedding cannot start an SDXL one.
    sd1 = save_kohya(tmp_path / "sd1.safetensors", torch.zeros(2, 32))
    err = _refusal(sdxl_train_textual_inversion.main, _flags(data, tmp_path / "o", "--weights", str(sd1)), capsys)
    assert "not an SDXL embedding" in err and "train_textual_inversion.py" in err

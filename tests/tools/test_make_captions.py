"""tools/make_captions.py (BLIP) and tools/make_captions_by_git.py (GIT) on tiny random transformers models saved
with save_pretrained: captions beside every image, seeded sampling, the length flags reaching generate, sd-scripts'
--remove_words, resumed runs, unreadable images, --recursive, one-line errors and sd-scripts' command lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from library.data import captioning
from library.data.captioning import BLIP_PROMPT, remove_words
from tools import make_captions, make_captions_by_git

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # BLIP's tokenizer starts captions with [DEC]
GIT_SPECIAL = SPECIAL[:5]
WORDS = "a picture of cat dog red blue green with the words sign that says on it photo man tree house".split()
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                   patch_size=16)
PROMPT_TOKENS = 4  # [DEC] a picture of: generate returns them in front of every BLIP caption


def _tokenizer(folder: Path, special=SPECIAL, **kwargs):
    from transformers import BertTokenizer

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(special + WORDS) + "\n", encoding="utf-8")
    return BertTokenizer(str(vocab), **kwargs)


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny-blip")
    tokenizer = _tokenizer(folder, bos_token="[DEC]")
    ids = {token: SPECIAL.index(token) for token in SPECIAL}
    text = dict(vocab_size=len(SPECIAL + WORDS), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=96, bos_token_id=ids["[DEC]"],
                sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"])
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(vision_config=TINY_VISION, text_config=text)).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def git_folder(tmp_path_factory):
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    folder = tmp_path_factory.mktemp("tiny-git")
    tokenizer = _tokenizer(folder, GIT_SPECIAL)
    config = GitConfig(vision_config=TINY_VISION, vocab_size=len(GIT_SPECIAL + WORDS), hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=37, max_position_embeddings=96,
                       bos_token_id=GIT_SPECIAL.index("[CLS]"), eos_token_id=GIT_SPECIAL.index("[SEP]"),
                       pad_token_id=0)
    torch.manual_seed(0)
    GitForCausalLM(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (40 + 8 * i, 32), colour).save(folder / f"img{i}.png")
    return folder


def _captions(folder: Path, extension: str = ".caption") -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(folder.rglob(f"*{extension}"))}


def _blip(folder, model, *extra):
    make_captions.main([str(folder), "--caption_weights", str(model), "--device", "cpu", *extra])


def _git(folder, model, *extra):
    make_captions_by_git.main([str(folder), "--model_id", str(model), "--device", "cpu", *extra])


@pytest.fixture
def generate_calls(monkeypatch):
    """Records (kwargs, output shape) of every BLIP and GIT generate call, the real generate still running."""
    from transformers import BlipForConditionalGeneration, GitForCausalLM

    calls = []
    for cls in (BlipForConditionalGeneration, GitForCausalLM):
        def spy(self, *args, _real=cls.generate, **kwargs):
            out = _real(self, *args, **kwargs)
            calls.append((kwargs, tuple(out.shape)))
            return out
        monkeypatch.setattr(cls, "generate", spy)
    return calls


def test_blip_writes_one_caption_per_image_without_the_prompt(images, blip_folder, capsys):
    _blip(images, blip_folder, "--beam_search", "--max_length", "12")
    captions = _captions(images)
    assert sorted(captions) == ["img0.caption", "img1.caption", "img2.caption"]
    assert all(text and not text.startswith(BLIP_PROMPT.strip()) for text in captions.values()), captions
    assert set(captions.values()) <= {" ".join(text.split()) for text in captions.values()}  # tidied
    assert "3 written" in capsys.readouterr().out


def test_git_writes_one_caption_per_image(images, git_folder):
    _git(images, git_folder, "--max_length", "8")
    captions = _captions(images)
    assert sorted(captions) == ["img0.caption", "img1.caption", "img2.caption"]
    assert all(set(text.split()) <= set(WORDS) for text in captions.values()), captions


def test_sampling_is_reproducible_with_a_seed_and_beam_search_deterministic(images, blip_folder):
    def run(*flags):
        _blip(images, blip_folder, "--overwrite", "--max_length", "16", *flags)
        return _captions(images)

    first = run("--seed", "1")
    assert run("--seed", "1") == first
    assert run("--seed", "2") != first  # the seed is what made them equal: near-uniform tiny model, 12 sampled tokens
    beam = run("--beam_search", "--num_beams", "2")
    assert run("--beam_search", "--num_beams", "2", "--seed", "7") == beam


def test_blip_length_and_search_flags_reach_generate(images, blip_folder, generate_calls):
    _blip(images, blip_folder, "--min_length", "9", "--max_length", "9", "--top_p", "0.5", "--batch_size", "2")
    assert [shape for _, shape in generate_calls] == [(2, 9), (1, 9)]  # exactly 9 tokens, prompt included
    kwargs = generate_calls[0][0]
    assert (kwargs["min_length"], kwargs["max_length"], kwargs["do_sample"], kwargs["top_p"]) == (9, 9, True, 0.5)
    assert all(len(text.split()) <= 9 - PROMPT_TOKENS for text in _captions(images).values())

    generate_calls.clear()
    _blip(images, blip_folder, "--overwrite", "--beam_search", "--num_beams", "3", "--max_length", "7")
    assert all(shape[1] <= 7 for _, shape in generate_calls)
    kwargs = generate_calls[0][0]
    assert (kwargs["num_beams"], kwargs["do_sample"], kwargs["max_length"], kwargs["min_length"]) == (3, False, 7, 5)


def test_sd_scripts_defaults():
    blip = make_captions.build_parser().parse_args(["d"])
    assert (blip.caption_extension, blip.batch_size, blip.num_beams, blip.top_p, blip.max_length, blip.min_length,
            blip.seed, blip.beam_search, blip.max_data_loader_n_workers) == (".caption", 1, 1, 0.9, 75, 5, 42, False,
                                                                             None)
    git = make_captions_by_git.build_parser().parse_args(["d"])
    assert (git.model_id, git.caption_extension, git.max_length, git.remove_words) == (
        "microsoft/git-large-textcaps", ".caption", 50, False)


def test_git_max_length_reaches_generate(images, git_folder, generate_calls):
    _git(images, git_folder, "--max_length", "6", "--batch_size", "3")
    assert len(generate_calls) == 1 and generate_calls[0][1][0] == 3 and generate_calls[0][1][1] <= 6
    assert generate_calls[0][0]["max_length"] == 6


@pytest.mark.parametrize(("caption", "cleaned"), [
    ('a sign with the words "hello world" on the wall', "a sign"),
    ("a man holding a sign that says stop", "a man holding a sign"),
    ("a poster with a sign that says 'i'm fine' on it", "a poster"),
    ("a red shirt with the number 23 on it", "a red shirt"),
    ("a book has the name harry", "a book"),
    ("a mug and the letters abc in her hand", "a mug"),
    ("a cat sitting on a couch", "a cat sitting on a couch"),
])
def test_remove_words(caption, cleaned):
    assert remove_words(caption) == cleaned


def test_git_remove_words_cleans_written_captions(images, git_folder, monkeypatch):
    from transformers import AutoTokenizer, GitForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(git_folder, local_files_only=True)
    ids = tokenizer("a sign with the words cat on it", return_tensors="pt").input_ids
    monkeypatch.setattr(GitForCausalLM, "generate", lambda self, pixel_values, **kw: ids.repeat(len(pixel_values), 1))
    _git(images, git_folder)
    assert set(_captions(images).values()) == {"a sign with the words cat on it"}
    _git(images, git_folder, "--overwrite", "--remove_words")
    assert set(_captions(images).values()) == {"a sign"}


def test_resumes_and_overwrite_redoes(images, blip_folder, monkeypatch, capsys):
    flags = ("--beam_search", "--max_length", "8")
    _blip(images, blip_folder, *flags)
    first = _captions(images)
    (images / "img0.caption").write_text("kept", encoding="utf-8")
    (images / "img1.caption").unlink()
    mtime = (images / "img2.caption").stat().st_mtime_ns
    capsys.readouterr()
    _blip(images, blip_folder, *flags)
    assert "1 written, 2 already done" in capsys.readouterr().out
    assert _captions(images) == {**first, "img0.caption": "kept"}
    assert (images / "img2.caption").stat().st_mtime_ns == mtime

    def no_loading(*args, **kwargs):
        raise AssertionError("the model is loaded although every image has a caption")

    with monkeypatch.context() as patch:
        patch.setattr(captioning, "load_model", no_loading)
        _blip(images, blip_folder, *flags)
    _blip(images, blip_folder, *flags, "--overwrite")
    assert _captions(images) == first
    assert (images / "img2.caption").stat().st_mtime_ns != mtime


@pytest.mark.parametrize("workers", [None, 1])
def test_unreadable_image_is_reported_and_skipped(images, blip_folder, capsys, workers):
    (images / "broken.png").write_bytes(b"not a png at all")
    extra = [] if workers is None else ["--max_data_loader_n_workers", str(workers)]
    _blip(images, blip_folder, "--beam_search", "--max_length", "8", "--batch_size", "2", *extra)
    assert sorted(_captions(images)) == ["img0.caption", "img1.caption", "img2.caption"]
    out, err = capsys.readouterr()
    assert "broken.png" in err and "1 unreadable" in out and "3 written" in out


def test_recursive(images, git_folder):
    sub = images / "sub" / "deeper"
    sub.mkdir(parents=True)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(sub / "nested.jpg")
    _git(images, git_folder, "--max_length", "5")
    assert "sub/deeper/nested.caption" not in _captions(images)
    _git(images, git_folder, "--max_length", "5", "--recursive")
    assert sorted(_captions(images)) == ["img0.caption", "img1.caption", "img2.caption", "sub/deeper/nested.caption"]


def test_sd_scripts_command_lines(images, blip_folder, git_folder):
    (images / "sub").mkdir()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(images / "sub" / "nested.webp")
    make_captions.main([str(images), "--caption_weights", str(blip_folder), "--caption_extention", ".txt",
                        "--beam_search", "--num_beams", "2", "--batch_size", "2", "--max_data_loader_n_workers", "1",
                        "--pin_memory", "--top_p", "0.9", "--max_length", "10", "--min_length", "5", "--seed", "42",
                        "--debug", "--recursive"])
    assert sorted(_captions(images, ".txt")) == ["img0.txt", "img1.txt", "img2.txt", "sub/nested.txt"]
    make_captions_by_git.main([str(images), "--model_id", str(git_folder), "--caption_extension", ".git",
                               "--batch_size", "2", "--max_data_loader_n_workers", "0", "--pin_memory",
                               "--max_length", "8", "--remove_words", "--debug"])
    assert sorted(_captions(images, ".git")) == ["img0.git", "img1.git", "img2.git"]
    assert not _captions(images, ".caption")


@pytest.mark.parametrize(("case", "needle"), [
    ("missing folder", "no such folder"),
    ("salesforce pth", "Salesforce's own BLIP checkpoint"),
    ("sd-scripts url", "Salesforce's own BLIP checkpoint"),
    ("git model", "a git model, not BLIP"),
    ("no config", "no config.json"),
    ("no images", "no images"),
    ("no model", "no model given"),
])
def test_user_mistakes_exit_2_with_one_line(images, tmp_path, git_folder, blip_folder, capsys, case, needle):
    url = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large_caption.pth"
    (tmp_path / "model_large_caption.pth").write_bytes(b"x")
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "no_images").mkdir()
    argv = {"missing folder": [str(images), "--caption_weights", str(tmp_path / "no_such_model")],
            "salesforce pth": [str(images), "--caption_weights", str(tmp_path / "model_large_caption.pth")],
            "sd-scripts url": [str(images), "--caption_weights", url],
            "git model": [str(images), "--caption_weights", str(git_folder)],
            "no config": [str(images), "--caption_weights", str(tmp_path / "empty_model")],
            "no images": [str(tmp_path / "no_images"), "--caption_weights", str(blip_folder)],
            "no model": [str(images)]}[case]
    with pytest.raises(SystemExit) as exit_info:
        make_captions.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not _captions(images)


def test_script_missing_model_is_one_line_without_traceback(images, tmp_path):
    for script, flag in (("make_captions.py", "--caption_weights"), ("make_captions_by_git.py", "--model_id")):
        result = subprocess.run([sys.executable, str(ROOT / "tools" / script), str(images), flag,
                                 str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "no such folder" in result.stderr and "Traceback" not in result.stderr


def test_folders_load_offline_and_hub_ids_go_to_from_pretrained(images, blip_folder, monkeypatch):
    from transformers import AutoConfig, AutoProcessor, BlipForConditionalGeneration

    calls = []
    for cls in (AutoConfig, AutoProcessor, BlipForConditionalGeneration):
        def redirected(name, *, _cls=cls, _real=cls.from_pretrained, **kwargs):
            calls.append((_cls.__name__, str(name), kwargs.get("local_files_only", False)))
            return _real(blip_folder if name == "someone/tiny-blip" else name, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", redirected)
    _blip(images, blip_folder, "--beam_search", "--max_length", "6")
    assert {"AutoProcessor", "BlipForConditionalGeneration"} <= {cls for cls, _, _ in calls}
    assert all(offline for _, _, offline in calls), calls  # transformers' own inner calls too
    calls.clear()
    _blip(images, "someone/tiny-blip", "--beam_search", "--max_length", "6", "--overwrite")
    assert calls[0] == ("AutoConfig", "someone/tiny-blip", False)  # its kind is checked before anything loads
    mine = [call for call in calls if call[1] == "someone/tiny-blip"]
    assert {"AutoProcessor", "BlipForConditionalGeneration"} <= {cls for cls, _, _ in mine}
    assert not any(offline for _, _, offline in mine), mine
    assert sorted(_captions(images)) == ["img0.caption", "img1.caption", "img2.caption"]


def test_unreachable_hub_id_is_one_line(images, monkeypatch, capsys):
    from transformers import AutoConfig

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    with pytest.raises(SystemExit) as exit_info:
        _git(images, "microsoft/git-large-textcaps")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "the hub could not supply it" in err and "couldn't connect" in err


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(images, tmp_path, monkeypatch, capsys):
    """`models/blp` where a folder `models` exists here is a typo of a local folder: one line, no download tried."""
    from transformers import AutoConfig

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for a mistyped local folder")

    monkeypatch.setattr(AutoConfig, "from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        _blip(images, "models/blp")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "models/blp: no such folder" in err

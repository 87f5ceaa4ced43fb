"""Class images for prior preservation: which folders get jobs, and generation that fills them reproducibly."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from library.config.declarations import OPTIONS
from library.config.options import DB
from library.config.resolve import resolve
from library.data.plan import plan_run
from library.errors import UserError
from library.training.class_images import ClassImageJob, class_image_jobs, generate_class_images
from tests.helpers import make_image_folder

FAST = ["--resolution", "64", "--class_infer_steps", "2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def parts(tiny_parts):
    return tiny_parts["tiny-sd1"]


def folders(tmp_path, reg_images: int):
    """A training folder of 2 images and a reg folder `1_dog` holding `reg_images` images (0: empty)."""
    train = make_image_folder(tmp_path / "train", count=2, class_tokens="sks dog")
    reg = make_image_folder(tmp_path / "reg", repeats=1, class_tokens="dog", count=reg_images, seed=1)
    return train, reg


def run_config(tmp_path, *argv: str):
    return resolve(["--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                    *FAST, *argv], DB, OPTIONS)


def jobs_for(config):
    return class_image_jobs(config, plan_run(config))


def generate(parts, config) -> int:
    return generate_class_images(parts, jobs_for(config), config=config, device="cpu")


def class_files(folder):
    return sorted(p.name for p in folder.glob("class_*"))


# ---------------------------------------------------------------------------------------------- jobs
def test_no_jobs_without_num_class_images(tmp_path):
    folders(tmp_path, reg_images=1)
    assert jobs_for(run_config(tmp_path)) == []
    assert jobs_for(run_config(tmp_path, "--num_class_images", "0")) == []


def test_job_per_short_reg_folder_only(tmp_path):
    _, reg = folders(tmp_path, reg_images=1)
    jobs = jobs_for(run_config(tmp_path, "--num_class_images", "3"))
    # The training folder (2 images < 3) is never filled; the reg folder's prompt is its class tokens.
    assert jobs == [ClassImageJob(folder=reg, prompt="dog", negative_prompt=None, have=1, want=3, width=64, height=64,
                                  caption_extension=".caption")]
    assert jobs_for(run_config(tmp_path, "--num_class_images", "1")) == []  # already full


def test_class_prompt_overrides_class_tokens(tmp_path):
    folders(tmp_path, reg_images=1)
    [job] = jobs_for(run_config(tmp_path, "--num_class_images", "3", "--class_prompt", "a photo of a dog",
                                "--class_negative_prompt", "blurry", "--caption_extension", ".txt"))
    assert (job.prompt, job.negative_prompt, job.caption_extension) == ("a photo of a dog", "blurry", ".txt")


def test_empty_reg_folder_gets_a_job(tmp_path):
    _, reg = folders(tmp_path, reg_images=0)
    config = run_config(tmp_path, "--num_class_images", "2")
    plan = plan_run(config)
    assert any("no images in" in problem for problem in plan.problems)  # the plan ignores it, the job does not
    [job] = class_image_jobs(config, plan)
    assert (job.folder, job.have, job.want) == (reg, 0, 2)


def test_missing_prompt_names_the_folder(tmp_path):
    train, _ = folders(tmp_path, reg_images=0)
    reg = tmp_path / "plain reg"
    reg.mkdir()
    config_file = tmp_path / "dataset.toml"
    config_file.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{train.as_posix()}"\n'
                           f'class_tokens = "sks dog"\n[[datasets.subsets]]\nimage_dir = "{reg.as_posix()}"\n'
                           'is_reg = true\n')
    config = resolve(["--dataset_config", str(config_file), "--num_class_images", "2"], DB, OPTIONS)
    with pytest.raises(UserError, match=re.escape(str(reg))) as err:
        class_image_jobs(config, plan_run(config))
    assert "--class_prompt" in str(err.value) and "\n" not in str(err.value)
    with_prompt = config.replace(class_prompt="a dog")
    assert [job.prompt for job in class_image_jobs(with_prompt, plan_run(with_prompt))] == ["a dog"]


def test_pndm_with_too_few_steps_is_refused_before_loading(tmp_path):
    folders(tmp_path, reg_images=0)
    with pytest.raises(UserError, match="class_infer_steps"):
        jobs_for(run_config(tmp_path, "--num_class_images", "2", "--class_sampler", "pndm"))


# ---------------------------------------------------------------------------------------------- generating
def test_fills_empty_folder_once(parts, tmp_path, capsys):
    _, reg = folders(tmp_path, reg_images=0)
    config = run_config(tmp_path, "--num_class_images", "3", "--class_prompt", "a photo of a dog",
                        "--caption_extension", ".txt", "--class_batch_size", "2")
    rng = torch.random.get_rng_state()
    assert generate(parts, config) == 3
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's RNG is untouched
    assert f"class images: generating 3 for '{reg}' (\"a photo of a dog\")" in capsys.readouterr().out
    assert class_files(reg) == ["class_00000.png", "class_00000.txt", "class_00001.png", "class_00001.txt",
                                "class_00002.png", "class_00002.txt"]
    for image in reg.glob("*.png"):
        assert Image.open(image).size == (64, 64)
        assert image.with_suffix(".txt").read_text() == "a photo of a dog"
    # Training now uses them, with the prompt as caption; nothing is left to generate.
    plan = plan_run(config)
    assert {(e.path.name, e.caption) for e in plan.datasets[0].reg} == {
        (f"class_0000{i}.png", "a photo of a dog") for i in range(3)}
    assert class_image_jobs(config, plan) == []
    assert generate(parts, config) == 0
    assert len(class_files(reg)) == 6


def test_restart_regenerates_identical_image(parts, tmp_path):
    _, reg = folders(tmp_path, reg_images=0)
    config = run_config(tmp_path, "--num_class_images", "3", "--class_seed", "7", "--class_batch_size", "2")
    generate(parts, config)
    images = {p.name: p.read_bytes() for p in reg.glob("*.png")}
    assert len(set(images.values())) == 3  # seeds differ per image
    (reg / "class_00001.png").unlink()
    [job] = jobs_for(config)
    assert (job.have, job.want) == (2, 3)
    assert generate_class_images(parts, [job], config=config, device="cpu") == 1
    assert (reg / "class_00001.png").read_bytes() == images["class_00001.png"]
    # Image i comes from seed base + i in the batch of seeds base + (i // 2) * 2 + (0, 1), wherever it is written.
    other = tmp_path / "other"
    other.mkdir()
    moved = ClassImageJob(other, job.prompt, None, 0, 1, 64, 64, ".caption")
    assert generate_class_images(parts, [moved], config=config.replace(class_seed=9), device="cpu") == 1
    assert (other / "class_00000.png").read_bytes() == images["class_00002.png"]  # seed 9 = 7 + 2
    generate_class_images(parts, [moved], config=config.replace(class_seed=100), device="cpu")
    assert (other / "class_00001.png").read_bytes() not in images.values()


def test_user_files_are_never_overwritten(parts, tmp_path):
    _, reg = folders(tmp_path, reg_images=0)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(reg / "class_00000.png")
    (reg / "class_00001.caption").write_text("my own caption")
    user_image = (reg / "class_00000.png").read_bytes()
    config = run_config(tmp_path, "--num_class_images", "3")
    [job] = jobs_for(config)
    assert job.have == 1
    assert generate_class_images(parts, [job], config=config, device="cpu") == 2
    assert (reg / "class_00000.png").read_bytes() == user_image
    assert (reg / "class_00001.caption").read_text() == "my own caption"
    assert not (reg / "class_00001.png").exists()
    assert class_files(reg) == ["class_00000.png", "class_00001.caption", "class_00002.caption", "class_00002.png",
                                "class_00003.caption", "class_00003.png"]
    assert (reg / "class_00002.caption").read_text() == "dog"

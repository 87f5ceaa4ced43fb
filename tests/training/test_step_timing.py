"""The s/step figure a run prints is the training steps' own pace: time spent saving and sampling is left out."""

from __future__ import annotations

import re
import time

import pytest

import train_network
from library.data.demo import make_demo_dataset
from library.training import sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SLOW_SAMPLE_S = 1.5  # a tiny step takes about 0.1 s here


def test_sampling_time_is_left_out_of_seconds_per_step(tmp_path, monkeypatch, capsys):
    make_demo_dataset(tmp_path / "data", count=2, size=32)
    (tmp_path / "prompts.txt").write_text("a shape --w 32 --h 32 --s 1\n")
    sampled = []

    def slow_sampling(*args, **kwargs):  # stands in for a slow sampler; what matters is the time it takes
        sampled.append(kwargs["step"])
        time.sleep(SLOW_SAMPLE_S)

    monkeypatch.setattr(sampling, "sample_images", slow_sampling)
    train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
                        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "out"),
                        "--output_name", "n", "--max_train_steps", "4", "--network_dim", "4", "--seed", "1",
                        "--max_data_loader_n_workers", "0", "--sample_prompts", str(tmp_path / "prompts.txt"),
                        "--sample_every_n_steps", "1"])
    out = capsys.readouterr().out
    assert sampled == [1, 2, 3, 4]
    pace, aside = map(float, re.search(r"([0-9.]+) s/step after the first step \(saving and sampling, ([0-9.]+) s, "
                                       r"left out\)", out).groups())
    # Four samples after the first step (steps 1-4) were set aside; counted in, the pace would be over SLOW_SAMPLE_S.
    assert aside >= 4 * SLOW_SAMPLE_S
    assert pace < SLOW_SAMPLE_S

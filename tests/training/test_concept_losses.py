"""Per-concept progress (#21 item 6): the training loss per subset in TensorBoard, and the images with the highest
mean loss listed at the end of a run."""

from __future__ import annotations

import shutil

import pytest
import torch

import train_network
from library.data.demo import make_demo_dataset
from library.training.concept_losses import TAG, ConceptLosses

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_hardest_images_come_first_and_each_concept_gets_its_mean():
    losses = ConceptLosses({"a/1.png": "a", "a/2.png": "a", "b/1.png": "b"})
    losses.add(["a/1.png", "b/1.png"], torch.tensor([0.2, 0.9]))
    losses.add(["a/2.png", "a/1.png"], torch.tensor([0.4, 0.6]))
    logs = losses.step_logs()
    assert logs == {TAG + "a": pytest.approx((0.2 + 0.4 + 0.6) / 3), TAG + "b": pytest.approx(0.9)}
    assert losses.step_logs() == {}  # read once
    assert [(p, round(m, 4), n) for p, m, n in losses.hardest(2)] == [("b/1.png", 0.9, 1), ("a/1.png", 0.4, 2)]
    assert losses.summary_lines(count=3) == []  # 3 images: listing them all tells nothing
    assert losses.summary_lines(count=2)[1] == "  0.9000 over 1 sample  b/1.png"


def test_a_run_logs_each_concept_and_lists_the_hardest_images(tmp_path, capsys):
    make_demo_dataset(tmp_path / "data", count=4, size=32)
    shutil.copytree(tmp_path / "data" / "10_sks shape", tmp_path / "data" / "5_other shape")
    result = train_network.main([
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "out"), "--output_name",
        "net", "--train_batch_size", "1", "--max_train_steps", "12", "--learning_rate", "1e-3", "--seed", "1",
        "--max_data_loader_n_workers", "0", "--logging_dir", str(tmp_path / "logs")])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = {t for t in events.Tags()["scalars"] if t.startswith(TAG)}
    assert tags == {TAG + "10_sks shape", TAG + "5_other shape"}
    current = {e.step: e.value for e in events.Scalars("loss/current")}
    by_step = {}
    for tag in tags:
        for event in events.Scalars(tag):
            by_step.setdefault(event.step, []).append(event.value)
    # batch size 1: each step's one sample belongs to one concept, whose loss is that step's loss
    assert sorted(by_step) == sorted(current) and all(len(v) == 1 for v in by_step.values())
    assert all(by_step[step][0] == pytest.approx(value, rel=1e-5) for step, value in current.items())

    out = capsys.readouterr().out
    seen = len(result.method.concept_losses.per_image)
    assert seen > 5  # more images than the list shows, so it is a choice
    listed = out.split(f"highest mean training loss (5 of {seen} images; check their captions and pixels):\n")[1]
    lines = listed.splitlines()[:5]
    per_image = result.method.concept_losses.per_image
    assert sum(count for _, count in per_image.values()) == 12
    means = []
    for line in lines:
        mean, _, rest = line.strip().partition(" over ")
        path = rest.split("  ", 1)[1]
        total, count = per_image[path]
        assert float(mean) == pytest.approx(total / count, abs=1e-4)
        means.append(float(mean))
    assert means == sorted(means, reverse=True)

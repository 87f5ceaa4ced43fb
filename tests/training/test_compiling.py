"""--torch_compile: the U-Net and its adapters trace as whole graphs, without graph breaks or per-step recompiles."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import train_network
from tests.helpers import make_image_folder


def _train(tmp_path, name, *extra, steps=4):
    return train_network.main([
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / name), "--output_name",
        "net", "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--network_dim", "4", "--seed", "3",
        "--max_data_loader_n_workers", "0", "--network_train_unet_only", *extra])


@pytest.mark.parametrize("module", ["networks.lora"])
def test_compiled_training_has_no_graph_breaks_and_compiles_once(tmp_path, module):
    make_image_folder(tmp_path / "data", repeats=2, count=2, caption_extension=".txt", sizes=((32, 32),))
    torch._dynamo.reset()
    counters.clear()
    plain = _train(tmp_path, "a", "--network_module", module)
    result = _train(tmp_path, "b", "--network_module", module, "--torch_compile", "--dynamo_backend", "aot_eager")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # One graph for the U-Net's forward (one bucket): every later step reuses it, no recompiles.
    assert counters["stats"]["unique_graphs"] == 1
    assert len(result.losses) == 4
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_an_unknown_backend_is_one_line(tmp_path):
    make_image_folder(tmp_path / "data", repeats=1, count=1, caption_extension=".txt", sizes=((32, 32),))
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path, "a", "--torch_compile", "--dynamo_backend", "tvm")
    assert exit_info.value.code == 2


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_every_adapter_reads_a_frozen_alpha_under_compile(algorithm):
    """What keeps the graph whole for each adapter (the end-to-end count above runs LoRA): the scale is a Python number
    once frozen, and the buffer is not read at all."""
    from torch import nn

    from networks.registry import module_class

    adapter = module_class(algorithm)("lora_unet_x", nn.Linear(8, 8), dim=4, alpha=2)
    expected = float(adapter.alpha)
    adapter.freeze_alpha()
    adapter.alpha = None  # were the buffer read, this would fail
    assert adapter.alpha_number() == expected and isinstance(adapter.scale, float)

"""networks/registry.py is the one list of adapter algorithms: file detection, the tools' names and shape guesses, the
`algo=` hints and the plug-in messages all derive from the registered classes. FakeAdapter below is a whole new
adapter (one file); registering it (one line) is enough for the consumers to handle its files."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from library.errors import UserError
from library.models.detect import foreign_kind
from networks import plugin
from networks.base import AdapterModule
from networks.files import describe_network_file, read_network_file, what_it_is
from networks.lycoris_common import algo_check
from networks.network import AdapterNetwork, plugin_entry_points
from networks.registry import (ALGORITHMS, algo_modules, file_module_classes, module_class,
                               network_modules, signature_names)
from tools import check_lora_weights, merge_lora, svd_merge_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeAdapter(AdapterModule):
    """ΔW stored whole (`fake_delta`, scaled by alpha/dim): about the smallest adapter there is."""

    ALGORITHM, MODULE, LABEL = "fake", __name__, "Fake"
    ALIASES = ("phony",)
    WEIGHT_NAMES = ("fake_delta",)

    def __init__(self, lora_name, org_module, multiplier=1.0, dim=1, alpha=1.0, dropout=None, rank_dropout=None,
                 module_dropout=None, **_unused):
        super().__init__(lora_name, org_module, multiplier, dim, alpha, dropout, rank_dropout, module_dropout)
        self.fake_delta = nn.Parameter(torch.zeros(org_module.weight.shape))

    def delta_weight(self) -> torch.Tensor:
        return self.fake_delta * self.scale

    @classmethod
    def dim_from_weights(cls, weights: dict[str, torch.Tensor]) -> int:
        return 1

    @classmethod
    def is_conv_kernel(cls, weights: dict[str, torch.Tensor]) -> bool:
        delta = weights["fake_delta"]
        return delta.dim() == 4 and tuple(delta.shape[2:]) != (1, 1)

    @classmethod
    def layer_shapes(cls, name: str, weights: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
        return [tuple(weights["fake_delta"].shape)]

    @classmethod
    def in_width(cls, weights: dict[str, torch.Tensor]) -> int | None:
        return int(weights["fake_delta"].shape[1])


create_network, create_network_from_weights = plugin_entry_points(FakeAdapter)


@pytest.fixture
def fake_registered(monkeypatch):
    """The one registry line a new adapter needs."""
    monkeypatch.setitem(ALGORITHMS, "fake", f"{__name__}:FakeAdapter")


@pytest.fixture
def fake_file(fake_registered, tiny_parts, tmp_path):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = create_network(1.0, 1, 1, None, parts.text_encoder, parts.unet, network_args=None)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.01)
    path = tmp_path / "fake.safetensors"
    network.save_weights(path)
    return network, path


# ---------------------------------------------------------------------------------------------- the table itself
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_entry_is_a_complete_adapter_class(algorithm):
    cls = module_class(algorithm)
    assert issubclass(cls, AdapterModule)
    assert cls.ALGORITHM == algorithm and cls.MODULE == ALGORITHMS[algorithm].partition(":")[0]
    assert cls.LABEL and cls.WEIGHT_NAMES and set(cls.signature_names()) <= set(cls.WEIGHT_NAMES)
    module = importlib.import_module(cls.MODULE)
    assert callable(module.create_network) and callable(module.create_network_from_weights)
    for hook in ("dim_from_weights", "layer_shapes"):  # what reading and svd-merging a file need
        assert getattr(cls, hook).__func__ is not getattr(AdapterModule, hook).__func__, hook


def test_algorithms_store_disjoint_tensor_names():
    """A module's tensor names tell its algorithm, so no two algorithms may share one."""
    seen: dict[str, str] = {}
    for cls in file_module_classes():  # a training variant (DyLoRA) writes its file algorithm's names
        for name in cls.WEIGHT_NAMES:
            assert name not in seen, f"{name}: {seen.get(name)} and {cls.ALGORITHM}"
            seen[name] = cls.ALGORITHM


def test_builtin_names_are_the_ones_the_tools_always_printed():
    assert {name: (module_class(name).LABEL, module_class(name).CONV_LABEL) for name in ("lora", "loha", "lokr")} \
        == {"lora": ("LoRA", "LoCon"), "loha": ("LoHa", None), "lokr": ("LoKr", None)}
    assert algo_modules() == {"lora": "networks.lora", "locon": "networks.lora", "loha": "networks.loha",
                              "lokr": "networks.lokr", "oft": "networks.oft",
                              "dylora": "networks.dylora"}
    assert signature_names() == ("lora_down.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a", "oft_blocks")


# ---------------------------------------------------------------------------------------------- one file + one line
def test_a_registered_adapter_reaches_the_tables_and_messages(fake_registered):
    assert algo_modules()["fake"] == algo_modules()["phony"] == __name__
    assert network_modules()[-1] == __name__ and plugin.is_ours(__name__)
    assert "fake_delta" in signature_names()
    with pytest.raises(ValueError, match=f"for fake use --network_module {__name__}"):
        algo_check("loha")("fake")
    with pytest.raises(UserError, match=f"ours are networks.lora, networks.loha, networks.lokr, networks.oft, networks.dylora and {__name__}"):
        plugin.load_network_module("no_such_network_module")
    assert "mixes fake modules into a lora network" in what_it_is(["lora_unet_x.fake_delta"], "lora")
    assert "LoRA/LyCORIS network" in foreign_kind(["x.fake_delta"])  # refused as a base model


def test_a_registered_adapters_files_are_read_checked_merged_and_svd_merged(fake_file, tiny_parts, tmp_path, capsys):
    network, path = fake_file
    weights, _ = read_network_file(path)
    info = describe_network_file(weights, source=str(path))
    assert info.algorithm == "fake" and info.module_class is FakeAdapter and info.label == "Fake"
    modules = network.text_encoder_loras + network.unet_loras
    assert set(info.dims) == {m.lora_name for m in modules}

    lines = check_lora_weights.describe(path)  # recognised as a network by its signature tensor, named by LABEL
    assert lines[0] == f"{path}: Fake network (fake, kohya key layout)"
    assert any("-wide cross-attention context suggests" in line for line in lines)  # in_width, no metadata

    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    before = {name: m.weight.detach().clone() for name, m in parts.unet.named_modules() if hasattr(m, "weight")}
    summary = merge_lora.merge_file_into(parts, path, 0.5, "cpu")
    assert summary.startswith(f"merged {path.name} (Fake) at ratio 0.5: {len(modules)} modules")
    layer = dict(parts.unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    fake = next(m for m in network.unet_loras if m.lora_name.endswith("down_blocks_0_attentions_0_transformer_blocks_0"
                                                                      "_attn2_to_k"))
    expected = before["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] + fake.fake_delta.detach() * 0.5
    assert torch.equal(layer.weight, expected)

    out = tmp_path / "svd.safetensors"
    report = svd_merge_lora.main(["--models", str(path), "--new_rank", "64", "--save_to", str(out)])
    assert {m.name for m in report} == set(info.dims)
    assert "average retained Frobenius norm 100.00%" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- merged_weight
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if module_class(a).ADDITIVE])
def test_default_merge_is_bit_identical_to_adding_the_scaled_delta(algorithm, kind, dtype):
    torch.manual_seed(0)
    layer = (nn.Linear(24, 40) if kind == "linear" else nn.Conv2d(24, 40, 3, padding=1)).to(dtype)
    adapter = module_class(algorithm)("lora_unet_test", layer, multiplier=0.8, dim=4, alpha=2)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.1)
        expected = layer.weight.detach().clone()
        expected += (adapter.delta_weight() * 0.8).to(expected)  # how merging was written before the hook
    adapter.merge_to()
    assert layer.weight.dtype == dtype and torch.equal(layer.weight, expected)


class Rescaling(FakeAdapter):
    """Not additive (as DoRA and OFT are not): the merged weight is W ⊙ (1 + ΔW·multiplier)."""

    def merged_weight(self, weight: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        multiplier = self.multiplier if multiplier is None else multiplier
        return weight * (1 + self.delta_weight() * multiplier)


def test_merging_goes_through_merged_weight():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    adapter = Rescaling("lora_unet_test", layer, multiplier=0.5)
    with torch.no_grad():
        adapter.fake_delta.normal_()
        expected = layer.weight * (1 + adapter.fake_delta * 0.5)
    AdapterNetwork(Rescaling, [], [adapter], multiplier=0.5).merge_to()
    assert torch.equal(layer.weight, expected)

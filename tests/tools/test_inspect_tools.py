"""tools/show_metadata.py and tools/check_lora_weights.py on real network, checkpoint, embedding, hypernetwork files."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from library.formats.embedding_files import save_a1111
from library.models import checkpoint_io
from library.models.checkpoint_io import read_safetensors_keys
from networks import plugin
from networks.hypernetwork import Hypernetwork, save_hypernetwork
from networks.registry import ALGORITHMS, module_class
from tests.conftest import ROOT
from tools import check_lora_weights, show_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TAGS = {"1_cat": {"cat": 3, "sitting": 1}}
THUMBNAIL = "data:image/png;base64," + "iVBORw0KGgo" * 60
METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2",
            "ss_output_name": "mycat", "ss_steps": "120", "ss_epoch": "3", "ss_base_model_version": "sd_v1",
            "ss_tag_frequency": json.dumps(TAGS), "modelspec.thumbnail": THUMBNAIL}


def _network(tiny_parts, module, dim, alpha, args=(), seed=0):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = plugin.create_network(module, 1.0, dim, alpha, None, parts.text_encoder, parts.unet,
                                    network_args=list(args))
    torch.manual_seed(seed)
    with torch.no_grad():  # trained-looking: no all-zero up factors
        for param in network.parameters():
            param.normal_(0, 0.05)
    return network


@pytest.fixture(scope="module")
def locon(tiny_parts, tmp_path_factory):
    network = _network(tiny_parts, "networks.lora", 4, 2, ["conv_dim=2", "conv_alpha=1"])
    file = tmp_path_factory.mktemp("locon") / "mycat.safetensors"
    network.save_weights(file, torch.float32, dict(METADATA))
    return network, file


def _run(tool, argv, capsys):
    tool.main([str(a) for a in argv])
    return capsys.readouterr().out


def _fails(tool, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---- check_lora_weights: networks -------------------------------------------------------------------------------

def test_locon_summary_has_algorithm_ranks_alphas_counts_and_training_metadata(locon, capsys):
    network, file = locon
    out = _run(check_lora_weights, [file], capsys)
    conv = [m for m in network.unet_loras if m.lora_down.weight.dim() == 4 and m.lora_down.weight.shape[2:] != (1, 1)]
    assert f"{file}: LoCon network (lora, kohya key layout)" in out
    total = len(network.unet_loras) + len(network.text_encoder_loras)
    assert (f"modules: {total} (UNet {len(network.unet_loras)}, text encoder {len(network.text_encoder_loras)}); "
            f"conv 3×3 modules: {len(conv)}") in out and conv
    assert "rank (dim): 4; alpha: 2\n" in out and "conv rank (conv_dim): 2; conv alpha: 1\n" in out
    assert "dtype: float32" in out and "base model: ss_base_model_version=sd_v1" in out
    for key in ("ss_network_module: networks.lora", "ss_output_name: mycat", "ss_steps: 120", "ss_epoch: 3"):
        assert f"    {key}\n" in out
    assert "warning" not in out and "lora_unet_" not in out  # per-module lines only with --verbose


def test_verbose_prints_each_module_with_shapes_and_mean_abs(locon, capsys):
    network, file = locon
    lines = _run(check_lora_weights, [file, "--verbose"], capsys).splitlines()
    modules = [line for line in lines if line.startswith("    lora_")]
    assert len(modules) == len(network.unet_loras) + len(network.text_encoder_loras)
    fc1 = next(m for m in network.text_encoder_loras if m.lora_name.endswith("layers_0_mlp_fc1"))
    up, down = fc1.lora_up.weight, fc1.lora_down.weight
    line = next(line for line in modules if line.strip().startswith(fc1.lora_name + ":"))
    assert f"dim 4, alpha 2 | lora_down {down.shape[0]}×{down.shape[1]} mean|w| {down.abs().mean().item():.4g}" in line
    assert f"lora_up {up.shape[0]}×{up.shape[1]} mean|w| {up.abs().mean().item():.4g}" in line
    assert any(", conv 3×3 |" in line for line in modules)


# Every registered algorithm, saved in both file kinds in turn; LoKr at dim 2 (at 4 the tiny layers' factors are full).
NAMED_CASES = [(algorithm, (".safetensors", ".pt")[i % 2]) for i, algorithm in enumerate(ALGORITHMS)]


@pytest.mark.parametrize("algorithm, suffix", NAMED_CASES)
def test_every_algorithm_is_named_with_its_own_counts(tiny_parts, tmp_path, capsys, algorithm, suffix):
    cls, dim = module_class(algorithm), {"lokr": 2}.get(algorithm, 4)
    network = _network(tiny_parts, cls.MODULE, dim, 1)
    file = tmp_path / f"net{suffix}"
    network.save_weights(file)
    out = _run(check_lora_weights, [file], capsys)
    stored = module_class(cls.FILE_ALGORITHM) if cls.FILE_ALGORITHM else cls  # DyLoRA writes LoRA files
    assert f"{stored.LABEL} network ({stored.ALGORITHM}, kohya key layout)" in out
    assert f"(UNet {len(network.unet_loras)}, text encoder {len(network.text_encoder_loras)})" in out
    if cls.ADDITIVE:
        assert f"rank (dim): {dim}; alpha: 1\n" in out
    else:  # OFT: dim counts blocks, alpha is a constraint
        assert f"blocks (dim): {dim}; constraint (alpha): 1\n" in out
    if suffix == ".pt":
        assert "metadata: none (a torch pickle has no header)" in out


def test_an_untrained_network_is_flagged(tiny_parts, tmp_path, capsys):
    parts = copy.deepcopy(tiny_parts["tiny-sd1"])
    network = plugin.create_network("networks.loha", 1.0, 4, 1, None, parts.text_encoder, parts.unet)
    network.save_weights(tmp_path / "fresh.safetensors")  # hada_w2_a starts at zero: ΔW = 0 everywhere
    total = len(network.unet_loras) + len(network.text_encoder_loras)
    out = _run(check_lora_weights, [tmp_path / "fresh.safetensors"], capsys)
    assert f"warning: {total} of {total} modules have an all-zero" in out


# ---- check_lora_weights: other kinds ----------------------------------------------------------------------------

def test_checkpoints_are_classified_from_the_header_alone(tiny_files, capsys, monkeypatch):
    def no_data(self, key, dtype=None):
        raise AssertionError(f"read tensor data of {key}: a checkpoint must be classified from its header")

    monkeypatch.setattr(checkpoint_io._SafetensorsFile, "load", no_data)
    file = tiny_files["tiny-sd1"]["safetensors"]
    out = _run(check_lora_weights, [file], capsys)
    count = len(read_safetensors_keys(file))
    assert f"{file}: Stable Diffusion 1.x checkpoint (single file): {count} tensors" in out and "float32" in out
    assert len(out.splitlines()) <= 2
    out = _run(check_lora_weights, [tiny_files["tiny-sd2"]["ckpt"]], capsys)
    assert "Stable Diffusion 2.x checkpoint" in out and "OpenCLIP" in out


def test_embedding_summary(tmp_path, capsys):
    save_a1111(tmp_path / "mychar.pt", torch.randn(3, 32), name="mychar", step=50)
    out = _run(check_lora_weights, [tmp_path / "mychar.pt"], capsys)
    assert "textual-inversion embedding (AUTOMATIC1111 layout): 3 vectors × 32 wide, step 50, name 'mychar'" in out
    assert len(out.splitlines()) <= 2


def test_hypernetwork_summary(tmp_path, capsys):
    network = Hypernetwork((32, 64))
    save_hypernetwork(tmp_path / "hn.pt", network, step=12, name="myhn")
    out = _run(check_lora_weights, [tmp_path / "hn.pt"], capsys)
    params = sum(p.numel() for p in network.parameters())
    assert "AUTOMATIC1111 hypernetwork: sizes 32, 64, layer structure [1, 2, 1], activation linear" in out
    assert f"step 12, name 'myhn', {params} parameters" in out and len(out.splitlines()) == 2


def test_other_files_are_refused_in_one_line(tiny_files, tmp_path, capsys):
    vae_only = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
               "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)}, str(vae_only))
    err = _fails(check_lora_weights, [vae_only], capsys)
    assert "is not a LoRA, checkpoint, embedding or hypernetwork: it is a VAE" in err
    peft = tmp_path / "peft.safetensors"
    save_file({"unet.down.to_q.lora_A.weight": torch.zeros(4, 8), "unet.down.to_q.lora_B.weight": torch.zeros(8, 4)},
              str(peft))
    assert "diffusers/PEFT layout" in _fails(check_lora_weights, [peft], capsys)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert "not a readable .safetensors file" in _fails(check_lora_weights, [tmp_path / "junk.safetensors"], capsys)
    assert "no such file" in _fails(check_lora_weights, [tmp_path / "missing.safetensors"], capsys)


# ---- show_metadata ----------------------------------------------------------------------------------------------

def test_show_metadata_prints_sorted_keys_pretty_json_and_truncates_long_values(locon, capsys):
    _, file = locon
    out = _run(show_metadata, [file], capsys)
    keys = [line.split(":", 1)[0] for line in out.splitlines() if not line.startswith(" ") and ":" in line
            and not line.startswith(("{", "}"))]
    assert keys == sorted(keys) and set(METADATA) <= set(keys) and "sshs_model_hash" in keys
    assert "ss_output_name: mycat\n" in out and 'ss_tag_frequency: {\n    "1_cat": {\n      "cat": 3,' in out
    thumbnail = next(line for line in out.splitlines() if line.startswith("modelspec.thumbnail: "))
    assert thumbnail.endswith(f"... ({len(THUMBNAIL)} chars in all; --json shows all)") and len(thumbnail) < 300


def test_show_metadata_json_round_trips_what_was_written(locon, capsys):
    _, file = locon
    shown = json.loads(_run(show_metadata, [file, "--json"], capsys))
    assert shown["ss_tag_frequency"] == TAGS  # a JSON value comes back as JSON
    assert {k: v for k, v in shown.items() if k != "ss_tag_frequency"} == {
        k: v for k, v in checkpoint_io.read_state_dict(file)[1].items() if k != "ss_tag_frequency"}
    assert shown["modelspec.thumbnail"] == THUMBNAIL and shown["ss_network_dim"] == "4"


def test_show_metadata_on_a_pickle_says_there_is_none(tiny_files, capsys):
    ckpt = tiny_files["tiny-sd1"]["ckpt"]
    out = _run(show_metadata, [ckpt], capsys)
    assert out == f"{ckpt}: a .ckpt torch pickle has no metadata header (only .safetensors files carry one)\n"
    assert json.loads(_run(show_metadata, [ckpt, "--json"], capsys)) == {}


def test_show_metadata_errors_are_one_line_exit_2(tmp_path, capsys):
    assert "no such file" in _fails(show_metadata, [tmp_path / "missing.safetensors"], capsys)
    (tmp_path / "cut.safetensors").write_bytes(b"\xff\xff\x00\x00\x00\x00\x00\x00{")
    assert "truncated or corrupt" in _fails(show_metadata, [tmp_path / "cut.safetensors"], capsys)
    (tmp_path / "notes.txt").write_text("hello")
    err = _fails(show_metadata, [tmp_path / "notes.txt"], capsys)
    assert "neither a .safetensors file nor a torch checkpoint" in err


def test_tools_run_as_scripts(locon):
    _, file = locon
    for tool in ("tools/show_metadata.py", "tools/check_lora_weights.py"):
        proc = subprocess.run([sys.executable, tool, str(file)], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "mycat" in proc.stdout


def test_loha_conv_layers_count_as_convs_though_their_factors_are_2d(tiny_parts, tmp_path, capsys):
    network = _network(tiny_parts, "networks.loha", 4, 1, args=["conv_dim=2", "conv_alpha=1"])
    convs = [m for m in network.unet_loras if isinstance(m.org_module, torch.nn.Conv2d)
             and m.org_module.kernel_size != (1, 1)]
    file = tmp_path / "loha_conv.safetensors"
    network.save_weights(file)
    out = _run(check_lora_weights, [file], capsys)
    assert convs and f"conv 3×3 modules: {len(convs)}" in out
    assert f"conv rank (conv_dim): 2 ×{len(convs)}" in out or "conv rank (conv_dim): 2;" in out
    assert "rank (dim): 4;" in out  # no conv rank mixed into the linear ones

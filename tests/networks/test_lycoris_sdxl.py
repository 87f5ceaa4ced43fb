"""`--network_module lycoris.kohya` on SDXL, as under sd-scripts: LyCORIS walks sd-scripts' SGM-named SDXL UNet and
the two text encoders, so its modules are named `lora_unet_input_blocks_…`, `lora_te1_…`, `lora_te2_…` — the names
our own LoRA/LoCon write (which diffusers loads, tests/networks/test_sdxl_lora_downstream.py). And lycoris-lora
loads the SDXL files we write (every adapter), with every module found and the same outputs as ours."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import sdxl_train_network
from library.data.demo import make_demo_dataset
from library.models.checkpoint_io import read_state_dict
from networks import lora
from networks.args import split_network_args
from networks.network import network_from_weights
from networks.plugin import create_network_from_weights
from networks.registry import algo_modules
from tests.helpers import ADAPTER_FLAGS
from tests.networks.test_lycoris_kohya import DOCUMENTED, restore_lycoris_presets  # noqa: F401 (fixture)

pytest.importorskip("lycoris")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

OUR_MODULE = {"default": "networks.lora", **algo_modules()}
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")


def our_locon_names(parts) -> set[str]:
    """Every module our LoCon (conv_dim) builds on the model: sd-scripts' LoRA targets plus the ResNet/sampler convs,
    the same layers LyCORIS' default preset wraps in sd-scripts' SDXL UNet."""
    network = lora.create_network(1.0, 4, 1, None, list(parts.text_encoders), parts.unet, conv_dim=4, conv_alpha=1)
    return {m.lora_name for m in network.text_encoder_loras + network.unet_loras}


@pytest.mark.parametrize("command", list(DOCUMENTED))
def test_documented_command_lines_train_sdxl_under_sd_scripts_names(command, tmp_path, tiny_parts):
    make_demo_dataset(tmp_path / "data", count=2, size=32)
    result = sdxl_train_network.main([
        "--pretrained_model_name_or_path", "tiny-sdxl", "--train_data_dir", str(tmp_path / "data"),
        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "out"),
        "--output_name", "ly", "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-3",
        "--network_dim", "4", "--network_alpha", "1", "--seed", "1", "--max_data_loader_n_workers", "0",
        "--network_module", "lycoris.kohya", "--network_args", *DOCUMENTED[command]])
    assert result.global_step == 2
    file = tmp_path / "out" / "ly.safetensors"
    weights, metadata = read_state_dict(file)
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    names = {key.partition(".")[0] for key in weights}
    assert {p for p in PREFIXES if any(n.startswith(p) for n in names)} == set(PREFIXES)
    # The default preset's names conv_in / conv_out / time_embedding.* do not exist in sd-scripts' SDXL UNet
    # (there they are input_blocks.0.0, out.2, time_embed.*), so nothing is added beyond the block layers.
    assert names == our_locon_names(tiny_parts["tiny-sdxl"])
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_input_blocks_3_0_op" in names and "lora_unet_output_blocks_2_2_conv" in names

    # Our loader (merge tools, generation) and LyCORIS' own find every module of the file again.
    parts = copy.deepcopy(tiny_parts["tiny-sdxl"])
    ours, _ = create_network_from_weights(OUR_MODULE[command], 1.0, file, None, list(parts.text_encoders),
                                          parts.unet)
    assert {m.lora_name for m in ours.text_encoder_loras + ours.unet_loras} == names
    theirs, _ = create_network_from_weights("lycoris.kohya", 1.0, file, None, list(parts.text_encoders),
                                            parts.unet)
    assert {m.lora_name for m in theirs.text_encoder_loras + theirs.unet_loras} == names


def _random_file(parts, algorithm: str, path):
    """Our `algorithm` network on every default target of tiny-sdxl, all weights seeded random, saved."""
    flags = ADAPTER_FLAGS[algorithm]
    module = importlib.import_module(flags[1])
    kwargs = split_network_args(flags[3:]) if "--network_args" in flags else {}
    network = module.create_network(1.0, 4, 2, None, list(parts.text_encoders), parts.unet, **kwargs)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.15)  # LoHa/LoKr multiply factors: smaller weights would barely move outputs
    network.save_weights(str(path), torch.float32, {})
    return path


def _outputs(parts):
    prompt = ["a photo of sks dog"]
    ids = [tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids for tok in parts.tokenizers]
    with torch.no_grad():
        te1 = parts.text_encoders[0](ids[0], output_hidden_states=True)
        te2 = parts.text_encoders[1](ids[1], output_hidden_states=True)
        context = torch.cat([te1.hidden_states[-2], te2.hidden_states[-2]], dim=-1)
        cond = {"text_embeds": te2.text_embeds, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
        torch.manual_seed(1)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([321])
        return context, te2.text_embeds, parts.unet(x, t, context, added_cond_kwargs=cond).sample


@pytest.mark.parametrize("algorithm", list(ADAPTER_FLAGS))
def test_lycoris_loads_our_sdxl_files_with_every_module_and_equal_outputs(algorithm, tiny_parts, tmp_path):
    base = tiny_parts["tiny-sdxl"]
    file = _random_file(copy.deepcopy(base), algorithm, tmp_path / "ours.safetensors")
    weights, _ = read_state_dict(file)
    modules = {k.partition(".")[0] for k in weights}
    assert {p for p in PREFIXES if any(n.startswith(p) for n in modules)} == set(PREFIXES)

    theirs = copy.deepcopy(base)
    network, sd = create_network_from_weights("lycoris.kohya", 1.0, file, None, list(theirs.text_encoders),
                                              theirs.unet)
    assert {m.lora_name for m in network.text_encoder_loras + network.unet_loras} == modules
    network.apply_to(list(theirs.text_encoders), theirs.unet, True, True)
    result = network.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys  # every tensor of our file is one LyCORIS has a place for
    network.eval()

    ours = copy.deepcopy(base)
    own = network_from_weights(1.0, str(file), list(ours.text_encoders), ours.unet)
    own.load_weights(str(file))
    own.apply_to(list(ours.text_encoders), ours.unet)

    got, want, before = _outputs(theirs), _outputs(ours), _outputs(base)
    assert (want[2] - before[2]).abs().max() > 1e-3  # the adapter does something
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)

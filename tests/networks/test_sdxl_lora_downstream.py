"""An SDXL LoRA file we save (SGM names, lora_te1_ / lora_te2_) loads in diffusers' StableDiffusionXLPipeline
.load_lora_weights with every key used, and both text encoders and the UNet then compute what ours compute."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file

from library.models.saving import save_model
from networks import lora
from networks.network import network_from_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NETWORK_ARGS = {"lora": {}, "locon": {"conv_dim": "2", "conv_alpha": "1"}}


@pytest.fixture(scope="module")
def diffusers_folder(tiny_parts, tmp_path_factory):
    return save_model(tiny_parts["tiny-sdxl"], tmp_path_factory.mktemp("sdxl") / "folder")


def _random_lora_file(parts, path, network_args):
    """A rank-4 LoRA of every default target of tiny-sdxl (both text encoders too), all weights seeded random."""
    network = lora.create_network(1.0, 4, 2, None, list(parts.text_encoders), parts.unet, **network_args)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.05)
    network.save_weights(str(path), torch.float32, {})
    return path


@pytest.mark.parametrize("kind", list(NETWORK_ARGS))
def test_diffusers_sdxl_load_lora_weights_uses_every_key_and_matches_our_outputs(kind, tiny_parts, diffusers_folder,
                                                                                 tmp_path, caplog):
    from diffusers import StableDiffusionXLPipeline

    base = tiny_parts["tiny-sdxl"]
    file = _random_lora_file(copy.deepcopy(base), tmp_path / "lora.safetensors", NETWORK_ARGS[kind])
    weights = load_file(str(file))
    modules = {k.partition(".")[0] for k in weights}
    prefixes = {"lora_unet_", "lora_te1_", "lora_te2_"}
    assert {p for p in prefixes if any(m.startswith(p) for m in modules)} == prefixes
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    if kind == "locon":
        assert "lora_unet_input_blocks_1_0_in_layers_2" in modules  # 3x3 conv of a ResBlock

    from diffusers.utils import logging as diffusers_logging

    pipe = StableDiffusionXLPipeline.from_pretrained(str(diffusers_folder), local_files_only=True)
    diffusers_logging.enable_propagation()  # diffusers' loggers do not reach caplog's root handler otherwise
    try:
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(str(file))
    finally:
        diffusers_logging.disable_propagation()
    complaints = [r.getMessage() for r in caplog.records
                  if any(w in r.getMessage().lower() for w in ("unexpected", "not loaded", "not found", "missing"))]
    assert not complaints, complaints[:3]
    # Every module of our file became one adapted module in diffusers (none left out, none invented).
    for prefix, model in (("lora_unet_", pipe.unet), ("lora_te1_", pipe.text_encoder),
                          ("lora_te2_", pipe.text_encoder_2)):
        injected = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
        ours_count = len([m for m in modules if m.startswith(prefix)])
        assert len(injected) == ours_count, (prefix, len(injected), ours_count)

    # Ours: the same file applied with network_from_weights on a fresh copy of the tiny model.
    ours = copy.deepcopy(base)
    network = network_from_weights(1.0, str(file), list(ours.text_encoders), ours.unet)
    network.load_weights(str(file))
    network.apply_to(list(ours.text_encoders), ours.unet)

    prompt = ["a photo of sks dog"]
    ids1 = ours.tokenizers[0](prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = ours.tokenizers[1](prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        te1 = [m(ids1, output_hidden_states=True) for m in (ours.text_encoders[0], pipe.text_encoder,
                                                             base.text_encoders[0])]
        te2 = [m(ids2, output_hidden_states=True) for m in (ours.text_encoders[1], pipe.text_encoder_2,
                                                             base.text_encoders[1])]
        # SDXL reads TE1 at hidden_states[11] (= [-2] with 12 layers), TE2 at [-2], plus TE2's pooled projection:
        # compare every hidden state of both, and the projection.
        for (o, t, b) in (te1, te2):
            assert (o.hidden_states[-2] - b.hidden_states[-2]).abs().max() > 1e-3  # the adapter does something
            for ho, ht in zip(o.hidden_states, t.hidden_states):
                torch.testing.assert_close(ht, ho, atol=1e-5, rtol=0)
        torch.testing.assert_close(te2[1].text_embeds, te2[0].text_embeds, atol=1e-5, rtol=0)

        context = torch.cat([te1[0].hidden_states[-2], te2[0].hidden_states[-2]], dim=-1)
        pooled = te2[0].text_embeds
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        torch.manual_seed(1)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([321])
        unet_ours = ours.unet(x, t, context, added_cond_kwargs=cond).sample
        unet_theirs = pipe.unet(x, t, context, added_cond_kwargs=cond).sample
        unet_base = base.unet(x, t, context, added_cond_kwargs=cond).sample
        assert (unet_ours - unet_base).abs().max() > 1e-3
        torch.testing.assert_close(unet_theirs, unet_ours, atol=1e-5, rtol=0)

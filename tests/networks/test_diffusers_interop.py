"""A LoRA file we save loads in diffusers' load_lora_weights with every key used, and behaves there as it does here."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from networks import lora


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_diffusers_load_lora_weights_matches_our_outputs(name, tiny_parts, tmp_path, caplog):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    ours = copy.deepcopy(tiny_parts[name])
    theirs = copy.deepcopy(tiny_parts[name])
    network = lora.create_network(1.0, 4, 2, None, ours.text_encoder, ours.unet)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.05)
    network.save_weights(str(tmp_path / "lora.safetensors"), torch.float32, {})

    pipe = StableDiffusionPipeline(vae=theirs.vae, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer,
                                   unet=theirs.unet, scheduler=PNDMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower() or "not" in r.getMessage().lower()
                and "lora" in r.getMessage().lower()]
    injected = [n for n, _ in pipe.unet.named_modules() if n.endswith("lora_A")]
    assert len(injected) == len(network.unet_loras)
    assert len([n for n, _ in pipe.text_encoder.named_modules() if n.endswith("lora_A")]) == len(network.text_encoder_loras)

    base = copy.deepcopy(tiny_parts[name])
    network.apply_to(ours.text_encoder, ours.unet)
    ids = ours.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([321])
    with torch.no_grad():
        te_ours, te_theirs, te_base = (m(ids)[0] for m in (ours.text_encoder, pipe.text_encoder, base.text_encoder))
        assert (te_ours - te_base).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(te_theirs, te_ours, atol=1e-5, rtol=0)
        unet_ours = ours.unet(x, t, te_ours).sample
        unet_theirs = pipe.unet(x, t, te_ours).sample
        assert (unet_ours - base.unet(x, t, te_ours).sample).abs().max() > 1e-3
        torch.testing.assert_close(unet_theirs, unet_ours, atol=1e-5, rtol=0)

#!/usr/bin/env python
"""The floor for bench/train_step.py: the minimal diffusers + peft LoRA loop (UNet-only, same targets as
sd-scripts, cached latents, fixed text embeddings, gradient checkpointing, AdamW, fp32). Prints the same lines
our trainer prints ("training starts", "first step took", "s/step") so the benchmark reads both the same way.

SDXL (detected from the loaded model: two text encoders): the context is TE1's hidden_states[11] next to TE2's
penultimate hidden state, the pooled embedding is TE2's projected output, and both go to the UNet with the six
size values (original, crop top-left, target) through added_cond_kwargs, as diffusers' SDXL LoRA script does; the
text encoders and the VAE are dropped once the latents and the embeddings are computed (SD 1.x keeps them, as
before, so its figures stay comparable)."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

START = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from PIL import Image  # noqa: E402

from library.models.loading import load_components  # noqa: E402
from library.training.noise import make_noise_scheduler  # noqa: E402


def encode_text(parts, batch: int):
    """(context, added_cond_kwargs or None) for the fixed caption."""
    caption = ["sks shape"] * batch
    if len(parts.text_encoders) == 1:
        ids = parts.tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return parts.text_encoder(ids)[0], None
    (te1, te2), (tok1, tok2) = parts.text_encoders, parts.tokenizers
    ids1 = tok1(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden1 = te1(ids1, output_hidden_states=True).hidden_states[11]
    out2 = te2(ids2, output_hidden_states=True)
    return torch.cat([hidden1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def main(model, data, resolution, batch, steps, rank) -> None:
    parts = load_components(model)  # the same loader, so the floor measures the loop, not file parsing
    unet, vae = parts.unet, parts.vae
    images = sorted(Path(data).rglob("*.png"))
    pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(Image.open(p).convert("RGB").resize(
        (resolution, resolution)))).permute(2, 0, 1).float() / 127.5 - 1 for p in images])
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 1]).latent_dist.sample() for i in range(len(pixels))])
        hidden, pooled = encode_text(parts, batch)
    added = None
    if pooled is not None:  # SDXL: original size, crop top-left, target size (h, w) of a square, uncropped image
        added = {"text_embeds": pooled,
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                          dtype=pooled.dtype)}
    scale = parts.family.latent_scale
    if pooled is not None:  # SDXL: only the UNet trains from here (diffusers' SDXL scripts del the encoders too)
        parts.vae, parts.text_encoders, vae = None, (), None
        gc.collect()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]))
    unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = make_noise_scheduler(v_parameterization=False)
    first = None
    print(f"training starts {time.time() - START:.1f} s after launch", flush=True)
    loop_started = time.time()
    for step in range(steps):
        x0 = latents[torch.randint(0, len(latents), (batch,))] * scale
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(scheduler.add_noise(x0, noise, t), t, hidden, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if first is None:
            first = time.time()
            print(f"first step took {first - loop_started:.1f} s", flush=True)
    print(f"trained {steps} steps: {(time.time() - first) / (steps - 1):.3f} s/step after the first step", flush=True)


if __name__ == "__main__":
    model, data, resolution, batch, steps, rank = sys.argv[1:7]
    main(model, data, int(resolution), int(batch), int(steps), int(rank))

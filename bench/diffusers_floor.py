#!/usr/bin/env python
"""The floor for bench/train_step.py: the minimal diffusers + peft LoRA loop (UNet-only, same targets as
sd-scripts, cached latents, fixed text embeddings, gradient checkpointing, AdamW, fp32). Prints the same lines
our trainer prints ("training starts", "s/step") so the benchmark reads both the same way."""

from __future__ import annotations

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


def main(model, data, resolution, batch, steps, rank) -> None:
    parts = load_components(model)  # the same loader, so the floor measures the loop, not file parsing
    unet, vae, te, tok = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
    images = sorted(Path(data).rglob("*.png"))
    pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(Image.open(p).convert("RGB").resize(
        (resolution, resolution)))).permute(2, 0, 1).float() / 127.5 - 1 for p in images])
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 1]).latent_dist.sample() for i in range(len(pixels))])
        ids = tok(["sks shape"] * batch, padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = te(ids)[0]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]))
    unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = make_noise_scheduler(v_parameterization=False)
    first = None
    print(f"training starts {time.time() - START:.1f} s after launch", flush=True)
    for step in range(steps):
        x0 = latents[torch.randint(0, len(latents), (batch,))] * parts.family.latent_scale
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(scheduler.add_noise(x0, noise, t), t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if first is None:
            first = time.time()
    print(f"trained {steps} steps: {(time.time() - first) / (steps - 1):.3f} s/step after the first step", flush=True)


if __name__ == "__main__":
    model, data, resolution, batch, steps, rank = sys.argv[1:7]
    main(model, data, int(resolution), int(batch), int(steps), int(rank))

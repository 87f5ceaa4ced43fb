#!/usr/bin/env python
"""The floor for bench/train_step.py: the minimal diffusers + peft LoRA loop (UNet-only, same targets as
sd-scripts, cached latents, fixed text embeddings, gradient checkpointing, AdamW, fp32). Prints the same lines
our trainer prints ("training starts", "first step took", "s/step") so the benchmark reads both the same way, and
"step N took X s" for every step (the benchmark takes the median).

    python bench/diffusers_floor.py MODEL DATA RESOLUTION BATCH STEPS RANK [--no-gc] [--bf16] [--te-lora]
                                    [--full] [--device cuda] [--max-grad-norm 1.0]

--no-gc: no gradient checkpointing. --bf16: the frozen weights stored in bfloat16 and torch.autocast(bfloat16) around
the forward passes and the loss, the LoRA weights in float32 (diffusers' LoRA scripts: weight_dtype, then
cast_training_params). --te-lora (SD 1.x/2.x): peft LoRA on the text encoder too (q/k/v/out_proj, fc1, fc2 of CLIP,
as sd-scripts targets its attention and MLP layers), the text embedding computed with grad every step (and the
text encoder checkpointed too with gradient checkpointing, as diffusers' DreamBooth LoRA script does).

SDXL (detected from the loaded model: two text encoders): the context is TE1's hidden_states[11] next to TE2's
penultimate hidden state, the pooled embedding is TE2's projected output, and both go to the UNet with the six
size values (original, crop top-left, target) through added_cond_kwargs, as diffusers' SDXL LoRA script does; the
text encoders and the VAE are dropped once the latents and the embeddings are computed (SD 1.x keeps them, as
before, so its figures stay comparable).

--full: the Dreambooth floor (diffusers' train_dreambooth.py): no adapters, the whole UNet trains in float32 with
AdamW; --bf16 is then autocast alone (the frozen encoders are not used in the loop). --device cuda: everything on the
GPU; each step's time is taken after torch.cuda.synchronize(), and the peak of torch.cuda.max_memory_allocated is
printed at the end ("peak VRAM X GiB"). --max-grad-norm N: the gradients clipped to norm N before each step, as
sd-scripts does by default (1.0; bench/gpu.py passes it); the CPU table's floor does not clip (its targets were set
against that floor)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path

START = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from PIL import Image  # noqa: E402

from library.models.loading import load_components  # noqa: E402
from library.training.noise import make_noise_scheduler  # noqa: E402
from profiling import StepProfiler, print_peak_vram  # noqa: E402


def encode_text(parts, batch: int, device: torch.device):
    """(context, added_cond_kwargs or None) for the fixed caption."""
    caption = ["sks shape"] * batch
    if len(parts.text_encoders) == 1:
        ids = parts.tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return parts.text_encoder(ids.to(device))[0], None
    (te1, te2), (tok1, tok2) = parts.text_encoders, parts.tokenizers
    ids1 = tok1(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids1, ids2 = ids1.to(device), ids2.to(device)
    hidden1 = te1(ids1, output_hidden_states=True).hidden_states[11]
    out2 = te2(ids2, output_hidden_states=True)
    return torch.cat([hidden1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def main(model, data, resolution, batch, steps, rank, *, gc_on=True, bf16=False, te_lora=False, full=False,
         device="cpu", max_grad_norm=0.0) -> None:
    device = torch.device(device)
    cuda = device.type == "cuda"
    parts = load_components(model)  # the same loader, so the floor measures the loop, not file parsing
    for module in parts.modules():
        module.to(device)
    unet, vae = parts.unet, parts.vae
    images = sorted(Path(data).rglob("*.png"))
    pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(Image.open(p).convert("RGB").resize(
        (resolution, resolution)))).permute(2, 0, 1).float() / 127.5 - 1 for p in images]).to(device)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 1]).latent_dist.sample() for i in range(len(pixels))])
        hidden, pooled = encode_text(parts, batch, device)
    added = None
    if pooled is not None:  # SDXL: original size, crop top-left, target size (h, w) of a square, uncropped image
        added = {"text_embeds": pooled,
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                          dtype=pooled.dtype, device=device)}
    scale = parts.family.latent_scale
    if te_lora and pooled is not None:
        raise SystemExit("--te-lora: SD 1.x/2.x only (one text encoder)")
    if full and te_lora:
        raise SystemExit("--full trains the UNet alone: no --te-lora")
    if pooled is not None:  # SDXL: only the UNet trains from here (diffusers' SDXL scripts del the encoders too)
        parts.vae, parts.text_encoders, vae = None, (), None
        gc.collect()
    if bf16 and not full:  # diffusers' LoRA scripts: the frozen models in weight_dtype, the adapters in float32
        unet.to(torch.bfloat16)
        if te_lora:
            parts.text_encoder.to(torch.bfloat16)
    if full:
        unet.requires_grad_(True)
    else:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=[
            "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]))
    trained = [unet]
    if te_lora:
        text_encoder = parts.text_encoder
        # peft directly: transformers' add_adapter wants a newer peft (diffusers' UNet add_adapter calls this too)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=[
            "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]), text_encoder)
        ids = parts.tokenizer(["sks shape"] * batch, padding="max_length", max_length=77,
                              return_tensors="pt").input_ids.to(device)
        trained.append(text_encoder)
    if gc_on:
        unet.enable_gradient_checkpointing()
        if te_lora:
            text_encoder.gradient_checkpointing_enable()
    for module in trained:
        module.train()
    params = [p for module in trained for p in module.parameters() if p.requires_grad]
    for param in params:  # cast_training_params: the trained LoRA weights stay float32
        param.data = param.data.float()
    print(f"trainable {len(params)} tensors, {sum(p.numel() for p in params)} params", flush=True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = make_noise_scheduler(v_parameterization=False)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    first = None
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    print(f"training starts {time.time() - START:.1f} s after launch", flush=True)
    loop_started = last = time.time()
    profiler = StepProfiler()
    profiler.after(0)
    for step in range(steps):
        x0 = latents[torch.randint(0, len(latents), (batch,), device=device)] * scale
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        with autocast():
            context = text_encoder(ids)[0] if te_lora else hidden
            pred = unet(scheduler.add_noise(x0, noise, t), t, context, added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        profiler.after(step + 1)
        now = time.time()
        print(f"step {step + 1} took {now - last:.4f} s", flush=True)
        last = now
        if first is None:
            first = now
            print(f"first step took {first - loop_started:.1f} s", flush=True)
    print(f"trained {steps} steps: {(time.time() - first) / (steps - 1):.3f} s/step after the first step", flush=True)
    print_peak_vram()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("data")
    for name in ("resolution", "batch", "steps", "rank"):
        parser.add_argument(name, type=int)
    parser.add_argument("--no-gc", action="store_true", help="no gradient checkpointing")
    parser.add_argument("--bf16", action="store_true", help="autocast bfloat16 around the forward passes and loss")
    parser.add_argument("--te-lora", action="store_true", help="LoRA on the text encoder too, its output with grad")
    parser.add_argument("--full", action="store_true", help="the whole UNet trains (Dreambooth), no adapters")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--max-grad-norm", type=float, default=0.0, help="clip the gradients to this norm (0: off)")
    args = parser.parse_args()
    main(args.model, args.data, args.resolution, args.batch, args.steps, args.rank, gc_on=not args.no_gc,
         bf16=args.bf16, te_lora=args.te_lora, full=args.full, device=args.device, max_grad_norm=args.max_grad_norm)

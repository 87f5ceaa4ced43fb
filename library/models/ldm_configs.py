"""Infer diffusers/transformers configs for SD 1.x/2.x components from the shapes of ldm-layout tensors."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from library.errors import UserError

Tensors = Mapping[str, torch.Tensor]

# Numbers no tensor shape reveals, fixed by the SD 1.x/2.x architectures themselves.
NORM_GROUPS = 32
SD1_UNET_HEADS = 8
HEAD_WIDTH = 64


def heads_for(width: int) -> int:
    """Attention heads for a layer width: SD uses 64-wide heads; tiny test models (width < 64) use 8-wide ones."""
    return width // HEAD_WIDTH if width >= HEAD_WIDTH else max(1, width // 8)


def make_unet_config(
    *,
    in_channels: int,
    out_channels: int,
    block_out_channels: list[int],
    layers_per_block: int,
    attention_levels: list[bool],
    transformer_depth: int,
    cross_attention_dim: int,
    use_linear_projection: bool,
    v2: bool,
    sample_size: int = 64,
) -> dict:
    """A UNet2DConditionModel config in the shape SD 1.x/2.x use; the one place both real and tiny models get theirs."""
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)],
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "cross_attention_dim": cross_attention_dim,
        # diffusers' "attention_head_dim" is really the head count (a known misnomer kept for compatibility).
        "attention_head_dim": [heads_for(c) for c in block_out_channels] if v2 else SD1_UNET_HEADS,
        "use_linear_projection": use_linear_projection,
        "transformer_layers_per_block": transformer_depth,
        "norm_num_groups": NORM_GROUPS,
    }


def make_vae_config(*, in_channels: int, out_channels: int, block_out_channels: list[int], layers_per_block: int,
                    latent_channels: int, scaling_factor: float, sample_size: int = 512) -> dict:
    """`scaling_factor`: the family's latent scale, which diffusers pipelines read from the VAE's config."""
    n = len(block_out_channels)
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": NORM_GROUPS,
        "scaling_factor": scaling_factor,
    }


def make_text_config(*, vocab_size: int, hidden_size: int, num_layers: int, intermediate_size: int,
                     max_positions: int, v2: bool) -> dict:
    """CLIPTextConfig kwargs: SD 1.x is OpenAI CLIP ViT-L/14 (quick_gelu), SD 2.x OpenCLIP ViT-H/14 (gelu)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads_for(hidden_size),
        "max_position_embeddings": max_positions,
        "hidden_act": "gelu" if v2 else "quick_gelu",
        "projection_dim": 512 if v2 else 768,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def key_indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(sd: Tensors, *, v2: bool, source: str) -> dict:
    """`sd`: ldm UNet tensors without the `model.diffusion_model.` prefix."""
    try:
        conv_in = sd["input_blocks.0.0.weight"]
        inputs = key_indices(sd, r"input_blocks\.(\d+)\.")
        downsamples = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in sd]
        levels = len(downsamples) + 1
        layers_per_block = (len(inputs) - 1 - len(downsamples)) // levels
        firsts = [1 + lvl * (layers_per_block + 1) for lvl in range(levels)]
        attn = [f"input_blocks.{i}.1.proj_in.weight" in sd for i in firsts]
        first_attn = next(f"input_blocks.{i}.1." for i, a in zip(firsts, attn) if a)
        to_k = sd[first_attn + "transformer_blocks.0.attn2.to_k.weight"]
        return make_unet_config(
            in_channels=conv_in.shape[1],
            out_channels=sd["out.2.weight"].shape[0],
            block_out_channels=[sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in firsts],
            layers_per_block=layers_per_block,
            attention_levels=attn,
            transformer_depth=len(key_indices(sd, re.escape(first_attn) + r"transformer_blocks\.(\d+)\.")),
            cross_attention_dim=to_k.shape[1],
            use_linear_projection=sd[first_attn + "proj_in.weight"].ndim == 2,
            v2=v2,
        )
    except (KeyError, StopIteration, ZeroDivisionError) as err:
        raise UserError(f"{source}: the UNet tensors do not form an SD 1.x/2.x UNet (missing {err}); "
                        "this architecture is not supported") from None


def infer_vae_config(sd: Tensors, *, source: str, scaling_factor: float) -> dict:
    """`sd`: ldm VAE tensors without the `first_stage_model.` prefix; `scaling_factor`: the family's latent scale."""
    try:
        downs = key_indices(sd, r"encoder\.down\.(\d+)\.")
        return make_vae_config(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0],
            block_out_channels=[sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in downs],
            layers_per_block=len(key_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
            latent_channels=sd["decoder.conv_in.weight"].shape[1],
            scaling_factor=scaling_factor,
        )
    except KeyError as err:
        raise UserError(f"{source}: the VAE tensors do not form an SD VAE (missing {err})") from None


def infer_text_config(sd: Tensors, *, v2: bool, source: str) -> dict:
    """`sd`: CLIPTextModel tensors in transformers' names (`embeddings.…`, `encoder.layers.N.…`)."""
    try:
        tokens = sd["embeddings.token_embedding.weight"]
        return make_text_config(
            vocab_size=tokens.shape[0],
            hidden_size=tokens.shape[1],
            num_layers=len(key_indices(sd, r"encoder\.layers\.(\d+)\.")),
            intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
            max_positions=sd["embeddings.position_embedding.weight"].shape[0],
            v2=v2,
        )
    except KeyError as err:
        raise UserError(f"{source}: the text-encoder tensors do not form a CLIP text model (missing {err})") from None

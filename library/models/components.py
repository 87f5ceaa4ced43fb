"""The loaded parts of an SD 1.x/2.x model and what kind of model they form."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None  # None once a method released it (every latent cached, nothing to decode)
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    v2: bool
    v_parameterization: bool
    source: str
    source_dtype: torch.dtype = torch.float32
    # SD 2.x OpenCLIP tensors the text model never uses (last block, projection), kept to re-save files exactly.
    text_encoder_extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def base_model_version(self) -> str:
        """sd-scripts' `ss_base_model_version`: sd_v1, sd_v2, sd_v1_v or sd_v2_v."""
        return ("sd_v2" if self.v2 else "sd_v1") + ("_v" if self.v_parameterization else "")

    def describe(self) -> str:
        unet_cfg, te_cfg = self.unet.config, self.text_encoder.config
        family = "SD 2.x" if self.v2 else "SD 1.x"
        pred = "v-prediction" if self.v_parameterization else "epsilon"
        return "\n".join([
            f"model: {self.source}",
            f"  family: {family} ({self.base_model_version}), prediction: {pred}, stored as {_dtype_name(self.source_dtype)}",
            f"  unet: {_count(self.unet)} params, blocks {list(unet_cfg.block_out_channels)}, "
            f"layers/block {unet_cfg.layers_per_block}, cross-attention {unet_cfg.cross_attention_dim}, "
            f"linear projection {unet_cfg.use_linear_projection}",
            f"  vae: {_count(self.vae)} params, blocks {list(self.vae.config.block_out_channels)}, "
            f"latent channels {self.vae.config.latent_channels}",
            f"  text encoder: {_count(self.text_encoder)} params, {te_cfg.num_hidden_layers} layers, "
            f"width {te_cfg.hidden_size}, {te_cfg.hidden_act}",
            f"  tokenizer: {len(self.tokenizer)} tokens, pads with {self.tokenizer.pad_token!r}",
        ])


def _count(module: torch.nn.Module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))

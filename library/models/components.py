"""The loaded parts of a model and the family they belong to (see `library/models/family.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

if TYPE_CHECKING:
    from library.models.family import ModelFamily


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None  # None once a method released it (every latent cached, nothing to decode)
    text_encoders: tuple  # the family's text encoders, in its order (SD 1.x/2.x: one CLIP text model)
    tokenizers: tuple  # one per text encoder
    family: "ModelFamily"
    v_parameterization: bool
    source: str
    source_dtype: torch.dtype = torch.float32
    # SD 2.x OpenCLIP tensors the text model never uses (last block, projection), kept to re-save files exactly.
    text_encoder_extras: dict[str, torch.Tensor] = field(default_factory=dict)

    # The one text encoder and tokenizer of a single-encoder family (SD 1.x/2.x); code that serves every family
    # goes through the tuples or asks the family.
    @property
    def text_encoder(self):
        return self._only(self.text_encoders, "text encoder")

    @text_encoder.setter
    def text_encoder(self, module) -> None:
        self._only(self.text_encoders, "text encoder")
        self.text_encoders = (module,)

    @property
    def tokenizer(self):
        return self._only(self.tokenizers, "tokenizer")

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._only(self.tokenizers, "tokenizer")
        self.tokenizers = (tokenizer,)

    def _only(self, values: tuple, what: str):
        if len(values) != 1:
            raise AttributeError(f"{self.family.label} models have {len(values)} {what}s; use the tuple")
        return values[0]

    @property
    def network_text_encoder(self):
        """What sd-scripts' network plug-in API passes as `text_encoder`: the module, or a list when the family has
        several (SDXL), which networks name lora_te1 / lora_te2."""
        return self.text_encoders[0] if len(self.text_encoders) == 1 else list(self.text_encoders)

    def modules(self) -> tuple[torch.nn.Module, ...]:
        """UNet, VAE (if kept) and every text encoder: what moves between devices and modes together."""
        return tuple(m for m in (self.unet, self.vae, *self.text_encoders) if m is not None)

    @property
    def base_model_version(self) -> str:
        """sd-scripts' `ss_base_model_version`: sd_v1, sd_v2, sd_v1_v or sd_v2_v."""
        return self.family.base_model_version(self.v_parameterization)

    def describe(self) -> str:
        unet_cfg = self.unet.config
        pred = "v-prediction" if self.v_parameterization else "epsilon"
        encoders = [f"  text encoder{'' if len(self.text_encoders) == 1 else f' {i + 1}'}: {_count(te)} params, "
                    f"{te.config.num_hidden_layers} layers, width {te.config.hidden_size}, {te.config.hidden_act}"
                    for i, te in enumerate(self.text_encoders)]
        tokenizers = [f"  tokenizer: {len(tok)} tokens, pads with {tok.pad_token!r}" for tok in self.tokenizers]
        return "\n".join([
            f"model: {self.source}",
            f"  family: {self.family.label} ({self.base_model_version}), prediction: {pred}, "
            f"stored as {_dtype_name(self.source_dtype)}",
            f"  unet: {_count(self.unet)} params, blocks {list(unet_cfg.block_out_channels)}, "
            f"layers/block {unet_cfg.layers_per_block}, cross-attention {unet_cfg.cross_attention_dim}, "
            f"linear projection {unet_cfg.use_linear_projection}",
            f"  vae: {_count(self.vae)} params, blocks {list(self.vae.config.block_out_channels)}, "
            f"latent channels {self.vae.config.latent_channels}",
            *encoders,
            *tokenizers,
        ])


def _count(module: torch.nn.Module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))

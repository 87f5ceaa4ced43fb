"""What train_network.py trains: an adapter network on the UNet and/or text encoder; its loss and its export."""

from __future__ import annotations

from pathlib import Path

import torch

from library.config.run_config import RunConfig
from library.data.dataset import Batch
from library.data.plan import RunPlan
from library.errors import UserError
from library.models.components import Components
from library.training.losses import training_loss
from library.training.noise import LATENT_SCALE, draw_noise, make_noise_scheduler, target_for
from library.training.text_encoding import PromptEncoder


class NetworkMethod:
    """setup → param groups, loss(batch), export(path) — the loop knows nothing else about what is trained."""

    def __init__(self, config: RunConfig, parts: Components, device: torch.device, weight_dtype: torch.dtype,
                 plan: RunPlan | None = None):
        from networks.plugin import create_network, load_network_module

        self.config, self.parts, self.device, self.weight_dtype = config, parts, device, weight_dtype
        self.train_unet = not config.network_train_text_encoder_only
        self.train_text_encoder = not config.network_train_unet_only
        if not (self.train_unet or self.train_text_encoder):
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only together train nothing")
        module_name = config.network_module or "networks.lora"
        _merge_base_weights(config, parts, module_name)
        if config.network_weights and config.dim_from_weights:
            self.network = load_network_module(module_name).create_network_from_weights(
                1.0, config.network_weights, parts.vae, parts.text_encoder, parts.unet)
        else:
            self.network = create_network(module_name, 1.0, config.network_dim, config.network_alpha, parts.vae,
                                          parts.text_encoder, parts.unet, neuron_dropout=config.network_dropout,
                                          network_args=config.network_args)
        self.network.apply_to(parts.text_encoder, parts.unet, self.train_text_encoder, self.train_unet)
        if config.network_weights:
            self.network.load_weights(config.network_weights)
        for module in (parts.unet, parts.vae, parts.text_encoder):
            module.requires_grad_(False).to(device=device, dtype=weight_dtype)
        if config.no_half_vae:  # the SD VAE overflows in fp16; sd-scripts keeps it in float32 on request
            parts.vae.to(dtype=torch.float32)
        network_dtype = weight_dtype if (config.full_fp16 or config.full_bf16) else torch.float32
        self.network.to(device=device, dtype=network_dtype)
        self.network.prepare_grad_etc(parts.text_encoder, parts.unet)
        self._gradient_checkpointing()
        self.scheduler = make_noise_scheduler(v_parameterization=parts.v_parameterization,
                                              zero_terminal_snr=bool(config.zero_terminal_snr))
        self._text_cache: dict[str, torch.Tensor] = {}
        subsets = [s for d in plan.datasets for s in d.spec.subsets] if plan is not None else []
        self._fixed_captions = plan is not None and not any(_varies(s) for s in subsets)
        self.encode_prompts = PromptEncoder(parts.tokenizer, parts.text_encoder, clip_skip=config.clip_skip,
                                            v2=parts.v2, max_token_length=config.max_token_length,
                                            source=parts.source)

    def _gradient_checkpointing(self) -> None:
        if not self.config.gradient_checkpointing:
            return
        # diffusers/transformers only checkpoint in train mode; SD has no dropout, so train mode changes nothing else.
        self.parts.unet.enable_gradient_checkpointing()
        self.parts.unet.train()
        if self.train_text_encoder:
            self.parts.text_encoder.gradient_checkpointing_enable()
            self.parts.text_encoder.train()

    def param_groups(self):
        lr = self.config.learning_rate
        return self.network.prepare_optimizer_params(self.config.text_encoder_lr, self.config.unet_lr, lr)

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        latents = self._latents(batch, generator) * LATENT_SCALE
        hidden = self._hidden_states(batch.captions)
        draw = draw_noise(self.scheduler, latents, self.config, generator)
        pred = self.parts.unet(draw.noisy_latents, draw.timesteps, hidden).sample
        target = target_for(self.scheduler, latents, draw.noise, draw.timesteps,
                            v_parameterization=self.parts.v_parameterization)
        mask = batch.alpha_masks if self.config.get("alpha_mask") else None
        loss, _ = training_loss(pred, target, draw.timesteps, batch.is_reg.to(self.device), self.scheduler,
                                self.config, v_parameterization=self.parts.v_parameterization, loss_mask=mask)
        return loss

    def _hidden_states(self, captions: list[str]) -> torch.Tensor:
        if self.train_text_encoder:
            return self.encode_prompts(captions)
        if self._fixed_captions:
            # A frozen text encoder and captions that never change: each caption is encoded once, in memory.
            missing = sorted({c for c in captions if c not in self._text_cache})
            if missing:
                with torch.no_grad():
                    self._text_cache.update(zip(missing, self.encode_prompts(missing)))
            return torch.stack([self._text_cache[c] for c in captions])
        with torch.no_grad():
            return self.encode_prompts(captions)

    def latents_ready(self, *, all_cached: bool) -> None:
        """Called once latents are cached. If every latent is cached and no sample will be decoded, nothing needs
        the VAE again: it is released, so its memory goes to training (SD's VAE is 0.33 GB in float32)."""
        if all_cached and not self.config.sample_prompts:
            self.parts.vae = None

    def _latents(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        if batch.latents is not None:
            return batch.latents.to(self.device, self.weight_dtype)
        vae = self.parts.vae
        with torch.no_grad():
            images = batch.images.to(self.device, vae.dtype)
            return vae.encode(images).latent_dist.sample(generator=generator).to(self.weight_dtype)

    def export(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> Path:
        self.network.save_weights(str(path), dtype, metadata)
        return path


CAPTION_RANDOMNESS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                      "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")


def _varies(subset) -> bool:
    return any(getattr(subset, name) for name in CAPTION_RANDOMNESS)


def _merge_base_weights(config: RunConfig, parts: Components, module_name: str) -> None:
    """--base_weights: merge other networks into the base model before training (sd-scripts)."""
    from networks.plugin import load_network_module

    files = config.base_weights or []
    multipliers = config.base_weights_multiplier or [1.0] * len(files)
    if len(multipliers) != len(files):
        raise UserError(f"--base_weights_multiplier needs one value per --base_weights file ({len(files)})")
    module = load_network_module(module_name)
    for file, multiplier in zip(files, multipliers):
        merged = module.create_network_from_weights(multiplier, file, parts.vae, parts.text_encoder, parts.unet,
                                                    for_inference=True)
        merged.merge_to(parts.text_encoder, parts.unet, None)
        print(f"merged --base_weights {file} × {multiplier}")

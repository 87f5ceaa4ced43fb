"""What train_db.py trains: the whole UNet, and the text encoder until --stop_text_encoder_training, as sd-scripts'
train_db.py does; optionally with an EMA of the weights. Every save writes a complete model."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from library.config.run_config import RunConfig
from library.data.plan import RunPlan
from library.methods.db_training import DIFFUSERS_FORMATS
from library.methods.diffusion_method import DiffusionMethod
from library.models.components import Components
from library.models.saving import PRECISIONS, save_diffusers, save_single_file

PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}  # --save_precision's name of a dtype


class DreamBoothMethod(DiffusionMethod):
    keeps_vae = True  # every save writes the whole model, VAE included

    def __init__(self, config: RunConfig, parts: Components, device: torch.device, weight_dtype: torch.dtype,
                 plan: RunPlan | None = None):
        # sd-scripts: the text encoder trains unless --stop_text_encoder_training is negative; N >= 0 freezes it
        # once N optimizer steps are done.
        stop = config.stop_text_encoder_training
        train_text_encoder = stop is None or stop >= 0
        self.stop_text_encoder_at = stop if stop is not None and stop >= 0 else None
        # full_fp16/full_bf16 train the weights themselves in half precision; otherwise float32 under autocast.
        train_dtype = weight_dtype if (config.full_fp16 or config.full_bf16) else torch.float32
        parts.unet.to(device=device, dtype=train_dtype).requires_grad_(True).train()
        te_dtype = train_dtype if train_text_encoder else weight_dtype
        for text_encoder in parts.text_encoders:
            text_encoder.to(device=device, dtype=te_dtype).requires_grad_(train_text_encoder)
            text_encoder.train(train_text_encoder)
        vae_dtype = torch.float32 if config.no_half_vae else weight_dtype
        parts.vae.to(device=device, dtype=vae_dtype).requires_grad_(False).eval()
        super().__init__(config, parts, device, weight_dtype, plan, train_text_encoder=train_text_encoder)
        if config.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                for text_encoder in parts.text_encoders:
                    text_encoder.gradient_checkpointing_enable()
        self._ema_params = self.trainable_params()  # fixed: after a text-encoder stop its EMA settles on it
        self.ema = _make_ema(config, self._ema_params) if config.use_ema else None

    # ------------------------------------------------------------------ what trains
    def param_groups(self):
        lr = self.config.learning_rate
        groups = [{"params": list(self.parts.unet.parameters()), "lr": lr}]
        descriptions = ["unet"]
        if self.train_text_encoder:
            groups.append({"params": [p for te in self.parts.text_encoders for p in te.parameters()],
                           "lr": self.config.learning_rate_te if self.config.learning_rate_te is not None else lr})
            descriptions.append("textencoder")
        return groups, descriptions

    def trainable_params(self) -> list[torch.nn.Parameter]:
        modules = (self.parts.unet, *self.parts.text_encoders)
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def before_step(self, global_step: int) -> None:
        at = self.stop_text_encoder_at
        if self.train_text_encoder and at is not None and global_step >= at:
            # Frozen parameters get no gradient, and optimizers skip parameters without one: the text encoder
            # stays exactly as it is from here (captions are encoded once from now on, when they never change).
            for text_encoder in self.parts.text_encoders:
                text_encoder.requires_grad_(False).eval()
            self.train_text_encoder = False
            print(f"text encoder: frozen from step {global_step} (--stop_text_encoder_training {at})")

    def after_step(self, global_step: int) -> None:
        if self.ema is not None and global_step % max(1, self.config.ema_update_step_interval or 1) == 0:
            first = self.ema.shadow_params[0]
            params = self._ema_params
            if first.device != params[0].device:  # --ema_on_cpu with the model on an accelerator
                params = [p.detach().to(first.device) for p in params]
            self.ema.step(params)

    def checkpoint_objects(self) -> list:
        # The model itself is the training state here; the EMA too when there is one.
        return [self.parts.unet, *self.parts.text_encoders] + ([self.ema] if self.ema is not None else [])

    # ------------------------------------------------------------------ saving
    def export(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str] | None, epoch: int = 0,
               global_step: int = 0) -> Path:
        # sd-scripts saves a full model in the dtype it trained in unless --save_precision says otherwise.
        precision = PRECISION_NAMES[dtype or self.parts.unet.dtype]
        if self.config.save_model_as in DIFFUSERS_FORMATS:
            save = partial(save_diffusers, self.parts, precision=precision)
            raw = path.with_name(path.name + "-raw")
        else:
            # The checkpoint's own modelspec (architecture without "/lora") replaces the network one.
            training = {k: v for k, v in (metadata or {}).items() if not k.startswith("modelspec.")}
            save = partial(save_single_file, self.parts, precision=precision, epoch=epoch, global_step=global_step,
                           metadata=training)
            raw = path.with_name(f"{path.stem}-raw{path.suffix}")
        if self.ema is not None and self.config.ema_save == "both":
            save(raw)
        with self._ema_applied():
            return save(path)

    @contextlib.contextmanager
    def _ema_applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (a save), the trained ones back afterwards."""
        if self.ema is None:
            yield
            return
        params = self._ema_params
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)


def _make_ema(config: RunConfig, params: list[torch.nn.Parameter]):
    """diffusers' EMAModel over the trained parameters: decay min(ema_decay, (1 + n) / (10 + n)) at update n, so a
    short run's EMA is not stuck at the base weights; kept in CPU memory with --ema_on_cpu."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=config.ema_decay, foreach=True)
    if config.ema_on_cpu:
        ema.to(device="cpu")
    return ema

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
from library.errors import UserError
from library.methods.db_training import DIFFUSERS_FORMATS
from library.methods.diffusion_method import DiffusionMethod
from library.models.components import Components
from library.models.saving import PRECISIONS, save_diffusers, save_single_file

PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}  # --save_precision's name of a dtype


class DreamBoothMethod(DiffusionMethod):
    keeps_vae = True  # every save writes the whole model, VAE included
    keeps_text_encoders = True

    def __init__(self, config: RunConfig, parts: Components, device: torch.device, weight_dtype: torch.dtype,
                 plan: RunPlan | None = None):
        # sd-scripts: the text encoder trains unless --stop_text_encoder_training is negative; N >= 0 freezes it
        # once N optimizer steps are done.
        # sdxl_train.py: the text encoders train with --train_text_encoder, each at its own rate (0: frozen).
        stop = config.stop_text_encoder_training
        self.text_encoder_rates = parts.family.full_tune_text_encoders(config)
        train_text_encoder = any(rate is not None for rate in self.text_encoder_rates)
        self.stop_text_encoder_at = stop if stop is not None and stop >= 0 else None
        # full_fp16/full_bf16 train the weights themselves in half precision; otherwise float32 under autocast.
        train_dtype = weight_dtype if (config.full_fp16 or config.full_bf16) else torch.float32
        train_unet = config.learning_rate != 0  # sd-scripts: --learning_rate 0 leaves the U-Net frozen
        parts.unet.to(device=device, dtype=train_dtype).requires_grad_(train_unet).train(train_unet)
        self.unet_block_rates = _block_rates(config, parts) if train_unet else None
        for text_encoder, rate in zip(parts.text_encoders, self.text_encoder_rates):
            trained = rate is not None
            text_encoder.to(device=device, dtype=train_dtype if trained else weight_dtype).requires_grad_(trained)
            text_encoder.train(trained)
        vae_dtype = torch.float32 if config.no_half_vae else weight_dtype
        parts.vae.to(device=device, dtype=vae_dtype).requires_grad_(False).eval()
        super().__init__(config, parts, device, weight_dtype, plan, train_text_encoder=train_text_encoder)
        if config.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            for text_encoder, rate in zip(parts.text_encoders, self.text_encoder_rates):
                if rate is not None:
                    text_encoder.gradient_checkpointing_enable()
        self._ema_params = self.trainable_params()  # fixed: after a text-encoder stop its EMA settles on it
        self.ema = _make_ema(config, self._ema_params) if config.use_ema else None

    # ------------------------------------------------------------------ what trains
    def param_groups(self):
        groups, descriptions = [], []
        if self.unet_block_rates is not None:  # --block_lr: one group per block; a block at 0 is frozen
            # By name: under FSDP the parameters were replaced by sharded ones since the blocks were listed.
            by_name = dict(self.parts.unet.named_parameters())
            for index, (rate, names) in enumerate(self.unet_block_rates):
                if rate and names:
                    groups.append({"params": [by_name[name] for name in names], "lr": rate})
                    descriptions.append(f"unet_block{index:02d}")
        elif self.config.learning_rate != 0:
            groups.append({"params": list(self.parts.unet.parameters()), "lr": self.config.learning_rate})
            descriptions.append("unet")
        several = len(self.parts.text_encoders) > 1
        for i, (text_encoder, rate) in enumerate(zip(self.parts.text_encoders, self.text_encoder_rates)):
            if self.train_text_encoder and rate is not None:
                groups.append({"params": list(text_encoder.parameters()), "lr": rate})
                descriptions.append(f"textencoder{i + 1}" if several else "textencoder")
        return groups, descriptions

    def trainable_params(self) -> list[torch.nn.Parameter]:
        modules = (self.parts.unet, *self.parts.text_encoders)
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def data_parallel_modules(self) -> tuple[list[torch.nn.Module], bool]:
        """Under several processes the loop wraps these in DDP (its forward computes the loss): the U-Net and the text
        encoders while they train. Also whether a parameter among them may get no gradient (DDP then searches the
        graph for such parameters every step, so only when needed: a text encoder whose last layers the conditioning
        skips, --clip_skip or SDXL)."""
        text_encoders = list(self.parts.text_encoders) if self.train_text_encoder else []
        modules = [m for m in (self.parts.unet, *text_encoders) if any(p.requires_grad for p in m.parameters())]
        return modules, bool(text_encoders) and self._text_encoders_leave_parameters_unused(text_encoders)

    def _text_encoders_leave_parameters_unused(self, text_encoders: list[torch.nn.Module]) -> bool:
        """One caption through the prompt encoder: does the conditioning depend on every trained parameter?"""
        params = [p for m in text_encoders for p in m.parameters() if p.requires_grad]
        with torch.enable_grad():
            text = self.encode_prompts.conditioning([""])
            outputs = [t.float().sum() for t in (text.hidden, text.pooled) if t is not None]
            grads = torch.autograd.grad(outputs, params, allow_unused=True)
        return any(g is None for g in grads)

    def before_step(self, global_step: int) -> None:
        at = self.stop_text_encoder_at
        if self.train_text_encoder and at is not None and global_step >= at:
            # Frozen parameters get no gradient, and optimizers skip parameters without one: the text encoder
            # stays exactly as it is from here (captions are encoded once from now on, when they never change).
            for text_encoder in self.parts.text_encoders:
                text_encoder.requires_grad_(False).eval()
            self.train_text_encoder = False
            if any(_sharded(t) for t in self.parts.text_encoders):
                # Sharded (FSDP): every call gathers its weights with the other processes, so each must call it
                # once per batch; a cache hit on one process and a miss on another would leave them waiting.
                self._fixed_captions = False
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


def _block_rates(config: RunConfig, parts: Components) -> list[tuple[float, list[str]]] | None:
    """--block_lr (sdxl_train.py): the U-Net's parameter names by block, each with its block's rate; the parameters
    of a block at 0 are frozen (sd-scripts leaves them out of the optimizer)."""
    if not config.block_lr:
        return None
    block_of = parts.family.unet_block_of(parts.unet)
    if block_of is None:
        raise UserError(f"--block_lr is sdxl_train.py's (SDXL); {parts.family.label} models have no block list")
    value = config.block_lr
    rates = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    blocks: list[list[str]] = [[] for _ in rates]
    for name, param in parts.unet.named_parameters():
        blocks[block_of(name)].append(name)
        if rates[block_of(name)] == 0:
            param.requires_grad_(False)
    return list(zip(rates, blocks))


def _sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP (library/training/distributed.py) sharded this model."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without torch.distributed shards nothing
        return False
    return isinstance(module, FSDPModule)


def _make_ema(config: RunConfig, params: list[torch.nn.Parameter]):
    """diffusers' EMAModel over the trained parameters: decay min(ema_decay, (1 + n) / (10 + n)) at update n, so a
    short run's EMA is not stuck at the base weights; kept in CPU memory with --ema_on_cpu."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=config.ema_decay, foreach=True)
    if config.ema_on_cpu:
        ema.to(device="cpu")
    return ema

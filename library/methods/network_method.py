"""What train_network.py trains: an adapter network on the UNet and/or text encoder; its loss and its export."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from library.config.run_config import RunConfig
from library.data.plan import RunPlan
from library.errors import UserError
from library.methods.diffusion_method import DiffusionMethod, freeze_models
from library.models.components import Components
from networks.args import DEFAULT_NETWORK_MODULE


class NetworkMethod(DiffusionMethod):
    """An adapter network on the UNet and/or text encoder; the base model stays frozen."""

    def __init__(self, config: RunConfig, parts: Components, device: torch.device, weight_dtype: torch.dtype,
                 plan: RunPlan | None = None):
        from networks.plugin import create_network, create_network_from_weights

        train_unet = not config.network_train_text_encoder_only
        train_text_encoder = not config.network_train_unet_only
        if not (train_unet or train_text_encoder):
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only together train nothing")
        module_name = config.network_module or DEFAULT_NETWORK_MODULE
        _merge_base_weights(config, parts, module_name)
        # --train_embeddings (pivotal tuning): the new tokens go in before the freeze, as a textual inversion's do.
        self.embeddings = _pivotal_embeddings(config, parts, plan, module_name)
        freeze_models(parts, device, weight_dtype, no_half_vae=bool(config.no_half_vae))
        # Before the adapters wrap the layers: they then call the float8 layers' forward.
        store_base_in_fp8(config, parts, weight_dtype)
        if config.network_weights and config.dim_from_weights:
            self.network, _ = create_network_from_weights(module_name, 1.0, config.network_weights, parts.vae,
                                                          parts.network_text_encoder, parts.unet)
        else:
            self.network = create_network(module_name, 1.0, config.network_dim, config.network_alpha, parts.vae,
                                          parts.network_text_encoder, parts.unet, neuron_dropout=config.network_dropout,
                                          network_args=config.network_args)
        self.network.apply_to(parts.network_text_encoder, parts.unet, train_text_encoder, train_unet)
        if config.network_weights:
            _load_weights(self.network, config.network_weights, module_name)
        network_dtype = weight_dtype if (config.full_fp16 or config.full_bf16) else torch.float32
        self.network.to(device=device, dtype=network_dtype)
        self.network.prepare_grad_etc(parts.network_text_encoder, parts.unet)
        if self.embeddings is not None:
            self.embeddings.train_on(device)
        # Captions go through the text encoders with gradients when its adapters or new embeddings train.
        super().__init__(config, parts, device, weight_dtype, plan,
                         train_text_encoder=train_text_encoder or self.embeddings is not None)
        if self.embeddings is not None:
            self.encode_prompts = self.embeddings.expand(self.encode_prompts)
            print(f"pivotal tuning: new token embeddings {self.embeddings.describe()} train with the network")
        self._gradient_checkpointing()
        self.max_norm = _max_norm(config, self.network, module_name)
        self._norm_stats = None  # [keys scaled, mean norm, max norm] of the last step, on the device

    def before_step(self, global_step: int) -> None:
        # sd-scripts' train loop calls the network's on_step_start every step (DyLoRA draws its blocks there).
        on_step_start = getattr(self.network, "on_step_start", None)
        if on_step_start is not None:
            on_step_start(self.parts.network_text_encoder, self.parts.unet)

    def after_step(self, global_step: int) -> None:
        if self.max_norm:
            # sd-scripts applies max-norm regularisation after every optimizer step; ours queues it on the device.
            scale = getattr(self.network, "scale_weight_norms", None)
            if scale is not None:
                self._norm_stats = scale(self.max_norm)
            else:  # a third-party network module (sd-scripts' API returns numbers)
                self._norm_stats = self.network.apply_max_norm_regularization(self.max_norm, self.device)

    def step_logs(self) -> dict[str, float]:
        """Scalars to log for the step just taken, under sd-scripts' TensorBoard names (read after the loss, so the
        device has already finished them)."""
        logs = super().step_logs()
        if self._norm_stats is None:
            return logs
        stats = self._norm_stats
        keys_scaled, mean_norm, max_norm = stats.tolist() if isinstance(stats, torch.Tensor) else stats
        return logs | {"max_norm/keys_scaled": int(keys_scaled), "max_norm/max_key_norm": float(max_norm),
                       "norm/avg_key_norm": float(mean_norm)}

    def _gradient_checkpointing(self) -> None:
        if not self.config.gradient_checkpointing:
            return
        # diffusers/transformers only checkpoint in train mode; SD has no dropout, so train mode changes nothing else.
        self.parts.unet.enable_gradient_checkpointing()
        self.parts.unet.train()
        if self.train_text_encoder:
            for text_encoder in self.parts.text_encoders:
                text_encoder.gradient_checkpointing_enable()
                text_encoder.train()

    def param_groups(self):
        lr = self.config.learning_rate
        groups, descriptions = self.network.prepare_optimizer_params(self.config.text_encoder_lr, self.config.unet_lr,
                                                                     lr)
        if self.embeddings is not None:
            embedding_lr = self.config.get("embedding_lr")
            groups = [*groups, {"params": self.embeddings.parameters(),
                                "lr": lr if embedding_lr is None else embedding_lr}]
            descriptions = [*descriptions, "embeddings"]
        return groups, descriptions

    def trainable_params(self) -> list[torch.nn.Parameter]:
        own = [p for p in self.network.parameters() if p.requires_grad]
        return own + (self.embeddings.parameters() if self.embeddings is not None else [])

    def checkpoint_objects(self) -> list:
        return [self.network] + (self.embeddings.checkpoint_objects() if self.embeddings is not None else [])

    def sampling_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.network,)

    def export(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str] | None, check: bool = True,
               **_) -> Path:
        if self.embeddings is None:
            self.network.save_weights(str(path), dtype, metadata)
        else:  # pivotal tuning: A1111's bundle in the network file, and each embedding as its own file
            from networks.files import save_network_file

            save_network_file({**self.network.state_dict(), **self.embeddings.bundle(dtype)}, path, dtype=dtype,
                              metadata=_with_embeddings(metadata, self.embeddings))
            written = self.embeddings.write_files(Path(path), dtype=dtype, metadata=metadata)
        if check:
            self._self_test(path)
            if self.embeddings is not None:
                from library.formats.reader_check import embedding_readers, report

                for file in written:
                    print("\n".join(report(f"saved {file.parent.name}/{file.name}", *embedding_readers(file, self.parts))))
        return path

    def _self_test(self, path: Path) -> None:
        """Export self-test (library/formats/loader_check.py): one line saying which loaders map every module of
        the file just written, and a warning naming any module one of them would not load."""
        from library.formats.loader_check import check_network, report_lines
        from networks.files import describe_network_file

        weights = self.network.state_dict()  # without the bundled embeddings, which the lines after this check
        try:
            algorithm = describe_network_file(weights, source=str(path)).algorithm
        except UserError:
            return  # a third-party module's own format: nothing to check it against
        for line in report_lines(f"saved {Path(path).name}", check_network(weights, self.parts, algorithm)):
            print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)


def _pivotal_embeddings(config: RunConfig, parts: Components, plan: RunPlan | None, module_name: str):
    """--train_embeddings: the new tokens (library/methods/pivotal.py), started from the embeddings bundled in
    --network_weights when it has them; a file's bundled embeddings are never silently dropped."""
    from library.methods.pivotal import FLAG, PivotalEmbeddings, check_captions_mention, parse_specs
    from networks.files import bundled_embeddings, read_network_file

    from networks.plugin import is_ours

    specs = parse_specs(config.get("train_embeddings"))
    start = None
    if config.network_weights and is_ours(module_name):
        weights, _ = read_network_file(config.network_weights)
        start = bundled_embeddings(weights, parts.family.embedding_keys(), source=str(config.network_weights))
        left = sorted(set(start) - {s.token for s in specs})
        if left:
            raise UserError(f"{config.network_weights}: holds bundled embeddings ({', '.join(left)}) that this run "
                            "would drop from the file it saves (--network_weights); add --train_embeddings "
                            + " ".join(f"{name}:{start[name][0].shape[0]}" for name in left)
                            + " to keep training them")
    if not specs:
        return None
    if not is_ours(module_name):
        raise UserError(f"{FLAG}: --network_module {module_name} writes its own files, which cannot carry the "
                        "embeddings; use one of this project's network modules (networks.lora, networks.loha, …)")
    check_captions_mention(specs, plan)
    return PivotalEmbeddings(specs, parts, start=start, source=str(config.network_weights))


def _with_embeddings(metadata: dict[str, str] | None, embeddings) -> dict[str, str] | None:
    """The network's metadata, naming the bundled embeddings (ours: ss_bundled_embeddings = token:count,…)."""
    if metadata is None:
        return None
    return {**metadata, "ss_bundled_embeddings": ",".join(f"{s.token}:{s.count}" for s in embeddings.specs)}


# Kept in the compute dtype: the text embeddings (nn.Embedding; sd-scripts keeps them too) and the projection.
FP8_TEXT_ENCODER_SKIPS = ("embeddings", "text_projection")


def store_base_in_fp8(config: RunConfig, parts: Components, compute_dtype: torch.dtype) -> None:
    """--fp8_base (U-Net and text encoders) / --fp8_base_unet (U-Net only): library/training/fp8.py."""
    from library.training.fp8 import store_in_fp8

    unet = bool(config.fp8_base or config.get("fp8_base_unet"))
    text_encoders = bool(config.fp8_base and not config.get("fp8_base_unet"))
    if not unet:
        return
    layers = store_in_fp8(parts.unet)
    if text_encoders:
        layers += sum(store_in_fp8(te, skip=FP8_TEXT_ENCODER_SKIPS) for te in parts.text_encoders)
    what = "U-Net and text encoder" if text_encoders else "U-Net"
    print(f"fp8 base: {layers} frozen layers of the {what} stored in float8, computed in "
          f"{str(compute_dtype).removeprefix('torch.')}")


def _merge_base_weights(config: RunConfig, parts: Components, module_name: str) -> None:
    """--base_weights: merge other networks into the base model before training (sd-scripts)."""
    from networks.plugin import create_network_from_weights

    files = config.base_weights or []
    multipliers = config.base_weights_multiplier or [1.0] * len(files)
    if len(multipliers) != len(files):
        raise UserError(f"--base_weights_multiplier needs one value per --base_weights file ({len(files)})")
    for file, multiplier in zip(files, multipliers):
        merged, weights = create_network_from_weights(module_name, multiplier, file, parts.vae,
                                                      parts.network_text_encoder, parts.unet, for_inference=True)
        # sd-scripts' modules return (network, weights); ours return the network, whose load_weights checks the file.
        if weights is None:
            merged.load_weights(file)
        base = next(parts.unet.parameters())
        # sd-scripts' call: merge_to(text_encoder, unet, weights, dtype, device) (LyCORIS requires all five)
        merged.merge_to(parts.network_text_encoder, parts.unet, weights, base.dtype, base.device)
        print(f"merged --base_weights {file} × {multiplier}")


def _load_weights(network, file, module_name: str) -> None:
    """--network_weights. Ours refuse a file that does not fit; a module written for sd-scripts loads with
    strict=False, so tensors it had no place for are refused here rather than silently dropped."""
    from networks.plugin import is_ours

    result = network.load_weights(str(file))
    if is_ours(module_name):
        return
    unexpected = list(result.get("unexpected keys", []) if isinstance(result, dict)
                      else getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise UserError(f"--network_weights {file}: {len(unexpected)} of its tensors fit no module --network_module "
                        f"{module_name} built (first: {unexpected[0]}); build it with the file's --network_args "
                        "(algo, preset, conv_dim) or add --dim_from_weights")


def _max_norm(config: RunConfig, network, module_name: str) -> float | None:
    """--scale_weight_norms (None: off), refused where it cannot be applied; its range is checked with the options."""
    value = config.get("scale_weight_norms")
    if not value:
        return None  # sd-scripts: 0 or unset turns it off
    if not hasattr(network, "scale_weight_norms") and not hasattr(network, "apply_max_norm_regularization"):
        raise UserError(f"--scale_weight_norms: --network_module {module_name} cannot apply max-norm "
                        "regularisation (it has no apply_max_norm_regularization); drop the flag")
    module_class = getattr(network, "module_class", None)
    if module_class is not None and not module_class.MAX_NORM:
        raise UserError(f"--scale_weight_norms: {module_class.LABEL} ({module_name}) has no weight norm to cap (it "
                        "does not add a low-rank ΔW; sd-scripts' OFT has no max-norm either); drop the flag")
    return float(value)

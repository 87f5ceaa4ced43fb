"""What train_hypernetwork.py trains: an AUTOMATIC1111 hypernetwork on the attention key/value inputs; all else frozen."""

from __future__ import annotations

from pathlib import Path

import torch

from library.config.run_config import RunConfig
from library.data.plan import RunPlan
from library.errors import UserError
from library.methods.a1111_common import CheckpointIdentity, template_transform
from library.methods.diffusion_method import DiffusionMethod, freeze_models
from library.models.components import Components


class HypernetworkMethod(DiffusionMethod):
    def __init__(self, config: RunConfig, parts: Components, device: torch.device, weight_dtype: torch.dtype,
                 plan: RunPlan | None = None):
        if config.output_dir:  # before any training, not after it
            _refuse_foreign(Path(config.output_dir) / f"{config.output_name or 'last'}.pt")
        self.network, self.step_offset = _build(config)
        self.network.multiplier = config.hypernetwork_multiplier if config.hypernetwork_multiplier is not None else 1.0
        hooked = self.network.apply_to(parts.unet)
        if not hooked:
            widths = sorted({m.to_k.in_features for m in parts.unet.modules() if hasattr(m, "to_k")})
            self.network.remove()
            raise UserError(f"--hypernetwork_sizes {','.join(map(str, self.network.sizes))}: this UNet's attention "
                            f"widths are {','.join(map(str, widths))}; enable at least one of them")
        freeze_models(parts, device, weight_dtype, no_half_vae=bool(config.no_half_vae))
        self.network.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        super().__init__(config, parts, device, weight_dtype, plan, train_text_encoder=False)
        self.name = config.output_name or "last"  # the file's stem, which is how A1111 lists it
        self.caption_transform = template_transform(config, name=self.name, require_name=False)
        if self.caption_transform is not None:
            self._fixed_captions = False  # templates × captions: too many to keep every encoding in memory
        self.checkpoint = CheckpointIdentity(config.pretrained_model_name_or_path)
        if config.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            parts.unet.train()  # diffusers only checkpoints in train mode; SD's UNet has no dropout
        print(f"hypernetwork: sizes {list(self.network.sizes)}, layers {list(self.network.layer_structure)}, "
              f"{hooked} attention layers" + (f", continuing from step {self.step_offset}" if self.step_offset else ""))

    def param_groups(self):
        return [{"params": list(self.network.parameters()), "lr": self.config.learning_rate}], ["hypernetwork"]

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return list(self.network.parameters())

    def checkpoint_objects(self) -> list:
        return [self.network]

    def sampling_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.network,)

    def export(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str] | None = None,
               global_step: int = 0, check: bool = True, **_) -> Path:
        from networks.hypernetwork import save_hypernetwork

        _refuse_foreign(path)
        written = save_hypernetwork(path, self.network, step=self.step_offset + global_step, name=self.name,
                                    sd_checkpoint=self.checkpoint.shorthash_from(metadata),
                                    sd_checkpoint_name=self.checkpoint.name, dtype=dtype or torch.float32)
        if check:  # export self-test: which readers would apply it to this model
            from library.formats.reader_check import hypernetwork_readers, report

            print("\n".join(report(f"saved {Path(written).name}", *hypernetwork_readers(Path(written), self.parts))))
        return written


def _build(config: RunConfig):
    """A new hypernetwork from the options, or the --weights file's (its own structure and step count)."""
    from networks.hypernetwork import (Hypernetwork, load_hypernetwork, parse_dropout_structure,
                                       parse_layer_structure, parse_sizes)

    if config.weights:
        network, info = load_hypernetwork(config.weights)
        print(f"--weights {config.weights}: structure from the file ({list(network.layer_structure)}, "
              f"{network.activation_func}), step {info.get('step') or 0}")
        return network, int(info.get("step") or 0)
    layers = parse_layer_structure(config.hypernetwork_layer_structure)
    network = Hypernetwork(parse_sizes(config.hypernetwork_sizes), layer_structure=layers,
                           activation_func=config.hypernetwork_activation_func,
                           weight_init=config.hypernetwork_weight_init,
                           add_layer_norm=bool(config.hypernetwork_layer_norm),
                           activate_output=bool(config.hypernetwork_activate_output),
                           dropout_structure=parse_dropout_structure(config.hypernetwork_dropout_structure, layers))
    return network, 0


def _refuse_foreign(path: Path) -> None:
    """Replacing an older hypernetwork is fine; replacing a checkpoint, embedding or anything else is not."""
    from networks.hypernetwork import load_hypernetwork

    if not path.exists():
        return
    try:
        load_hypernetwork(path)
    except UserError:
        raise UserError(f"{path}: already exists and is not an AUTOMATIC1111 hypernetwork; refusing to overwrite it, "
                        "choose another --output_name or --output_dir") from None

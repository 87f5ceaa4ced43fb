"""The adapter network: creates adapters at sd-scripts' places, applies, merges, groups parameters, saves and loads."""

from __future__ import annotations

import sys
from typing import Any, Iterable

import torch
from torch import nn

from library.errors import UserError
from networks.args import parse_network_args
from networks.injection import (BLOCK_LAYOUTS, BlockLayout, Target, adapter_targets, every_layer,
                                text_encoder_targets, unet_targets)


class AdapterNetwork(nn.Module):
    """sd-scripts' network object API: apply_to, merge_to, set_multiplier, prepare_optimizer_params, save/load."""

    def __init__(self, module_class, text_encoder_loras: list, unet_loras: list, *, multiplier: float,
                 options: dict[str, Any] | None = None, block_layout: BlockLayout = BLOCK_LAYOUTS["sd"]):
        super().__init__()
        self.block_layout = block_layout
        self.module_class = module_class
        self.multiplier = multiplier
        self.text_encoder_loras = text_encoder_loras
        self.unet_loras = unet_loras
        self.options = dict(options or {})
        self.layer_names: frozenset[str] = frozenset()  # every layer of the model a file may name (build_network)
        self.dropped: set[str] = set()  # adapters apply_to left out (--network_train_unet_only / _text_encoder_only)
        for lora in text_encoder_loras + unet_loras:
            self.add_module(lora.lora_name, lora)

    # ------------------------------------------------------------------ applying
    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Route the target layers through the adapters; the parts not applied are dropped (sd-scripts)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()

    def _drop(self, loras: list) -> None:
        for lora in loras:
            delattr(self, lora.lora_name)
            self.dropped.add(lora.lora_name)

    def restore(self) -> None:
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder=None, unet=None, weights_sd: dict | None = None, dtype=None, device=None) -> None:
        """Add every adapter's ΔW · multiplier into the base weights (after loading `weights_sd`, if given)."""
        if weights_sd is not None:
            self.load_state_dict_flexible(weights_sd)
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.merge_to()

    # ------------------------------------------------------------------ training hooks
    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def on_step_start(self, *args, **kwargs) -> None:
        pass

    def get_trainable_params(self):
        return self.parameters()

    def enable_gradient_checkpointing(self) -> None:
        pass  # adapters hold no activations of their own; the base models checkpoint

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None, *args, **kwargs):
        """(param groups, descriptions) as sd-scripts builds them: text encoder, UNet (per block with lr weights),
        and LoRA+ groups for the `up` side at lr × ratio. Groups whose lr is 0 are left out (not trained)."""
        text_encoder_lr = text_encoder_lr[0] if isinstance(text_encoder_lr, (list, tuple)) and text_encoder_lr else text_encoder_lr
        text_encoder_lr = default_lr if text_encoder_lr in (None, []) else text_encoder_lr
        unet_lr = default_lr if unet_lr is None else unet_lr
        opts = self.options
        groups: list[dict] = []
        descriptions: list[str] = []
        te_ratio = opts.get("loraplus_text_encoder_lr_ratio") or opts.get("loraplus_lr_ratio")
        unet_ratio = opts.get("loraplus_unet_lr_ratio") or opts.get("loraplus_lr_ratio")
        self._add_groups(groups, descriptions, self.text_encoder_loras, text_encoder_lr, te_ratio, "textencoder")
        if self._block_lr_weights() is None:
            self._add_groups(groups, descriptions, self.unet_loras, unet_lr, unet_ratio, "unet")
        else:
            by_block: dict[int, list] = {}
            for lora in self.unet_loras:
                by_block.setdefault(self.block_layout.index(lora.lora_name), []).append(lora)
            for index in sorted(by_block):
                weight = self.lr_weight(index)
                lr = None if unet_lr is None else unet_lr * weight
                self._add_groups(groups, descriptions, by_block[index], lr, unet_ratio, f"unet {index}")
        return groups, descriptions

    def _add_groups(self, groups, descriptions, loras, lr, plus_ratio, label) -> None:
        plus_names = set(self.module_class.PLUS_PARAMS) if plus_ratio else set()
        normal, plus = [], []
        for lora in loras:
            for name, param in lora.named_parameters():
                # a PLUS_PARAMS entry names a parameter, or a list of them (DyLoRA's lora_B.0, lora_B.1, ...)
                is_plus = name in plus_names or name.rpartition(".")[0] in plus_names
                (plus if is_plus else normal).append(param)
        for params, ratio, suffix in ((normal, 1.0, ""), (plus, plus_ratio, " plus")):
            if not params:
                continue
            group: dict[str, Any] = {"params": params}
            if lr is not None:
                group["lr"] = lr * ratio
                if group["lr"] == 0:
                    continue  # sd-scripts skips a zero-lr group: those adapters do not train
            groups.append(group)
            descriptions.append(label + suffix)

    def _block_lr_weights(self) -> list[float] | None:
        """sd-scripts' per-block learning-rate weights (get_block_lr_weight), one per block index; None without
        down/mid/up_lr_weight. A given weight at or below block_lr_zero_threshold becomes 0 (that block does not
        train); a list not given is all 1.0."""
        opts, layout = self.options, self.block_layout
        if all(opts.get(k) is None for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
            return None
        threshold = opts.get("block_lr_zero_threshold") or 0.0

        def given(key: str, n: int) -> list[float]:
            values = opts.get(key)
            return [1.0] * n if values is None else [w if w > threshold else 0.0 for w in values]

        return layout.lr_weights(given("down_lr_weight", layout.down), given("mid_lr_weight", layout.mid),
                                 given("up_lr_weight", layout.up))

    def lr_weight(self, index: int) -> float:
        """The learning-rate weight of block `index` (1.0 outside the blocks: text encoders, or no weights)."""
        weights = self._block_lr_weights()
        return 1.0 if weights is None or index < 0 else weights[index]

    @torch.no_grad()
    def scale_weight_norms(self, max_norm: float) -> torch.Tensor:
        """--scale_weight_norms (sd-scripts' max-norm regularisation), without waiting for the device: every adapter
        whose ‖ΔW‖ (alpha/dim included) exceeds max_norm has each of its n factors scaled by (max_norm/‖ΔW‖)^(1/n)
        (LoRA: up and down by the square root, as sd-scripts; LoHa/LoKr: every factor, as LyCORIS). Returns a
        device tensor [modules scaled, mean norm, largest norm], the norms after scaling."""
        loras = self.text_encoder_loras + self.unet_loras
        if not loras:
            return torch.zeros(3)
        norms = torch.stack([lora.delta_weight().float().norm() for lora in loras])
        # sd-scripts' rule: norms under max_norm/2 are never touched, those above are brought down to max_norm.
        clamped = norms.clamp(min=max_norm / 2)
        ratios = clamped.clamp(max=max_norm) / clamped
        for lora, ratio in zip(loras, ratios):
            factors = lora.parameter_factors()
            # Multiplying by exactly 1 changes nothing, so no per-module branch (and no device sync) is needed.
            step = ratio ** (1.0 / lora.factor_degree())
            for factor in factors:
                factor.mul_(step.to(factor.dtype))
        scaled = norms * ratios
        return torch.stack([(ratios < 1).sum().float(), scaled.mean(), scaled.max()])

    def apply_max_norm_regularization(self, max_norm_value, device=None):
        """sd-scripts' network API: (keys scaled, mean norm, max norm) as numbers (this waits for the device)."""
        keys_scaled, mean_norm, max_norm = self.scale_weight_norms(float(max_norm_value)).tolist()
        return int(keys_scaled), mean_norm, max_norm

    # ------------------------------------------------------------------ files
    def save_weights(self, file, dtype=None, metadata: dict[str, str] | None = None) -> None:
        from networks.files import save_network_file

        save_network_file(self.state_dict(), file, dtype=dtype, metadata=metadata)

    def load_weights(self, file) -> Any:
        from networks.files import read_network_file

        weights, _ = read_network_file(file)
        return self.load_state_dict_flexible(weights, source=str(file))

    def load_state_dict_flexible(self, weights: dict[str, torch.Tensor], *, source: str = "the weights"):
        """Load adapter tensors, accepting 2-D or 1×1 4-D forms of the same weight (SD 2.x proj_in/out). Tensors this
        network cannot hold as they are meant are refused (sd-scripts' strict=False would drop them); modules the
        file does not have keep their weights, as in sd-scripts."""
        from networks.files import canonical_key, without_bundle

        own = self.state_dict()
        # Bundled embeddings (bundle_emb.*) are not the network's: the method or generator that wants them reads them.
        weights = {canonical_key(key): value for key, value in without_bundle(weights).items()}
        _check_tensors(self, weights, own, source)
        adapted = {}
        for key, value in weights.items():
            target = own.get(key)
            if target is None:
                continue  # an alpha without weights, or an adapter this run does not train (warned)
            if value.shape != target.shape:
                if value.numel() != target.numel():
                    raise UserError(f"{source}: {key} has shape {tuple(value.shape)} but this network's is "
                                    f"{tuple(target.shape)}: the file is for another base model (SD 1.x vs 2.x) or "
                                    "was trained with another rank or network_args (with --network_weights, add "
                                    "--dim_from_weights)")
                value = value.reshape(target.shape)
            adapted[key] = value
        return self.load_state_dict(adapted, strict=False)


def _check_tensors(network: AdapterNetwork, weights: dict[str, torch.Tensor], own: dict, source: str) -> None:
    """Refuse tensors the network cannot hold as they are meant, each kind with its own fix; warn about adapters
    this run leaves out on purpose."""
    from networks.files import not_understood, tensor_names, what_it_is

    here = {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras}
    names = tensor_names(network.module_class)
    weighted = {key.partition(".")[0] for key in weights if not key.endswith(".alpha")}
    foreign, unknown, not_adapted, layout, dropped = [], [], [], [], []
    for key in weights:
        if key in own:
            continue
        module, _, rest = key.partition(".")
        if rest == "alpha" and module not in weighted:
            continue  # an alpha without weights changes nothing
        known = module in here or module in network.dropped or module in network.layer_names
        if known and rest not in names:
            foreign.append(key)
        elif module in here:
            layout.append(key)
        elif module in network.dropped:
            dropped.append(key)
        elif module in network.layer_names:
            not_adapted.append(key)
        else:
            unknown.append(key)
    total, algorithm = len(weights), network.module_class.ALGORITHM
    if foreign:
        raise UserError(not_understood(source, foreign, total, what_it_is(foreign, algorithm)))
    if unknown:
        modules = sorted({key.partition(".")[0] for key in unknown})
        raise UserError(not_understood(source, unknown, total, _absent_modules(modules)))
    if not_adapted or layout:
        keys = not_adapted + layout
        raise UserError(f"{source}: {len(keys)} of its {total} tensors do not fit this network (e.g. "
                        f"{', '.join(sorted(keys)[:3])}): the file adapts other layers or stores them in another "
                        "layout; with --network_weights add --dim_from_weights (layers, ranks and network_args from "
                        "the file) or give the network_args it was trained with (conv_dim, block_dims, ...)")
    incomplete = sorted(key for key in own if key.partition(".")[0] in weighted and key not in weights
                        and not key.endswith(".alpha"))
    if incomplete:
        raise UserError(f"{source}: {incomplete[0]} is missing ({len(incomplete)} tensors of its modules are): the "
                        "file is damaged; re-save or re-train it")
    if dropped:
        modules = len({key.partition(".")[0] for key in dropped})
        print(f"warning: {source}: {modules} of its modules are not trained in this run "
              "(--network_train_unet_only / --network_train_text_encoder_only), so they are not loaded and will not "
              "be in the saved network", file=sys.stderr)


def _absent_modules(modules: list[str]) -> str:
    from networks.files import other_model_hint

    count = f"{len(modules)} module{'s' if len(modules) != 1 else ''}"
    return f"they adapt {count} this model does not have; {other_model_hint(modules)}"



def build_network(module_class, multiplier, network_dim, network_alpha, text_encoder, unet, *, neuron_dropout=None,
                  modules_dim: dict | None = None, modules_alpha: dict | None = None, network_class=None,
                  **network_args) -> AdapterNetwork:
    """Adapters for every target, with sd-scripts' dims: network_dim/alpha, conv_dim/alpha for 3×3 convolutions,
    block-wise dims for the UNet, or per-module dims (`modules_dim`, from a file)."""
    encoders = [te for te in (text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder])
                if te is not None]
    # The family with this many text encoders names them (lora_te, or lora_te1 / lora_te2), says what to adapt and
    # how sd-scripts counts the UNet's blocks (25 for SD 1.x/2.x, 23 for SDXL).
    unet_side, te_sides = adapter_targets(len(encoders))
    unet_side, te_sides = named_for(module_class, unet_side, te_sides)
    if not module_class.TEXT_ENCODER:
        encoders, te_sides = [], ()
    layout = BLOCK_LAYOUTS[unet_side.blocks]
    opts = parse_network_args(network_args, getattr(module_class, "EXTRA_ARGS", None), module=module_class.MODULE,
                              layout=layout, common=module_class.COMMON_ARGS)
    dim = 4 if network_dim is None else int(network_dim)
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = opts.get("conv_dim")
    conv_alpha = opts.get("conv_alpha", 1.0 if conv_dim is not None else None)
    blocks = _block_dims(opts, dim, alpha, conv_dim, conv_alpha, layout.total)
    kwargs = {"dropout": neuron_dropout, "rank_dropout": opts.get("rank_dropout"),
              "module_dropout": opts.get("module_dropout"), **_module_kwargs(module_class, opts)}
    include_conv = modules_dim is not None or conv_dim is not None or blocks is not None and blocks[2] is not None

    def make(targets: Iterable[Target], is_unet: bool) -> list:
        loras = []
        for target in targets:
            if modules_dim is not None:
                if target.lora_name not in modules_dim:
                    continue
                d, a = modules_dim[target.lora_name], modules_alpha[target.lora_name]
            elif is_unet and blocks is not None:
                index = layout.index(target.lora_name)
                dims, alphas = (blocks[2], blocks[3]) if target.is_conv_kernel else (blocks[0], blocks[1])
                d, a = (None, None) if dims is None else (dims[index], alphas[index])
            elif target.is_conv_kernel:
                d, a = conv_dim, conv_alpha
            else:
                d, a = dim, alpha
            if not d:
                continue
            loras.append(module_class(target.lora_name, target.module, multiplier, d, a, **kwargs))
        return loras

    layers = [target for te, side in zip(encoders, te_sides)
              for target in every_layer(te, None, text_encoder_prefix=side.prefix)]
    layers += list(every_layer(None, unet, unet_prefix=unet_side.prefix,
                               unet_paths=unet_side.paths(unet) if unet is not None else None))
    if modules_dim is not None:
        # A file names its layers: any Linear/Conv2d of the model, as other loaders (A1111, ComfyUI) apply them.
        te_loras = make([t for t in layers if not t.lora_name.startswith(unet_side.prefix)], False)
        unet_loras = make([t for t in layers if t.lora_name.startswith(unet_side.prefix)], True)
    else:
        te_loras = [lora for te, side in zip(encoders, te_sides)
                    for lora in make(text_encoder_targets(te, side), False)]
        unet_loras = make(unet_targets(unet, unet_side, include_conv=include_conv), True) if unet is not None else []
    network = (network_class or AdapterNetwork)(module_class, te_loras, unet_loras, multiplier=multiplier,
                                                options=opts, block_layout=layout)
    network.layer_names = frozenset(target.lora_name for target in layers)
    return network


def named_for(module_class, unet_side, te_sides):
    """The family's targets with this algorithm's name prefixes (sd-scripts' OFT: oft_unet_ for lora_unet_)."""
    from dataclasses import replace

    if module_class.NAME_PREFIX == "lora":
        return unet_side, te_sides
    return (replace(unet_side, prefix=module_class.name_prefix(unet_side.prefix)),
            tuple(replace(side, prefix=module_class.name_prefix(side.prefix)) for side in te_sides))


def _block_dims(opts, dim, alpha, conv_dim, conv_alpha, total: int):
    """(dims, alphas, conv dims, conv alphas) per block (`total`: 25 for SD 1.x/2.x, 23 for SDXL) when block_dims is
    given (sd-scripts' get_block_dims_and_alphas), else None."""
    if opts.get("block_dims") is None:
        return None
    dims = opts["block_dims"]
    alphas = opts.get("block_alphas") or [alpha] * total
    conv_dims = opts.get("conv_block_dims") or ([conv_dim] * total if conv_dim is not None else None)
    conv_alphas = opts.get("conv_block_alphas") or (
        [conv_alpha if conv_alpha is not None else 1.0] * total if conv_dims is not None else None)
    return dims, alphas, conv_dims, conv_alphas


def _module_kwargs(module_class, opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k in getattr(module_class, "EXTRA_ARGS", {})}


def network_from_weights(multiplier, file, text_encoder, unet, *, weights_sd=None, for_inference=False,
                         module_class=None, **network_args) -> AdapterNetwork:
    """A network shaped like a saved file: algorithm, per-module dims and alphas read from its tensors."""
    from networks.files import canonical_key, describe_network_file, not_understood, other_model_hint, read_network_file

    if weights_sd is None:
        weights_sd, _ = read_network_file(file)
    info = describe_network_file(weights_sd, source=str(file))
    cls = info.module_class
    if module_class is not None and module_class is not cls:
        if module_class.FILE_ALGORITHM != info.algorithm:
            raise UserError(f"{file}: this is a {info.algorithm} network; load it with --network_module "
                            f"{cls.MODULE} (not {module_class.MODULE})")
        cls = module_class  # a training variant of the file's algorithm (DyLoRA trains LoRA files)
    network = build_network(cls, multiplier, None, None, text_encoder, unet,
                            modules_dim=info.dims, modules_alpha=info.alphas, **info.module_args, **network_args)
    found = {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras}
    missing = sorted(set(info.dims) - found)
    if not found:
        raise UserError(f"{file}: none of its {len(info.dims)} adapters matches this model's layers "
                        f"(first: {missing[0] if missing else '-'}); {other_model_hint(missing)}")
    if missing:
        # Loading the rest would be another network than the file's (sd-scripts skips them silently).
        keys = [key for key in weights_sd if canonical_key(key).partition(".")[0] in missing]
        raise UserError(not_understood(str(file), keys, len(weights_sd), _absent_modules(missing)))
    return network


def plugin_entry_points(module_class, *, ignores_neuron_dropout: bool = False):
    """sd-scripts' two module-level plug-in functions for an adapter class (every networks.* module exports them)."""

    def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
        if ignores_neuron_dropout:
            from networks.lycoris_common import warn_neuron_dropout

            warn_neuron_dropout(neuron_dropout, module_class.__name__.removesuffix("Module"))  # "LoHa", "LoKr"
        return build_network(module_class, multiplier, network_dim, network_alpha, text_encoder, unet,
                             neuron_dropout=neuron_dropout, **kwargs)

    def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                    **kwargs):
        return network_from_weights(multiplier, file, text_encoder, unet, weights_sd=weights_sd,
                                    for_inference=for_inference, module_class=module_class, **kwargs)

    create_network.__doc__ = f"sd-scripts' plug-in entry: a {module_class.ALGORITHM} network for the text encoder and UNet."
    create_network_from_weights.__doc__ = (f"sd-scripts' plug-in entry: a {module_class.ALGORITHM} network shaped "
                                           "like a saved file (ranks, alphas and layout from its tensors).")
    return create_network, create_network_from_weights

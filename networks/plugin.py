"""`--network_module`: import sd-scripts-style network modules (ours, or third-party ones such as lycoris.kohya)."""

from __future__ import annotations

import importlib
from types import ModuleType

from library.errors import UserError
from networks.args import split_network_args
from networks.injection import adapter_targets
from networks.plugin_trees import sgm_unet_view, text_encoder_view, unet_view
from networks.registry import network_modules

REQUIRED = ("create_network", "create_network_from_weights")


def load_network_module(name: str) -> ModuleType:
    """The module behind --network_module, checked for sd-scripts' two plug-in functions."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        hint = " (pip install lycoris-lora)" if name.startswith("lycoris") else ""
        *others, last = network_modules()
        ours = f"{', '.join(others)} and {last}" if others else last
        raise UserError(f"--network_module {name}: cannot import it ({err}){hint}; ours are {ours}") from None
    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise UserError(f"--network_module {name}: not a network module (it has no {', '.join(missing)})")
    return module


def is_ours(name: str) -> bool:
    """Whether --network_module names one of our adapter modules (they take the models as they are)."""
    return name in network_modules()


def network_trees(name: str, text_encoder, unet):
    """The text encoder and UNet to hand the module: ours take the models; one written for sd-scripts gets views
    with sd-scripts' module paths and class names, so it builds and names its adapters as under sd-scripts (for
    SDXL, whose text encoders come as a list, sd-scripts' SGM-named UNet)."""
    if is_ours(name):
        return text_encoder, unet
    count = len(text_encoder) if isinstance(text_encoder, (list, tuple)) else int(text_encoder is not None)
    unet_side, _ = adapter_targets(count)
    if unet is not None and unet_side.path_map is not None:
        return text_encoder_view(text_encoder), sgm_unet_view(unet, unet_side.paths(unet))
    return text_encoder_view(text_encoder), unet_view(unet)


def create_network(name: str, multiplier: float, network_dim, network_alpha, vae, text_encoder, unet, *,
                   neuron_dropout=None, network_args=None):
    """Call the module the way sd-scripts' train_network does: --network_args as string keyword arguments."""
    kwargs = split_network_args(network_args)
    text_encoder, unet = network_trees(name, text_encoder, unet)
    return load_network_module(name).create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                                    neuron_dropout=neuron_dropout, **kwargs)


def create_network_from_weights(name: str, multiplier: float, file, vae, text_encoder, unet, **kwargs):
    """The module's network shaped like a saved file. sd-scripts' modules return (network, weights), ours the
    network; this returns (network, weights or None) for both."""
    text_encoder, unet = network_trees(name, text_encoder, unet)
    built = load_network_module(name).create_network_from_weights(multiplier, str(file), vae, text_encoder, unet,
                                                                  **kwargs)
    return built if isinstance(built, tuple) else (built, None)

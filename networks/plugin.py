"""`--network_module`: import sd-scripts-style network modules (ours, or third-party ones such as lycoris.kohya)."""

from __future__ import annotations

import importlib
from types import ModuleType

from library.errors import UserError
from networks.args import split_network_args

REQUIRED = ("create_network", "create_network_from_weights")


def load_network_module(name: str) -> ModuleType:
    """The module behind --network_module, checked for sd-scripts' two plug-in functions."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        hint = " (pip install lycoris-lora)" if name.startswith("lycoris") else ""
        raise UserError(f"--network_module {name}: cannot import it ({err}){hint}; ours are networks.lora, "
                        "networks.loha and networks.lokr") from None
    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise UserError(f"--network_module {name}: not a network module (it has no {', '.join(missing)})")
    return module


def create_network(name: str, multiplier: float, network_dim, network_alpha, vae, text_encoder, unet, *,
                   neuron_dropout=None, network_args=None):
    """Call the module the way sd-scripts' train_network does: --network_args as string keyword arguments."""
    kwargs = split_network_args(network_args)
    return load_network_module(name).create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                                    neuron_dropout=neuron_dropout, **kwargs)

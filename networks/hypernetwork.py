"""AUTOMATIC1111 hypernetworks: residual MLPs on the key/value context of every UNet attention, in A1's .pt layout."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from library.errors import UserError
from library.formats.a1111_pickle import save_pickle

LAYER_FLAG = "--hypernetwork_layer_structure"
DROPOUT_FLAG = "--hypernetwork_dropout_structure"
SIZES_FLAG = "--hypernetwork_sizes"
ACTIVATION_FLAG = "--hypernetwork_activation_func"
WEIGHT_INIT_FLAG = "--hypernetwork_weight_init"

# A1's table: its own names first, then every torch activation by lower-cased class name. "swish" really is
# Hardswish in A1; files trained with it must rebuild the same layers.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
    "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}
ACTIVATIONS.update({
    name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
    if cls.__module__ == "torch.nn.modules.activation"
})
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
# NAI-era files named the two layers of the (1, 2, 1) structure directly.
_LEGACY_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
                "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
_INFO_KEYS = ("step", "name", "sd_checkpoint", "sd_checkpoint_name", "optional_info")


def _numbers(value, source: str, what: str) -> list[float]:
    """Parse "1, 2, 1" or a sequence into numbers; integral values become ints so files read [1, 2, 1]."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        numbers = [float(item.strip() if isinstance(item, str) else item) for item in items]
    except (TypeError, ValueError, AttributeError):
        raise UserError(f"{source}: {value!r} is not a comma-separated list of numbers; write {what}") from None
    if not all(math.isfinite(n) for n in numbers):
        raise UserError(f"{source}: {value!r} holds an infinite or NaN value; write {what}")
    return [int(n) if n.is_integer() else n for n in numbers]


def parse_layer_structure(value: str | Sequence[float], *, source: str = LAYER_FLAG) -> tuple[float, ...]:
    """Layer widths as multiples of the context width, e.g. (1, 2, 1); must start and end with 1."""
    numbers = _numbers(value, source, "e.g. 1,2,1")
    if len(numbers) < 2 or numbers[0] != 1 or numbers[-1] != 1 or any(n <= 0 for n in numbers):
        raise UserError(f"{source}: {value!r} must be at least two positive numbers starting and ending with 1; "
                        f"write e.g. 1,2,1")
    return tuple(numbers)


def parse_dropout_structure(value: str | Sequence[float] | None, layer_structure,
                            *, source: str = DROPOUT_FLAG) -> tuple[float, ...]:
    """Dropout after each layer, one value per layer_structure entry; None means no dropout."""
    if value is None:
        return (0,) * len(layer_structure)
    numbers = _numbers(value, source, "e.g. 0,0.1,0")
    zeros = ",".join(["0"] * len(layer_structure))
    if len(numbers) != len(layer_structure):
        raise UserError(f"{source}: {value!r} has {len(numbers)} values but the layer structure "
                        f"{list(layer_structure)} has {len(layer_structure)}; give one per layer, e.g. {zeros}")
    if numbers[0] != 0 or numbers[-1] != 0 or any(not 0 <= n < 1 for n in numbers):
        raise UserError(f"{source}: {value!r} must start and end with 0 and stay in [0, 1); e.g. {zeros}")
    return tuple(numbers)


def legacy_dropout_structure(layer_structure, use_dropout: bool, last_layer_dropout: bool) -> tuple[float, ...]:
    """A1's mapping of its old use_dropout / last_layer_dropout flags to a dropout structure."""
    if not use_dropout or len(layer_structure) < 3:
        return (0,) * len(layer_structure)
    return (0,) + (0.3,) * (len(layer_structure) - 3) + (0.3 if last_layer_dropout else 0, 0)


def parse_sizes(value: str | Sequence[int], *, source: str = SIZES_FLAG) -> tuple[int, ...]:
    """Context widths that get a module pair, e.g. "320,640,768,1024,1280" (duplicates dropped)."""
    numbers = _numbers(value, source, "e.g. 320,640,768,1024,1280")
    if not numbers or any(not isinstance(n, int) or n <= 0 for n in numbers):
        raise UserError(f"{source}: {value!r} must be positive whole numbers; write e.g. 320,640,768,1024,1280")
    return tuple(dict.fromkeys(numbers))


def activation_class(name: str | None) -> type[nn.Module] | None:
    """The activation module class of A1's name, or None for "linear"/None (no activation layer at all)."""
    if name is None or name == "linear":
        return None
    if name not in ACTIVATIONS:
        raise UserError(f"{ACTIVATION_FLAG}: unknown activation {name!r}; use linear, relu, leakyrelu, elu, swish, "
                        f"tanh, sigmoid or a torch activation such as gelu, silu, mish")
    return ACTIVATIONS[name]


def _layers(dim: int, layer_structure, activation_func, add_layer_norm, activate_output, dropout_structure):
    """A1's Sequential: Linear, [activation], [LayerNorm], [Dropout] per step; indices decide the state-dict keys."""
    activation = activation_class(activation_func)
    last = len(layer_structure) - 2
    layers: list[nn.Module] = []
    for i in range(len(layer_structure) - 1):
        width = int(dim * layer_structure[i + 1])
        layers.append(nn.Linear(int(dim * layer_structure[i]), width))
        if activation is not None and (i < last or activate_output):
            try:
                layers.append(activation())
            except TypeError:
                raise UserError(f"{ACTIVATION_FLAG}: {activation_func!r} needs arguments and cannot be a "
                                f"hypernetwork activation; pick e.g. relu, gelu or silu") from None
        if add_layer_norm:
            layers.append(nn.LayerNorm(width))
        if dropout_structure[i + 1] > 0:
            layers.append(nn.Dropout(p=dropout_structure[i + 1]))
    return layers


def _initialise(layer: nn.Module, weight_init: str, activation_func) -> None:
    # A1 gives LayerNorm weights std 0.01 too (not 1): a freshly created A1 network starts that way.
    if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
        nn.init.normal_(layer.weight, mean=0.0, std=0.01)
    elif weight_init == "XavierUniform":
        nn.init.xavier_uniform_(layer.weight)
    elif weight_init == "XavierNormal":
        nn.init.xavier_normal_(layer.weight)
    else:
        init = nn.init.kaiming_uniform_ if weight_init == "KaimingUniform" else nn.init.kaiming_normal_
        init(layer.weight, nonlinearity="leaky_relu" if activation_func == "leakyrelu" else "relu")
    nn.init.zeros_(layer.bias)


class HypernetworkModule(nn.Module):
    """One residual MLP: x + linear(x) * multiplier, applied to a context of width `dim`."""

    def __init__(self, dim: int, layer_structure=(1, 2, 1), activation_func="linear", weight_init="Normal",
                 add_layer_norm=False, activate_output=False, dropout_structure=None):
        super().__init__()
        if weight_init not in WEIGHT_INITS:
            raise UserError(f"{WEIGHT_INIT_FLAG}: unknown initialisation {weight_init!r}; use one of "
                            f"{', '.join(WEIGHT_INITS)}")
        if dropout_structure is None:
            dropout_structure = (0,) * len(layer_structure)
        self.multiplier = 1.0
        self.linear = nn.Sequential(*_layers(dim, layer_structure, activation_func, add_layer_norm,
                                             activate_output, dropout_structure))
        with torch.no_grad():
            for layer in self.linear:
                if type(layer) in (nn.Linear, nn.LayerNorm):
                    _initialise(layer, weight_init, activation_func)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.multiplier


def _context_hook(module: HypernetworkModule):
    """A to_k/to_v pre-hook: feed the projection module(context) instead of the context."""

    def replace(x: torch.Tensor) -> torch.Tensor:
        param = next(module.parameters())
        return module(x.to(device=param.device, dtype=param.dtype)).to(x.dtype)

    def hook(_projection, args, kwargs):
        if args:
            return (replace(args[0]), *args[1:]), kwargs
        if "input" in kwargs:
            return args, {**kwargs, "input": replace(kwargs["input"])}
        return None

    return hook


class Hypernetwork(nn.Module):
    """A (k, v) module pair per context width; apply_to() hooks them into a diffusers UNet's attentions."""

    def __init__(self, sizes, *, layer_structure=(1, 2, 1), activation_func="linear", weight_init="Normal",
                 add_layer_norm=False, activate_output=False, dropout_structure=None, multiplier=1.0):
        super().__init__()
        self.sizes = parse_sizes(sizes)
        self.layer_structure = parse_layer_structure(layer_structure)
        self.dropout_structure = parse_dropout_structure(dropout_structure, self.layer_structure)
        self.activation_func = activation_func
        self.weight_init = weight_init
        self.add_layer_norm = bool(add_layer_norm)
        self.activate_output = bool(activate_output)
        settings = (self.layer_structure, activation_func, weight_init, self.add_layer_norm, self.activate_output,
                    self.dropout_structure)
        self.layers = nn.ModuleDict({
            str(size): nn.ModuleList([HypernetworkModule(size, *settings), HypernetworkModule(size, *settings)])
            for size in self.sizes
        })
        self._handles: list | None = None  # None: not applied; a list (maybe empty) while applied
        self.multiplier = multiplier

    def pair(self, size: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        if str(size) not in self.layers:
            return None
        k, v = self.layers[str(size)]
        return k, v

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for modules in self.layers.values():
            for module in modules:
                module.multiplier = self._multiplier

    def apply_to(self, unet: nn.Module) -> int:
        """Hook every attention whose context width has a module pair; returns how many attentions were hooked."""
        if self._handles is not None:
            raise RuntimeError("hypernetwork is already applied; call remove() before applying it again")
        self._handles = []
        hooked = 0
        for attention in unet.modules():
            to_k, to_v = getattr(attention, "to_k", None), getattr(attention, "to_v", None)
            if not (isinstance(to_k, nn.Linear) and isinstance(to_v, nn.Linear)):
                continue
            pair = self.pair(to_k.in_features)
            if pair is None:
                continue
            self._handles.append(to_k.register_forward_pre_hook(_context_hook(pair[0]), with_kwargs=True))
            self._handles.append(to_v.register_forward_pre_hook(_context_hook(pair[1]), with_kwargs=True))
            hooked += 1
        return hooked

    def remove(self) -> None:
        for handle in self._handles or ():
            handle.remove()
        self._handles = None

    def to_a1111(self, *, step: int, name: str, sd_checkpoint: str | None = None,
                 sd_checkpoint_name: str | None = None, optional_info: str | None = None,
                 dtype: torch.dtype = torch.float32) -> dict:
        """The dict A1 saves: size -> (k state dict, v state dict), plus its settings under string keys."""
        data: dict = {size: tuple(_plain_state_dict(m, dtype) for m in self.pair(size)) for size in self.sizes}
        data.update({
            "step": int(step), "name": str(name), "layer_structure": list(self.layer_structure),
            "activation_func": self.activation_func, "is_layer_norm": self.add_layer_norm,
            "weight_initialization": self.weight_init, "sd_checkpoint": sd_checkpoint,
            "sd_checkpoint_name": sd_checkpoint_name, "activate_output": self.activate_output,
            "use_dropout": any(p > 0 for p in self.dropout_structure),
            "dropout_structure": list(self.dropout_structure),
            "last_layer_dropout": self.dropout_structure[-2] != 0, "optional_info": optional_info,
        })
        return data

    @classmethod
    def from_a1111(cls, data: Mapping, *, where: str = "hypernetwork file") -> tuple["Hypernetwork", dict]:
        """Rebuild a network from A1's dict, with A1's defaults for keys older files lack; returns (network, info)."""
        sizes = [key for key in data if isinstance(key, int) and not isinstance(key, bool)] \
            if isinstance(data, Mapping) else []
        if not sizes:
            raise UserError(f"{where}: not an AUTOMATIC1111 hypernetwork .pt (no integer context-size keys); "
                            f"pass a hypernetwork trained by A1111 or by this tool")
        layer_structure = parse_layer_structure(_get(data, "layer_structure", [1, 2, 1]), source=where)
        dropout = data.get("dropout_structure")
        if dropout is None:
            dropout = legacy_dropout_structure(layer_structure, bool(data.get("use_dropout", False)),
                                               bool(data.get("last_layer_dropout", False)))
        weight_init = _get(data, "weight_initialization", "Normal")
        activation = data.get("activation_func")
        if activation is not None and activation not in ACTIVATIONS:
            raise UserError(f"{where}: unknown activation_func {activation!r}; the file was written by a tool with "
                            f"activations this one does not know")
        network = cls(
            parse_sizes(sizes, source=where), layer_structure=layer_structure,
            activation_func=activation,
            # The initialisation is only recorded once weights exist; A1 never checks it when loading.
            weight_init=weight_init if weight_init in WEIGHT_INITS else "Normal",
            add_layer_norm=bool(data.get("is_layer_norm", False)),
            activate_output=bool(data.get("activate_output", True)),
            dropout_structure=parse_dropout_structure(dropout, layer_structure, source=where),
        )
        network.weight_init = weight_init
        for size in network.sizes:
            _load_pair(network, size, data[size], where)
        info = {key: data.get(key) for key in _INFO_KEYS}
        info["step"] = int(info["step"] or 0)
        return network, info


def _get(data: Mapping, key: str, default):
    value = data.get(key)
    return default if value is None else value


def _plain_state_dict(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Plain dict of detached CPU tensors: loadable with torch.load(weights_only=True) and by A1 alike.
    out = {}
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu")
        out[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous().clone()
    return out


def _load_pair(network: Hypernetwork, size: int, pair, where: str) -> None:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, Mapping) for s in pair)):
        raise UserError(f"{where}: entry {size} is not a (k, v) pair of state dicts; the file is damaged or not "
                        f"an AUTOMATIC1111 hypernetwork")
    for role, module, state in zip("kv", network.pair(size), pair):
        state = {_LEGACY_KEYS.get(key, key): value for key, value in state.items()}
        expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
        found = {key: tuple(t.shape) if isinstance(t, torch.Tensor) else None for key, t in state.items()}
        if found != expected:
            raise UserError(f"{where}: the size {size} {role} state dict does not match its layer_structure "
                            f"{list(network.layer_structure)} (activation {network.activation_func}, layer norm "
                            f"{network.add_layer_norm}, dropout {list(network.dropout_structure)}): "
                            f"{_difference(expected, found)}; the file is damaged or its settings were edited")
        module.load_state_dict(state, strict=True)


def _difference(expected: dict, found: dict) -> str:
    """What differs between the keys/shapes a structure needs and those a file holds, in one line."""
    parts = []
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected)}")
    for key in sorted(set(expected) & set(found)):
        if expected[key] != found[key]:
            parts.append(f"{key} has shape {list(found[key] or ())}, the structure needs {list(expected[key])}")
    return "; ".join(parts)


def save_hypernetwork(path, network: Hypernetwork, **to_a1111_kwargs) -> Path:
    """Write the network as A1's .pt (one its safe unpickler accepts) atomically; returns the path."""
    return save_pickle(network.to_a1111(**to_a1111_kwargs), path)


def load_hypernetwork(path) -> tuple[Hypernetwork, dict]:
    """Read an A1 hypernetwork .pt (safely: weights_only); info["name"] falls back to the file's stem as in A1."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such hypernetwork file; check the path")
    if path.suffix.lower() == ".safetensors":
        raise UserError(f"{path}: a .safetensors file (a LoRA or embedding?), not an AUTOMATIC1111 hypernetwork .pt")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt pickle fails with almost any exception type
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: not a loadable AUTOMATIC1111 hypernetwork .pt ({reason}); "
                        f"the file is corrupt or of another kind") from None
    network, info = Hypernetwork.from_a1111(data, where=str(path))
    if info["name"] is None:
        info["name"] = path.stem
    return network, info

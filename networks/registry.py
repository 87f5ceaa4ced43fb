"""The adapter algorithms, one line each: name -> "module:Class". A new adapter is one file plus one line here.

Everything else that knows the algorithms (file detection, tool tables, messages, `algo=` hints) derives it from the
registered classes' attributes (networks.base.AdapterModule documents them); tests check the wrapper scripts'
algo lists against this table.
"""

from __future__ import annotations

import importlib

ALGORITHMS = {
    "lora": "networks.lora:LoRAModule",
    "loha": "networks.loha:LoHaModule",
    "lokr": "networks.lokr:LoKrModule",
    "oft": "networks.oft:OFTModule",
    "dylora": "networks.dylora:DyLoRAModule",
}


def module_class(algorithm: str):
    module, _, name = ALGORITHMS[algorithm].partition(":")
    return getattr(importlib.import_module(module), name)


def all_module_classes() -> list:
    return [module_class(name) for name in ALGORITHMS]


def network_modules() -> list[str]:
    """Our --network_module values, in registry order (read from the table: nothing is imported)."""
    return list(dict.fromkeys(path.partition(":")[0] for path in ALGORITHMS.values()))


def algo_modules() -> dict[str, str]:
    """Every `algo` name we train (registered algorithms and their aliases, e.g. locon) -> its --network_module."""
    return {name: cls.MODULE for cls in all_module_classes() for name in (cls.ALGORITHM, *cls.ALIASES)}


def file_module_classes() -> list:
    """The classes that read files: a training variant writing another algorithm's files (DyLoRA) is left out."""
    return [cls for cls in all_module_classes() if cls.FILE_ALGORITHM is None]


def signature_names() -> tuple[str, ...]:
    """Tensor names (after `<lora_name>.`) of which every module of some registered algorithm holds one."""
    return tuple(name for cls in file_module_classes() for name in cls.signature_names())

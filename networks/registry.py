"""The adapter algorithms, one line each: name -> "module:Class". A new adapter is one file plus one line here."""

from __future__ import annotations

import importlib

ALGORITHMS = {
    "lora": "networks.lora:LoRAModule",
    "loha": "networks.loha:LoHaModule",
    "lokr": "networks.lokr:LoKrModule",
}


def module_class(algorithm: str):
    module, _, name = ALGORITHMS[algorithm].partition(":")
    return getattr(importlib.import_module(module), name)


def all_module_classes() -> list:
    return [module_class(name) for name in ALGORITHMS]

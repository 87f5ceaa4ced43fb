"""Options declared once (name, type, default, help, section); argparse is generated from the declarations.

Only the model and saving options exist yet; the configuration issue grows this into the full typed system
(TOML files, --output_config) on the same declarations.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: Any
    help: str
    section: str
    choices: tuple | None = None


MODEL_OPTIONS = (
    Option("pretrained_model_name_or_path", str, None,
           "base model: .safetensors/.ckpt file, diffusers folder, hub id, or tiny-sd1/tiny-sd2 (built-in demo)", "model"),
    Option("v2", bool, False, "the base model is SD 2.x (detected from the tensors; this flag insists on it)", "model"),
    Option("v_parameterization", bool, False, "the base model predicts v (SD 2.x 768-v models)", "model"),
    Option("vae", str, None, "replace the model's VAE with this file or diffusers folder", "model"),
    Option("tokenizer", str, None, "tokenizer folder or hub id (default: the bundled CLIP tokenizer)", "model"),
)

SAVE_OPTIONS = (
    Option("output_dir", str, None, "folder for the outputs", "saving"),
    Option("output_name", str, None, "file name of the output, without extension", "saving"),
    Option("save_model_as", str, "safetensors", "format of a saved full model", "saving",
           ("safetensors", "ckpt", "diffusers")),
    Option("save_precision", str, None, "precision of saved weights (default: as loaded)", "saving",
           ("float", "fp16", "bf16")),
)


def build_parser(description: str, groups: Sequence[Sequence[Option]]) -> argparse.ArgumentParser:
    """An argparse parser with one --help group per section."""
    parser = argparse.ArgumentParser(description=description)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for options in groups:
        for opt in options:
            group = sections.setdefault(opt.section, parser.add_argument_group(opt.section))
            if opt.type is bool:
                group.add_argument(f"--{opt.name}", action="store_true", default=opt.default, help=opt.help)
            else:
                group.add_argument(f"--{opt.name}", type=opt.type, default=opt.default, help=opt.help, choices=opt.choices)
    return parser

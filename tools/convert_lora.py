#!/usr/bin/env python
"""Convert an SD 1.x/2.x or SDXL LoRA/LoCon between sd-scripts' kohya layout and diffusers' (peft lora_A/lora_B) layout.

SDXL files (kohya: `lora_te1_`/`lora_te2_`, SGM UNet names `lora_unet_input_blocks_4_1_…`) map to diffusers'
`text_encoder.`/`text_encoder_2.`/`unet.down_blocks.1.attentions.0…` keys and back; a diffusers file is read as
SDXL when it has `text_encoder_2.` keys or UNet modules only SDXL has (else with --sdxl).

The source layout is read from its tensor names; --to defaults to the other one. DST may be a folder (diffusers:
`pytorch_lora_weights.safetensors` inside it, as save_lora_weights names it) or a file path. Each module's kohya
scale alpha/rank is folded into lora_B (diffusers reads peft files as alpha = rank); going back, alpha = rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/convert_lora.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.config.declarations import OPTIONS  # noqa: E402
from library.config.options import Option  # noqa: E402
from library.config.resolve import parse_tool_args  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LAYOUTS = {"kohya": "kohya", "diffusers": "peft"}
KOHYA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
TOOL_OPTIONS = (Option("to", str, None, "layout to write (default: the other one than SRC's)", "convert",
                       choices=tuple(LAYOUTS)),
                Option("sdxl", bool, False, "diffusers -> kohya: read SRC as an SDXL LoRA (SGM names, lora_te1_/"
                       "lora_te2_) even where its keys do not tell (a UNet-only file of attention layers)", "convert"))
POSITIONALS = (("src", "LoRA to read: kohya or diffusers .safetensors/.pt file, or a diffusers LoRA folder"),
               ("dst", "where to write: a folder (diffusers) or a file path (.safetensors; kohya also .pt/.ckpt)"))


@exit_on_user_error
def main(argv=None) -> Path:
    args = parse_tool_args(argv, __doc__, TOOL_OPTIONS + tuple(o for o in OPTIONS if o.name == "save_precision"),
                           ["to", "sdxl", "save_precision"], POSITIONALS)
    from library.console import quiet_libraries

    quiet_libraries()  # before anything imports diffusers, whose bitsandbytes import logs a warning
    from library.models.saving import save_dtype

    dtype = None if args.save_precision is None else save_dtype(args.save_precision)  # default: keep SRC's
    from library.safe_write import refuse_input_as_output

    src = Path(args.src)
    refuse_input_as_output(args.dst, [src, src / DIFFUSERS_WEIGHT_NAME], "DST")
    if Path(args.dst).is_dir():
        refuse_input_as_output(Path(args.dst) / DIFFUSERS_WEIGHT_NAME, [src, src / DIFFUSERS_WEIGHT_NAME], "DST")
    weights, metadata, source = read_lora(args.src)
    layout = _source_layout(weights, source)
    to = LAYOUTS[args.to] if args.to else ("peft" if layout == "kohya" else "kohya")
    if to == layout:
        raise UserError(f"{source}: already in the {args.to} layout; to change precision use --save_precision "
                        f"with --to {'diffusers' if layout == 'kohya' else 'kohya'}, or copy the file")
    dst = write_diffusers(weights, args.dst, dtype, source) if to == "peft" else \
        write_kohya(weights, metadata, args.dst, dtype, source, sdxl=args.sdxl or None)
    print(f"wrote {dst}")
    return dst


def read_lora(src) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """(tensors, safetensors metadata, file read) of a LoRA file or a diffusers LoRA folder."""
    from library.models.checkpoint_io import read_state_dict

    path = Path(src)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
        if not path.is_file():
            raise UserError(f"{src}: a folder without {DIFFUSERS_WEIGHT_NAME}; give the LoRA file itself")
    weights, metadata = read_state_dict(path)
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}, dict(metadata), path


def _source_layout(weights, source) -> str:
    from networks.lora_layouts import detect_layout

    layout = detect_layout(weights)
    if layout is None:
        sample = ", ".join(sorted(weights)[:2]) or "no tensors"
        raise UserError(f"{source}: neither a kohya (lora_down/lora_up) nor a diffusers (lora_A/lora_B) LoRA; "
                        f"keys start: {sample}")
    return layout


def write_diffusers(weights, dst, dtype, source) -> Path:
    from safetensors.torch import save_file

    from library.safe_write import write_atomically
    from networks.lora_layouts import kohya_to_peft

    unet_sd, te_sd, info = kohya_to_peft(weights, source=str(source))
    print(f"{source}: {len(unet_sd) // 2} UNet and {len(te_sd) // 2} text-encoder modules "
          f"({len(info.conv_modules)} LoCon 3×3), alpha/rank folded into lora_B")
    file = _diffusers_file(Path(dst))
    tensors = {k: _cast(v, dtype) for k, v in {**unet_sd, **te_sd}.items()}
    # diffusers writes {"format": "pt"}; no alphas or adapter config, so loaders use alpha = rank (scale 1).
    return write_atomically(file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _diffusers_file(dst: Path) -> Path:
    if dst.suffix == "" or dst.is_dir():
        return dst / DIFFUSERS_WEIGHT_NAME
    if dst.suffix.lower() != ".safetensors":
        raise UserError(f"{dst}: a diffusers LoRA is written as .safetensors; give a folder or a .safetensors path")
    if dst.exists():
        from library.models.checkpoint_io import read_safetensors_keys

        if not any(".lora_" in k for k in read_safetensors_keys(dst)):
            raise UserError(f"{dst}: already exists and is not a LoRA file; refusing to overwrite it")
    return dst


def write_kohya(weights, metadata, dst, dtype, source, *, sdxl: bool | None = None) -> Path:
    from networks.files import family_of_network, save_network_file
    from networks.lora_layouts import peft_scales, peft_to_kohya, split_peft

    dst = Path(dst)
    if dst.suffix.lower() not in KOHYA_SUFFIXES:
        raise UserError(f"{dst}: a kohya LoRA is one file; give a path ending in {', '.join(KOHYA_SUFFIXES)}")
    unet_sd, te_sd = split_peft(weights, source=str(source))
    scales = {}
    for component, config in _adapter_configs(metadata, source).items():
        modules = {k.rsplit(".lora_", 1)[0] for k in (unet_sd if component == "unet" else te_sd)
                   if k.startswith(f"{component}.")}
        scales |= peft_scales(modules, config, component)
    kohya = peft_to_kohya(unet_sd, te_sd, scales=scales, source=str(source), sdxl=sdxl)
    ranks = {int(v) for k, v in kohya.items() if k.endswith(".alpha")}
    rank = str(min(ranks)) if len(ranks) == 1 else "Dynamic"  # sd-scripts' word for per-module ranks
    print(f"{source}: {len(kohya) // 3} modules, rank {rank}, written with alpha = rank")
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": rank}
    family, _ = family_of_network({k.partition(".")[0] for k in kohya})
    if family is not None:  # SDXL names say the base model; SD 1.x and 2.x share theirs, so nothing is guessed
        meta = {key: str(value) for key, value in family.ss_keys(False).items()} | meta
    return save_network_file(kohya, dst, dtype=dtype, metadata=meta)


def _adapter_configs(metadata, source) -> dict[str, dict]:
    """The peft LoraConfig per component that diffusers stores (when saved with adapter metadata)."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except ValueError:
        raise UserError(f"{source}: its lora_adapter_metadata is not JSON; the file is damaged") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _cast(value: torch.Tensor, dtype) -> torch.Tensor:
    value = value.detach().to("cpu")
    return (value.to(dtype) if dtype is not None and value.is_floating_point() else value).contiguous()


if __name__ == "__main__":
    main()

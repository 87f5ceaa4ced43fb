#!/usr/bin/env python
"""Cut a DyLoRA file (networks.dylora, or sd-scripts' DyLoRA) into LoRAs of its first unit, 2·unit, … ranks.

DyLoRA trains its ranks `unit` at a time so that the first r of them work on their own: each output keeps the first
r rows of lora_down and columns of lora_up, and the file's alphas unchanged, as sd-scripts'
networks/extract_lora_from_dylora.py does (its command line runs unchanged). Outputs are `<save_to stem>-<rank
as 4 digits><suffix>`, e.g. `--save_to out.safetensors` writes out-0004.safetensors, out-0008.safetensors, … below
the file's largest rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/extract_lora_from_dylora.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config.options import Option  # noqa: E402
from library.config.resolve import parse_tool_args  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402

TOOL_OPTIONS = (
    Option("model", str, None, "DyLoRA file to cut (.safetensors, .ckpt, .pt)", "extract"),
    Option("save_to", str, None, "base name of the outputs: <stem>-<rank><suffix> (.safetensors, .ckpt, .pt)",
           "extract"),
    Option("unit", int, None, "the unit it was trained with (network_args unit=N): outputs every unit ranks",
           "extract", minimum=1),
)


def split_ranks(weights: dict, unit: int) -> list[tuple[int, dict]]:
    """(rank, tensors) for rank = unit, 2·unit, … below the largest: the first `rank` ranks of every module (a
    module with fewer ranks is kept whole), other tensors as they are."""
    ranks = [v.shape[0] for k, v in weights.items() if k.endswith(".lora_down.weight")]
    outputs = []
    for rank in range(unit, max(ranks), unit):
        cut = {}
        for key, value in weights.items():
            if key.endswith(".lora_down.weight"):
                value = value[:rank]
            elif key.endswith(".lora_up.weight"):
                value = value[:, :rank]
            cut[key] = value.contiguous()
        outputs.append((rank, cut))
    return outputs


@exit_on_user_error
def main(argv=None) -> list[Path]:
    args = parse_tool_args(argv, __doc__, TOOL_OPTIONS, [o.name for o in TOOL_OPTIONS])
    for name in ("model", "save_to", "unit"):
        if getattr(args, name) is None:
            raise UserError(f"--{name} is required (e.g. --model dylora.safetensors --save_to lora.safetensors "
                            "--unit 4)")
    from library.safe_write import refuse_input_as_output
    from networks.files import describe_network_file, is_bundle_key, read_network_file, save_network_file, without_bundle

    source = Path(args.model)
    weights, metadata = read_network_file(source)
    info = describe_network_file(weights, source=str(source))
    if info.algorithm != "lora" or info.module_args:
        raise UserError(f"{source}: a {info.label} network; DyLoRA files are plain LoRA files (lora_down/lora_up)")
    odd = sorted(name for name, rank in info.dims.items() if rank % args.unit)
    if odd:
        raise UserError(f"{source}: {odd[0]} has rank {info.dims[odd[0]]}, not a multiple of --unit {args.unit}: "
                        "give the unit the file was trained with (its ss_network_args)")
    bundle = {k: v for k, v in weights.items() if is_bundle_key(k)}  # pivotal tuning's embeddings, carried
    outputs = split_ranks(without_bundle(weights), args.unit)
    if not outputs:
        raise UserError(f"{source}: its largest rank is {max(info.dims.values())}: nothing below it to cut with "
                        f"--unit {args.unit}")
    base = Path(args.save_to)
    targets = [base.with_name(f"{base.stem}-{rank:04d}{base.suffix}") for rank, _ in outputs]
    for target in targets:
        refuse_input_as_output(target, [source], "--save_to")
    original = max(info.dims.values())
    comment = metadata.get("ss_training_comment", "")
    written = []
    for (rank, tensors), target in zip(outputs, targets):
        meta = {k: v for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
        meta["ss_training_comment"] = f"split from DyLoRA, rank {original} to {rank}; {comment}"
        meta["ss_network_dim"] = str(rank)
        written.append(save_network_file({**tensors, **bundle}, target, metadata=meta))
        print(f"wrote {target} (rank {rank})")
    return written


if __name__ == "__main__":
    main()

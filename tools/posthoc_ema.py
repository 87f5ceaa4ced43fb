#!/usr/bin/env python
"""Reconstruct the weights of an EMA of any width from a run's post-hoc EMA snapshots (--posthoc_ema).

Karras et al. 2024's method: the snapshots of the run's two power-function EMAs are combined by least squares so that
their averaging profiles best match the profile of an EMA of width --sigma_rel (the EMA's standard deviation relative
to the training length; the run's default pair is 0.05 and 0.10, and 0.05-0.15 is where the paper found the best
models) at --step (default: the last snapshot). The result is written in the snapshots' own format (a LoRA, an
embedding, a hypernetwork), loadable wherever the run's own output is.

    python tools/posthoc_ema.py --snapshots out/my_lora-posthoc_ema --sigma_rel 0.08 --save_to my_lora-ema008.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/posthoc_ema.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config.options import Option  # noqa: E402
from library.config.resolve import parse_tool_args  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402

TOOL_OPTIONS = (
    Option("snapshots", str, None, "the run's <output_name>-posthoc_ema folder", "posthoc_ema"),
    Option("sigma_rel", float, None, "the EMA width to reconstruct (0 < σ_rel < 0.28; e.g. 0.05-0.15)", "posthoc_ema",
           above=0, below=0.2886),
    Option("step", int, None, "the training step to reconstruct it at (default: the last snapshot's)", "posthoc_ema",
           minimum=1),
    Option("save_to", str, None, "where to write the weights (same suffix as the snapshots)", "posthoc_ema"),
)


def read_snapshots(folder: Path) -> list[tuple[Path, float, int]]:
    from library.training.posthoc_ema import parse_snapshot

    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        parsed = parse_snapshot(path)
        if parsed is not None:
            found.append((path, *parsed))
    if not found:
        raise UserError(f"--snapshots {folder}: no post-hoc EMA snapshots there (files named "
                        "<name>-sigma<σ>-step<N>.<ext>, written by a run with --posthoc_ema)")
    if len({path.suffix for path, _, _ in found}) > 1:
        raise UserError(f"--snapshots {folder}: snapshots of several formats; keep one run's snapshots per folder")
    return found


def _load(path: Path):
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        return load_file(str(path)), metadata
    return torch.load(str(path), map_location="cpu", weights_only=True), None


def _save(path: Path, tree, metadata) -> None:
    from library.formats.a1111_pickle import write_pickle
    from library.safe_write import atomic_file

    with atomic_file(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tree.items()}, str(tmp), metadata=metadata)
        else:
            write_pickle(tree, tmp)


@exit_on_user_error
def main(argv=None) -> Path:
    args = parse_tool_args(argv, __doc__, TOOL_OPTIONS, [o.name for o in TOOL_OPTIONS])
    for name in ("snapshots", "sigma_rel", "save_to"):
        if getattr(args, name) is None:
            raise UserError(f"--{name} is required (e.g. --snapshots out/net-posthoc_ema --sigma_rel 0.08 "
                            "--save_to net-ema.safetensors)")
    from library.safe_write import refuse_input_as_output
    from library.training.posthoc_ema import combine, gamma_for, solve_weights

    snapshots = read_snapshots(Path(args.snapshots))
    last = max(step for _, _, step in snapshots)
    step = args.step or last
    if step > last:
        raise UserError(f"--step {step}: the snapshots end at step {last}; an EMA is reconstructed up to there")
    usable = [(path, sigma, s) for path, sigma, s in snapshots if s <= step]
    save_to = Path(args.save_to)
    if save_to.suffix != usable[0][0].suffix:
        raise UserError(f"--save_to {save_to}: the snapshots are {usable[0][0].suffix} files; write the same kind")
    refuse_input_as_output(save_to, [path for path, _, _ in snapshots], "--save_to")
    weights = solve_weights([(s, gamma_for(sigma)) for _, sigma, s in usable], step, gamma_for(args.sigma_rel))
    trees, metadata = [], None
    for path, _, _ in usable:
        tree, metadata = _load(path)
        trees.append(tree)
    result = combine(trees, weights)
    if metadata is not None:
        metadata = dict(metadata)
        for key in ("sshs_model_hash", "sshs_legacy_hash"):
            metadata.pop(key, None)
        metadata["ss_training_comment"] = (f"post-hoc EMA, sigma_rel {args.sigma_rel:g} at step {step}, from "
                                           f"{len(usable)} snapshots; " + metadata.get("ss_training_comment", ""))
        from library.formats.kohya_metadata import model_hashes

        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(result, metadata)
    _save(save_to, result, metadata)
    print(f"wrote {save_to}: EMA of σ_rel {args.sigma_rel:g} at step {step} from {len(usable)} snapshots "
          f"(σ_rel {', '.join(sorted({f'{s:g}' for _, s, _ in usable}))})")
    return save_to


if __name__ == "__main__":
    main()

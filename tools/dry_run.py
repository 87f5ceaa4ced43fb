#!/usr/bin/env python
"""Check a training run without loading any weights: the same options as train_network.py (or --script), printed
as a plan — datasets and subsets, image and caption counts, repeats, regularisation balance, buckets, steps — with
every problem found. Images are fully decoded-checked, not just their headers.

The script goes first (`tools/dry_run.py sdxl_train_network.py --config_file sdxl_lora.toml`); without one, the
base model's header decides: an SDXL model is checked as sdxl_train_network.py would run it (bucket steps of 32,
no --v2), anything else as train_network.py."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/dry_run.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config.declarations import OPTIONS  # noqa: E402
from library.config.options import DB, HYPERNETWORK, NETWORK, TI  # noqa: E402
from library.config.resolve import resolve  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.methods.entry import check_model_family, dry_run  # noqa: E402

SD = ("sd1", "sd2")
# script -> (options it takes, model families it trains), as the entry scripts call library.methods.entry.start.
SCRIPTS = {"train_network.py": (NETWORK, SD), "train_db.py": (DB, SD), "train_textual_inversion.py": (TI, SD),
           "train_hypernetwork.py": (HYPERNETWORK, SD), "sdxl_train_network.py": (NETWORK, ("sdxl",)),
           "sdxl_train.py": (DB, ("sdxl",)), "sdxl_train_textual_inversion.py": (TI, ("sdxl",))}
# sd-scripts' other SDXL scripts, which this project does not have yet.
MISSING_SCRIPTS = ("sdxl_train_control_net_lllite.py", "sdxl_train_control_net.py")


@exit_on_user_error
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    named = argv.pop(0) if argv[:1] and (argv[0] in SCRIPTS or argv[0] in MISSING_SCRIPTS) else None
    if named in MISSING_SCRIPTS:
        raise UserError(f"{named}: not available in this project yet; SDXL training is sdxl_train_network.py, "
                        "sdxl_train.py and sdxl_train_textual_inversion.py (check them with tools/dry_run.py "
                        "<script> ...)")
    script, families = SCRIPTS[named or "train_network.py"]
    config = resolve(argv, script, OPTIONS, __doc__, families=families)
    found = _model_family(config.get("pretrained_model_name_or_path"))
    if named is None and found is not None and found.name not in families:
        print(f"the base model is an {found.label} model: checking the run as {found.network_script} would do it")
        config = resolve(argv, script, OPTIONS, __doc__, families=(found.name,))
    if found is not None:
        check_model_family(config, found)  # the refusal the real run would give, from the header alone
    dry_run(config)


def _model_family(source: str | None):
    """The family of --pretrained_model_name_or_path from its header or model_index.json only; None when it is not
    given, not found here (a hub id) or no family claims it (the real run reports that). A LoRA or a truncated
    file is refused here, as the real run refuses it."""
    from library.models.detect import check_base_model

    return check_base_model(source) if source else None


if __name__ == "__main__":
    main()

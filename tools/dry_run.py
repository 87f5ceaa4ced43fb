#!/usr/bin/env python
"""Check a training run without loading any weights: the same options as train_network.py (or --script), printed
as a plan — datasets and subsets, image and caption counts, repeats, regularisation balance, buckets, steps — with
every problem found. Images are fully decoded-checked, not just their headers."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/dry_run.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config.declarations import OPTIONS  # noqa: E402
from library.config.options import DB, HYPERNETWORK, NETWORK, TI  # noqa: E402
from library.config.resolve import resolve  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402
from library.methods.entry import dry_run  # noqa: E402

SCRIPTS = {"train_network.py": NETWORK, "train_db.py": DB, "train_textual_inversion.py": TI,
           "train_hypernetwork.py": HYPERNETWORK}


@exit_on_user_error
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    script = NETWORK
    if argv[:1] and argv[0] in SCRIPTS:  # `tools/dry_run.py train_db.py --config_file …`
        script = SCRIPTS[argv.pop(0)]
    dry_run(resolve(argv, script, OPTIONS, __doc__))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Dreambooth / full fine-tuning for SD 1.x/2.x — not implemented yet (issue #6)."""

import sys

from library.errors import USER_ERROR_EXIT_CODE


def main() -> None:
    print("train_db.py: not yet — Dreambooth / full fine-tuning lands with issue #6; train_network.py already loads and re-saves models.",
          file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT_CODE)


if __name__ == "__main__":
    main()

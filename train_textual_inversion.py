#!/usr/bin/env python
"""Textual inversion for SD 1.x/2.x — not implemented yet (issue #7)."""

import sys

from library.errors import USER_ERROR_EXIT_CODE


def main() -> None:
    print("train_textual_inversion.py: not yet — textual inversion lands with issue #7; train_network.py already loads and re-saves models.",
          file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT_CODE)


if __name__ == "__main__":
    main()

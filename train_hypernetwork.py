#!/usr/bin/env python
"""Hypernetwork training for SD 1.x/2.x — not implemented yet (issue #7)."""

import sys

from library.errors import USER_ERROR_EXIT_CODE


def main() -> None:
    print("train_hypernetwork.py: not yet — hypernetwork training lands with issue #7; train_network.py already loads and re-saves models.",
          file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT_CODE)


if __name__ == "__main__":
    main()

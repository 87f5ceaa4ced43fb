#!/usr/bin/env python
"""Hypernetwork training for SD 1.x/2.x — not implemented yet (issue #7)."""

from library.methods.not_yet import exit_not_yet

if __name__ == "__main__":
    exit_not_yet("train_hypernetwork.py", "hypernetwork training", 7)

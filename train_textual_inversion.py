#!/usr/bin/env python
"""Textual inversion for SD 1.x/2.x — not implemented yet (issue #7)."""

from library.methods.not_yet import exit_not_yet

if __name__ == "__main__":
    exit_not_yet("train_textual_inversion.py", "textual inversion", 7)

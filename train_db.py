#!/usr/bin/env python
"""Dreambooth / full fine-tuning for SD 1.x/2.x — not implemented yet (issue #6)."""

from library.methods.not_yet import exit_not_yet

if __name__ == "__main__":
    exit_not_yet("train_db.py", "Dreambooth / full fine-tuning", 6)

#!/usr/bin/env python
"""`accelerate launch` with the trainers' one-line errors: `python launch.py [accelerate launch options] train_network.py
--config_file lora.toml`. Same options and machinery as `accelerate launch` (one process or several), but a script that
stops with its one `error:` line keeps it — no launcher traceback after it — and its exit code (2, or 130 for Ctrl+C)."""

from library.launch import main

if __name__ == "__main__":
    main()

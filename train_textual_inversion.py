#!/usr/bin/env python
"""Train a textual-inversion embedding for Stable Diffusion 1.x/2.x with sd-scripts' options (plus AUTOMATIC1111's
schedule and templates); writes A1111's .pt, sd-scripts' safetensors or diffusers' layout. --dry_run prints the plan."""

from library.config.options import TI
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    from library.methods.entry import start
    from library.methods.embedding_training import run_textual_inversion

    return start(argv, TI, __doc__, run_textual_inversion)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train an AUTOMATIC1111 hypernetwork for Stable Diffusion 1.x/2.x with sd-scripts' dataset, caption and training
options; writes the .pt that A1111's models/hypernetworks/ folder loads. --dry_run prints the plan."""

from library.config.options import HYPERNETWORK
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    from library.methods.entry import start
    from library.methods.embedding_training import run_hypernetwork

    return start(argv, HYPERNETWORK, __doc__, run_hypernetwork)


if __name__ == "__main__":
    main()

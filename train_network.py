#!/usr/bin/env python
"""Train a LoRA / LoCon / LoHa / LoKr network on Stable Diffusion 1.x/2.x with sd-scripts' options and configs:
`python launch.py train_network.py --config_file lora.toml` (or plain flags). --dry_run prints the plan."""

from library.config.options import NETWORK
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    from library.methods.entry import start
    from library.methods.network_training import run

    return start(argv, NETWORK, __doc__, run)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train a LoRA / LoCon / LoHa / LoKr network on SDXL (base 1.0 and its fine-tunes) with sd-scripts' options and
configs: `python launch.py sdxl_train_network.py --config_file sdxl_lora.toml` (or plain flags). --dry_run prints
the plan. Names and metadata are sd-scripts' SDXL ones (lora_unet_input_blocks_..., lora_te1_ / lora_te2_)."""

from library.config.options import NETWORK
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    from library.methods.entry import start
    from library.methods.network_training import run

    return start(argv, NETWORK, __doc__, run, families=("sdxl",))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Fine-tune SDXL (base 1.0 and its fine-tunes) with sd-scripts' sdxl_train.py options: the whole UNet, the text
encoders with --train_text_encoder (--learning_rate_te1 / --learning_rate_te2; 0 leaves one frozen), --block_lr per
UNet block, regularisation images with --prior_loss_weight, --in_json metadata, EMA; saves complete SDXL models
(single file as sd-scripts writes it, or a diffusers folder)."""

from library.config.options import DB
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    from library.methods.db_training import run
    from library.methods.entry import start

    return start(argv, DB, __doc__, run, families=("sdxl",))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Dreambooth / full fine-tuning for SD 1.x/2.x with sd-scripts' options: the whole UNet (and the text encoder
until --stop_text_encoder_training), regularisation images with --prior_loss_weight, class images generated on
request (--num_class_images), optional EMA; saves complete models (single file or diffusers folder)."""

from library.config.options import DB
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    from library.methods.db_training import run
    from library.methods.entry import start

    return start(argv, DB, __doc__, run)


if __name__ == "__main__":
    main()

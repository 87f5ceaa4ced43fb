#!/usr/bin/env python
"""Train a LoRA/LoCon/LoHa/LoKr network on SD 1.x/2.x, with sd-scripts' options and configs.

Training lands with its issue; for now this checks the options and the dataset (--dry_run prints the plan),
then loads the base model, describes it, re-saves it under --output_dir and checks the saved copy."""

from library.config.options import NETWORK
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    from library.methods.entry import start
    from library.methods.model_check import load_resave_and_check, output_name

    def run(config):
        saved = load_resave_and_check(config)
        return output_name(config, saved.stem)

    start(argv, NETWORK, __doc__, run)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train a LoRA/LoCon/LoHa/LoKr network. Training lands with its issue; for now this loads the base model,
describes it, re-saves it under --output_dir and checks the saved copy."""

from library.config.options import MODEL_OPTIONS, SAVE_OPTIONS, build_parser
from library.console import quiet_libraries
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser(__doc__, [MODEL_OPTIONS, SAVE_OPTIONS]).parse_args(argv)
    quiet_libraries()
    from library.methods.model_check import load_resave_and_check

    load_resave_and_check(args)


if __name__ == "__main__":
    main()

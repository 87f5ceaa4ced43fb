#!/usr/bin/env python
"""Textual inversion for SD 1.x/2.x with sd-scripts' options — training not implemented yet (issue #7);
--dry_run already checks the options and the dataset and prints the plan."""

from library.config.options import TI
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    from library.methods.entry import start
    from library.methods.not_yet import not_yet

    start(argv, TI, __doc__, not_yet("train_textual_inversion.py", "textual inversion", 7))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Dreambooth / full fine-tuning for SD 1.x/2.x with sd-scripts' options — training not implemented yet (issue #6);
--dry_run already checks the options and the dataset and prints the plan."""

from library.config.options import DB
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    from library.methods.entry import start
    from library.methods.not_yet import not_yet

    start(argv, DB, __doc__, not_yet("train_db.py", "Dreambooth / full fine-tuning", 6))


if __name__ == "__main__":
    main()

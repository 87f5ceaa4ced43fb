#!/usr/bin/env python
"""Train a textual-inversion embedding for SDXL (base 1.0 and its fine-tunes) with sd-scripts' options: the same new
token in both text encoders, one vector set each, saved as sd-scripts' {"clip_l", "clip_g"} .safetensors (AUTOMATIC1111,
ComfyUI and diffusers read it) or diffusers' learned_embeds / learned_embeds_2 folder. --dry_run prints the plan."""

from library.config.options import TI
from library.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    from library.methods.entry import start
    from library.methods.embedding_training import run_sdxl_textual_inversion

    return start(argv, TI, __doc__, run_sdxl_textual_inversion, families=("sdxl",))


if __name__ == "__main__":
    main()

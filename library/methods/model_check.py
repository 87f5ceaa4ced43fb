"""What train_network.py does until training lands: load the base model, describe it, re-save it and re-check it."""

from __future__ import annotations

from pathlib import Path

import torch

from library.errors import UserError


def load_resave_and_check(args) -> Path:
    from library.models.loading import load_components
    from library.models.saving import save_model, to_ldm_state_dict

    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a .safetensors/.ckpt file, a diffusers folder, "
                        "or tiny-sd1 for the built-in demo model")
    if not args.output_dir:
        raise UserError("--output_dir is required: the folder where the re-saved model goes")
    parts = load_components(args.pretrained_model_name_or_path, v2=args.v2, v_parameterization=args.v_parameterization,
                            vae=args.vae, tokenizer=args.tokenizer)
    print(parts.describe())
    name = args.output_name or Path(parts.source).stem or "model"
    suffix = "" if args.save_model_as == "diffusers" else f".{args.save_model_as}"
    dst = Path(args.output_dir) / f"{name}{suffix}"
    save_model(parts, dst, precision=args.save_precision)
    again = load_components(str(dst))
    dtype = torch.float32
    before, after = to_ldm_state_dict(parts, dtype), to_ldm_state_dict(again, dtype)
    same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    print(f"saved: {dst} ({len(after)} tensors, {'identical to' if same else 'DIFFERENT from'} the loaded model"
          f"{'' if args.save_precision in (None, 'float') else ' at float precision; saved as ' + args.save_precision})")
    return dst

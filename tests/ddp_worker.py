"""Run an entry script's main in this process and save what it trained as rank<RANK>.safetensors (for the DDP tests):
`ddp_worker.py <train_network|train_db|...> <out folder> <script options...>`."""

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402


def trained_state(method) -> dict:
    """The adapter's state dict (an embedding's vectors); for a full fine-tune the U-Net's and text encoders'
    (unet.*, te<i>.*)."""
    if hasattr(method, "network"):  # LoRA & co., hypernetwork
        return method.network.state_dict()
    if hasattr(method, "vectors_by_key"):  # textual inversion
        return method.vectors_by_key
    state = {f"unet.{k}": v for k, v in method.parts.unet.state_dict().items()}
    for i, text_encoder in enumerate(method.parts.text_encoders):
        state.update({f"te{i}.{k}": v for k, v in text_encoder.state_dict().items()})
    return state


def keep_process_group_for_gathering() -> None:
    """FSDP leaves each process its shards, and gathering them is a collective: accelerate's end_training would
    destroy the process group first, so here that waits until the worker has gathered (it destroys it afterwards)."""
    from accelerate.state import PartialState

    PartialState.destroy_process_group = lambda self, group=None: None


def gathered(method):
    """DeepSpeed ZeRO 3 partitions the weights: the full ones exist inside GatheredParameters (a collective)."""
    import contextlib

    params = [p for m in (method.parts.unet, *method.parts.text_encoders) for p in m.parameters()
              if hasattr(p, "ds_tensor")] if hasattr(method, "parts") else []
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


if __name__ == "__main__":
    sharded = os.environ.get("ACCELERATE_USE_FSDP") == "true" or "--deepspeed" in sys.argv
    if sharded:  # (DeepSpeed on one process makes a group of one itself)
        keep_process_group_for_gathering()
    script, out = importlib.import_module(sys.argv[1]), Path(sys.argv[2])
    result = script.main(sys.argv[3:])
    with gathered(result.method):
        state = {k: v.detach().clone().contiguous() for k, v in trained_state(result.method).items()}
    # FSDP: each process holds shards (DTensors); every process gathers each full tensor, in the same key order.
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    save_file(state, str(out / f"rank{os.environ.get('RANK', '0')}.safetensors"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no process tears its connections down while another still uses them
        dist.destroy_process_group()

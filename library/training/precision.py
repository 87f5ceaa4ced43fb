"""Whether the device computes bfloat16 fast, for the start-up tip that suggests --mixed_precision bf16 (the single
biggest speed lever on a current GPU, and on CPUs with AMX or AVX512-BF16)."""

from __future__ import annotations

import torch


def fast_bf16(device_type: str) -> str | None:
    """What makes bfloat16 fast on this device ("this GPU", "this CPU's AMX units"...), or None when it is not."""
    if device_type == "cuda":
        return "this GPU" if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False) \
            else None
    if device_type == "cpu":
        if torch.cpu._is_amx_tile_supported():
            return "this CPU's AMX units"
        if torch.cpu._is_avx512_bf16_supported():
            return "this CPU (AVX512-BF16)"
    return None


def bf16_tip(mixed_precision: str | None, device_type: str) -> str | None:
    """One line suggesting --mixed_precision bf16 to a float32 run on a device that computes it fast; None otherwise
    (a run that asked for fp16 or bf16 chose already)."""
    if mixed_precision not in (None, "no"):
        return None
    fast = fast_bf16(device_type)
    if fast is None:
        return None
    return (f"tip: bfloat16 runs several times faster than float32 on {fast}: --mixed_precision bf16 trains about "
            "twice as fast with half the activation memory (the weights you train stay float32)")

"""--mixed_precision bf16 really computes in bf16: every matrix product, convolution and attention of a training step
(forward and backward, UNet and text encoder) gets bf16 operands; none silently runs in float32."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from library.config.declarations import OPTIONS
from library.config.options import NETWORK
from library.config.resolve import resolve
from library.data.dataset import Batch
from library.methods.network_method import NetworkMethod
from library.models.tiny import build_tiny

HEAVY = ("convolution", "convolution_backward", "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product")


class _HeavyOps(TorchDispatchMode):
    """Records (op, dtypes of its first three tensor inputs: the operands) for every heavy op that runs. (Attention's
    backward also takes the forward's log-sum-exp, kept in float32 by design: a per-row statistic, not an operand.)"""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith(HEAVY):
            tensors = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
            dtypes = {a.dtype for a in tensors[:3]}
            self.seen.append((name, dtypes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_a_bf16_step_runs_every_heavy_op_in_bf16(train_text_encoder):
    flags = ["--pretrained_model_name_or_path", "tiny-sd1", "--output_dir", "unused", "--mixed_precision", "bf16",
             "--network_dim", "4", "--network_args", "conv_dim=4"]
    if not train_text_encoder:
        flags.append("--network_train_unet_only")
    config = resolve(flags, NETWORK, OPTIONS)
    method = NetworkMethod(config, build_tiny("tiny-sd1", seed=0), torch.device("cpu"), torch.bfloat16)
    batch = Batch(captions=["a photo", "a cat"], is_reg=torch.tensor([False, False]), network_multipliers=torch.ones(2),
                  images=None, latents=torch.randn(2, 4, 8, 8), alpha_masks=None, image_paths=["a", "b"], skipped=[])
    ops = _HeavyOps()
    with ops, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.loss(batch, torch.Generator().manual_seed(0))
    with ops:
        loss.backward()
    names = {name for name, _ in ops.seen}
    assert {"convolution", "convolution_backward", "_scaled_dot_product_flash_attention_for_cpu"} <= names
    assert names & {"mm", "addmm"}
    slow = [(name, dtypes) for name, dtypes in ops.seen if dtypes != {torch.bfloat16}]
    assert slow == []
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_params())

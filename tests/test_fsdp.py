"""FSDP (`accelerate launch --use_fsdp`, sharded here with FSDP2's fully_shard): train_db.py on 2 CPU processes ends
with the same weights as one process accumulating the same batches, and saves the full model; what FSDP does not
cover (adapters, --use_ema, ...) is one line."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.test_ddp import assert_trained_and_saved_in_full, SGD, _argv, _db_argv, _two_processes_and_one
from tests.test_deepspeed import _refused_in_process

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_OFFLOAD_PARAMS": "false"}  # what `accelerate launch --use_fsdp --fsdp_version 2` exports


def test_train_db_under_fsdp_matches_one_process_and_saves_the_full_model(tmp_path, tiny_parts, monkeypatch):
    for name, value in FSDP_ENV.items():
        monkeypatch.setenv(name, value)  # both runs see it; the one-process reference trains unsharded
    # The text encoder trains for the first step only (then it is encoded on every batch: a per-process caption
    # cache would call the sharded model on some processes only); --clip_skip 2 leaves its last layer without a
    # gradient. Gradients accumulate unsharded for one micro-batch (no reduce-scatter), then reduce on the
    # boundary; they are clipped as DTensors (--max_grad_norm's default 1.0).
    # Samples after each step: every process gathers, the main one samples from the full models.
    (tmp_path / "prompts.txt").write_text("a photo --w 32 --h 32 --s 2 --d 5\n")
    out, rank0, _ = _two_processes_and_one(tmp_path, "train_db", _db_argv, accumulation=2,
                                           extra=(*SGD, "--stop_text_encoder_training", "1", "--clip_skip", "2"),
                                           two_only=("--sample_prompts", str(tmp_path / "prompts.txt"),
                                                     "--sample_every_n_steps", "1"),
                                           reference_here=False)  # under accelerate's FSDP environment
    assert_trained_and_saved_in_full(out, rank0, tiny_parts["tiny-sd1"])
    samples = sorted((out / "sample").glob("db_*.png"))
    assert [p.name[:9] for p in samples] == ["db_000001", "db_000002"]
    assert len({Image.open(p).tobytes() for p in samples}) == 2  # the second step's weights draw another image


def _refused(tmp_path, capsys, monkeypatch, script, argv, *extra) -> list[str]:
    for name, value in FSDP_ENV.items():
        monkeypatch.setenv(name, value)
    return [line for line in _refused_in_process(tmp_path, capsys, script, argv, *extra) if "--use_fsdp" in line]


def test_an_adapter_under_fsdp_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    lines = _refused(tmp_path, capsys, monkeypatch, "train_network", _argv)
    assert len(lines) == 1 and "adapter" in lines[0], lines


def test_ema_under_fsdp_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    lines = _refused(tmp_path, capsys, monkeypatch, "train_db", _db_argv, "--use_ema")
    assert len(lines) == 1 and "--use_ema" in lines[0], lines


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"ACCELERATE_USE_FSDP": "false"}, None),
    ({"ACCELERATE_USE_FSDP": "true"}, {"reshard_after_forward": True, "offload": False}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"},
     {"reshard_after_forward": False, "offload": False}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
      "FSDP_OFFLOAD_PARAMS": "true"}, {"reshard_after_forward": False, "offload": True}),
])
def test_fsdp_settings_come_from_accelerate_launchs_environment(environ, expected):
    from library.training.distributed import sharding_requested

    assert sharding_requested(environ) == expected


def test_unsupported_sharding_strategies_are_one_line():
    from library.errors import UserError
    from library.training.distributed import sharding_requested

    with pytest.raises(UserError, match="HYBRID_SHARD"):
        sharding_requested({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "HYBRID_SHARD"})


def test_every_block_is_sharded_and_a_gather_gives_back_the_unsharded_models(tiny_parts):
    """In one process (a gloo group of one): the U-Net's blocks and the text encoder's layers become FSDP units with
    DTensor parameters, and `gather` rebuilds plain models holding exactly the weights."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from library.training.distributed import FullySharded

    base = tiny_parts["tiny-sd1"]
    unet, text_encoder = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = FullySharded([unet, text_encoder])
        assert all(isinstance(b, FSDPModule) for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks))
        assert all(isinstance(layer, FSDPModule) for layer in text_encoder.encoder.layers)
        assert all(isinstance(p, DTensor) for m in (unet, text_encoder) for p in m.parameters())
        full_unet, full_te = sharded.gather()
    finally:
        dist.destroy_process_group()
    for full, original in ((full_unet, base.unet), (full_te, base.text_encoder)):
        assert type(full) is type(original) and not any(isinstance(p, DTensor) for p in full.parameters())
        state = full.state_dict()
        assert state.keys() == original.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())

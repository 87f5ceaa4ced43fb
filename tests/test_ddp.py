"""Data parallel through accelerate: 2 CPU processes (torchrun, ACCELERATE_USE_CPU=1) end with identical adapters,
equal to one process accumulating the same two batches per step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import toml
import torch
from safetensors.torch import load_file

from library.data.demo import make_demo_dataset
from tests.conftest import ROOT

# float32: the same gradients summed in a different order; a few AdamW steps keep the gap near 1e-7.
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _argv(data, out, *extra):
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "32", "--output_dir", str(out), "--output_name", "net", "--train_batch_size", "1",
            "--max_train_steps", "4", "--learning_rate", "1e-3", "--network_dim", "4",
            "--max_data_loader_n_workers", "0", "--lr_scheduler", "constant", *extra]


def test_two_cpu_processes_match_one_process_over_the_same_global_batch(tmp_path):
    data = tmp_path / "data"
    make_demo_dataset(data, count=4, size=32)  # 4 images × 10 repeats = 40 batches of 1: even, no padding
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp_out.mkdir()
    single_out.mkdir()
    worker = str(ROOT / "tests" / "ddp_worker.py")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), worker, str(ddp_out),
                          *_argv(data, ddp_out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # Unseeded: the ranks must share the main process's drawn seed, and the saved options must hold it.
    seed = toml.load(ddp_out / "net.config.toml")["training"]["seed"]
    single = subprocess.run([sys.executable, worker, str(single_out), *_argv(data, single_out,
                             "--gradient_accumulation_steps", "2", "--seed", str(seed))], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0, rank1 = load_file(str(ddp_out / "rank0.safetensors")), load_file(str(ddp_out / "rank1.safetensors"))
    reference = load_file(str(single_out / "rank0.safetensors"))
    assert rank0.keys() == rank1.keys() == reference.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # all-reduced gradients: the ranks never drift apart
        torch.testing.assert_close(rank0[key], reference[key], atol=ATOL, rtol=0)
    moved = max((rank0[k] - load_file(str(ddp_out / "net.safetensors"))[k]).abs().max() for k in rank0)
    assert moved == 0  # the file rank 0 saved is the trained adapter
    assert any(v.abs().max() > 0 for k, v in reference.items() if "lora_up" in k)  # training changed something

"""Data parallel through accelerate: 2 CPU processes (torchrun, ACCELERATE_USE_CPU=1) end with identical weights,
equal to one process accumulating the same batches per step, for an adapter (bucketed all-reduce on gradient hooks)
and for train_db.py (DDP over the U-Net and text encoder)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import toml
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from library.data.demo import make_demo_dataset
from library.training.distributed import BucketedReducer, plan_buckets
from tests.conftest import ROOT, python_path

# float32: the same gradients summed in a different order; a few AdamW steps keep the gap near 1e-7.
ATOL = 1e-5
WORKER = str(ROOT / "tests" / "ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _argv(data, out, *extra):
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "32", "--output_dir", str(out), "--output_name", "net", "--train_batch_size", "1",
            "--network_dim", "4", "--max_data_loader_n_workers", "0", "--lr_scheduler", "constant", *extra]


def _db_argv(data, out, *extra):
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "32", "--output_dir", str(out), "--output_name", "db", "--train_batch_size", "1",
            "--save_model_as", "safetensors", "--max_data_loader_n_workers", "0", "--lr_scheduler", "constant", *extra]


ADAMW = ("--max_train_steps", "4", "--learning_rate", "1e-3")
# With accumulation the ranks' sums associate differently from one process's ((a + b) + c) + d: rounding-level
# differences, which AdamW turns into lr-sized steps where a gradient is near zero (a LoRA's down weights at step
# 2). Plain SGD at a small rate keeps them at rounding level; the seed is fixed so the batches are the same each run.
SGD = ("--optimizer_type", "SGDNesterov", "--learning_rate", "0.01", "--max_train_steps", "2", "--seed", "7")


def _two_processes_and_one(tmp_path, script: str, argv, *, accumulation: int = 1, extra=(), two_only=(),
                           atol: float = ATOL, reference_here: bool = True):
    """Train with 2 processes (`accumulation` micro-batches each; unseeded unless `extra` sets --seed; `two_only`
    options for this run alone), then with 1 process accumulating twice as many under the same seed; the weights
    agree within `atol`. Returns (ddp folder, rank 0's weights, one process's). The one-process run trains in this
    process (a process of its own only repeated the imports, ~7 s a test) unless `reference_here` is False."""
    data = tmp_path / "data"
    make_demo_dataset(data, count=4, size=32)  # 4 images × 10 repeats = 40 batches of 1: even, no padding
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=python_path(ROOT))
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp_out.mkdir()
    single_out.mkdir()
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), WORKER, script,
                          str(ddp_out), *argv(data, ddp_out, "--gradient_accumulation_steps", str(accumulation),
                                              *extra, *two_only)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (ddp_out / "launch.log").write_text(ddp.stdout)
    # Unseeded: the ranks must share the main process's drawn seed, and the saved options must hold it.
    name = next(ddp_out.glob("*.config.toml"))
    seed = toml.load(name)["training"]["seed"]
    single_argv = argv(data, single_out, "--gradient_accumulation_steps", str(2 * accumulation), *extra,
                       "--seed", str(seed))
    if reference_here:
        reference = _one_process_here(script, single_argv)
    else:
        single = subprocess.run([sys.executable, WORKER, script, str(single_out), *single_argv],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert single.returncode == 0, single.stderr[-3000:]
        reference = load_file(str(single_out / "rank0.safetensors"))
    rank0, rank1 = load_file(str(ddp_out / "rank0.safetensors")), load_file(str(ddp_out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() == reference.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # averaged gradients: the ranks never drift apart
        torch.testing.assert_close(rank0[key], reference[key], atol=atol, rtol=0)
    return ddp_out, rank0, reference


def _one_process_here(script: str, argv) -> dict:
    """What ddp_worker.py saves for one process, trained in this process with the workers' settings (CPU, one
    thread)."""
    import importlib

    from tests.ddp_worker import trained_state

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "1")
        torch.set_num_threads(1)
        try:
            result = importlib.import_module(script).main(argv)
        finally:
            torch.set_num_threads(threads)
    return {k: v.detach().clone().contiguous() for k, v in trained_state(result.method).items()}


def assert_trained_and_saved_in_full(out, rank0: dict, base) -> None:
    """A sharded train_db run (FSDP, DeepSpeed) trained the U-Net and text encoder, and the file rank 0 saved holds
    the full trained weights, as without sharding."""
    from library.models.loading import load_components

    assert max((rank0[f"unet.{k}"] - v).abs().max() for k, v in base.unet.state_dict().items()) > 1e-4  # trained
    assert any(not torch.equal(rank0[f"te0.{k}"], v) for k, v in base.text_encoder.state_dict().items())
    saved = load_components(str(out / "db.safetensors"))
    for prefix, module in (("unet", saved.unet), ("te0", saved.text_encoder)):
        for key, value in module.state_dict().items():
            assert torch.equal(value, rank0[f"{prefix}.{key}"]), key


@pytest.mark.parametrize("accumulation, options", [(1, ADAMW), (2, SGD)], ids=["adamw", "accumulating"])
def test_network_on_two_cpu_processes_matches_one_process_over_the_same_global_batch(tmp_path, accumulation, options):
    ddp_out, rank0, reference = _two_processes_and_one(tmp_path, "train_network", _argv, accumulation=accumulation,
                                                       extra=options)
    moved = max((rank0[k] - load_file(str(ddp_out / "net.safetensors"))[k]).abs().max() for k in rank0)
    assert moved == 0  # the file rank 0 saved is the trained adapter
    assert max(v.abs().max() for k, v in reference.items() if "lora_up" in k) > 10 * ATOL  # training changed it


@pytest.mark.parametrize("accumulation, options", [(1, ADAMW), (2, SGD)], ids=["adamw", "accumulating"])
def test_train_db_under_ddp_matches_one_process_and_saves_rank_0s_weights(tmp_path, tiny_parts, accumulation,
                                                                          options):
    from library.models.loading import load_components

    # The text encoder trains for the first step only (then DDP is rebuilt without it), and --clip_skip 2 leaves its
    # last layer without a gradient (DDP must look for unused parameters). The AdamW run also sets sd-scripts' DDP
    # options (a static graph, rebuilt without the text encoder, must still average the same gradients).
    ddp_out, rank0, _ = _two_processes_and_one(
        tmp_path, "train_db", _db_argv, accumulation=accumulation,
        extra=(*options, "--stop_text_encoder_training", "1", "--clip_skip", "2"),
        two_only=("--ddp_static_graph", "--ddp_gradient_as_bucket_view", "--ddp_timeout", "5") if accumulation == 1
        else ())
    base = tiny_parts["tiny-sd1"]
    assert max((rank0[f"unet.{k}"] - v).abs().max() for k, v in base.unet.state_dict().items()) > 10 * ATOL
    changed_te = [k for k, v in base.text_encoder.state_dict().items() if not torch.equal(rank0[f"te0.{k}"], v)]
    assert changed_te and not any(".layers.1." in k for k in changed_te)  # trained; its skipped last layer did not

    saved = load_components(str(ddp_out / "db.safetensors"))
    for prefix, module in (("unet", saved.unet), ("te0", saved.text_encoder)):
        for key, value in module.state_dict().items():
            assert torch.equal(value, rank0[f"{prefix}.{key}"]), key  # the file holds rank 0's weights, unwrapped


def test_buckets_run_from_the_last_parameter_and_split_on_size_and_dtype():
    params = [torch.zeros(4), torch.zeros(4), torch.zeros(8), torch.zeros(2, dtype=torch.float16), torch.zeros(1)]
    assert plan_buckets(params, cap_bytes=32) == [[4], [3], [2], [1, 0]]
    assert plan_buckets(params, cap_bytes=1) == [[4], [3], [2], [1], [0]]


@pytest.fixture
def one_process_group():
    """A gloo group of one, in this process: the reducer's order and bookkeeping without spawning anything."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_reducer_sends_full_buckets_in_order_during_the_boundary_backward_only(one_process_group, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    unused = torch.nn.Parameter(torch.ones(3))  # gets no gradient: sent as zeros, in the last bucket
    params = [unused, *model.parameters()]
    reducer = BucketedReducer(params, cap_bytes=80)  # one Linear (weight 64 B + bias 16 B) per bucket
    sent = []
    real = dist.all_reduce

    def spy(tensor, **kwargs):
        sent.append(tensor.clone())
        return real(tensor, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", spy)
    with reducer.micro_batch(False):
        model(torch.randn(2, 4)).square().sum().backward()
    assert sent == []  # no reduction on a micro-batch that only accumulates
    with reducer.micro_batch(True):
        model(torch.randn(2, 4)).square().sum().backward()
    assert len(sent) == 3  # every full bucket went during backward, before finish()
    layers = [torch.cat([m.bias.grad, m.weight.grad.reshape(-1)]) for m in reversed(model)]
    assert all(torch.equal(a, b) for a, b in zip(sent, layers))  # last layer first: the order backward fills them
    expected = [p.grad.clone() for p in model.parameters()]
    reducer.finish()
    assert len(sent) == 4 and torch.equal(sent[3], torch.zeros(3)) and torch.equal(unused.grad, torch.zeros(3))
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))  # the mean over one process
    reducer.close()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_sharded_launches_are_refused_in_one_line(kind):
    from accelerate.utils import DistributedType

    from library.errors import UserError
    from library.training.loop import refuse_sharding

    with pytest.raises(UserError, match="sharding is not supported yet"):
        refuse_sharding(getattr(DistributedType, kind))
    for fine in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        refuse_sharding(fine)


def test_ddp_options_reach_the_process_group_and_ddp(one_process_group):
    from datetime import timedelta

    from library.config.run_config import RunConfig
    from library.training.distributed import gradient_sync
    from library.training.loop import process_group_kwargs

    [handler] = process_group_kwargs(RunConfig({"ddp_timeout": 5}, {}, "train_db"))
    assert handler.timeout == timedelta(minutes=5)
    assert process_group_kwargs(RunConfig({"ddp_timeout": None}, {}, "train_db")) == []

    model = torch.nn.Linear(2, 2)

    class Method:
        def data_parallel_modules(self):
            return [model], False

    for static in (False, True):
        sync = gradient_sync(Method(), list(model.parameters()), first=True, static_graph=static)
        assert sync.ddp.static_graph is static and sync.ddp.gradient_as_bucket_view and sync.reducer is None
        sync.close()


def test_a_static_graph_cannot_accumulate_locally(tmp_path, capsys):
    import train_db

    make_demo_dataset(tmp_path / "data", count=2, size=32)
    with pytest.raises(SystemExit) as exit_info:
        train_db.main(_db_argv(tmp_path / "data", tmp_path / "out", "--max_train_steps", "1", "--ddp_static_graph",
                               "--gradient_accumulation_steps", "2"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: --ddp_static_graph with --gradient_accumulation_steps > 1: DDP cannot accumulate gradients locally on "
        "a static graph; drop --ddp_static_graph"]

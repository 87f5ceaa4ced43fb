"""Post-hoc EMA (#21 item 4): power-function EMAs tracked during training, snapshots, and tools/posthoc_ema.py's
least-squares reconstruction of an EMA of any width."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train_network
import train_textual_inversion
from library.data.demo import make_demo_dataset
from library.training.posthoc_ema import PosthocTracker, PowerEMA, gamma_for, sigma_rel_for, solve_weights
from networks.network import network_from_weights
from tools import posthoc_ema

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_the_exponent_gives_back_its_width(sigma_rel):
    assert sigma_rel_for(gamma_for(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


def test_each_step_gets_the_power_profiles_weight():
    """Fed 1 at step k and 0 elsewhere, the EMA at step T holds k's weight: (1 − β_k)·(k/T)^(γ+1) exactly, which is
    (γ+1)·k^γ / T^(γ+1) — the profile the reconstruction assumes — within 2 % once k is in the hundreds."""
    gamma, steps = gamma_for(0.1), 800
    for k in (10, 200, 400):
        ema = PowerEMA([torch.zeros(1)], 0.1)
        for step in range(1, steps + 1):
            ema.update([torch.ones(1, dtype=torch.float64) if step == k else torch.zeros(1)])
        exact = (1 - (1 - 1 / k) ** (gamma + 1)) * (k / steps) ** (gamma + 1)
        assert float(ema.average[0]) == pytest.approx(exact, rel=1e-4)
        if k >= 200:
            assert float(ema.average[0]) == pytest.approx((gamma + 1) * k ** gamma / steps ** (gamma + 1), rel=0.02)


def _synthetic(steps=400, every=20, seed=0):
    """A random walk of 8 weights, EMAs at σ_rel 0.05 and 0.10 snapshotted every `every` steps, and a directly
    tracked EMA at 0.15 to compare a reconstruction with."""
    torch.manual_seed(seed)
    theta = torch.cumsum(torch.randn(steps, 8), 0)
    emas = {s: PowerEMA([theta[0]], s) for s in (0.05, 0.1, 0.15)}
    snapshots = []
    for t in range(steps):
        for ema in emas.values():
            ema.update([theta[t]])
        if (t + 1) % every == 0:
            snapshots += [(t + 1, s, emas[s].average[0].clone()) for s in (0.05, 0.1)]
    return theta, emas, snapshots


def _reconstruct(snapshots, step, sigma_rel):
    weights = solve_weights([(t, gamma_for(s)) for t, s, _ in snapshots], step, gamma_for(sigma_rel))
    return sum(float(w) * v.double() for w, (_, _, v) in zip(weights, snapshots))


def test_a_tracked_width_comes_back_as_its_own_snapshot_and_another_within_a_tenth_of_a_percent():
    theta, emas, snapshots = _synthetic()
    torch.testing.assert_close(_reconstruct(snapshots, 400, 0.05).float(), emas[0.05].average[0], atol=1e-5, rtol=1e-6)
    direct = emas[0.15].average[0].double()
    error = (_reconstruct(snapshots, 400, 0.15) - direct).norm()
    # Stated error: below 0.1 % of how far that EMA is from the current weights (5.5e-4 here).
    assert float(error / (direct - theta[-1].double()).norm()) < 1e-3
    # At an earlier step, from the snapshots up to it only.
    early = [s for s in snapshots if s[0] <= 200]
    assert float((_reconstruct(early, 200, 0.05) - early[-2][2].double()).norm()) < 1e-4


def test_the_tracker_state_round_trips(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3))]
    tracker = PosthocTracker(params, [0.05, 0.1], every=2, folder=tmp_path)
    for _ in range(3):
        params[0].data.add_(1)
        tracker.update()
    again = PosthocTracker(params, [0.05, 0.1], every=2, folder=tmp_path)
    again.load_state_dict(tracker.state_dict())
    assert [e.updates for e in again.emas] == [3, 3]
    assert all(torch.equal(a.average[0], b.average[0]) for a, b in zip(again.emas, tracker.emas))
    with pytest.raises(ValueError, match="σ_rel"):
        PosthocTracker(params, [0.05, 0.2], every=2, folder=tmp_path).load_state_dict(tracker.state_dict())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("posthoc")
    make_demo_dataset(root / "data", count=2, size=32)
    train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(root / "data"),
                        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(root / "out"),
                        "--output_name", "net", "--train_batch_size", "2", "--max_train_steps", "30",
                        "--learning_rate", "1e-2", "--seed", "1", "--max_data_loader_n_workers", "0",
                        "--posthoc_ema", "--posthoc_ema_every", "10"])
    return root


def test_a_run_writes_snapshots_of_both_emas(lora_run):
    folder = lora_run / "out" / "net-posthoc_ema"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"net-sigma{s}-step{t:08d}.safetensors" for s in ("0.0500", "0.1000") for t in (10, 20, 30)]
    final = load_file(str(lora_run / "out" / "net.safetensors"))
    ema = load_file(str(folder / "net-sigma0.0500-step00000030.safetensors"))
    assert ema.keys() == final.keys()
    moved = [k for k in final if k.endswith("lora_up.weight")]
    assert sum(not torch.equal(ema[k], final[k]) for k in moved) > len(moved) // 2  # an average, not the last
    assert all(torch.equal(ema[k], final[k]) for k in final if k.endswith(".alpha"))


def test_the_tool_reconstructs_a_lora_of_any_width(lora_run, tiny_parts, capsys):
    folder = lora_run / "out" / "net-posthoc_ema"
    same = posthoc_ema.main(["--snapshots", str(folder), "--sigma_rel", "0.05", "--save_to",
                             str(lora_run / "out" / "ema005.safetensors")])
    tracked = load_file(str(folder / "net-sigma0.0500-step00000030.safetensors"))
    for key, value in load_file(str(same)).items():
        torch.testing.assert_close(value, tracked[key], atol=1e-6, rtol=1e-5)
    other = posthoc_ema.main(["--snapshots", str(folder), "--sigma_rel", "0.08", "--save_to",
                              str(lora_run / "out" / "ema008.safetensors")])
    assert "EMA of σ_rel 0.08 at step 30 from 6 snapshots (σ_rel 0.05, 0.1)" in capsys.readouterr().out
    parts = tiny_parts["tiny-sd1"]
    import copy

    model = copy.deepcopy(parts)
    network = network_from_weights(1.0, other, model.text_encoder, model.unet)
    network.load_weights(other)  # a LoRA like the run's own output
    weights = load_file(str(other))
    assert any(not torch.allclose(weights[k], tracked[k]) for k in weights if k.endswith("lora_up.weight"))


def test_an_embedding_run_reconstructs_its_pt(tmp_path):
    make_demo_dataset(tmp_path / "data", count=2, size=32)
    train_textual_inversion.main([
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / "out"),
        "--train_batch_size", "2", "--max_train_steps", "6", "--learning_rate", "1e-2", "--seed", "1",
        "--max_data_loader_n_workers", "0", "--token_string", "mychar", "--init_word", "shape", "--use_object_template", "--posthoc_ema",
        "--posthoc_ema_every", "3"])
    folder = next((tmp_path / "out").glob("*-posthoc_ema"))
    snapshots = sorted(folder.iterdir())
    assert len(snapshots) == 4 and all(p.suffix == ".pt" for p in snapshots)
    out = posthoc_ema.main(["--snapshots", str(folder), "--sigma_rel", "0.1", "--save_to", str(tmp_path / "e.pt")])
    from library.formats.embedding_files import load_embedding

    vectors = load_embedding(out).vectors
    tracked = load_embedding(next(p for p in snapshots if "sigma0.1000-step00000006" in p.name)).vectors
    torch.testing.assert_close(vectors, tracked, atol=1e-6, rtol=1e-5)

"""`-state` folders appear whole or not at all; --resume refuses a partial one by name, takes the newest complete one
from an output folder; a run removes what killed saves of its own left behind; the saved options hold the seed."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train_network
from library.data.demo import make_demo_dataset
from tests.conftest import ROOT
from tests.helpers import tiny_lora_flags

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data(tmp_path):
    make_demo_dataset(tmp_path / "data", count=2, size=32)
    return tmp_path / "data"


def _flags(data, out, *extra, steps=3):
    return tiny_lora_flags(data, out, *extra, steps=steps)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _main_exit(argv, capsys) -> tuple[int, str, str]:
    """Exit code, stdout, and the error line (stderr also holds the progress bar); never a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return exit_info.value.code, out, errors[0]


def test_a_state_save_killed_half_way_leaves_no_folder_and_resume_takes_the_previous_one(data, tmp_path, capsys,
                                                                                         monkeypatch):
    """The acceptance case: the optimizer writer dies half-way through the second state save."""
    import accelerate.checkpointing

    out = tmp_path / "out"
    real_save = accelerate.checkpointing.save
    calls, before = [], {}

    def dies_half_way(obj, f, **kwargs):
        real_save(obj, f, **kwargs)
        if Path(f).name == "optimizer.bin":
            calls.append(f)
            if len(calls) == 2:
                before.update(_snapshot(out / "net-step00000001-state"))
                Path(f).write_bytes(Path(f).read_bytes()[: Path(f).stat().st_size // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerate.checkpointing, "save", dies_half_way)
    code, _, err = _main_exit(_flags(data, out, "--save_every_n_steps", "1", "--save_state", "--seed", "4"), capsys)
    assert code == 2
    assert err.startswith(f"error: could not write {out / 'net-step00000002-state'}: No space left on device (")
    assert "free on its disk); files saved before are intact" in err
    assert not (out / "net-step00000002-state").exists()  # never a partial folder under the real name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # and no temporary left
    assert _snapshot(out / "net-step00000001-state") == before  # the previous state is untouched

    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)
    resumed = train_network.main(_flags(data, tmp_path / "b", "--seed", "4", "--resume", str(out)))
    said = capsys.readouterr().out
    assert f"--resume {out}: continuing from its newest complete state, net-step00000001-state" in said
    assert resumed.global_step == 3 and len(resumed.losses) == 2


_KILLED_IN_A_STATE_SAVE = """
import os, shutil, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import accelerate.checkpointing
import train_network

real_save, calls = accelerate.checkpointing.save, []


def dies_half_way(obj, f, **kwargs):
    real_save(obj, f, **kwargs)
    if Path(f).name == "optimizer.bin":
        calls.append(f)
        if len(calls) == 2:
            out = Path(f).parent.parent
            shutil.copytree(out / "net-step00000001-state", out.parent / "snapshot")
            Path(f).write_bytes(Path(f).read_bytes()[: Path(f).stat().st_size // 2])
            os._exit(137)  # as kill -9 (or the OOM killer) would: no clean-up runs


accelerate.checkpointing.save = dies_half_way
train_network.main(sys.argv[1:])
"""


def test_a_run_killed_inside_a_state_save_leaves_nothing_resume_would_take(data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _flags(data, out, "--save_every_n_steps", "1", "--save_state", "--seed", "4")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", _KILLED_IN_A_STATE_SAVE.format(root=str(ROOT)), *argv],
                            capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == 137, killed.stderr[-2000:]
    partial = out / ".net-step00000002-state.saving.tmp"
    assert not (out / "net-step00000002-state").exists() and partial.is_dir()  # only under a hidden name

    code, _, err = _main_exit(_flags(data, tmp_path / "b", "--resume", str(partial)), capsys)
    assert code == 2 and err.startswith(f"error: --resume {partial}: not a complete state folder (missing "
                                        "scheduler.bin, custom_checkpoint_0.pkl, random_states_0.pkl, train_state.json")

    resumed = train_network.main(_flags(data, out, "--seed", "4", "--resume", str(out)))
    said = capsys.readouterr().out
    assert f"removed 1 leftover(s) of interrupted saves in {out}" in said and not partial.exists()
    assert "newest complete state, net-step00000001-state" in said and resumed.global_step == 3
    assert _snapshot(out / "net-step00000001-state") == _snapshot(tmp_path / "snapshot")


@pytest.mark.parametrize("damage, named", [
    ("no optimizer.bin, no train_state.json", "missing optimizer.bin"),  # a crash in a first save, before this fix
    ("optimizer.bin cut short", "optimizer.bin cut short"),  # a crash while rewriting a folder of the same name
    ("scheduler.bin removed", "missing scheduler.bin"),
])
def test_resume_refuses_a_partial_state_folder_naming_what_is_missing(damage, named, data, tmp_path, capsys):
    train_network.main(_flags(data, tmp_path / "a", "--save_state", "--seed", "4", steps=1))
    state = tmp_path / "a" / "net-state"
    partial = tmp_path / "a" / "partial-state"
    shutil.copytree(state, partial)
    if damage.startswith("no optimizer"):
        (partial / "optimizer.bin").unlink()
        (partial / "train_state.json").unlink()
    elif damage.startswith("optimizer.bin cut"):
        size = (partial / "optimizer.bin").stat().st_size
        with open(partial / "optimizer.bin", "r+b") as f:
            f.truncate(size // 2)
    else:
        (partial / "scheduler.bin").unlink()
    code, _, err = _main_exit(_flags(data, tmp_path / "b", "--resume", str(partial)), capsys)
    assert code == 2
    assert err.startswith(f"error: --resume {partial}: not a complete state folder ({named}")

    # Given the output folder, the partial one is skipped (and said so) and the complete one is taken.
    resumed = train_network.main(_flags(data, tmp_path / "c", "--resume", str(tmp_path / "a"), steps=2))
    said = capsys.readouterr().out
    assert f"--resume: skipping {partial} ({named}" in said and "newest complete state, net-state" in said
    assert resumed.global_step == 2 and len(resumed.losses) == 1


_KILLED_SAVES = """
import os, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from library.safe_write import atomic_dir, atomic_file, shared_temp_dir

out = Path(sys.argv[1])
(out / "net-step00000002-state").mkdir(parents=True)
(out / "net-step00000002-state" / "optimizer.bin").write_bytes(b"o" * 500)
shared = shared_temp_dir(out / "net-step00000003-state")
shared.mkdir()
(shared / "optimizer.bin").write_bytes(b"p" * 700)
(out / "net-step00000001-state").mkdir()
(out / ".net-step00000001-state.old").mkdir()  # killed just before the old copy was dropped
(out / ".net-step00000001-state.old" / "optimizer.bin").write_bytes(b"q" * 480)
# killed between the two renames of a folder replacement: the old folder is aside, the new one not yet in place
os.replace(out / "net-step00000002-state", out / ".net-step00000002-state.old")
with atomic_file(out / "net.safetensors") as tmp, atomic_dir(out / "net-diffusers") as folder, \\
        atomic_file(out / "sample" / "net_000001_00_20240101000000.png") as png, \\
        atomic_file(out / "other.safetensors") as foreign:
    tmp.write_bytes(b"x" * 1000)
    (folder / "unet.bin").write_bytes(b"y" * 300)
    png.write_bytes(b"z" * 20)
    foreign.write_bytes(b"f" * 10)
    os._exit(9)  # as kill -9 would: no clean-up runs
"""


def test_a_run_removes_the_leftovers_of_its_own_killed_saves_and_says_how_much(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".notes.old").write_text("a user's file that only looks like ours")
    killed = subprocess.run([sys.executable, "-c", _KILLED_SAVES.format(root=str(ROOT)), str(out)], timeout=60)
    assert killed.returncode == 9
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert len(hidden) == 7 and len(list((out / "sample").glob(".*.tmp"))) == 1

    previous = signal.getsignal(signal.SIGTERM)
    train_network.main(_flags(data, out, "--seed", "1", steps=1))
    assert signal.getsignal(signal.SIGTERM) is previous  # the run's SIGTERM handler lived only while it trained
    said = capsys.readouterr().out
    assert f"removed 5 leftover(s) of interrupted saves in {out} (2.5 KB reclaimed)" in said  # 1000+300+700+480+20
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert len(left) == 2 and left[0] == ".notes.old" and left[1].startswith(".other.safetensors.")  # not ours
    assert (out / "net-step00000002-state" / "optimizer.bin").read_bytes() == b"o" * 500  # put back, not deleted
    assert not list((out / "sample").glob(".*"))


def test_an_unseeded_run_saves_the_seed_it_used_and_its_options_repeat_it_bit_for_bit(data, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import assert_same_tensors

    train_network.main(_flags(data, tmp_path / "a", steps=2))
    saved = (tmp_path / "a" / "net.config.toml").read_text()
    assert any(line.startswith("seed = ") for line in saved.splitlines())
    config = saved.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    (tmp_path / "rerun.toml").write_text(config)
    train_network.main(["--config_file", str(tmp_path / "rerun.toml")])
    # The weights, bit for bit (the metadata holds the save time, so the files' bytes differ there).
    assert_same_tensors(load_file(tmp_path / "a" / "net.safetensors"), load_file(tmp_path / "b" / "net.safetensors"))

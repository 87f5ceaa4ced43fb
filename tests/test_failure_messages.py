"""The common failures end with one line that says what to change: a diverging loss (nothing non-finite is saved)
and running out of memory (the messages docs/troubleshooting.md quotes)."""

from __future__ import annotations

import pytest

import train_network
from library.config.options import NETWORK
from library.data.demo import make_demo_dataset
from library.errors import UserError, exit_on_user_error
from library.methods.entry import start

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_loss_that_becomes_nan_stops_before_any_save(tmp_path, capsys):
    make_demo_dataset(tmp_path / "data", count=4, size=32, folder="2_sks shape")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        # SGD at 1e38 blows the weights up after one step: the second step's loss is NaN.
        train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
                            "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(out),
                            "--output_name", "n", "--max_train_steps", "4", "--save_every_n_steps", "1",
                            "--learning_rate", "1e38", "--optimizer_type", "SGD", "--network_dim", "4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "error: the loss became nan at step 2 (epoch 1), so training stopped without saving it" in err
    # step 1's file (still finite) was saved; nothing after it
    assert sorted(p.name for p in out.iterdir()) == ["n-step00000001.safetensors", "n.config.toml"]


@pytest.mark.parametrize("error, what", [("cuda", "out of GPU memory"), ("ram", "out of CPU memory (RAM)")])
def test_running_out_of_memory_is_one_line_with_what_to_change(tmp_path, capsys, error, what):
    import torch

    make_demo_dataset(tmp_path / "data", count=2, size=32)

    def run(config, plan):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB") if error == "cuda" \
            else MemoryError()

    main = exit_on_user_error(lambda argv: start(argv, NETWORK, "test", run))
    with pytest.raises(SystemExit) as exit_info:
        main(["--train_data_dir", str(tmp_path / "data"), "--caption_extension", ".txt"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {what}: try --gradient_checkpointing, --cache_latents")


def test_a_token_string_that_cannot_name_the_output_file_is_refused_before_the_run(tmp_path, capsys):
    from library.config.options import TI

    make_demo_dataset(tmp_path / "data", count=2, size=32)
    ran = []
    main = exit_on_user_error(lambda argv: start(argv, TI, "test", lambda config, plan: ran.append(config)))
    with pytest.raises(SystemExit) as exit_info:
        # sd-scripts names the embedding file after its token when --output_name is not given
        main(["--train_data_dir", str(tmp_path / "data"), "--caption_extension", ".txt",
              "--output_dir", str(tmp_path / "out"), "--token_string", "my/char"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not ran and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --token_string my/char (used as --output_name): is a file name, not a path")


@pytest.mark.parametrize("raised,line,code", [
    (lambda: UserError("no such file: a.safetensors"), "error: no such file: a.safetensors\n", 2),
    (lambda: KeyboardInterrupt(), "interrupted (Ctrl+C); files saved before are intact\n", 130),
])
def test_the_one_line_reaches_stderr_in_one_write(monkeypatch, raised, line, code):
    # Ranks under accelerate launch share stderr: a line written as text, then newline (print's two writes), ran into
    # the other rank's ("...'?)error: ...") in a CI run of test_launch. One write of a short line to a pipe is atomic.
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stderr", Recorder())

    def main():
        raise raised()

    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(main)()
    assert exit_info.value.code == code
    assert writes == [line]

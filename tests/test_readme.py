"""CI must run the test command the README gives, so the README's instructions stay true."""

import re

from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "train_network.py --config_file configs/demo_lora.toml" in commands[0]


def test_the_quick_start_trains_a_lora_with_samples_and_tensorboard_logs(tmp_path):
    """Run the README's quick-start command (less the install step, done for the suite already) as a newcomer
    would, from a folder holding the project's configs, and find what the README says it leaves behind."""
    import shutil
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```bash\n(.+?)\n```", readme)[0]
    steps = [s.strip() for s in first.split("&&")]
    assert steps[0] == "bash scripts/install.sh"
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    for step in steps[1:]:
        program, *args = step.split()
        assert program == "python"
        proc = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "output" / "demo"
    for path in re.findall(r"`(output/demo/[^`*]+)`", readme):  # every output the README points at exists
        assert (tmp_path / path).exists(), path
    assert (out / "demo_lora.safetensors").is_file()
    assert list((out / "sample").glob("*.png"))
    assert list((out / "logs").rglob("events.out.tfevents.*"))

"""CI must run the test command the README gives, so the README's instructions stay true."""

import re

from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "train_network.py --config_file configs/demo_lora.toml" in commands[0]

"""Run train_network.main in this process and save its adapter weights as rank<RANK>.safetensors (for the DDP test)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402

import train_network  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = train_network.main(sys.argv[2:])
    state = {k: v.detach().contiguous() for k, v in result.method.network.state_dict().items()}
    save_file(state, str(out / f"rank{os.environ.get('RANK', '0')}.safetensors"))

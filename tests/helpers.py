"""Test helpers: image-folder generator and exact tensor comparison."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image


def make_image_folder(root: Path, *, repeats: int = 10, class_tokens: str = "sks dog", count: int = 4,
                      seed: int = 0, caption_extension: str = ".txt", sizes=((64, 64), (96, 64), (64, 80))) -> Path:
    """A sd-scripts style `<repeats>_<class tokens>` folder of small random PNGs, each with a caption file."""
    rng = random.Random(seed)
    folder = Path(root) / f"{repeats}_{class_tokens}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        color = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (w, h), color)
        for _ in range(20):  # a few random rectangles so images are not flat colour
            x, y = rng.randrange(w), rng.randrange(h)
            image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(w, x + 8), min(h, y + 8)))
        image.save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}{caption_extension}").write_text(f"{class_tokens}, photo {i}, {rng.choice(['red', 'blue'])}")
    return folder


def assert_same_tensors(a: dict, b: dict) -> None:
    """Equal key sets, and every tensor equal in dtype, shape and value."""
    assert sorted(a) == sorted(b), f"keys differ: only left {sorted(a.keys() - b.keys())[:5]}, only right {sorted(b.keys() - a.keys())[:5]}"
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def tiny_lora_flags(data, out, *extra, steps: int, seed: int | None = None) -> list[str]:
    """A short LoRA run on tiny-sd1 (32 px, rank 4, no loader workers) writing `net*` files into `out`."""
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "32", "--output_dir", str(out), "--output_name", "net", "--max_train_steps", str(steps),
            "--learning_rate", "1e-3", "--network_dim", "4", "--max_data_loader_n_workers", "0",
            *(["--seed", str(seed)] if seed is not None else []), *extra]


# Flags for each adapter kind the trainers test (LoCon is LoRA with conv_dim): one table for SD and SDXL runs.
ADAPTER_FLAGS = {
    "lora": ["--network_module", "networks.lora"],
    "locon": ["--network_module", "networks.lora", "--network_args", "conv_dim=2", "conv_alpha=1"],
    "loha": ["--network_module", "networks.loha", "--network_args", "conv_dim=2"],
    "lokr": ["--network_module", "networks.lokr", "--network_args", "factor=4"],
}


def planted_low_rank_file(parts, path: Path, **network_args) -> dict[str, torch.Tensor]:
    """A copy of `parts` with a seeded rank-2 change added to every weight LoRA targets (`network_args`, e.g.
    conv_dim="1", widen the targets), saved as a single file at `path`; returns the changes by adapter name.
    What extract_lora_from_models.py must recover."""
    import copy

    from library.models.saving import save_single_file
    from networks import lora

    tuned = copy.deepcopy(parts)
    network = lora.create_network(1.0, 1, 1, None, tuned.network_text_encoder, tuned.unet, **network_args)
    generator = torch.Generator().manual_seed(0)
    changes = {}
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            weight = module.org_module.weight
            b = torch.randn(weight.shape[0], 2, generator=generator) * 0.1
            a = torch.randn(2, weight[0].numel(), generator=generator) * 0.1
            changes[module.lora_name] = (b @ a).reshape(weight.shape)
            weight += changes[module.lora_name]
    save_single_file(tuned, path)
    return changes

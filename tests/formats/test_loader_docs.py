"""docs/outputs.md sends each kind of file only to loaders that accept it (measured: compatibility-notes 9 and 10)."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "outputs.md"


def test_diffusers_load_lora_weights_is_offered_for_lora_and_locon_only():
    text = DOC.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| train_network.py"))
    diffusers_cell = row.rstrip(" |").rsplit("|", 1)[1]
    assert "load_lora_weights" in diffusers_cell
    assert "LoRA and LoCon only" in diffusers_cell and "LoHa and LoKr: not loadable in diffusers" in diffusers_cell
    assert "**LoHa / LoKr**" in text and "diffusers' `load_lora_weights` refuses them" in text


def test_hypernetwork_dropout_in_comfyui_is_documented():
    text = " ".join(DOC.read_text(encoding="utf-8").split())
    assert "ComfyUI runs hypernetwork layers in training mode" in text
    assert "AUTOMATIC1111 evaluates them (dropout off)" in text

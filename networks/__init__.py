"""Adapter networks (LoRA, LoCon, LoHa, LoKr) injected into UNet and text-encoder layers; lands with issue #4."""

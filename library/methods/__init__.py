"""Training methods: what is trained and exported (network, dreambooth, textual inversion, hypernetwork)."""

"""Typed options: one declaration per option, from which argparse (and later TOML loading) is generated."""

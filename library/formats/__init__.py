"""File formats as pure functions: metadata, key names, embedding and hypernetwork layouts."""

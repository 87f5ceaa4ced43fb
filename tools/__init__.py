"""Command-line tools: convert, and (later) merge, resize, extract, inspect, generate."""

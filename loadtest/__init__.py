"""Benchmarks: `python -m loadtest <name> [--json PATH]`; each prints its numbers and writes one
JSON object."""

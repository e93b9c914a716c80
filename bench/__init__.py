"""Benchmarks and evaluation: wire size, codec and kernel speed, answer quality (kvwire eval/diagnose)."""

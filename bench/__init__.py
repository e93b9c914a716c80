"""The tools layer: the `kvwire` CLI (main.py), benchmarks, evaluation (kvwire eval/diagnose), the demos
and the network lab. It may import every other layer; nothing outside bench/ imports it (tests/test_layers.py)."""

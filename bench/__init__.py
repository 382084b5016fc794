"""Benchmark: ucpflow against DeepSpeed's ds_to_universal on the same checkpoints and cores (`python -m bench`)."""

"""Benchmarks of fused-attention: `python -m benchmarks` (the main job) and `python -m benchmarks.profile`."""

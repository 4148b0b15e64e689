"""Benchmark helpers for TorchRecord (synthetic-but-realistic datasets, timing scripts)."""

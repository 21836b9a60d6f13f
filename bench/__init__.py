"""Benchmark suite: broker vs a minimal websockets baseline (see bench/README.md)."""

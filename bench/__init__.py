"""Kernel and model benchmarks."""

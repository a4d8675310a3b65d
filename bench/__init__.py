"""Benchmarks of the kernels and the models built on them: ``python -m bench`` (see bench/run.py),
``pytest bench/ --benchmark-only`` (pytest-benchmark) and ``bash bench/gpu_check.sh`` (the GPU session's
script). Method and results: bench/NOTES.md."""

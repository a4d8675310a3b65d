"""Models built on the kernels (see the models issue)."""

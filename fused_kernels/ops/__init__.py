"""The ops, one module (or package) each: kernels, launchers, custom ops and autograd, the PyTorch path and the
public functions. ``norms`` (LayerNorm, RMSNorm, residual-add + LayerNorm), ``softmax``, ``attention``."""

"""Which implementation an op runs: our Triton kernel, or the fastest PyTorch implementation of the op.

- "auto" (default): the Triton kernel on CUDA tensors, and on CPU tensors when the Triton
  interpreter is on (``TRITON_INTERPRET=1``); the PyTorch implementation (each op's PyTorch path)
  otherwise, i.e. on CPU tensors in normal use.
- "triton": always the Triton kernel; a CPU tensor without the interpreter is an error, never a
  silent fallback.
- "torch": always the PyTorch implementation: torch's fused ops (flash attention, softmax, native
  LayerNorm/RMSNorm) with our semantics on top. The float64-capable references in ``fused_kernels.reference``
  are not a backend: they are what the tests compare every implementation with.

``choose`` is the one place where that decision is taken. A case for which torch's own fused kernel
is faster than ours on a GPU can be routed to the PyTorch implementation there too (``torch_faster``);
no caller asks for that yet: on CUDA, "auto" runs our kernels.

The default comes from the environment variable ``FUSED_KERNELS_BACKEND``; ``use_backend`` overrides it
for a block of code. The choice is a plain module global so that ``torch.compile`` can read it
(and guard on it) while tracing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this package is imported:
# what matters is its value at that moment, not later.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _validate(os.environ.get("FUSED_KERNELS_BACKEND", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The backend currently in force: "auto", "triton" or "torch"."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with backend ``name`` ("auto", "triton" or "torch").

    >>> with fused_kernels.use_backend("torch"):
    ...     y = fused_kernels.layer_norm(x, (x.shape[-1],))   # torch's native LayerNorm
    """
    global _backend
    previous, _backend = _backend, _validate(name)
    try:
        yield
    finally:
        _backend = previous


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose(x: torch.Tensor, op: str, *, torch_faster: bool = False) -> str:
    """The implementation ``op`` runs on tensor ``x``: "triton" (our kernel) or "torch" (the op's PyTorch path).

    ``torch_faster``: the caller knows that torch's fused kernel beats ours for this case on a GPU;
    under "auto" such a case then runs the PyTorch implementation on CUDA as well."""
    if _backend == "torch":
        return "torch"
    kernel_device = x.is_cuda or (INTERPRET and x.device.type == "cpu")
    if _backend == "auto":
        return "triton" if kernel_device and not torch_faster and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"{op}: backend 'triton' was requested but triton is not installed")
    if not kernel_device:
        raise RuntimeError(
            f"{op}: backend 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before importing "
            f"fused_kernels to run the kernel on the CPU; got a tensor on {x.device}"
        )
    return "triton"


def unavailable(device: str, backend: str | None = None) -> str | None:
    """Why ``backend`` (default: the one in force) cannot run the ops on ``device`` ("cpu" or "cuda"), in one
    sentence; None when it can. What ``choose`` would raise at the first op, asked before any work starts."""
    backend = _validate(backend or _backend)
    if backend != "triton":
        return None
    if not triton_available():
        return "the Triton kernels need triton, which is not installed"
    if device == "cpu" and not INTERPRET:
        return ("the Triton kernels need a CUDA device; on the CPU use backend 'auto' or 'torch' (the PyTorch "
                "path). TRITON_INTERPRET=1 would run the kernels in Triton's interpreter, which is for tests: "
                "far too slow to train")
    return None


def use_triton(x: torch.Tensor, op: str) -> bool:
    """Whether ``op`` on tensor ``x`` runs its Triton kernel (True) or its PyTorch implementation (False)."""
    return choose(x, op) == "triton"


def describe() -> str:
    """One line naming the backend and what it resolves to on the available device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(0, device=device)
    try:
        impl = "triton kernels" + (" (interpreter)" if device == "cpu" else "") if use_triton(probe, "") \
            else "PyTorch ops (each op's PyTorch path)"
    except RuntimeError as err:
        impl = f"unavailable: {err}"
    return f"backend={_backend} device={device} -> {impl}"

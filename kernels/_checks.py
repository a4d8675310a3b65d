"""Argument checks shared by every op: each failure names the argument, what it got and what it needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, t: object, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_like(name: str, t: torch.Tensor | None, ref: torch.Tensor, op: str, *,
               shape: Sequence[int] | None = None, dtypes: Sequence[torch.dtype] | None = None) -> None:
    """``t`` (if given) must be a float tensor on ``ref``'s device with ``shape`` and one of ``dtypes``

    (defaults: ``ref``'s shape and dtype)."""
    if t is None:
        return
    check_float_tensor(name, t, op)
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {ref.device}")
    want_shape = tuple(ref.shape if shape is None else shape)
    if tuple(t.shape) != want_shape:
        raise ValueError(f"{op}: {name} must have shape {want_shape}, got {tuple(t.shape)}")
    want_dtypes = (ref.dtype,) if dtypes is None else tuple(dtypes)
    if t.dtype not in want_dtypes:
        names = " or ".join(str(d) for d in want_dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}, got {t.dtype}")


def check_probability(name: str, p: float, op: str) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: {name} must be a float in [0, 1), got {p!r}")
    return float(p)


def normalize_dim(dim: int, ndim: int, op: str) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise ValueError(f"{op}: dim {dim} is out of range for a tensor of {ndim} dimensions")
    return dim % max(ndim, 1)


def param_dtypes(x: torch.Tensor) -> tuple[torch.dtype, ...]:
    """Weights and biases may be in the input's dtype or in float32 (mixed precision)."""
    return (x.dtype,) if x.dtype in (torch.float32, torch.float64) else (x.dtype, torch.float32)


def dropout_seed() -> int:
    """A kernel RNG seed drawn from torch's default CPU generator, so ``torch.manual_seed`` fixes it."""
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (no more dims, each dim 1 or equal):
    ``torch.broadcast_shapes(shape, target) == target`` without its cost (tens of microseconds a call)."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))

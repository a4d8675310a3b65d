"""Argument checks shared by every op: each failure names the argument, what it got and what it needs.

The exception types: our messages name the argument, and each error is also an instance of the type torch
raises for the same input, so code written for torch (``except RuntimeError``, ``assertRaises(RuntimeError)``)
catches ours too:

- ``ArgumentValueError(ValueError, RuntimeError)``: a wrong shape, length, range or device (torch: RuntimeError);
- ``ArgumentTypeError(TypeError, RuntimeError)``: a mismatched dtype (torch: RuntimeError);
- ``DtypeNotImplementedError(TypeError, NotImplementedError)``: an input of a dtype the op does not compute in,
  such as an integer tensor (torch: NotImplementedError, a RuntimeError, "... not implemented for 'Long'");
  an argument that is not a tensor at all stays a plain ``TypeError``, as torch's argument parser raises;
- ``DimIndexError(ValueError, IndexError)``: a dim out of range (torch: IndexError);
- ``ShapeAssertionError(ValueError, AssertionError)``: the checks ``torch.nn.MultiheadAttention`` makes with
  ``assert``-style AssertionErrors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentValueError(ValueError, RuntimeError):
    """A bad argument value (shape, length, range, device): a ValueError, and the RuntimeError torch raises."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A bad or mismatched dtype: a TypeError, and the RuntimeError torch raises."""


class DtypeNotImplementedError(TypeError, NotImplementedError):
    """An input dtype the op does not compute in: a TypeError, and the NotImplementedError torch raises."""


class DimIndexError(ValueError, IndexError):
    """A dim out of range: a ValueError, and the IndexError torch raises."""


class ShapeAssertionError(ValueError, AssertionError):
    """A shape check of ``torch.nn.MultiheadAttention``: a ValueError, and the AssertionError torch raises."""


def check_tensor_type(name: str, t: torch.Tensor, op: str) -> None:
    """Refuse a tensor subclass whose ``__torch_function__`` we do not know (it may redefine what its values
    mean, as ``torch.nn.attention.bias.CausalBias`` does, whose storage holds nothing meaningful) instead of
    reading its storage. Plain tensors, ``nn.Parameter``/``nn.Buffer`` and subclasses that leave torch
    functions alone (tracing tensors such as FakeTensor and FunctionalTensor disable them) pass."""
    cls = type(t)
    if cls is torch.Tensor or cls is torch.nn.Parameter:
        return
    tf = getattr(cls.__torch_function__, "__func__", cls.__torch_function__)
    if tf is torch._C._disabled_torch_function_impl or tf is torch.Tensor.__torch_function__.__func__:
        return
    raise TypeError(f"{op}: {name} is a {cls.__module__}.{cls.__qualname__}, a tensor subclass that overrides "
                    f"torch functions; {op} does not know what its values mean (pass a plain tensor)")


def check_float_tensor(name: str, t: object, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise DtypeNotImplementedError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_like(name: str, t: torch.Tensor | None, ref: torch.Tensor, op: str, *,
               shape: Sequence[int] | None = None, dtypes: Sequence[torch.dtype] | None = None) -> None:
    """``t`` (if given) must be a float tensor on ``ref``'s device with ``shape`` and one of ``dtypes``

    (defaults: ``ref``'s shape and dtype)."""
    if t is None:
        return
    check_float_tensor(name, t, op)
    if t.device != ref.device:
        raise ArgumentValueError(f"{op}: {name} is on {t.device} but the input is on {ref.device}")
    want_shape = tuple(ref.shape if shape is None else shape)
    if tuple(t.shape) != want_shape:
        raise ArgumentValueError(f"{op}: {name} must have shape {want_shape}, got {tuple(t.shape)}")
    want_dtypes = (ref.dtype,) if dtypes is None else tuple(dtypes)
    if t.dtype not in want_dtypes:
        names = " or ".join(str(d) for d in want_dtypes)
        raise ArgumentTypeError(f"{op}: {name} must have dtype {names}, got {t.dtype}")


def check_probability(name: str, p: float, op: str) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ArgumentValueError(f"{op}: {name} must be a float in [0, 1), got {p!r}")
    return float(p)


def normalize_dim(dim: int, ndim: int, op: str) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise DimIndexError(f"{op}: dim {dim} is out of range for a tensor of {ndim} dimensions (expected to be in "
                            f"range of [{-max(ndim, 1)}, {max(ndim, 1) - 1}])")
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

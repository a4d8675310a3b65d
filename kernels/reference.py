"""Pure-PyTorch references: one per op, with the op's signature and semantics.

They are what the "torch" backend runs, what CPU tensors run without the Triton interpreter, and
what the tests compare the kernels with (called on float64 inputs for a high-precision reference).
Arithmetic happens in float32 (float64 for float64 inputs), results come back in the input's dtype,
as the kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _up(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def layer_norm_ref(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    ct = _compute_dtype(input)
    out = F.layer_norm(input.to(ct), tuple(normalized_shape), _up(weight, ct), _up(bias, ct), eps)
    return out.to(input.dtype)


def rms_norm_ref(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
                 eps: float | None = None) -> torch.Tensor:
    ct = _compute_dtype(input)
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.to(ct)
    out = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(ct)
    return out.to(input.dtype)


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, eps: float = 1e-5,
                       dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_out = residual + dropout(x)``; ``out = layer_norm(residual_out)`` over the last dim."""
    residual_out = F.dropout(x, dropout_p) if dropout_p > 0 else x
    if residual is not None:
        residual_out = residual + residual_out
    out = layer_norm_ref(residual_out, (x.shape[-1],), weight, bias, eps)
    return out, residual_out


def causal_mask(l: int, s: int, device: torch.device | str | None = None, *,
                bottom_right: bool = False) -> torch.Tensor:
    """Bool ``(l, s)`` mask, True where query i may attend key j: ``j <= i`` (top-left aligned, as
    torch's ``is_causal``) or ``j <= i + s - l`` (bottom-right aligned, as a KV cache needs)."""
    i = torch.arange(l, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return j <= i + (s - l if bottom_right else 0)


def softmax_ref(input: torch.Tensor, dim: int = -1, mask: torch.Tensor | None = None, scale: float = 1.0,
                is_causal: bool = False) -> torch.Tensor:
    """Softmax of ``scale * input (+ mask)`` along ``dim``; a bool ``mask`` keeps True entries.

    Entries that are masked out (or -inf) get probability 0; a row with nothing left gives 0."""
    ct = _compute_dtype(input)
    z = input.to(ct) * scale
    if is_causal:
        z = z.masked_fill(~causal_mask(z.shape[-2], z.shape[-1], z.device), float("-inf"))
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(ct)
    zmax = z.amax(dim, keepdim=True)
    zmax = torch.where(zmax == float("-inf"), torch.zeros_like(zmax), zmax)
    e = torch.exp(z - zmax)
    total = e.sum(dim, keepdim=True)
    out = torch.where(total == 0, torch.zeros_like(e), e / total)
    return out.to(input.dtype)

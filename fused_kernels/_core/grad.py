"""Gradients beyond what the fused kernels' backward computes (second derivatives), shared by every op; the
attention-specific ones (the float-mask gradient, the differentiable attention backward) are in
``ops/attention/grad.py``. Both paths (the Triton kernels' custom ops and each op's PyTorch path) call these.

- **Double backward.** When autograd builds a graph of the backward (``torch.autograd.grad(...,
  create_graph=True)``, ``.backward(create_graph=True)``: grad mode is on inside a backward only then), an op's
  backward is computed with differentiable PyTorch ops from its reference formula (``torch.autograd.grad`` of the
  formula re-run on the saved inputs) instead of the kernel backward, so every higher derivative exists. Speed
  matters less there: attention materializes the (L, S) scores of that backward. Under ``torch.compile`` the
  backward is traced without grad mode and keeps the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def create_graph() -> bool:
    """Whether the backward being run must itself be differentiable (``create_graph=True``)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def grads(outputs: Sequence[torch.Tensor | None], cotangents: Sequence[torch.Tensor | None],
           inputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``torch.autograd.grad`` with a graph, skipping absent outputs/cotangents and inputs (None for those)."""
    pairs = [(o, c.to(o.dtype)) for o, c in zip(outputs, cotangents) if o is not None and c is not None]
    wanted = [t for t in inputs if t is not None]
    if not pairs or not wanted:
        return [None] * len(inputs)
    found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs], create_graph=True,
                                     allow_unused=True))
    return [None if t is None else next(found) for t in inputs]


# ----------------------------------------------------------------------------- norms and softmax


def norm_backward(prenorm: torch.Tensor, weight: torch.Tensor | None, dy: torch.Tensor, eps: float,
                  is_rms_norm: bool, need_input: bool, need_weight: bool) -> tuple[torch.Tensor | None, ...]:
    """Differentiable ``(d prenorm, d weight)`` of a LayerNorm / RMSNorm over the last dim of ``prenorm``
    (no bias term: its gradient is ``dy`` summed over the rows), statistics in float32 (float64 for float64)."""
    ct = compute_dtype(prenorm)
    x = prenorm.to(ct)
    w = None if weight is None else weight.to(ct)
    if is_rms_norm:
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        out = out if w is None else out * w
    else:
        out = F.layer_norm(x, (x.shape[-1],), w, None, eps)
    dx, dw = grads([out], [dy], [prenorm if need_input else None, weight if need_weight and w is not None else None])
    dx = None if dx is None else dx.to(prenorm.dtype)
    dw = None if dw is None else dw.to(weight.dtype)
    return dx, dw


def softmax_input_grad(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    """Differentiable gradient of the softmax input ``z`` from the output ``y = softmax(z)``: ``y * (dy - <dy, y>)``
    (0 wherever ``y`` is 0: masked entries, rows with nothing left)."""
    ct = compute_dtype(y)
    yc, dyc = y.to(ct), dy.to(ct)
    return (yc * (dyc - (dyc * yc).sum(dim, keepdim=True))).to(y.dtype)


def sum_to(t: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``t`` summed over the dims that a tensor of ``shape`` is broadcast along to ``t``'s shape."""
    return t.sum_to_size(tuple(shape)).to(dtype) if tuple(t.shape) != tuple(shape) else t.to(dtype)


def mask_requires_grad(mask: object) -> bool:
    """A float mask whose gradient autograd will ask for."""
    return (isinstance(mask, torch.Tensor) and mask.requires_grad and mask.is_floating_point()
            and torch.is_grad_enabled())

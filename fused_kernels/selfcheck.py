"""The cases of ``python -m fused_kernels``: each op on small awkward float32 shapes, run through its Triton
kernel and compared (output and every gradient) with the float64 reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import reference as ref
from ._core.backend import use_backend
from .ops.attention import attention, scaled_dot_product_attention
from .ops.norms import add_layer_norm, layer_norm, rms_norm
from .ops.softmax import softmax

# A case builds (kernel function, reference function, float32 inputs) from a generator and a device.
Case = tuple[str, Callable[[torch.Generator, str], tuple[Callable, Callable, list]]]

TOLERANCE = 1e-4  # float32 kernels vs float64: relative to the reference's scale


def _randn(gen: torch.Generator, device: str, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device)


def _ln(gen, device):
    x, w, b = _randn(gen, device, 3, 37, 129), _randn(gen, device, 129), _randn(gen, device, 129)
    return (lambda *a: layer_norm(a[0], (129,), a[1], a[2]),
            lambda *a: ref.layer_norm_ref(a[0], (129,), a[1], a[2]), [x, w, b])


def _ln_long(gen, device):
    x, w, b = _randn(gen, device, 2, 70000), _randn(gen, device, 70000), _randn(gen, device, 70000)
    return (lambda *a: layer_norm(a[0], 70000, a[1], a[2]),
            lambda *a: ref.layer_norm_ref(a[0], (70000,), a[1], a[2]), [x, w, b])


def _rms(gen, device):
    x, w = _randn(gen, device, 5, 1023), _randn(gen, device, 1023)
    return (lambda *a: rms_norm(a[0], (1023,), a[1]), lambda *a: ref.rms_norm_ref(a[0], (1023,), a[1]), [x, w])


def _add_ln(gen, device):
    x, r = _randn(gen, device, 4, 9, 96), _randn(gen, device, 4, 9, 96)
    w, b = _randn(gen, device, 96), _randn(gen, device, 96)
    return (lambda *a: add_layer_norm(*a), lambda *a: ref.add_layer_norm_ref(*a), [x, r, w, b])


def _softmax_mask(gen, device):
    x = _randn(gen, device, 2, 3, 17, 200)
    keep = (torch.rand(2, 1, 17, 200, generator=gen) > 0.3).to(device)
    keep[:, :, 0] = False  # fully masked rows
    return (lambda a: softmax(a, mask=keep, scale=0.125), lambda a: ref.softmax_ref(a, mask=keep, scale=0.125), [x])


def _softmax_causal(gen, device):
    x = _randn(gen, device, 3, 33, 33)
    return (lambda a: softmax(a, is_causal=True), lambda a: ref.softmax_ref(a, is_causal=True), [x])


def _softmax_long(gen, device):
    x, bias = _randn(gen, device, 3, 70000), _randn(gen, device, 70000)
    return (lambda a: softmax(a, mask=bias), lambda a: ref.softmax_ref(a, mask=bias), [x])


def _attn_gqa_mask(gen, device):
    q, k, v = _randn(gen, device, 2, 4, 37, 40), _randn(gen, device, 2, 2, 53, 40), _randn(gen, device, 2, 2, 53, 24)
    keep = (torch.rand(2, 1, 37, 53, generator=gen) > 0.3).to(device)
    keep[:, :, 3] = False  # fully masked rows
    kw = dict(causal=True, attn_mask=keep, seqlens_k=torch.tensor([53, 30], device=device))
    return (lambda *a: attention(*a, **kw), lambda *a: ref.attention_ref(*a, **kw), [q, k, v])


def _attn_decode(gen, device):
    q, k, v = _randn(gen, device, 2, 4, 1, 64), _randn(gen, device, 2, 1, 300, 64), _randn(gen, device, 2, 1, 300, 64)
    return (lambda *a: attention(*a, causal=True, return_lse=True),
            lambda *a: ref.attention_ref(*a, causal=True, return_lse=True), [q, k, v])


def _sdpa_causal(gen, device):
    q, k, v = _randn(gen, device, 3, 45, 72), _randn(gen, device, 3, 61, 72), _randn(gen, device, 3, 61, 72)
    return (lambda *a: scaled_dot_product_attention(*a, is_causal=True),
            lambda *a: ref.scaled_dot_product_attention_ref(*a, is_causal=True), [q, k, v])


CASES: list[Case] = [
    ("layer_norm (3, 37, 129)", _ln),
    ("layer_norm multi-pass (2, 70000)", _ln_long),
    ("rms_norm (5, 1023)", _rms),
    ("add_layer_norm (4, 9, 96)", _add_ln),
    ("softmax bool mask, fully masked rows", _softmax_mask),
    ("softmax is_causal (3, 33, 33)", _softmax_causal),
    ("softmax float mask multi-pass (3, 70000)", _softmax_long),
    ("attention GQA+causal+mask+seqlens (2,4,37,40)", _attn_gqa_mask),
    ("attention decode + lse (2, 4, 1, 300, 64)", _attn_decode),
    ("sdpa is_causal top-left (3, 45, 61, 72)", _sdpa_causal),
]


def _outputs(y) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (tuple, list)) else [y]


def run_case(case: Case, device: str) -> tuple[float, float]:
    """Max error of outputs and gradients relative to the reference's scale, and the tolerance."""
    gen = torch.Generator().manual_seed(0)
    fn, ref_fn, inputs = case[1](gen, device)
    inputs = [t.requires_grad_() for t in inputs]
    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in inputs]
    with use_backend("triton"):
        outs = _outputs(fn(*inputs))
    with use_backend("torch"):
        ref_outs = _outputs(ref_fn(*ref_inputs))
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref_outs]
    grads = torch.autograd.grad(outs, inputs, [c.to(device, o.dtype) for c, o in zip(cotangents, outs)])
    ref_grads = torch.autograd.grad(ref_outs, ref_inputs, cotangents)
    err = 0.0
    for got, want in zip([*outs, *grads], [*ref_outs, *ref_grads]):
        scale = want.abs().max().item() if want.numel() else 0.0
        diff = (got.detach().cpu().double() - want).abs().max().item() if want.numel() else 0.0
        err = max(err, diff / max(scale, 1.0))
    return err, TOLERANCE

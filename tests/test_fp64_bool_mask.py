"""float64 attention with a bool mask on triton releases whose compiler fails it (before 3.9: the fp64 MMA
lowering asserts on the kernels that load the uint8 mask): the launchers hand the kernels the equivalent float
0 / -inf mask instead (``ops.attention.launch.FP64_BOOL_MASK_AS_FLOAT``). Here that route is forced on whatever
triton runs the tests, and every float64 path that takes a mask (dense forward and backward, flash-decoding, the
variants) matches the float64 reference, fully masked rows included."""

from __future__ import annotations

import pytest
import torch
import triton
from test_attention import _qkv, check_attention

import fused_kernels
from fused_kernels._core import backend as _backend
from fused_kernels._core.launch import intercept
from fused_kernels.ops.attention import launch as at
from fused_kernels.ops.attention.config import MASK_BOOL, MASK_FLOAT

pytestmark = pytest.mark.usefixtures("triton_backend")
TOL = dict(atol=1e-10, rtol=1e-10)


def test_route_decided_by_triton_version():
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    assert at.FP64_BOOL_MASK_AS_FLOAT == ((major, minor) < (3, 9))


@pytest.fixture(params=[True, False], ids=["as-float", "as-bool"])
def route(request, monkeypatch):
    """The route forced on or off; yields the mask kinds the mask-taking kernels were launched with."""
    if not request.param and at.FP64_BOOL_MASK_AS_FLOAT and not _backend.INTERPRET:
        pytest.skip(f"triton {triton.__version__} cannot compile the float64 kernels that load a bool mask")
    monkeypatch.setattr(at, "FP64_BOOL_MASK_AS_FLOAT", request.param)
    kinds: list[int] = []

    def record(call, run):
        if call.kwargs.get("MASK_KIND"):
            kinds.append(call.kwargs["MASK_KIND"])
        run(call)

    with intercept(record):
        yield request.param, kinds
    assert kinds and set(kinds) == {MASK_FLOAT if request.param else MASK_BOOL}


@pytest.mark.parametrize("causal", [False, True])
def test_dense_forward_backward(route, causal, device):
    b, h, hkv, l, s = 2, 4, 2, 37, 45
    q, k, v = _qkv(b, h, hkv, l, s, 16, dtype=torch.float64, device=device)
    keep = torch.rand(b, 1, l, s, generator=torch.Generator().manual_seed(0)) > 0.4
    keep[:, :, :3] = False                                   # fully masked rows: output 0, gradient 0
    out = check_attention(q, k, v, causal=causal, attn_mask=keep.to(device),
                          seqlens_k=torch.tensor([45, 20], device=device), **TOL)[0]
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))


def test_broadcast_mask_and_decode(route, device):
    """A (S,) key mask broadcast to (B, H, L, S) (stride 0 everywhere but S) on the flash-decoding path."""
    q, k, v = _qkv(2, 4, 1, 1, 300, 16, dtype=torch.float64, device=device)
    keep = torch.arange(300, device=device) % 3 != 0
    check_attention(q, k, v, causal=True, attn_mask=keep, **TOL)


def test_variants(route, device):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 40, 40, 16, dtype=torch.float64, device=device))
    keep = (torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(1)) > 0.3).to(device)
    out = fused_kernels.attention(q, k, v, attn_mask=keep, window=(5, 2), softcap=3.0)
    want = fused_kernels.reference.attention_ref(q, k, v, attn_mask=keep, window=(5, 2), softcap=3.0)
    torch.testing.assert_close(out, want, **TOL)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(g, w, **TOL)

"""The attention kernels with the configurations shipped for real GPUs, run through the interpreter.

Under the interpreter the launchers normally pick small test tiles and the pointer path. Here the
architecture the launchers see is forced to sm_80 or sm_90 (``force_arch``), so the kernels run exactly the
configurations a GPU gets: 128-key tiles, mask-free steady-state loops (full / diagonal / tail blocks),
``EVEN_D`` head dims, and on sm_90 the TMA tensor-descriptor loads (zero-filled past S and D), including
keys past ``seqlens_k`` that hold NaN. Each case is compared with the float64 reference (forward and
every gradient, the 2x rule for half precision)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from test_attention import FP32_TOL, _qkv, check_attention, check_per_row

import fused_kernels
from fused_kernels import reference as ref
from fused_kernels._core.launch import force_arch, intercept
from fused_kernels.ops.attention import launch as attn_mod

pytestmark = pytest.mark.usefixtures("triton_backend")


@pytest.fixture(params=[80, 90], ids=["sm80", "sm90"])
def arch(request):
    """The launchers see compute capability ``arch``; returns it with the list of (kernel name, TMA flag) of
    every attention launch."""
    launches = []

    def record(call, run):
        if "TMA" in call.kwargs:
            launches.append((call.name, call.kwargs["TMA"]))
        run(call)

    with force_arch(request.param), intercept(record):
        yield request.param, launches


def _used_tma(launches) -> bool:
    return any(tma for _, tma in launches)


@pytest.mark.parametrize("l, s", [(1, 1), (97, 300), (300, 97), (257, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(arch, l, s, causal, device):
    q, k, v = _qkv(1, 2, 1, l, s, 64, dtype=torch.float16, device=device)
    check_attention(q, k, v, causal=causal)
    assert _used_tma(arch[1]) == (arch[0] == 90)


@pytest.mark.parametrize("d, dv", [(40, 40), (80, 72), (128, 128), (96, 128), (256, 256)])
def test_head_dims(arch, d, dv, device):
    q, k, v = _qkv(1, 2, 2, 130, 200, d, dv, dtype=torch.float16, device=device)
    check_attention(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(arch, dtype, device):
    q, k, v = _qkv(1, 2, 1, 150, 140, 64, dtype=dtype, device=device)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else FP32_TOL
    check_attention(q, k, v, causal=True, **tol)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_gqa(arch, kind, device):
    b, h, hkv, l, s = 2, 4, 1, 140, 260
    q, k, v = _qkv(b, h, hkv, l, s, 64, dtype=torch.float16, device=device)
    gen = torch.Generator().manual_seed(3)
    if kind == "bool":
        mask = (torch.rand(b, 1, 1, s, generator=gen) > 0.3).to(device)
    else:
        mask = torch.randn(1, h, l, s, generator=gen).to(device, torch.float16)
    check_attention(q, k, v, causal=True, attn_mask=mask)


def test_seqlens_with_nan_tail(arch, device):
    """Keys past seqlens_k hold NaN (an uninitialized cache): TMA loads them, the kernels must not let
    them reach the output or any gradient; the keys' own gradients are 0."""
    b, h, l, s = 3, 2, 40, 300
    q, k, v = _qkv(b, h, 1, l, s, 64, dtype=torch.float16, device=device)
    seqlens = torch.tensor([300, 130, 7], dtype=torch.int32, device=device)
    clean = check_attention(q, k, v, causal=True, seqlens_k=seqlens)     # against the reference
    for i, n in enumerate(seqlens.tolist()):
        k[i, :, n:], v[i, :, n:] = float("nan"), float("nan")
    qd, kd, vd = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fused_kernels.attention(qd, kd, vd, causal=True, seqlens_k=seqlens)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    dirty = [out, *torch.autograd.grad(out, (qd, kd, vd), dout)]
    for name, a, c in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(a, c), name
    dk = dirty[2]
    assert torch.equal(dk[1, :, 130:], torch.zeros_like(dk[1, :, 130:]))


@pytest.mark.parametrize("l", [3, 130])
def test_causal_seqlens_per_row(arch, l, device):
    """Causal with seqlens_k at the shipped tiles (decode split for L = 3, the 128-row tiles, TMA on sm_90):
    each row's diagonal ends at its own valid keys, in the forward, dK/dV and dQ kernels."""
    q, k, v = _qkv(3, 2, 1, l, 300, 64, dtype=torch.float16, device=device)
    check_per_row(q, k, v, [300, 131, 7])


def test_fully_masked_rows_and_lse(arch, device):
    b, h, l, s = 1, 2, 160, 140
    q, k, v = (t.requires_grad_() for t in _qkv(b, h, h, l, s, 64, dtype=torch.float16, device=device))
    out, lse = fused_kernels.attention(q, k, v, causal=True, return_lse=True)     # rows i < 20 see no key
    dq, dk, dv = torch.autograd.grad(out.float().sum() + lse.masked_fill(lse.isinf(), 0).sum(), (q, k, v))
    assert bool(lse[:, :, :20].isinf().all()) and not lse[:, :, 20:].isinf().any()
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.equal(dq[:, :, :20], torch.zeros_like(dq[:, :, :20]))
    for t in (out, dq, dk, dv):
        assert not t.isnan().any()
    q64, k64 = q.detach().double(), k.detach().double()
    want = torch.logsumexp((q64 @ k64.transpose(-1, -2) * 64 ** -0.5).masked_fill(
        ~ref.causal_mask(l, s, device, bottom_right=True), float("-inf")), -1)
    assert_close(lse, want, atol=1e-4, rtol=1e-4)


def test_strided_views_tma_and_fallback(arch, device):
    """Views of a fused (B, L, 3, H, D) projection take TMA (16-byte aligned strides); a view whose base
    is not 16-byte aligned falls back to the pointer path; both match the reference."""
    b, l, h, d = 2, 150, 2, 64
    qkv = torch.randn(b, l, 3, h, d, dtype=torch.float16, device=device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check_attention(q, k, v, causal=True)
    assert _used_tma(arch[1]) == (arch[0] == 90)
    flat = torch.randn(b * h * l * d + 1, dtype=torch.float16, device=device)
    odd = flat[1:].view(b, h, l, d)                                      # base 2 bytes past an aligned one
    assert attn_mod.tma_desc(odd, 128, 64) is None
    arch[1].clear()
    check_attention(q, odd, v)                  # k cannot be a descriptor: the forward takes the pointer path
    forward = [tma for name, tma in arch[1] if name == "_attn_fwd_kernel"]
    assert forward and not any(forward)


def test_dropout_consistent(arch, device):
    """Dropout configurations (no TMA): forward and backward draw the same mask (gradcheck-style check
    of the backward against autograd of the reference with that mask)."""
    b, h, l, s, p = 1, 2, 130, 140, 0.3
    q, k, v = _qkv(b, h, 1, l, s, 32, dtype=torch.float32, device=device)
    eye = torch.eye(s, dtype=torch.float32, device=device)[None, None].expand(b, 1, s, s)
    torch.manual_seed(5)
    keep = fused_kernels.attention(q, k, eye, dropout_p=p) != 0
    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(5)
    out = fused_kernels.attention(q1, k1, v1, dropout_p=p)
    dout = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q1, k1, v1), dout)]
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    probs = torch.softmax(q2 @ k2.repeat_interleave(h, 1).transpose(-1, -2) * 32 ** -0.5, -1)
    want = (probs * keep / (1 - p)) @ v2.repeat_interleave(h, 1)
    exp = [want, *torch.autograd.grad(want, (q2, k2, v2), dout.double())]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, exp):
        assert_close(g, w, name=name, atol=1e-5, rtol=1e-5)


def test_decode(arch, device):
    q, k, v = _qkv(2, 8, 2, 1, 600, 128, dtype=torch.float16, device=device)
    check_attention(q, k, v, causal=True, seqlens_k=torch.tensor([600, 311], device=device))

"""Fused attention (fused_kernels.attention, fused_kernels.scaled_dot_product_attention): the interpreted Triton
kernels against float64 references, forward and every gradient (the 2x rule for float16, tight
tolerances for float32/float64), masks, GQA, causal alignments, seqlens_k, dropout, decoding, strides,
bad inputs and torch.compile. GPU-only cases (bf16 at realistic sizes, determinism, long sequences) are
marked ``gpu``."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, bounds_checked, nan_padded

import fused_kernels
from fused_kernels import reference as ref
from fused_kernels.ops.attention.config import decode_splits
from fused_kernels.ops.attention.launch import attention_fwd

KERNELS = ("_attn_fwd_kernel", "_attn_fwd_split_kernel", "_attn_combine_kernel", "_attn_bwd_preprocess_kernel",
           "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")

pytestmark = pytest.mark.usefixtures("op_backend")   # each test on the kernels and on the PyTorch path


# ----------------------------------------------------------------------------- helpers


def _rand(*shape, dtype=torch.float32, device="cpu", gen=None, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def _qkv(b, h, hkv, l, s, d, dv=None, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    return (_rand(b, h, l, d, dtype=dtype, device=device, gen=gen),
            _rand(b, hkv, s, d, dtype=dtype, device=device, gen=gen),
            _rand(b, hkv, s, dv, dtype=dtype, device=device, gen=gen))


def _dense_mask(b, h, l, s, device, causal=False, attn_mask=None, seqlens_k=None, bottom_right=True):
    """(keep bool (B, H, L, S) or None, bias float or None) of attention()'s arguments."""
    keep = torch.ones(b, h, l, s, dtype=torch.bool, device=device)
    if causal and bottom_right and seqlens_k is not None:    # per row: query i at seqlens_k[b] - L + i
        last = torch.arange(l, device=device)[:, None] + seqlens_k.to(device).long().view(-1, 1, 1, 1) - l
        keep = keep & (torch.arange(s, device=device) <= last)
    elif causal:
        keep = keep & ref.causal_mask(l, s, device, bottom_right=bottom_right)
    if seqlens_k is not None:
        keep = keep & (torch.arange(s, device=device) < seqlens_k.to(device)[:, None, None, None])
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            bias = attn_mask
    return keep, bias


def _naive(q, k, v, scale, keep, bias):
    """Plain PyTorch attention in q's dtype (the 2x-rule baseline)."""
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    return ref._attention_core(q, k, v, scale, keep, None if bias is None else bias.to(q.dtype), 0.0)[0]


def _grads(out, inputs, dout):
    return list(torch.autograd.grad(out, inputs, dout))


def check_attention(q, k, v, *, causal=False, attn_mask=None, seqlens_k=None, scale=None, dout=None,
                    atol=None, rtol=None):
    """attention() forward and dq/dk/dv against the float64 reference (2x rule for half precision)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kw = dict(causal=causal, attn_mask=attn_mask, seqlens_k=seqlens_k, scale=scale)
    out = fused_kernels.attention(q, k, v, **kw)
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    got = [out, *_grads(out, (q, k, v), dout)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask64 = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    with fused_kernels.use_backend("torch"):
        out64 = ref.attention_ref(q64, k64, v64, causal=causal, attn_mask=mask64, seqlens_k=seqlens_k, scale=scale)
    want = [out64, *_grads(out64, (q64, k64, v64), dout.double())]
    base = [None] * 4
    if q.dtype in (torch.float16, torch.bfloat16):
        qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
        keep, bias = _dense_mask(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device, causal, attn_mask,
                                 seqlens_k)
        sc = q.shape[-1] ** -0.5 if scale is None else scale
        outt = _naive(qt, kt, vt, sc, keep, bias)
        base = [outt, *_grads(outt, (qt, kt, vt), dout)]
    tol = {} if q.dtype in (torch.float16, torch.bfloat16) else dict(atol=atol, rtol=rtol)
    for name, g, w, t in zip(("out", "dq", "dk", "dv"), got, want, base):
        assert g.dtype == q.dtype and g.shape == w.shape, name
        if w.numel() and w.abs().max() < 1e-6:   # e.g. dq with one key: zero up to rounding
            assert (g.double() - w).abs().max() < 1e-3, name
            continue
        assert_close(g, w, t, grad=name != "out", name=name, **tol)
    return got


FP32_TOL = dict(atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("l, s", [(1, 1), (1, 239), (113, 203), (127, 513), (197, 197), (256, 128)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lengths(l, s, causal, dtype, device):
    b, h = (1, 1) if l * s > 40000 else (1, 2)
    q, k, v = _qkv(b, h, h, l, s, 64, dtype=dtype, device=device)
    check_attention(q, k, v, causal=causal, **FP32_TOL)


@pytest.mark.parametrize("l, s, h, hkv, causal", [(339, 1, 2, 2, False), (339, 1, 2, 1, True), (2000, 16, 2, 1, False),
                                                   (2000, 16, 1, 1, True), (20000, 16, 1, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_many_queries_into_few_keys(l, s, h, hkv, causal, dtype, device, op_backend):
    """Many query rows add into one dK/dV row (FlashAttention's test_flash_attn_splitkv shapes: 339 or 20,000
    queries against 1-16 keys; MQA; causal): half-precision gradients meet the 2x rule against float64 on every
    path (torch's CPU flash backward alone does not: it accumulates dK/dV in the input's dtype)."""
    if op_backend == "triton" and l * h > 4000 and device == "cpu":
        pytest.skip("20,000 queries take minutes in the interpreter; the PyTorch path runs them")
    q, k, v = (t.requires_grad_() for t in _qkv(1, h, hkv, l, s, 64, dtype=dtype, device=device))
    out = fused_kernels.attention(q, k, v, causal=causal)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    got = [out, *_grads(out, (q, k, v), dout)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref.attention_ref(q64, k64, v64, causal=causal)
    want = [want, *_grads(want, (q64, k64, v64), dout.double())]
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    keep, _ = _dense_mask(1, h, l, s, device, causal)
    base = _naive(qt, kt, vt, 64 ** -0.5, keep, None)
    base = [base, *_grads(base, (qt, kt, vt), dout)]
    for name, g, w, t in zip(("out", "dq", "dk", "dv"), got, want, base):   # FlashAttention's own rule: 2x
        if w.abs().max() < 1e-6:   # dq and dk with one key: zero up to rounding
            assert (g.double() - w).abs().max() < 1e-3, name
            continue
        assert_close(g, w, t, name=name, factor=2.0, ulps=0)   # no floor: FlashAttention has none here


@pytest.mark.parametrize("d", [16, 32, 40, 64, 72, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dims(d, dtype, device):
    l, s = (33, 47) if d <= 128 else (17, 40)
    q, k, v = _qkv(1, 2, 2, l, s, d, dtype=dtype, device=device)
    check_attention(q, k, v, causal=True, **FP32_TOL)


@pytest.mark.parametrize("d, dv", [(40, 72), (128, 16), (256, 96), (16, 256), (136, 24)])
def test_value_head_dim_differs(d, dv, device):
    q, k, v = _qkv(1, 2, 1, 19, 35, d, dv, device=device)
    check_attention(q, k, v, **FP32_TOL)


def test_float64(device):
    q, k, v = _qkv(2, 2, 1, 29, 41, 24, 40, dtype=torch.float64, device=device)
    check_attention(q, k, v, causal=True, scale=0.3, atol=1e-10, rtol=1e-10)


def test_bfloat16_interpreter(device):
    """bf16 loads are upcast under the interpreter (its bf16 arithmetic is broken); the 2x rule holds."""
    q, k, v = _qkv(1, 2, 2, 37, 45, 64, dtype=torch.bfloat16, device=device)
    check_attention(q, k, v, causal=True)


@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 2), (4, 1), (2, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(h, hkv, causal, device):
    q, k, v = _qkv(1, h, hkv, 45, 70, 32, dtype=torch.float16, device=device)
    check_attention(q, k, v, causal=causal)


def test_empty_and_zero_length(device):
    q, k, v = _qkv(0, 2, 2, 5, 7, 16, device=device)
    assert fused_kernels.attention(q, k, v).shape == (0, 2, 5, 16)
    q, k, v = _qkv(1, 2, 2, 5, 0, 16, device=device)
    q.requires_grad_()
    out, lse = fused_kernels.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# ----------------------------------------------------------------------------- masks


MASK_SHAPES = [lambda b, h, l, s: (l, s), lambda b, h, l, s: (b, 1, 1, s), lambda b, h, l, s: (1, h, l, s),
               lambda b, h, l, s: (b, h, l, s), lambda b, h, l, s: (s,), lambda b, h, l, s: (1, 1, l, 1)]


@pytest.mark.parametrize("shape_fn", MASK_SHAPES, ids=["LS", "B11S", "1HLS", "BHLS", "S", "11L1"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(shape_fn, kind, device):
    b, h, l, s = 2, 2, 37, 45
    q, k, v = _qkv(b, h, h, l, s, 32, device=device)
    gen = torch.Generator().manual_seed(3)
    shape = shape_fn(b, h, l, s)
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.3
        if len(shape) >= 2 and shape[-2] == l and shape[-1] == s:
            mask[..., 5, :] = False            # a fully masked row
    else:
        mask = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
        mask = mask.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))
        if len(shape) >= 2 and shape[-2] == l and shape[-1] == s:
            mask[..., 5, :] = float("-inf")
        mask = mask.float()
    check_attention(q, k, v, attn_mask=mask.to(device), **FP32_TOL)


def test_mask_strided_and_causal(device):
    """A transposed mask (last-dim stride != 1), combined with causal and seqlens_k, in fp16."""
    b, h, l, s = 2, 2, 40, 50
    q, k, v = _qkv(b, h, h, l, s, 64, dtype=torch.float16, device=device)
    mask = (torch.rand(b, 1, s, l, generator=torch.Generator().manual_seed(5)) > 0.2).transpose(-1, -2)
    check_attention(q, k, v, attn_mask=mask.to(device), causal=True,
                    seqlens_k=torch.tensor([50, 31], device=device))


@pytest.mark.parametrize("causal", [False, True])
def test_seqlens_k(causal, device):
    b, h, l, s = 4, 1, 20, 70
    q, k, v = _qkv(b, h, h, l, s, 32, device=device)
    seqlens = torch.tensor([0, 70, 33, 1], dtype=torch.int32, device=device)
    check_attention(q, k, v, causal=causal, seqlens_k=seqlens, **FP32_TOL)


def check_per_row(q, k, v, lens, *, tol=FP32_TOL, causal=True, **variants):
    """attention(causal=True, seqlens_k=lens) against its per-sequence definition: row b alone, cut to its
    lens[b] valid keys, under bottom-right causal attention (query i at position lens[b] - L + i), in float64
    (the 2x rule against plain PyTorch on the same cut rows in half precision); dk / dv of the padded keys are
    0. ``variants`` (window, alibi_slopes, prefix_lengths: fp32 only) are positioned the same way. Returns
    (out, dq, dk, dv)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    seqlens = torch.tensor(lens, dtype=torch.int32, device=q.device)
    out = fused_kernels.attention(q, k, v, causal=causal, seqlens_k=seqlens, **variants)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    got = [out, *_grads(out, (q, k, v), dout)]
    half = q.dtype in (torch.float16, torch.bfloat16)
    l = q.shape[2]
    for b, n in enumerate(lens):
        cut = [t[b:b + 1].detach() for t in (q, k[:, :, :n], v[:, :, :n])]
        q64, k64, v64 = (t.double().requires_grad_() for t in cut)
        row = {name: val[b:b + 1] if name == "prefix_lengths" or (name == "alibi_slopes" and val.dim() == 2)
               else val for name, val in variants.items()}
        want = ref.attention_ref(q64, k64, v64, causal=causal, **row)
        want = [want, *_grads(want, (q64, k64, v64), dout[b:b + 1].double())]
        base = [None] * 4
        if half:
            qt, kt, vt = (t.clone().requires_grad_() for t in cut)
            keep = ref.causal_mask(l, n, q.device, bottom_right=True)
            outt = _naive(qt, kt, vt, q.shape[-1] ** -0.5, keep, None)
            base = [outt, *_grads(outt, (qt, kt, vt), dout[b:b + 1])]
        rows = (slice(b, b + 1), slice(None), slice(None))
        keys = (slice(b, b + 1), slice(None), slice(0, n))
        for name, g, w, t, where in zip(("out", "dq", "dk", "dv"), got, want, base, (rows, rows, keys, keys)):
            if w.abs().max() < 1e-6:   # dq of a row that sees one key (or none): zero up to rounding
                assert (g[where].double() - w).abs().max() < 1e-3, f"{name} row {b}"
                continue
            assert_close(g[where], w, t, grad=name != "out", name=f"{name} row {b}", **({} if half else tol))
        for name, g in zip(("dk", "dv"), got[2:]):
            assert not g[b, :, n:].any(), f"{name} row {b}: padded keys get a gradient"
    return got


@pytest.mark.parametrize("l", [1, 3, 17])
def test_causal_seqlens_k_aligns_per_row(l, device):
    """A padded KV cache holding L new queries: causal is bottom-right per row (query i of row b sits at
    seqlens_k[b] - L + i, as varlen_attention, paged_attention and FlashAttention's KV-cache function do), not
    at the padded length S. Row 2 has fewer keys than queries: its first queries see no key (0). L = 1 and 3
    take the flash-decoding forward on the kernels, L = 17 the main one."""
    q, k, v = _qkv(3, 4, 2, l, 300, 32, device=device)
    check_per_row(q, k, v, [300, 131, max(l - 2, 1)])


def test_causal_seqlens_k_per_row_second_derivatives_and_mask_gradient(device):
    """The PyTorch gradients beside the kernels (double backward, a float mask's gradient) use the same per-row
    diagonal: equal to the same call written as an explicit per-row mask, and gradcheck-consistent."""
    l, s = 3, 6
    q, k, v = (t.double().requires_grad_() for t in _qkv(2, 2, 1, l, s, 8, device=device))
    mask = torch.randn(1, 2, l, s, dtype=torch.float64, device=device, requires_grad=True)
    lens = torch.tensor([6, 2], device=device)
    j, i = torch.arange(s, device=device), torch.arange(l, device=device)[:, None]
    keep = (j < lens.view(-1, 1, 1, 1)) & (j <= i + lens.view(-1, 1, 1, 1) - l)    # query 0 of row 1: no key

    def ours(a, b, c, m):
        return fused_kernels.attention(a, b, c, causal=True, seqlens_k=lens, attn_mask=m)

    def explicit(a, b, c, m):
        return fused_kernels.attention(a, b, c, attn_mask=m.masked_fill(~keep, float("-inf")))
    w = torch.randn(2, 2, l, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(device)
    results = []
    for fn in (ours, explicit):
        first = torch.autograd.grad((fn(q, k, v, mask) * w).sum(), (q, k, v, mask), create_graph=True)
        second = torch.autograd.grad((first[0] * w).sum(), (q, k, v))     # d/d(q, k, v) of <dq, w>
        results.append([g.detach() for g in (*first, *second)])
    for name, a, b in zip(("dq", "dk", "dv", "dmask", "d2q", "d2k", "d2v"), *results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)
    assert torch.autograd.gradcheck(ours, (q, k, v, mask), fast_mode=True)


@pytest.mark.parametrize("kw", [dict(window=(5, 0)), dict(causal=False, window=(4, 2)),
                                dict(alibi_slopes=True), dict(causal=False, alibi_slopes=True),
                                dict(prefix_lengths=True)])
def test_variants_seqlens_k_align_per_row(kw, device):
    """With seqlens_k every position-dependent variant (window band, ALiBi distance, the causal part of
    prefix-LM) places query i of row b at seqlens_k[b] - L + i, as causal does."""
    b, h, l, s = 3, 2, 6, 40
    q, k, v = _qkv(b, h, 1, l, s, 16, device=device)
    kw = dict(kw)     # the parameter is shared by both backends' runs
    if kw.pop("alibi_slopes", False):
        kw["alibi_slopes"] = torch.tensor([[0.5, 0.25], [0.3, 0.1], [1.0, 0.7]], device=device)
    if kw.pop("prefix_lengths", False):
        kw["prefix_lengths"] = torch.tensor([3, 9, 0], device=device)
    check_per_row(q, k, v, [40, 17, 4], **kw)


@pytest.mark.triton_only   # the PyTorch path masks those keys but reads them (see ops/attention/torch_path.py)
def test_seqlens_skip_blocks(device):
    """Key blocks past seqlens_k are never read: NaN there does not reach the output or gradients."""
    q, k, v = _qkv(2, 2, 2, 16, 96, 32, device=device)
    k[:, :, 40:], v[:, :, 40:] = float("nan"), float("nan")
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    out = fused_kernels.attention(q, k, v, seqlens_k=torch.tensor([32, 40], device=device))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert not out.isnan().any() and not dq.isnan().any()
    assert not dk[:, :, :40].isnan().any() and not dv[:, :, :40].isnan().any()
    assert torch.equal(dk[0, :, 32:], torch.zeros_like(dk[0, :, 32:]))


def _check_nan_contract(got, want, dtype, name):
    """NaN in the same output entries as the float64 reference; in a gradient, NaN wherever the reference has
    some (which masked or padded entries also turn NaN is the implementation's: a NaN query's probabilities are
    NaN); the entries finite in both agree."""
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if name == "out":
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN entries differ from the reference"
    else:
        assert bool(got.isnan().any()) == bool(want.isnan().any()), f"{name}: NaN present in one but not the other"
    both = got.isfinite() & want.isfinite()
    torch.testing.assert_close(got[both], want[both], **tol, msg=name)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(gqa=True), dict(l=5), dict(seqlens=True),
                                dict(mask=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_propagates(where, kw, dtype, device):
    """One contract on every path: a NaN in an input propagates as in the float64 reference (torch's math
    path): a NaN query gives its own output row NaN and no other (torch's CPU flash kernel alone gives it 0), a
    NaN key or value every row that sees it; the gradients hold NaN where the reference's do."""
    kw = dict(kw)
    b, h, l, s = 2, 2, kw.pop("l", 9), 9
    q, k, v = _qkv(b, h, 1 if kw.pop("gqa", False) else h, l, s, 16, dtype=dtype, device=device)
    {"q": q, "k": k, "v": v}[where][1, 0, 3, 5] = float("nan")
    if kw.pop("seqlens", False):
        kw["seqlens_k"] = torch.tensor([9, 7], device=device)
    if kw.pop("mask", False):
        kw["attn_mask"] = torch.randn(l, s, generator=torch.Generator().manual_seed(2)).to(device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fused_kernels.attention(q, k, v, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    got = [out, *_grads(out, (q, k, v), dout)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    want = ref.attention_ref(q64, k64, v64, **kw64)
    want = [want, *_grads(want, (q64, k64, v64), dout.double())]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _check_nan_contract(g, w, dtype, name)
    if where == "q":
        nan_rows = out.isnan().any(-1)
        assert nan_rows[1, 0, 3] and int(nan_rows.sum()) == 1, "a NaN query: its own row NaN, no other"
        assert got[1][1, 0, 3].isnan().all() and int(got[1].isnan().any(-1).sum()) == 1   # and dq likewise


@pytest.mark.parametrize("causal", [False, True])
def test_nan_propagates_sdpa(causal, device):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 2, 9, 9, 16, device=device))
    with torch.no_grad():
        q[0, 1, 4, 2] = float("nan")
    out = fused_kernels.scaled_dot_product_attention(q, k, v, is_causal=causal)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref.scaled_dot_product_attention_ref(q64, k64, v64, is_causal=causal)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *torch.autograd.grad(want.sum(),
                                                                                                 (q64, k64, v64)))):
        _check_nan_contract(g, w, torch.float32, name)
    assert out[0, 1, 4].isnan().all() and int(out.isnan().any(-1).sum()) == 1


def test_fully_masked_rows(device):
    """Output 0, lse -inf, gradients 0, never NaN (bool mask, float -inf mask, bottom-right causal)."""
    b, h, l, s = 1, 2, 24, 16
    q, k, v = (t.requires_grad_() for t in _qkv(b, h, h, l, s, 32, device=device))
    mask = torch.ones(l, s, dtype=torch.bool, device=device)
    mask[3] = False
    fmask = torch.zeros(l, s, device=device)
    fmask[4] = float("-inf")
    for kw in (dict(attn_mask=mask), dict(attn_mask=fmask), dict(causal=True)):
        out, lse = fused_kernels.attention(q, k, v, return_lse=True, **kw)
        dq, dk, dv = torch.autograd.grad(out.sum() + lse.masked_fill(lse.isinf(), 0).sum(), (q, k, v))
        rows = lse[0, 0].isinf().nonzero().reshape(-1).tolist()
        expect = {"attn_mask": [3] if "attn_mask" in kw and kw["attn_mask"].dtype == torch.bool else [4]}
        if "causal" in kw:
            assert rows == list(range(l - s))          # rows i < L - S see no key (bottom-right)
        else:
            assert rows == expect["attn_mask"]
        assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows]))
        assert torch.equal(dq[:, :, rows], torch.zeros_like(dq[:, :, rows]))
        for t in (out, lse, dq, dk, dv):
            assert not t.isnan().any()


# ----------------------------------------------------------------------------- causal conventions


@pytest.mark.parametrize("l, s", [(40, 70), (70, 40), (33, 33)])
def test_sdpa_causal_top_left(l, s, device):
    """fused_kernels.scaled_dot_product_attention(is_causal=True) equals torch's (top-left aligned)."""
    q, k, v = _qkv(1, 2, 2, l, s, 32, dtype=torch.float64, device=device)
    check_sdpa((q, k, v), dict(is_causal=True))


@pytest.mark.parametrize("l, s", [(40, 70), (70, 40)])
def test_attention_causal_bottom_right(l, s, device):
    """attention(causal=True) equals the reference with causal_mask(bottom_right=True) as attn_mask."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, l, s, 32, dtype=torch.float64, device=device))
    out = fused_kernels.attention(q, k, v, causal=True)
    q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with fused_kernels.use_backend("torch"):
        want = ref.attention_ref(q64, k64, v64, attn_mask=ref.causal_mask(l, s, device, bottom_right=True))
    dout = torch.randn_like(out)
    for g, w in zip([out, *_grads(out, (q, k, v), dout)], [want, *_grads(want, (q64, k64, v64), dout)]):
        assert_close(g, w, atol=1e-10, rtol=1e-10)
    if l != s:  # differs from top-left
        top = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
        assert not torch.allclose(out.detach().nan_to_num(), top.nan_to_num())


# ----------------------------------------------------------------------------- scaled_dot_product_attention


def check_sdpa(inputs, kwargs, atol=1e-10, rtol=1e-10):
    """fused_kernels.scaled_dot_product_attention vs torch's in float64 (no fully masked rows)."""
    ours = [t.detach().clone().requires_grad_() for t in inputs]
    theirs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fused_kernels.scaled_dot_product_attention(*ours, **kwargs)
    want = F.scaled_dot_product_attention(*theirs, **kwargs)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=want.dtype).to(want.device)
    got = [out, *_grads(out, ours, dout)]
    exp = [want, *_grads(want, theirs, dout)]
    for name, g, w in zip(("out", "dquery", "dkey", "dvalue"), got, exp):
        assert g.shape == w.shape, name
        assert_close(g, w, name=name, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", ["3d", "4d", "5d", "broadcast_batch", "mask_bool", "mask_float", "scale", "gqa",
                                  "mqa_broadcast", "ev"])
def test_sdpa_matches_torch(case, device):
    gen = torch.Generator().manual_seed(7)
    r = lambda *shape: _rand(*shape, dtype=torch.float64, device=device, gen=gen)
    kw = {}
    if case == "3d":
        inputs = (r(3, 21, 16), r(3, 30, 16), r(3, 30, 16))
    elif case == "4d":
        inputs = (r(2, 2, 21, 16), r(2, 2, 30, 16), r(2, 2, 30, 16))
    elif case == "5d":
        inputs = (r(2, 1, 2, 9, 16), r(2, 1, 2, 11, 16), r(2, 1, 2, 11, 16))
    elif case == "broadcast_batch":
        inputs = (r(2, 2, 9, 16), r(1, 2, 11, 16), r(1, 2, 11, 16))
    elif case in ("mask_bool", "mask_float"):
        inputs = (r(2, 2, 21, 16), r(2, 2, 30, 16), r(2, 2, 30, 16))
        keep = torch.rand(2, 1, 21, 30, generator=gen) > 0.3
        keep[..., 0] = True                            # no fully masked rows (torch gives NaN there)
        kw["attn_mask"] = keep.to(device) if case == "mask_bool" else r(21, 30)
    elif case == "scale":
        inputs = (r(2, 2, 21, 16), r(2, 2, 30, 16), r(2, 2, 30, 16))
        kw["scale"] = 0.77
    elif case == "gqa":
        inputs = (r(1, 4, 21, 16), r(1, 2, 30, 16), r(1, 2, 30, 16))
        kw.update(enable_gqa=True, is_causal=True)
    elif case == "mqa_broadcast":
        inputs = (r(1, 4, 21, 16), r(1, 1, 30, 16), r(1, 1, 30, 16))
    else:
        inputs = (r(2, 21, 40), r(2, 30, 40), r(2, 30, 24))
    check_sdpa(inputs, kw)


def test_sdpa_fp16_two_x_rule(device):
    q, k, v = _qkv(2, 2, 2, 50, 61, 64, dtype=torch.float16, device=device)
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    out = fused_kernels.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    dout = torch.randn_like(out)
    got = [out, *_grads(out, (qs, ks, vs), dout)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    exp = [want, *_grads(want, (q64, k64, v64), dout.double())]
    keep = ref.causal_mask(50, 61, device)
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base_out = _naive(qt, kt, vt, 64 ** -0.5, keep, None)
    base = [base_out, *_grads(base_out, (qt, kt, vt), dout)]
    for name, g, w, t in zip(("out", "dq", "dk", "dv"), got, exp, base):
        assert_close(g, w, t, grad=name != "out", name=name)


def test_sdpa_fully_masked_row_gives_zero(device):
    q, k, v = _qkv(1, 1, 1, 6, 8, 16, device=device)
    mask = torch.ones(6, 8, dtype=torch.bool, device=device)
    mask[2] = False
    out = fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[0, 0, 2], torch.zeros(16, device=device)) and not out.isnan().any()


# ----------------------------------------------------------------------------- lse


def test_return_lse(device):
    b, h, l, s = 2, 2, 30, 41
    q, k, v = (t.requires_grad_() for t in _qkv(b, h, 1, l, s, 40, dtype=torch.float64, device=device))
    mask = torch.rand(b, 1, l, s, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[..., 7, :] = False
    seqlens = torch.tensor([41, 25], device=device)
    out, lse = fused_kernels.attention(q, k, v, causal=True, attn_mask=mask.to(device), seqlens_k=seqlens, scale=0.4,
                                 return_lse=True)
    keep, _ = _dense_mask(b, h, l, s, device, True, mask.to(device), seqlens)
    scores = (q.detach() @ k.detach().repeat_interleave(h, 1).transpose(-1, -2)) * 0.4
    want = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), -1)
    assert lse.shape == (b, h, l) and lse.dtype == torch.float64
    assert_close(lse, want, atol=1e-12, rtol=1e-12)
    assert bool(lse[:, :, 7].isinf().all())
    # the lse is differentiable: d lse / d scores = softmax
    q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sc = (q64 @ k64.repeat_interleave(h, 1).transpose(-1, -2)) * 0.4
    lse_ref = torch.logsumexp(sc.masked_fill(~keep, float("-inf")), -1)
    w = torch.randn(lse.shape, dtype=torch.float64, device=device).masked_fill(lse.isinf(), 0)
    got = torch.autograd.grad((lse.masked_fill(lse.isinf(), 0) * w).sum(), (q, k))
    exp = torch.autograd.grad((lse_ref.masked_fill(lse_ref.isinf(), 0) * w).sum(), (q64, k64))
    for g, e in zip(got, exp):
        assert_close(g, e, atol=1e-10, rtol=1e-10)
    lse32 = fused_kernels.attention(q.detach().float(), k.detach().float(), v.detach().float(), return_lse=True)[1]
    assert lse32.dtype == torch.float32


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("kw", [
    dict(), dict(causal=True), dict(gqa=True, causal=True), dict(mask="bool"), dict(mask="float"),
    dict(seqlens=True, causal=True), dict(lse=True)], ids=lambda kw: "-".join(kw) or "plain")
def test_gradcheck(kw, device):
    b, h, l, s, d = 2, 2, 5, 7, 8
    hkv = 1 if kw.get("gqa") else h
    q, k, v = (t.requires_grad_() for t in _qkv(b, h, hkv, l, s, d, 6, dtype=torch.float64, device=device))
    mask = None
    if kw.get("mask") == "bool":
        mask = torch.rand(b, 1, l, s, generator=torch.Generator().manual_seed(0)).to(device) > 0.3
    elif kw.get("mask") == "float":
        mask = torch.randn(l, s, dtype=torch.float64, device=device)
    seqlens = torch.tensor([7, 3], device=device) if kw.get("seqlens") else None

    def fn(q, k, v):
        r = fused_kernels.attention(q, k, v, causal=kw.get("causal", False), attn_mask=mask, seqlens_k=seqlens,
                              return_lse=kw.get("lse", False))
        return (r[0], r[1].masked_fill(r[1].isinf(), 0)) if kw.get("lse") else r

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# ----------------------------------------------------------------------------- dropout


def _dropout_keep(q, k, p, seed, causal=False):
    """The kernel's dropout mask (B, H, L, S) for these shapes and seed, read back with v = identity."""
    b, h, l, _ = q.shape
    s = k.shape[2]
    eye = torch.eye(s, dtype=q.dtype, device=q.device).expand(b, k.shape[1], s, s)
    torch.manual_seed(seed)
    probs = fused_kernels.attention(q, k, eye, dropout_p=p, causal=causal)
    return probs != 0


def test_dropout_matches_reference_with_same_mask(device):
    b, h, hkv, l, s, p = 2, 2, 1, 24, 32, 0.3
    q, k, v = _qkv(b, h, hkv, l, s, 16, 20, dtype=torch.float64, device=device)
    keep = _dropout_keep(q, k, p, seed=11)
    frac = 1 - keep.double().mean().item()
    assert abs(frac - p) < 0.05, frac
    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(11)
    out = fused_kernels.attention(q1, k1, v1, dropout_p=p)
    dout = torch.randn_like(out)
    got = [out, *_grads(out, (q1, k1, v1), dout)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    kk, vv = k2.repeat_interleave(h // hkv, 1), v2.repeat_interleave(h // hkv, 1)
    probs = torch.softmax(q2 @ kk.transpose(-1, -2) * 16 ** -0.5, -1)
    want = (probs * keep / (1 - p)) @ vv
    exp = [want, *_grads(want, (q2, k2, v2), dout)]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, exp):
        assert_close(g, w, name=name, atol=1e-10, rtol=1e-10)


def test_dropout_reproducible_and_statistics(device):
    q, k, v = _qkv(1, 2, 2, 64, 64, 32, device=device)
    torch.manual_seed(0)
    a = fused_kernels.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = fused_kernels.attention(q, k, v, dropout_p=0.5)
    c = fused_kernels.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    keep = _dropout_keep(q, k, 0.5, seed=5)
    assert abs(keep.float().mean().item() - 0.5) < 0.02
    # unbiased: the mean over many seeds approaches the output without dropout
    mean = torch.stack([fused_kernels.attention(q, k, v, dropout_p=0.5) for _ in range(12)]).mean(0)
    plain = fused_kernels.attention(q, k, v)
    assert (mean - plain).abs().mean() < 0.5 * (c - plain).abs().mean()


def test_dropout_gradcheck_fixed_seed(device):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 6, 9, 8, dtype=torch.float64, device=device))

    def fn(q, k, v):
        torch.manual_seed(3)
        return fused_kernels.attention(q, k, v, dropout_p=0.4, causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_sdpa_dropout_always_drops(device):
    q, k, v = _qkv(1, 1, 1, 16, 16, 16, device=device)
    plain = fused_kernels.scaled_dot_product_attention(q, k, v)
    dropped = fused_kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(plain, dropped)


# ----------------------------------------------------------------------------- decoding path


@pytest.mark.triton_only
@pytest.mark.parametrize("l, h, hkv, kw", [
    (1, 2, 2, {}), (1, 4, 1, dict(causal=True)), (4, 4, 2, dict(causal=True, seqlens=True)),
    (16, 2, 1, dict(mask=True)), (3, 2, 2, dict(dropout=True))])
def test_decode_matches_main_path(l, h, hkv, kw, device):
    b, s = 2, 300
    q, k, v = _qkv(b, h, hkv, l, s, 64, 48, device=device)
    mask = (torch.rand(b, 1, l, s, generator=torch.Generator().manual_seed(1)) > 0.2).to(device) \
        if kw.get("mask") else None
    seqlens = torch.tensor([300, 0 if l == 4 else 170], device=device) if kw.get("seqlens") else None
    p = 0.25 if kw.get("dropout") else 0.0
    splits = decode_splits(b, hkv, l, h, s, q.device)
    assert splits > 1
    args = (mask, seqlens, 0.125, kw.get("causal", False), s - l, p)
    torch.manual_seed(0)
    main, main_lse, _ = attention_fwd(q, k, v, *args, 0)
    torch.manual_seed(0)
    with bounds_checked(*KERNELS) as launches:
        dec, dec_lse, _ = attention_fwd(q, k, v, *args, splits)
    assert launches == {"_attn_fwd_split_kernel": 1, "_attn_combine_kernel": 1}
    torch.testing.assert_close(dec, main, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(dec_lse, main_lse, atol=2e-6, rtol=2e-6)


@pytest.mark.triton_only
def test_decode_public_path_and_backward(device):
    """attention() routes a short query over a long cache to the decoding path; its backward is exact."""
    q, k, v = _qkv(1, 4, 2, 2, 300, 32, device=device)
    with bounds_checked("_attn_fwd_split_kernel") as launches:
        check_attention(q, k, v, causal=True, seqlens_k=torch.tensor([257], device=device), **FP32_TOL)
    assert launches["_attn_fwd_split_kernel"] == 1


# ----------------------------------------------------------------------------- layouts and memory


@pytest.mark.triton_only
def test_strided_qkv_views_and_bounds(device):
    """q, k, v as views of one (B, L, 3, H, D) projection (no copy), NaN around them, every kernel run
    under guard bytes; non-contiguous incoming gradient."""
    b, l, h, d = 2, 37, 2, 40
    qkv = nan_padded(_rand(b, l, 3, h, d, device=device))
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))          # (B, H, L, D), last dim contiguous
    assert q.stride(-1) == 1 and not q.is_contiguous()
    mask = nan_padded(torch.randn(l, l, device=device))
    dout = torch.randn(b, l, h, d, device=device).transpose(1, 2)       # non-contiguous gradient
    with bounds_checked(*KERNELS) as launches:
        check_attention(q, k, v, causal=True, attn_mask=mask, dout=dout, **FP32_TOL)
    assert launches["_attn_fwd_kernel"] == 1 and launches["_attn_bwd_dkdv_kernel"] == 1


def test_last_dim_strided_inputs(device):
    q, k, v = _qkv(1, 2, 2, 20, 30, 32, device=device)
    q = q.transpose(-1, -2).contiguous().transpose(-1, -2)              # last-dim stride != 1: copied
    check_attention(q, k, v, **FP32_TOL)


def test_bounds_gqa_mask_dropout_seqlens(device):
    q, k, v = (nan_padded(t).requires_grad_() for t in _qkv(2, 4, 2, 21, 50, 24, 40, device=device))
    mask = torch.rand(2, 1, 21, 50, generator=torch.Generator().manual_seed(0)).to(device) > 0.2
    with bounds_checked(*KERNELS):
        out = fused_kernels.attention(q, k, v, attn_mask=mask, causal=True, dropout_p=0.2,
                                seqlens_k=torch.tensor([50, 33], device=device))
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for t in (out, *grads):
        assert not t.isnan().any()


def test_deterministic_backward(device):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 40, 40, 32, device=device))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        out = fused_kernels.attention(q, k, v, causal=True, dropout_p=0.1)
        runs.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph(device):
    q, k, v = _qkv(1, 2, 1, 19, 23, 16, device=device)
    mask = torch.rand(19, 23, generator=torch.Generator().manual_seed(0)).to(device) > 0.2

    def fn(q, k, v):
        out, lse = fused_kernels.attention(q, k, v, attn_mask=mask, causal=True, return_lse=True)
        out2 = fused_kernels.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                    is_causal=True)
        return out + out2, lse

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    comp_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    (oe, le), (oc, lc) = fn(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(oc, oe)
    torch.testing.assert_close(lc, le)
    ge = torch.autograd.grad(oe.sum(), eager_in)
    gc = torch.autograd.grad(oc.sum(), comp_in)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- bad inputs


def _bad_cases(device):
    q, k, v = _qkv(2, 4, 2, 8, 10, 16, device=device)
    return [
        (lambda: fused_kernels.attention(q[0], k[0], v[0]), ValueError, "q must be 4-D"),
        (lambda: fused_kernels.attention(q, k[:1], v[:1]), ValueError, "batch sizes"),
        (lambda: fused_kernels.attention(q, k, v[:, :, :9]), ValueError, "same heads and length"),
        (lambda: fused_kernels.attention(q, k[..., :8], v), ValueError, "head dim"),
        (lambda: fused_kernels.attention(q[:, :3], k, v), ValueError, "must divide q heads"),
        (lambda: fused_kernels.attention(q, k.double(), v), TypeError, "k has dtype"),
        (lambda: fused_kernels.attention(q, k, v.half()), TypeError, "v has dtype"),
        (lambda: fused_kernels.attention(q.int(), k, v), TypeError, "q must be float16"),
        (lambda: fused_kernels.attention("q", k, v), TypeError, "q must be a torch.Tensor"),
        (lambda: fused_kernels.attention(torch.zeros(2, 4, 8, 300), torch.zeros(2, 2, 10, 300), v), ValueError,
         "head dim of q/k must be in"),
        (lambda: fused_kernels.attention(q, k, torch.zeros(2, 2, 10, 257)), ValueError, "head dim of v"),
        (lambda: fused_kernels.attention(q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.bool)), ValueError,
         "attn_mask of shape"),
        (lambda: fused_kernels.attention(q, k, v, attn_mask=torch.ones(1, 2, 3, 8, 10)), ValueError,
         "attn_mask of shape"),
        (lambda: fused_kernels.attention(q, k, v, attn_mask=torch.ones(8, 10, dtype=torch.int32)), TypeError,
         "attn_mask must be bool"),
        (lambda: fused_kernels.attention(q, k, v, seqlens_k=torch.ones(2)), TypeError, "seqlens_k must be an integer"),
        (lambda: fused_kernels.attention(q, k, v, seqlens_k=torch.ones(3, dtype=torch.int32)), ValueError,
         "seqlens_k must have shape"),
        (lambda: fused_kernels.attention(q, k, v, seqlens_k=[1, 2]), TypeError, "seqlens_k must be an int tensor"),
        (lambda: fused_kernels.attention(q, k, v, seqlens_k=torch.tensor([10, -1], device=device)), ValueError,
         r"seqlens_k\[1\] is -1, outside \[0, 10\].*check=False"),
        (lambda: fused_kernels.attention(q, k, v, causal=True, seqlens_k=torch.tensor([11, 3], device=device)),
         ValueError, r"seqlens_k\[0\] is 11, outside \[0, 10\]"),
        (lambda: fused_kernels.attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda: fused_kernels.attention(q, k, v, dropout_p=-0.1), ValueError, "dropout_p"),
        (lambda: fused_kernels.attention(q, k, v, scale="x"), TypeError, "scale"),
        (lambda: fused_kernels.scaled_dot_product_attention(q, k, v), ValueError, "do not broadcast"),
        (lambda: fused_kernels.scaled_dot_product_attention(q[:, :3], k, v, enable_gqa=True), ValueError,
         "must divide"),
        (lambda: fused_kernels.scaled_dot_product_attention(q, k, v[..., :3, :], enable_gqa=True), ValueError,
         "key's length"),
        (lambda: fused_kernels.scaled_dot_product_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), ValueError,
         "at least 2 dims"),
        (lambda: fused_kernels.scaled_dot_product_attention(q, k[0], v[0]), ValueError, "do not broadcast"),
        (lambda: fused_kernels.scaled_dot_product_attention(q, k, v, enable_gqa=True, dropout_p=2.0), ValueError,
         "dropout_p"),
    ]


def test_bad_inputs(device):
    for fn, exc, msg in _bad_cases(device):
        with pytest.raises(exc, match=msg):
            fn()


def test_seqlens_k_range_check_can_be_skipped(device):
    """check=False skips the range check of seqlens_k (its one device sync); valid lengths give the same result
    either way, and the kernels clamp an invalid one to [0, S] rather than read outside the keys."""
    q, k, v = _qkv(2, 2, 1, 3, 10, 16, device=device)
    lens = torch.tensor([10, 4], device=device)
    checked = fused_kernels.attention(q, k, v, causal=True, seqlens_k=lens)
    assert torch.equal(fused_kernels.attention(q, k, v, causal=True, seqlens_k=lens, check=False), checked)
    out = fused_kernels.attention(q, k, v, seqlens_k=torch.tensor([12, 4], device=device), check=False)
    assert out.isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a device mismatch")
def test_bad_device():
    q, k, v = _qkv(1, 2, 2, 8, 10, 16)
    with pytest.raises(ValueError, match="k is on"):
        fused_kernels.attention(q, k.cuda(), v)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_realistic(dtype, d, causal):
    q, k, v = _qkv(2, 8, 2, 1024, 1024, d, dtype=dtype, device="cuda")
    check_attention(q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_sdpa_against_torch(dtype):
    q, k, v = _qkv(2, 8, 8, 2048, 2048, 128, dtype=dtype, device="cuda")
    out = fused_kernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    base = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(out, want, base)


@pytest.mark.gpu
def test_gpu_deterministic_backward():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 8, 2, 2048, 2048, 128, dtype=torch.bfloat16, device="cuda"))
    dout = torch.randn(2, 8, 2048, 128, dtype=torch.bfloat16, device="cuda")
    first = None
    for _ in range(10):
        torch.manual_seed(0)
        out = fused_kernels.attention(q, k, v, causal=True, dropout_p=0.1)
        g = torch.autograd.grad(out, (q, k, v), dout)
        if first is None:
            first = g
        for a, b in zip(first, g):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_long_sequence_and_decode():
    q, k, v = _qkv(1, 4, 4, 8192, 8192, 64, dtype=torch.float16, device="cuda")
    out = fused_kernels.attention(q, k, v, causal=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (out.float() - want).abs().max().item() < 2e-2
    qd = q[:, :, -1:]
    dec = fused_kernels.attention(qd, k, v, causal=True)
    assert decode_splits(1, 4, 1, 4, 8192, qd.device) > 1
    torch.testing.assert_close(dec, out[:, :, -1:], atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [40, 72, 80, 96, 160, 256])
def test_gpu_head_dims(d):
    q, k, v = _qkv(2, 4, 2, 513, 777, d, dtype=torch.bfloat16, device="cuda")
    check_attention(q, k, v, causal=True, attn_mask=torch.ones(513, 777, dtype=torch.bool, device="cuda"),
                    seqlens_k=torch.tensor([777, 300], device="cuda"))


def test_math_helpers():
    cfg = importlib.import_module("fused_kernels.ops.attention.config")
    assert math.isclose(cfg.LOG2E * cfg.LN2, 1.0)

"""Packed variable-length attention (fused_kernels.varlen_attention): the interpreted one-launch Triton kernels
against the float64 per-sequence reference, forward, lse and every gradient (the 2x rule for float16 /
bfloat16, tight tolerances for float32 / float64); empty, one-token and odd lengths, L_b != S_b both ways,
fully masked rows, GQA / MQA, Dv != D, head dims, strided views, dropout, bounds and bad inputs. Each test
runs on the kernels and on the PyTorch path (``op_backend``) unless marked ``triton_only``."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, bounds_checked, nan_padded

import fused_kernels
from fused_kernels import reference as ref
from fused_kernels._core import checks as _checks
from fused_kernels.ops.attention import varlen as varlen_mod  # looks its kernels up by name: bounds_checked patches it

KERNELS = ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
FP32_TOL = dict(atol=2e-5, rtol=2e-5)

pytestmark = pytest.mark.usefixtures("op_backend")


def _cu(lengths, device="cpu", dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=device)


def _packed(lq, lk, h, hkv, d, dv=None, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    return rand(sum(lq), h, d), rand(sum(lk), hkv, d), rand(sum(lk), hkv, dv)


def _naive(q, k, v, lq, lk, causal, scale):
    """Plain PyTorch in q's dtype per sequence (the 2x-rule baseline); fully masked rows 0."""
    outs, cq, ck = [], _cu(lq).tolist(), _cu(lk).tolist()
    g = q.shape[1] // k.shape[1]
    for b in range(len(lq)):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(g, 0)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(g, 0)
        s = qb @ kb.transpose(-1, -2) * scale
        if causal:
            keep = ref.causal_mask(lq[b], lk[b], q.device, bottom_right=True)
            s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        outs.append((p @ vb).transpose(0, 1))
    return torch.cat(outs, 0)


def check_varlen(q, k, v, lq, lk, *, causal=False, scale=None, with_lse=True, atol=None, rtol=None,
                 cu_dtype=torch.int32):
    """varlen_attention() out, lse and dq/dk/dv (with an lse gradient when ``with_lse``) against the float64
    per-sequence reference; the 2x rule (without the lse gradient) for 16-bit dtypes."""
    cq, ck = _cu(lq, q.device, cu_dtype), _cu(lk, q.device, cu_dtype)
    mq, mk = max(lq, default=0), max(lk, default=0)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    half = q.dtype in (torch.float16, torch.bfloat16)
    with_lse = with_lse and not half
    out, lse = fused_kernels.varlen_attention(q, k, v, cq, ck, mq, mk, causal=causal, scale=scale, return_lse=True)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse)

    def loss(o, l_):
        total = (o * dout.to(o.dtype)).sum()
        if with_lse:
            total = total + (l_.masked_fill(l_.isinf(), 0.0) * dlse.to(l_.dtype)).sum()
        return total

    got = [out, *torch.autograd.grad(loss(out, lse), (q, k, v), allow_unused=True)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with fused_kernels.use_backend("torch"):
        out64, lse64 = ref.varlen_attention_ref(q64, k64, v64, cq, ck, mq, mk, causal=causal, scale=scale,
                                                return_lse=True)
    want = [out64, *torch.autograd.grad(loss(out64, lse64), (q64, k64, v64), allow_unused=True)]
    want = [w if w is not None else torch.zeros_like(t) for w, t in zip(want, (out64, q64, k64, v64))]
    got = [g if g is not None else torch.zeros_like(t) for g, t in zip(got, (out, q, k, v))]
    base = [None] * 4
    if half:
        qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
        sc = q.shape[-1] ** -0.5 if scale is None else scale
        outt = _naive(qt, kt, vt, lq, lk, causal, sc)
        base = [outt, *torch.autograd.grad(loss(outt, None), (qt, kt, vt), allow_unused=True)]
        base = [b if b is not None else torch.zeros_like(t) for b, t in zip(base, (outt, qt, kt, vt))]
    tol = {} if half else dict(atol=atol, rtol=rtol)
    assert lse.shape == (q.shape[1], q.shape[0])
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert torch.equal(lse.isinf(), lse64.isinf()), "lse: fully masked rows differ"
    fin = ~lse64.isinf()
    if fin.any():
        torch.testing.assert_close(lse[fin].double(), lse64[fin], atol=1e-3 if half else 1e-5, rtol=0)
    for name, g, w, t in zip(("out", "dq", "dk", "dv"), got, want, base):
        assert g.dtype == q.dtype and g.shape == w.shape, name
        assert not g.isnan().any(), name
        if w.numel() and w.abs().max() < 1e-6:   # e.g. no key anywhere: zero
            assert (g.double() - w).abs().max() < 1e-3, name
            continue
        assert_close(g, w, t, grad=name != "out", name=name, **tol)
    return got, lse


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("lq, lk", [
    ([1, 7, 0, 33], [1, 7, 5, 33]),      # one token, odd, an empty query sequence
    ([5, 40, 3], [17, 9, 0]),            # L_b < S_b, L_b > S_b, no keys at all (fully masked)
    ([64], [1]),                          # one sequence, many queries over one key
    ([0, 2], [3, 0]),                     # nothing to attend at all
])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(lq, lk, causal, device):
    q, k, v = _packed(lq, lk, 2, 2, 32, device=device)
    check_varlen(q, k, v, lq, lk, causal=causal, **FP32_TOL)


@pytest.mark.parametrize("d", [16, 40, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dims(d, dtype, device):
    lq, lk = [9, 23], [15, 20]
    q, k, v = _packed(lq, lk, 2, 1, d, dtype=dtype, device=device)
    check_varlen(q, k, v, lq, lk, causal=True, **FP32_TOL)


def test_head_dim_256(device):
    lq, lk = [3, 11], [7, 6]
    q, k, v = _packed(lq, lk, 1, 1, 256, dtype=torch.float32, device=device)
    check_varlen(q, k, v, lq, lk, causal=True, **FP32_TOL)


@pytest.mark.parametrize("h, hkv, d, dv", [(4, 1, 40, 24), (4, 2, 16, 72), (3, 3, 24, 8)])
def test_gqa_mqa_value_dim(h, hkv, d, dv, device):
    lq, lk = [6, 19, 1], [13, 4, 8]
    q, k, v = _packed(lq, lk, h, hkv, d, dv, device=device)
    check_varlen(q, k, v, lq, lk, causal=True, **FP32_TOL)
    check_varlen(q, k, v, lq, lk, causal=False, scale=0.3, cu_dtype=torch.int64, **FP32_TOL)


def test_float64(device):
    lq, lk = [7, 0, 18], [12, 3, 9]
    q, k, v = _packed(lq, lk, 2, 1, 24, 40, dtype=torch.float64, device=device)
    check_varlen(q, k, v, lq, lk, causal=True, scale=0.3, atol=1e-10, rtol=1e-10)


def test_bfloat16_interpreter(device):
    """bf16 loads are upcast under the interpreter (its bf16 arithmetic is broken); the 2x rule holds."""
    lq, lk = [21, 5], [17, 30]
    q, k, v = _packed(lq, lk, 2, 2, 64, dtype=torch.bfloat16, device=device)
    check_varlen(q, k, v, lq, lk, causal=True)


def test_fully_masked_rows_zero(device):
    """Causal with L_b > S_b (bottom-right): the first L_b - S_b rows see no key: output 0, lse -inf, no
    gradient to them, and the keys' gradients come only from the rows that see them."""
    lq, lk = [6, 5], [2, 0]
    q, k, v = _packed(lq, lk, 2, 1, 16, device=device)
    (out, dq, dk, dv), lse = check_varlen(q, k, v, lq, lk, causal=True, **FP32_TOL)
    dead = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    assert torch.equal(dq[dead], torch.zeros_like(dq[dead]))
    assert bool(lse[:, dead].isneginf().all()) and bool(lse[:, ~dead].isfinite().all())


def test_strided_qkv_views(device):
    """q, k, v as views of one packed (total, 3, H, D) qkv tensor (row stride 3 * H * D)."""
    lq = [13, 4, 29]
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lq), 3, 2, 32, generator=gen, dtype=torch.float64).float().to(device)
    q, k, v = qkv.unbind(1)
    assert q.stride(0) == 3 * 2 * 32
    check_varlen(q, k, v, lq, lq, causal=True, **FP32_TOL)
    qkv = qkv.detach().requires_grad_()
    out = fused_kernels.varlen_attention(*qkv.unbind(1), _cu(lq, device), _cu(lq, device), 29, 29, causal=True)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and not qkv.grad.isnan().any()


# ----------------------------------------------------------------------------- dropout


def test_dropout_reproducible(device):
    lq, lk = [9, 20], [14, 11]
    q, k, v = _packed(lq, lk, 2, 1, 16, device=device)
    args = (q, k, v, _cu(lq, device), _cu(lk, device), 20, 14)
    torch.manual_seed(0)
    a = fused_kernels.varlen_attention(*args, dropout_p=0.4)
    torch.manual_seed(0)
    b = fused_kernels.varlen_attention(*args, dropout_p=0.4)
    c = fused_kernels.varlen_attention(*args, dropout_p=0.4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _dropout_keep(q, k, lk, cq, ck, mq, mk, p, seed):
    """The kernel's dropout mask per sequence, read back with v = identity over the packed keys."""
    total_k, hkv = k.shape[0], k.shape[1]
    eye = torch.eye(total_k, dtype=q.dtype, device=q.device)[:, None, :].expand(total_k, hkv, total_k)
    torch.manual_seed(seed)
    probs = fused_kernels.varlen_attention(q, k, eye, cq, ck, mq, mk, dropout_p=p)
    return probs != 0      # (total_q, H, total_k): only the sequence's own key columns can be set


@pytest.mark.triton_only
def test_dropout_matches_reference_with_same_mask(device):
    lq, lk, h, hkv, p = [11, 0, 24], [16, 5, 30], 2, 1, 0.3
    q, k, v = _packed(lq, lk, h, hkv, 16, 20, dtype=torch.float64, device=device)
    cq, ck = _cu(lq, device), _cu(lk, device)
    keep = _dropout_keep(q, k, lk, cq, ck, 24, 30, p, seed=11)
    frac = 1 - keep.double().sum().item() / (h * sum(a * b for a, b in zip(lq, lk)))
    assert abs(frac - p) < 0.06, frac
    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(11)
    out = fused_kernels.varlen_attention(q1, k1, v1, cq, ck, 24, 30, dropout_p=p)
    dout = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q1, k1, v1), dout)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outs, c_q, c_k = [], cq.tolist(), ck.tolist()
    for b in range(len(lq)):
        qb = q2[c_q[b]:c_q[b + 1]].transpose(0, 1)
        kb = k2[c_k[b]:c_k[b + 1]].transpose(0, 1).repeat_interleave(h // hkv, 0)
        vb = v2[c_k[b]:c_k[b + 1]].transpose(0, 1).repeat_interleave(h // hkv, 0)
        kp = keep[c_q[b]:c_q[b + 1], :, c_k[b]:c_k[b + 1]].transpose(0, 1)
        probs = torch.softmax(qb @ kb.transpose(-1, -2) * 16 ** -0.5, -1)
        outs.append(((probs * kp / (1 - p)) @ vb).transpose(0, 1))
    want = torch.cat(outs, 0)
    exp = [want, *torch.autograd.grad(want, (q2, k2, v2), dout)]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, exp):
        assert_close(g, w, name=name, atol=1e-10, rtol=1e-10)


@pytest.mark.triton_only
def test_dropout_gradcheck_fixed_seed(device):
    lq, lk = [4, 3], [5, 2]
    q, k, v = (t.requires_grad_() for t in _packed(lq, lk, 2, 1, 8, dtype=torch.float64, device=device))
    cq, ck = _cu(lq, device), _cu(lk, device)

    def fn(q, k, v):
        torch.manual_seed(3)
        out, lse = fused_kernels.varlen_attention(q, k, v, cq, ck, 4, 5, dropout_p=0.4, causal=True, return_lse=True)
        return out, lse.masked_fill(lse.isinf(), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# ----------------------------------------------------------------------------- memory and launches


@pytest.mark.triton_only
def test_bounds_and_one_launch(device):
    """NaN-padded inputs, guarded outputs: no out-of-bounds read (NaN would leak) or write; one launch of
    each kernel, whatever the number of sequences."""
    lq, lk = [5, 0, 37, 1], [9, 4, 33, 0]
    q, k, v = (nan_padded(t).requires_grad_() for t in _packed(lq, lk, 2, 1, 40, 24, device=device))
    cq, ck = _cu(lq, device), _cu(lk, device)
    with bounds_checked(*KERNELS) as launches:
        out, lse = fused_kernels.varlen_attention(q, k, v, cq, ck, 37, 33, causal=True, return_lse=True)
        dq, dk, dv = torch.autograd.grad((out * 1.5).sum() + lse.masked_fill(lse.isinf(), 0).sum(), (q, k, v))
    assert launches == {name: 1 for name in KERNELS}
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not t.isnan().any(), name
    want = ref.varlen_attention_ref(q.detach().double(), k.detach().double(), v.detach().double(), cq, ck, 37, 33,
                                    causal=True)
    assert_close(out, want, name="out", **FP32_TOL)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("case, exc, match", [
    ("float_cu", _checks.ArgumentTypeError, "cu_seqlens_q must be int32 or int64"),
    ("not_zero", _checks.ArgumentValueError, "cu_seqlens_q must start at 0"),
    ("decreasing", _checks.ArgumentValueError, "cu_seqlens_k must be non-decreasing"),
    ("wrong_end", _checks.ArgumentValueError, "cu_seqlens_q must end at the number of packed tokens 8"),
    ("max_small", _checks.ArgumentValueError, "max_seqlen_k is 3 but the longest sequence has 5 tokens"),
    ("batch", _checks.ArgumentValueError, "cu_seqlens_q has 2 sequences but cu_seqlens_k has 1"),
    ("not_tensor", TypeError, "cu_seqlens_k must be a torch.Tensor"),
])
def test_bad_cu_seqlens(case, exc, match, device):
    q, k, v = _packed([3, 5], [5, 3], 2, 2, 16, device=device)
    cq, ck, mq, mk = _cu([3, 5], device), _cu([5, 3], device), 5, 5
    if case == "float_cu":
        cq = cq.float()
    elif case == "not_zero":
        cq = torch.tensor([1, 3, 8], dtype=torch.int32, device=device)
    elif case == "decreasing":
        ck = torch.tensor([0, 9, 8], dtype=torch.int32, device=device)
    elif case == "wrong_end":
        cq = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    elif case == "max_small":
        mk = 3
    elif case == "batch":
        ck = torch.tensor([0, 8], dtype=torch.int32, device=device)
    elif case == "not_tensor":
        ck = [0, 5, 8]
    with pytest.raises(exc, match=match):
        fused_kernels.varlen_attention(q, k, v, cq, ck, mq, mk)


@pytest.mark.triton_only
def test_check_false_skips_host_checks(device):
    """check=False reads nothing on the host; valid inputs give the same result."""
    lq, lk = [3, 9], [4, 6]
    q, k, v = _packed(lq, lk, 2, 2, 16, device=device)
    cq, ck = _cu(lq, device), _cu(lk, device)
    a = fused_kernels.varlen_attention(q, k, v, cq, ck, 9, 6)
    b = fused_kernels.varlen_attention(q, k, v, cq, ck, 9, 6, check=False)
    assert torch.equal(a, b)


@pytest.mark.triton_only   # the kernels' custom ops (the PyTorch path has none)
def test_opcheck(device):
    """Schema, fake implementation (shapes and strides), autograd registration and AOT dispatch of the
    packed forward and backward ops."""
    lq, lk = [3, 0, 5], [4, 2, 1]
    q, k, v = (t.requires_grad_() for t in _packed(lq, lk, 2, 1, 16, 8, device=device))
    cq, ck = _cu(lq, device), _cu(lk, device)
    torch.library.opcheck(varlen_mod.varlen_attention_fwd, (q, k, v, cq, ck, 5, 4, 0.25, True, 0.0))
    out, lse, seed = varlen_mod.varlen_attention_fwd(q, k, v, cq, ck, 5, 4, 0.25, True, 0.0)
    do, dl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(varlen_mod.varlen_attention_bwd,
                          (do, dl, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cq, ck, 5, 4,
                           seed, 0.25, True, 0.0))

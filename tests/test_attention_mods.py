"""The attention variants on the Triton kernels (interpreted on the CPU): window, ALiBi, softcap, document ids,
prefix-LM and user score_mod / mask_mod, forward and every gradient against the float64 reference built from
the same definitions (``fused_kernels.reference.attention_ref``), block skipping, bounds, dropout together with a
mod, strided inputs and gradcheck. The PyTorch path of the same arguments: tests/test_attention_variants.py."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_close, bounds_checked

import fused_kernels
from fused_kernels.reference import attention_ref

pytestmark = pytest.mark.triton_only

KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


@triton.jit
def distance(score, b, h, q_idx, kv_idx):
    return score - 0.05 * (q_idx - kv_idx) + 0.01 * h


@triton.jit
def distance_grad(score, b, h, q_idx, kv_idx):
    return score * 0.0 + 1.0


@triton.jit
def squash(score, b, h, q_idx, kv_idx):
    return score * score * 0.25


@triton.jit
def squash_grad(score, b, h, q_idx, kv_idx):
    return score * 0.5


@triton.jit
def stripes(b, h, q_idx, kv_idx):
    return (q_idx + 2 * kv_idx + b) % 3 != 1


@triton.jit
def table_bias(score, b, h, q_idx, kv_idx, args):
    return score + tl.load(args[0] + h * 64 + (q_idx + kv_idx) % 64)


@triton.jit
def table_bias_grad(score, b, h, q_idx, kv_idx, args):
    return score * 0.0 + 1.0


def _table_bias_torch(score, b, h, q_idx, kv_idx, args):
    return score + args[0].reshape(-1)[(h * 64 + (q_idx + kv_idx) % 64)]


def _inputs(b, h, hkv, l, s, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, m, d, generator=gen, dtype=torch.float64) for n, m in ((h, l), (hkv, s), (hkv, s)))
    return [t.to(dtype).to(device).requires_grad_() for t in (q, k, v)]


def check(variant: dict, *, b=1, h=2, hkv=1, l=37, s=53, d=16, dtype=torch.float32, device="cpu", causal=False,
          ref_variant: dict | None = None, attn_mask=None, seqlens_k=None):
    """Output and dq, dk, dv (and a float mask's gradient) of the kernels vs the float64 reference."""
    q, k, v = _inputs(b, h, hkv, l, s, d, dtype, device)
    out = fused_kernels.attention(q, k, v, causal=causal, attn_mask=attn_mask, seqlens_k=seqlens_k, **variant)
    grad = torch.randn_like(out)
    wanted = [q, k, v] + ([attn_mask] if attn_mask is not None and attn_mask.requires_grad else [])
    got = torch.autograd.grad(out, wanted, grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = None
    if attn_mask is not None:
        m64 = attn_mask.detach().double().requires_grad_(attn_mask.requires_grad) if attn_mask.is_floating_point() \
            else attn_mask
    ref = attention_ref(q64, k64, v64, causal=causal, attn_mask=m64, seqlens_k=seqlens_k,
                        **(ref_variant if ref_variant is not None else variant))
    wanted64 = [q64, k64, v64] + ([m64] if len(wanted) == 4 else [])
    refs = torch.autograd.grad(ref, wanted64, grad.double())
    tol = TOL.get(dtype, {})
    assert_close(out, ref, **tol)
    # Gradients at the scale of the largest one: a gradient that is 0 in exact arithmetic (a row that keeps one
    # key has dS = 0) is a rounding difference of two equal products in the kernel.
    gscale = max(float(r.abs().max()) for r in refs)
    for name, g, r in zip(("dq", "dk", "dv", "dmask"), got, refs):
        ratio = gscale / max(float(r.abs().max()), 1e-3)
        assert_close(g, r, name=name, **({} if not tol else dict(atol=tol["atol"] * ratio, rtol=tol["rtol"])))
    return out, got


def _docs(lengths_per_batch, device):
    rows = [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_batch]
    return torch.stack(rows).to(device)


WINDOWS = [(0, 0), (3, -1), (-1, 2), (100, 100)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_window(device, window, causal):
    check(dict(window=window), causal=causal, device=device)


@pytest.mark.parametrize("l,s", [(53, 37), (37, 37), (1, 45)])
def test_window_lengths(device, l, s):
    """L > S (bottom-right: the first rows see nothing under causal), L == S, one query (the decode shape,
    which the variants send to the main kernel)."""
    out, (dq, _, _) = check(dict(window=(4, 0)), causal=True, l=l, s=s, device=device)
    if l > s:      # rows i + S - L < 0 keep no key: output 0, no gradient
        dead = slice(0, l - s)
        assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
        assert torch.equal(dq[:, :, dead], torch.zeros_like(dq[:, :, dead]))


@pytest.mark.parametrize("shape", ["(H,)", "(B, H)"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi(device, shape, causal):
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    if shape == "(B, H)":
        slopes = torch.stack([slopes, slopes.flip(0)])
    check(dict(alibi_slopes=slopes), b=2, h=4, hkv=2, causal=causal, device=device)


@pytest.mark.parametrize("cap", [0.5, 5.0])
def test_softcap(device, cap):
    check(dict(softcap=cap), causal=True, device=device)


def test_documents_single_and_pair(device):
    ids = _docs([[10, 20, 7], [37]], device)
    check(dict(document_ids=ids), b=2, l=37, s=37, device=device)
    q_ids = _docs([[5, 32], [20, 17]], device)
    k_ids = _docs([[50, 3], [1, 52]], device)
    check(dict(document_ids=(q_ids, k_ids)), b=2, device=device)


def test_documents_without_keys_give_zero_rows(device):
    """A query whose document has no key: output 0 and zero gradient."""
    q_ids = torch.zeros(2, 37, dtype=torch.int64, device=device)
    q_ids[:, 30:] = 7
    k_ids = torch.zeros(2, 53, dtype=torch.int64, device=device)
    out, (dq, _, _) = check(dict(document_ids=(q_ids, k_ids)), b=2, device=device)
    assert torch.equal(out[:, :, 30:], torch.zeros_like(out[:, :, 30:]))
    assert torch.equal(dq[:, :, 30:], torch.zeros_like(dq[:, :, 30:]))


def test_prefix_lengths(device):
    check(dict(prefix_lengths=torch.tensor([0, 20], device=device)), b=2, causal=True, l=45, s=45, device=device)
    check(dict(prefix_lengths=torch.tensor([100, 3], device=device)), b=2, causal=True, device=device)


def test_score_mod_and_mask_mod(device):
    check(dict(score_mod=distance, score_mod_grad=distance_grad, mask_mod=stripes), device=device)
    check(dict(score_mod=squash, score_mod_grad=squash_grad), causal=True, device=device)


def test_mod_args(device):
    table = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(device)
    check(dict(score_mod=table_bias, score_mod_grad=table_bias_grad, mod_args=(table,)), device=device,
          ref_variant=dict(score_mod=_table_bias_torch, mod_args=(table,)))


def test_everything_at_once_float64_with_masks(device):
    """Window + ALiBi + softcap + documents + score_mod + mask_mod + a float mask that requires grad +
    seqlens_k, in float64."""
    slopes = torch.tensor([0.3, 0.2, 0.1, 0.05], device=device)
    ids = _docs([[20, 17], [5, 32]], device)
    mask = torch.randn(2, 1, 37, 37, dtype=torch.float64, device=device).requires_grad_()
    variant = dict(window=(9, 3), alibi_slopes=slopes, softcap=3.0, document_ids=ids, score_mod=distance,
                   score_mod_grad=distance_grad, mask_mod=stripes)
    check(variant, b=2, h=4, hkv=2, l=37, s=37, dtype=torch.float64, device=device, attn_mask=mask,
          seqlens_k=torch.tensor([30, 37], device=device))


def test_block_mask_reused(device):
    """A block mask made once gives the same result as the one attention builds itself."""
    q, k, v = _inputs(2, 2, 1, 37, 53, 16, torch.float32, device)
    bm = fused_kernels.block_mask(stripes, 2, None, 37, 53, block=64, device=device)
    a = fused_kernels.attention(q, k, v, mask_mod=stripes, block_mask=bm)
    b = fused_kernels.attention(q, k, v, mask_mod=stripes)
    assert torch.equal(a, b)


def test_bfloat16_two_x_rule(device):
    """bf16 (upcast under the interpreter) within twice PyTorch's own bf16 error of the float64 reference."""
    q, k, v = _inputs(1, 2, 2, 40, 40, 32, torch.bfloat16, device)
    variant = dict(window=(7, 0), softcap=4.0, alibi_slopes=torch.tensor([0.5, 0.25], device=device))
    out = fused_kernels.attention(q, k, v, causal=True, **variant)
    ref = attention_ref(q.double(), k.double(), v.double(), causal=True, **variant)
    torch_out = attention_ref(q.detach(), k.detach(), v.detach(), causal=True, **variant)
    assert_close(out, ref, torch_out)


def test_strided_inputs(device):
    """q, k, v as (B, L, H, D) views transposed to (B, H, L, D)."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(1, n, 2, 16, generator=gen).to(device) for n in (37, 53, 53)]
    q, k, v = (t.transpose(1, 2) for t in base)
    variant = dict(window=(6, 2), alibi_slopes=torch.full((2,), 0.1, device=device))
    out = fused_kernels.attention(q, k, v, **variant)
    ref = attention_ref(q.double(), k.double(), v.double(), **variant)
    assert_close(out, ref, **TOL[torch.float32])


def test_dropout_keeps_the_mask(device):
    """With dropout and a window, every kept probability lies inside the window: v is the identity, so the output
    row is the dropped-out probability row itself; outside the band it is exactly 0."""
    s, l = 40, 40
    q = torch.randn(1, 1, l, 16, device=device)
    k = torch.randn(1, 1, s, 16, device=device)
    v = torch.eye(s, device=device)[None, None]
    out = fused_kernels.attention(q, k, v, window=(5, 0), causal=True, softcap=2.0, dropout_p=0.3)
    i = torch.arange(l, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    outside = (j > i) | (j < i - 5)
    assert torch.equal(out[0, 0][outside], torch.zeros_like(out[0, 0][outside]))
    assert (out[0, 0][~outside] == 0).any() and (out[0, 0][~outside] > 0).any()


def test_gradcheck_float64(device):
    q, k, v = (t.detach().double().requires_grad_() for t in _inputs(1, 2, 1, 7, 11, 8, torch.float64, device))
    slopes = torch.tensor([0.3, 0.1], device=device)

    def f(q, k, v):
        return fused_kernels.attention(q, k, v, window=(4, 1), alibi_slopes=slopes, softcap=1.5, score_mod=squash,
                                 score_mod_grad=squash_grad)
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, fast_mode=True)


def test_blocks_outside_the_band_are_skipped_and_bounds_hold(device):
    """The sparse path reads and writes nothing out of bounds (guard bytes), and the kernels visit only the
    non-empty tiles: a window of 0 on 4 x 4 blocks of 32 visits the diagonal tiles alone."""
    q, k, v = _inputs(1, 1, 1, 128, 128, 16, torch.float32, device)
    with bounds_checked(*KERNELS):
        out = fused_kernels.attention(q, k, v, window=(0, 0))
        out.sum().backward()
    counts = fused_kernels.attention_tiles(q, k, window=(0, 0))
    assert counts["visited"] == counts["partial"] + counts["full"]
    if device == "cpu":     # the interpreter's tiles are 32 x 32
        assert counts["visited"] == 4 and counts["partial"] == 4 and counts["full"] == 0


def _brute_visited(keep: torch.Tensor, bm: int, bn: int) -> int:
    """Tiles of a dense (B, H, L, S) keep mask with at least one kept element."""
    b, h, l, s = keep.shape
    pad = torch.zeros(b, h, triton.cdiv(l, bm) * bm, triton.cdiv(s, bn) * bn, dtype=torch.bool)
    pad[:, :, :l, :s] = keep
    tiles = pad.reshape(b, h, pad.shape[2] // bm, bm, pad.shape[3] // bn, bn)
    return int(tiles.any(5).any(3).sum())


@pytest.mark.parametrize("case", ["causal", "window", "document"])
def test_tile_counts_equal_the_analytic_counts(device, case):
    """``fused_kernels.attention_tiles`` counts what the forward visits; it equals the tiles a dense mask says are
    non-empty, and the closed forms: causal over n x n blocks visits n (n + 1) / 2 tiles per head (n partial);
    a window of w = one block visits the diagonal and the one below it."""
    b, h, n = 1, 2, 4
    l = s = 32 * n if device == "cpu" else 128 * n
    q, k, v = _inputs(b, h, h, l, s, 16, torch.float32, device)
    i = torch.arange(l)[:, None]
    j = torch.arange(s)[None, :]
    if case == "causal":
        counts = fused_kernels.attention_tiles(q, k, causal=True)
        keep = (j <= i)[None, None].expand(b, h, l, s)
        expect = h * n * (n + 1) // 2
    elif case == "window":
        w = l // n
        counts = fused_kernels.attention_tiles(q, k, causal=True, window=(w, 0))
        keep = ((j <= i) & (j >= i - w))[None, None].expand(b, h, l, s)
        expect = h * (n + (n - 1))
    else:
        lengths = [l // n, l // n, 2 * l // n]          # three documents: 1, 1 and 2 blocks long
        ids = _docs([lengths], device)
        counts = fused_kernels.attention_tiles(q, k, document_ids=ids)
        keep = (ids.cpu()[:, :, None] == ids.cpu()[:, None, :])[:, None].expand(b, h, l, s)
        expect = h * (1 + 1 + 4)
    bm, bn = counts["block"]
    assert counts["visited"] == _brute_visited(keep, bm, bn)
    if (bm, bn) == (l // n, s // n):
        assert counts["visited"] == expect


def test_mod_errors(device):
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="score_mod_grad"):
        fused_kernels.attention(q, k, v, score_mod=squash)       # q, k, v require grad: the derivative is needed
    with pytest.raises(TypeError, match="mask_mod"):
        fused_kernels.attention(q, k, v, mask_mod=lambda b, h, i, j: i >= j)


@pytest.mark.parametrize("op_backend", ["triton", "torch"])
def test_prefix_is_causal_or_prefix(device, op_backend):
    """prefix-LM by its definition: the same as a bool mask keep = (j <= i + S - L) | (j < prefix[b])."""
    q, k, v = (t.detach() for t in _inputs(2, 2, 2, 37, 45, 16, torch.float32, device))
    prefix = torch.tensor([20, 50], device=device)
    i = torch.arange(37, device=device)[:, None]
    j = torch.arange(45, device=device)[None, :]
    keep = (j <= i + 8)[None, None] | (j < prefix[:, None, None, None])
    with fused_kernels.use_backend(op_backend):
        out = fused_kernels.attention(q, k, v, causal=True, prefix_lengths=prefix)
    ref = attention_ref(q.double(), k.double(), v.double(), attn_mask=keep)
    assert_close(out, ref, **TOL[torch.float32])

"""Flash-decoding: few queries over long keys. ``_attn_fwd_split_kernel`` packs the queries of a GQA group
into one tile and splits the keys across programs; ``_attn_combine_kernel`` merges the splits by their lse."""

from __future__ import annotations

import triton
import triton.language as tl

from ...._core.launch import split_program_id
from .common import LN2, MASK_NONE, _group_queries, _key_length, _store_partial
from .forward import _fwd_block
from .mods import PLAIN, no_variant_context


@triton.jit(do_not_specialize=["PID1_BASE"])
def _attn_fwd_split_kernel(
    Q,          # (B, H, L, D) any strides, last dim contiguous
    K,          # (B, Hkv, S, D)
    V,          # (B, Hkv, S, DV)
    MASK,       # (B, H, L, S) bool (as uint8) or float mask, broadcast strides (MASK_KIND != 0)
    SEQLENS,    # (B,) int valid key lengths (HAS_SEQLENS)
    OPART,      # (B * Hkv, SPLITS, GROUP * L, DV) partial outputs, contiguous, accumulation dtype
    LSEPART,    # (B * Hkv, SPLITS, GROUP * L) partial lse (log2 units), contiguous
    H, HKV, L, S, D, DV, GROUP, SPLITS, chunk,
    stride_q, stride_k, stride_v,   # (batch, head, row) strides of each tensor
    stride_m,                       # (batch, head, query, key) strides of MASK
    qk_scale, causal_offset, dropout_p, seed,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_SEQLENS: tl.constexpr,   # the causal offset per row (common._key_length)
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    VARIANT: tl.constexpr = PLAIN,   # no variant runs here yet (the launchers pass none): the main kernel has them
    PID1_BASE=0, GRID_SPLIT: tl.constexpr = False,   # a part of a split grid (_core.launch.split_grid)
):
    """Flash-decoding: the rows of one tile are the GROUP * L (query head, query) pairs sharing a key/value
    head, so each key/value block is read once per group; program ``split`` owns keys
    [split * chunk, (split + 1) * chunk)."""
    stride_kb, stride_kh, stride_kn = stride_k
    stride_vb, stride_vh, stride_vn = stride_v
    stride_mb, stride_mh, stride_mm, stride_mn = stride_m
    split = tl.program_id(0)
    bhk = split_program_id(1, PID1_BASE, GRID_SPLIT).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    rows = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok, h, i, q = _group_queries(Q, b, hk, rows, GROUP, L, stride_q, offs_d, D, EVEN_D=EVEN_D, UPCAST=UPCAST)
    m_row = b * stride_mb + h.to(tl.int64) * stride_mh + i.to(tl.int64) * stride_mm
    rng_row = (((b * H + h) * L + i) * S).to(tl.int64)
    kv_len, c_off = _key_length(SEQLENS, b, S, S, causal_offset, HAS_SEQLENS=HAS_SEQLENS, VARLEN=False,
                                ALIGN_SEQLENS=ALIGN_SEQLENS)
    hi = kv_len
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(kv_len, L + c_off), 0)
    lo = split * chunk
    hi = tl.minimum(hi, lo + chunk)
    k_base = K + b * stride_kb + hk * stride_kh + lo * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + lo * stride_vn
    m_base = MASK + lo * stride_mn
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :]
    m_offs = m_row[:, None] + offs_n[None, :] * stride_mn
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M, 1], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    dims = (offs_d, offs_dv, D, DV)
    drop = (seed, rng_row, dropout_p)
    vctx = no_variant_context()
    for start_n in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, start_n, k_base + k_offs, v_base + v_offs, m_base + m_offs, None, None, None,
            i, row_ok, offs_n, dims, hi, c_off, qk_scale, drop, vctx,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=True, SAFE=True, FOLD_SCALE=FOLD_SCALE,
            EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=False, ZERO_V_TAIL=False, HAS_DROPOUT=HAS_DROPOUT,
            UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            VAR=VARIANT)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        if MASK_KIND != MASK_NONE:
            m_base += BLOCK_N * stride_mn
    _store_partial(OPART, LSEPART, acc, m_i, l_i, dropout_p, bhk * SPLITS + split, rows, row_ok, GROUP * L,
                   offs_dv, DV, HAS_DROPOUT=HAS_DROPOUT)


@triton.jit(do_not_specialize=["PID1_BASE"])
def _attn_combine_kernel(
    OPART,      # (B * Hkv, SPLITS, GROUP * L, DV) partial outputs, contiguous
    LSEPART,    # (B * Hkv, SPLITS, GROUP * L) partial lse (log2 units), contiguous
    O,          # (B, H, L, DV) output
    LSE,        # (B, H, L) log-sum-exp (natural log), contiguous
    H, HKV, L, DV, GROUP, SPLITS,
    stride_o,   # (batch, head, row) strides of O
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
    PID1_BASE=0, GRID_SPLIT: tl.constexpr = False,   # a part of a split grid (_core.launch.split_grid)
):
    """Merge the splits of one (b, kv head, row) by their log-sum-exps."""
    stride_ob, stride_oh, stride_om = stride_o
    bhk = split_program_id(1, PID1_BASE, GRID_SPLIT).to(tl.int64)
    row = tl.program_id(0)
    b = bhk // HKV
    h = (bhk % HKV) * GROUP + row // L
    i = row % L
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < SPLITS
    lse2 = tl.load(LSEPART + (bhk * SPLITS + offs_s) * GROUP * L + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse2 - m_safe)                        # (BLOCK_S,)
    total = tl.sum(w, 0)
    o = tl.load(OPART + ((bhk * SPLITS + offs_s[:, None]) * GROUP * L + row) * DV + offs_dv[None, :],
                mask=s_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), (m_safe + tl.math.log2(tl.where(total == 0.0, 1.0, total))) * LN2)
    tl.store(O + b * stride_ob + h * stride_oh + i * stride_om + offs_dv, out.to(O.dtype.element_ty),
             mask=offs_dv < DV)
    tl.store(LSE + (b * H + h) * L + i, lse.to(ACC))

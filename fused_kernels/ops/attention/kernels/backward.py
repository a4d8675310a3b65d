"""Backward kernels, atomics-free and deterministic: ``delta = rowsum(dO * O)`` (preprocess), dK/dV per key
block over every query block of its GQA group, dQ per query block."""

from __future__ import annotations

import triton
import triton.language as tl

from ...._core.launch import split_program_id
from .common import (
    LOG2E,
    MASK_NONE,
    _key_length,
    _key_range,
    _key_walk,
    _next_key_block,
    _packed_bounds,
    _query_program,
    _query_variants,
    _row_tile,
    _scores,
    _stage_range,
    _tile_pair,
)
from .mods import PLAIN, _mask, doc_ids, variant_context


@triton.jit(do_not_specialize=["PID1_BASE"])
def _attn_bwd_preprocess_kernel(
    O,          # (B, H, L, DV) forward output
    DO,         # (B, H, L, DV) its gradient, any strides, last dim contiguous
    DLSE,       # (B, H, L) gradient of the lse, contiguous (HAS_DLSE; else None)
    LSE,        # (B, H, L) forward log-sum-exp (natural log), contiguous
    DELTA,      # (B, H, L) rowsum(dO * O) - dlse, contiguous, accumulation dtype
    LSE2,       # (B, H, L) lse in log2 units, +inf for fully masked rows (p = exp2(s - lse2) = 0), contiguous
    H, L, DV,
    stride_o, stride_do,    # (batch, head, row) strides of O / DO
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
    PID1_BASE=0, GRID_SPLIT: tl.constexpr = False,   # a part of a split grid (_core.launch.split_grid)
):
    stride_ob, stride_oh, stride_om = stride_o
    stride_dob, stride_doh, stride_dom = stride_do
    bh = split_program_id(1, PID1_BASE, GRID_SPLIT).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < L) & (offs_dv[None, :] < DV)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                mask=ok, other=0.0).to(ACC)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=ok, other=0.0).to(ACC)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * L + offs_m, mask=offs_m < L, other=0.0).to(ACC)
    tl.store(DELTA + bh * L + offs_m, delta, mask=offs_m < L)
    lse = tl.load(LSE + bh * L + offs_m, mask=offs_m < L, other=0.0)
    tl.store(LSE2 + bh * L + offs_m, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=offs_m < L)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, start_m,
    q_ptrs, do_ptrs, m_ptrs,   # (BLOCK_M, BLOCK_D) / (BLOCK_M, BLOCK_DV) / (BLOCK_N, BLOCK_M) pointers of this block
    Q_DESC, DO_DESC, desc_at,  # TMA descriptors of (B, H, L, D) q / (B, H, L, DV) do and this program's (b, h)
    LSE2, DELTA,               # (L,) rows of this (b, h)
    offs_m0, offs_n, dims, L, S, kv_len, c_hi, qk_scale, drop, vctx,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK_ROWS: tl.constexpr, PARTIAL: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, VAR: tl.constexpr,
):
    """One query block's contribution to this program's dK, dV, on transposed scores (BLOCK_N, BLOCK_M).
    Rows past L contribute nothing: their lse2 is +inf (p = 0) and q / do load as 0. Keys past kv_len are
    not masked here: their rows of dK / dV are zeroed once at the end. ``c_hi`` is the band's upper diagonal;
    the variants as in ``_fwd_block``, on the transposed index tiles, their masks on PARTIAL tiles only."""
    offs_m = start_m + offs_m0
    row_ok = offs_m < L
    q, do = _tile_pair(q_ptrs, do_ptrs, Q_DESC, DO_DESC, desc_at, start_m, row_ok, dims, CHECK_ROWS=CHECK_ROWS,
                       ZERO_A=False, ZERO_B=False, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, UPCAST=UPCAST,
                       BLOCK_R=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    if CHECK_ROWS:
        lse2 = tl.load(LSE2 + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(LSE2 + offs_m)
        delta = tl.load(DELTA + offs_m)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC)     # (BLOCK_N, BLOCK_M)
    sT, g = _scores(sT, m_ptrs, row_ok[None, :] & (offs_n[:, None] < S), offs_m[None, :], offs_n[:, None], qk_scale,
                    vctx, MASK_KIND=MASK_KIND, FOLD_SCALE=FOLD_SCALE, ACC=ACC, VAR=VAR, NEED_GRAD=True)
    if IS_CAUSAL or (PARTIAL and (VAR.band_lo or VAR.docs or VAR.mask_mod is not None)):
        sT = _mask(sT, offs_m[None, :], offs_n[:, None], kv_len, c_hi, vctx, CHECK_KV=False, CAUSAL=IS_CAUSAL,
                   VAR=VAR)
    if FOLD_SCALE:
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
    else:
        pT = tl.math.exp2(sT - lse2[None, :])
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)    # (BLOCK_N, BLOCK_M)
    if HAS_DROPOUT:
        seed, rng_base, dropout_p = drop
        keep_d = tl.rand(seed, rng_base + offs_m[None, :].to(tl.int64) * S + offs_n[:, None]) >= dropout_p
        pdT = tl.where(keep_d, pT * (1.0 / (1.0 - dropout_p)), 0.0)
        dpT = tl.where(keep_d, dpT * (1.0 / (1.0 - dropout_p)), 0.0)
    else:
        pdT = pT
    dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=ACC)
    dsT = pT * (dpT - delta[None, :])
    if VAR.softcap or VAR.score_mod is not None:
        dsT = dsT * g
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=ACC)
    return dk, dv


@triton.jit
def _dkdv_loop(
    dk, dv, k, v, lo, hi, LIST,  # query blocks [lo, hi), or LIST[lo:hi] (FROM_LIST: a sparse list of the table)
    q_ptrs, do_ptrs, m_ptrs,     # pointers of query block 0
    row_strides,                 # (query row) strides of q / do / the mask
    Q_DESC, DO_DESC, desc_at, LSE2, DELTA,
    offs_m0, offs_n, dims, L, S, kv_len, c_hi, qk_scale, drop, vctx,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK_ROWS: tl.constexpr, PARTIAL: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, FROM_LIST: tl.constexpr,
    VAR: tl.constexpr,
):
    """dK, dV over the query blocks [lo, hi) of one head, every block with the same masks; FROM_LIST: over the
    query blocks ``LIST[lo:hi]``."""
    stride_qm, stride_dom, stride_mm = row_strides
    for it in range(lo, hi, 1 if FROM_LIST else BLOCK_M):
        if FROM_LIST:
            start_m = tl.load(LIST + it) * BLOCK_M
        else:
            start_m = it
        dk, dv = _dkdv_block(
            dk, dv, k, v, start_m, q_ptrs + start_m * stride_qm, do_ptrs + start_m * stride_dom,
            m_ptrs + start_m * stride_mm, Q_DESC, DO_DESC, desc_at, LSE2, DELTA, offs_m0, offs_n, dims, L, S,
            kv_len, c_hi, qk_scale, drop, vctx,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_ROWS=CHECK_ROWS, PARTIAL=PARTIAL, FOLD_SCALE=FOLD_SCALE,
            EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, HAS_DROPOUT=HAS_DROPOUT, UPCAST=UPCAST,
            PRECISION=PRECISION, ACC=ACC, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, VAR=VAR)
    return dk, dv


@triton.jit(do_not_specialize=["PID1_BASE"])
def _attn_bwd_dkdv_kernel(
    Q, K, V,        # (B, H, L, D) / (B, Hkv, S, D) / (B, Hkv, S, DV), any strides, last dim contiguous
    Q_DESC,         # TMA descriptor of Q, block (1, 1, BLOCK_M, BLOCK_D) (TMA; else None)
    DO_DESC,        # TMA descriptor of DO, block (1, 1, BLOCK_M, BLOCK_DV) (TMA; else None)
    MASK,           # (B, H, L, S) bool (as uint8) or float mask, broadcast strides (MASK_KIND; else any tensor)
    SEQLENS,        # (B,) int valid key lengths (HAS_SEQLENS; else None)
    DO,             # (B, H, L, DV) output gradient, any strides, last dim contiguous
    LSE2,           # (B, H, L) lse in log2 units (+inf: fully masked row), contiguous
    DELTA,          # (B, H, L) from the preprocess kernel, contiguous
    DK,             # (B, Hkv, S, D) key gradient, contiguous
    DV_,            # (B, Hkv, S, DV) value gradient, contiguous
    CU_Q, CU_K,     # (B + 1,) cumulative query / key lengths (VARLEN; else None)
    H, HKV, L, S, D, DV, GROUP,
    stride_q, stride_k, stride_v, stride_do,   # (batch, head, row) strides of each tensor
    stride_m,                                  # (batch, head, query, key) strides of MASK
    sm_scale, qk_scale, causal_offset, dropout_p, seed,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_SEQLENS: tl.constexpr,   # the causal offset per row (common._key_length)
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    SPLIT_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, VARLEN: tl.constexpr = False,
    # Variants as in the forward kernel (mods.py), all off by default.
    SLOPES=None, PREFIX_LEN=None, DOC_Q=None, DOC_K=None, MOD_ARGS=None, LIST_CNT=None, LIST_IDX=None,
    stride_list=None, NN=0, var_args=None,
    SPARSE: tl.constexpr = False, VARIANT: tl.constexpr = PLAIN,
    PID1_BASE=0, GRID_SPLIT: tl.constexpr = False,   # a part of a split grid (_core.launch.split_grid)
):
    """One key block: dK, dV summed over every query block of every query head of its GQA group, in a
    fixed order (deterministic, no atomics). Per head (SPLIT_BLOCKS, the tensor-core dtypes): the diagonal
    query blocks (causal mask), the full ones (no mask at all), the last partial one (row bounds);
    otherwise one loop with every mask. VARLEN: packed sequences as in the forward (L = total_q, S = total_k,
    LSE2 / DELTA (H, total_q), DK / DV_ (Hkv, total_k, D)); a key block past its sequence returns at once.
    SPARSE: per head, the full query blocks of the block table's lists (no mask), then its partial ones."""
    stride_qb, stride_qh, stride_qm = stride_q
    stride_kn, stride_vn = stride_k[2], stride_v[2]
    stride_dob, stride_doh, stride_dom = stride_do
    stride_mb, stride_mh, stride_mm, stride_mn = stride_m
    pid_n = tl.program_id(0)
    bhk = split_program_id(1, PID1_BASE, GRID_SPLIT).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    start_n = pid_n * BLOCK_N
    seq_s = S
    if VARLEN:
        q_start, seq_l, k_start, seq_s = _packed_bounds(CU_Q, CU_K, b)
        if start_n >= seq_s:
            return
        Q += q_start * stride_qm
        DO += q_start * stride_dom
        K += k_start * stride_kn
        V += k_start * stride_vn
        c_off = seq_s - seq_l
        krow0 = hk * S + k_start
        out_lim = seq_s
    else:
        seq_l = L
        c_off = causal_offset
        krow0 = bhk * S
        out_lim = S
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_len, c_off = _key_length(SEQLENS, b, S, seq_s, c_off, HAS_SEQLENS=HAS_SEQLENS, VARLEN=VARLEN,
                                ALIGN_SEQLENS=ALIGN_SEQLENS)
    col_ok = offs_n < kv_len
    k = _row_tile(K, b, hk, offs_n, col_ok, offs_d, stride_k, D, EVEN_C=EVEN_D, UPCAST=UPCAST)
    v = _row_tile(V, b, hk, offs_n, col_ok, offs_dv, stride_v, DV, EVEN_C=EVEN_DV, UPCAST=UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    # Query blocks [lo, diag_hi) see part of this key block (causal mask); [diag_hi, rows_full) all of it;
    # [max(diag_hi, rows_full), L) is the last partial block. A key block past kv_len gets no work.
    lo = 0
    diag_hi = 0
    if IS_CAUSAL:
        lo = (tl.maximum(start_n - c_off, 0) // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - c_off, 0), BLOCK_M) * BLOCK_M, seq_l)
        diag_hi = tl.maximum(diag_hi, lo)
    hi = seq_l
    if start_n >= kv_len:
        hi = 0
    rows_full = (hi // BLOCK_M) * BLOCK_M
    tail_lo = tl.maximum(diag_hi, rows_full)
    dims = (offs_d, offs_dv, D, DV)
    row_strides = (stride_qm, stride_dom, stride_mm)
    sm_scale_v, softcap, win_left, win_right = sm_scale, 1.0, 0, 0
    if var_args is not None:
        sm_scale_v, softcap, win_left, win_right = var_args
    prefix_len = 0
    if VARIANT.prefix:
        prefix_len = tl.minimum(tl.load(PREFIX_LEN + b), kv_len)
    if VARIANT.docs:    # the program's key rows' document ids, once (``doc_ids``)
        DOC_K = doc_ids(DOC_K, b, S, offs_n[:, None])
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        if VARLEN:
            row0 = h * L + q_start
        else:
            row0 = bh * L
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m0[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m0[:, None] * stride_dom + offs_dv[None, :]
        m_ptrs = (MASK + b * stride_mb + h * stride_mh + offs_m0[None, :].to(tl.int64) * stride_mm
                  + offs_n[:, None] * stride_mn)
        slope = 0.0
        if VARIANT.alibi:
            slope = tl.load(SLOPES + bh)
        desc_at = (b.to(tl.int32), h.to(tl.int32))
        drop = (seed, row0 * S, dropout_p)
        vctx = variant_context(b.to(tl.int32), h.to(tl.int32), c_off, c_off - win_left, prefix_len, sm_scale_v,
                               softcap, slope, seq_l, S, DOC_Q, DOC_K, MOD_ARGS)
        if SPARSE:
            stride_lk, stride_lb, stride_lh = stride_list
            row = b * stride_lb + h * stride_lh + pid_n
            for kind in tl.static_range(2):    # the full query blocks (no mask), then the partial ones
                dk, dv = _dkdv_loop(
                    dk, dv, k, v, 0, tl.load(LIST_CNT + kind * stride_lk + row),
                    LIST_IDX + (kind * stride_lk + row) * NN, q_ptrs, do_ptrs, m_ptrs, row_strides, Q_DESC, DO_DESC,
                    desc_at, LSE2 + row0, DELTA + row0,
                    offs_m0, offs_n, dims, seq_l, S, kv_len, c_off + win_right, qk_scale, drop, vctx,
                    MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL and kind == 1, CHECK_ROWS=True, PARTIAL=kind == 1,
                    FOLD_SCALE=FOLD_SCALE, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, HAS_DROPOUT=HAS_DROPOUT,
                    UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                    BLOCK_DV=BLOCK_DV, FROM_LIST=True, VAR=VARIANT)
        elif SPLIT_BLOCKS:
            # Query blocks [lo, diag_hi): causal mask; [diag_hi, rows_full): no mask; then the partial tail.
            for stage in tl.static_range(3):
                if stage == 0:
                    start, stop = lo, tl.minimum(diag_hi, hi)
                elif stage == 1:
                    start, stop = diag_hi, rows_full
                else:
                    start, stop = tail_lo, hi
                dk, dv = _dkdv_loop(
                    dk, dv, k, v, start, stop, LIST_IDX, q_ptrs, do_ptrs, m_ptrs, row_strides, Q_DESC, DO_DESC,
                    desc_at, LSE2 + row0, DELTA + row0, offs_m0, offs_n, dims, seq_l, S, kv_len, c_off, qk_scale,
                    drop, vctx,
                    MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL and stage == 0, CHECK_ROWS=stage != 1, PARTIAL=False,
                    FOLD_SCALE=FOLD_SCALE, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, HAS_DROPOUT=HAS_DROPOUT,
                    UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                    BLOCK_DV=BLOCK_DV, FROM_LIST=False, VAR=VARIANT)
        else:   # one loop, every mask on: fewer live registers for the fp32 / fp64 tiles
            dk, dv = _dkdv_loop(
                dk, dv, k, v, lo, hi, LIST_IDX, q_ptrs, do_ptrs, m_ptrs, row_strides, Q_DESC, DO_DESC, desc_at,
                LSE2 + row0, DELTA + row0, offs_m0, offs_n, dims, seq_l, S, kv_len, c_off, qk_scale, drop, vctx,
                MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_ROWS=True, PARTIAL=False, FOLD_SCALE=FOLD_SCALE,
                EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, HAS_DROPOUT=HAS_DROPOUT, UPCAST=UPCAST,
                PRECISION=PRECISION, ACC=ACC, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, FROM_LIST=False,
                VAR=VARIANT)
    dk = tl.where(col_ok[:, None], dk * sm_scale, 0.0)      # keys past kv_len: no gradient
    dv = tl.where(col_ok[:, None], dv, 0.0)
    out_ok = offs_n[:, None] < out_lim
    tl.store(DK + (krow0 + offs_n[:, None]) * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=out_ok & (offs_d[None, :] < D))
    tl.store(DV_ + (krow0 + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=out_ok & (offs_dv[None, :] < DV))


@triton.jit
def _dq_block(
    dq, q, do, lse2, delta, start_n,
    k_ptrs, v_ptrs, m_ptrs,    # (BLOCK_N, BLOCK_D) / (BLOCK_N, BLOCK_DV) / (BLOCK_M, BLOCK_N) pointers of this block
    K_DESC, V_DESC, desc_at,   # TMA descriptors of (B, Hkv, S, D) k / v and this program's (b, kv head) (TMA)
    offs_m, row_ok, offs_n, dims, S, kv_len, c_hi, qk_scale, drop, vctx,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK_BOUNDS: tl.constexpr, FOLD_SCALE: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr, ZERO_KV_TAIL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, VAR: tl.constexpr,
):
    """One key block's contribution to this program's dQ; masks (key bound + causal limit as one compare)
    only in the CHECK_BOUNDS blocks. Keys in [kv_len, S) are zeroed (ZERO_KV_TAIL) where TMA loads them:
    ds = 0 must not meet a NaN there. The variants as in ``_fwd_block``; ``ds`` is taken back through the score
    mods by their derivative (``_mod_scores``)."""
    cols = start_n + offs_n
    col_ok = cols < kv_len
    k, v = _tile_pair(k_ptrs, v_ptrs, K_DESC, V_DESC, desc_at, start_n, col_ok, dims, CHECK_ROWS=CHECK_BOUNDS,
                      ZERO_A=ZERO_KV_TAIL, ZERO_B=ZERO_KV_TAIL, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, UPCAST=UPCAST,
                      BLOCK_R=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)          # (BLOCK_M, BLOCK_N)
    s, g = _scores(s, m_ptrs, row_ok[:, None] & (cols[None, :] < S), offs_m[:, None], cols[None, :], qk_scale, vctx,
                   MASK_KIND=MASK_KIND, FOLD_SCALE=FOLD_SCALE, ACC=ACC, VAR=VAR, NEED_GRAD=True)
    if CHECK_BOUNDS:
        s = _mask(s, offs_m[:, None], cols[None, :], kv_len, c_hi, vctx, CHECK_KV=True, CAUSAL=IS_CAUSAL, VAR=VAR)
    if FOLD_SCALE:
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
    else:
        p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)           # (BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        seed, rng_row, dropout_p = drop
        keep_d = tl.rand(seed, rng_row[:, None] + cols[None, :]) >= dropout_p
        dp = tl.where(keep_d, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if VAR.softcap or VAR.score_mod is not None:
        ds = ds * g
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=ACC)


@triton.jit(do_not_specialize=["PID1_BASE"])
def _attn_bwd_dq_kernel(
    Q, K, V,        # (B, H, L, D) / (B, Hkv, S, D) / (B, Hkv, S, DV), any strides, last dim contiguous
    K_DESC,         # TMA descriptor of K, block (1, 1, BLOCK_N, BLOCK_D) (TMA; else None)
    V_DESC,         # TMA descriptor of V, block (1, 1, BLOCK_N, BLOCK_DV) (TMA; else None)
    MASK,           # (B, H, L, S) bool (as uint8) or float mask, broadcast strides (MASK_KIND; else any tensor)
    SEQLENS,        # (B,) int valid key lengths (HAS_SEQLENS; else None)
    DO,             # (B, H, L, DV) output gradient, any strides, last dim contiguous
    LSE2,           # (B, H, L) lse in log2 units (+inf: fully masked row), contiguous
    DELTA,          # (B, H, L) from the preprocess kernel, contiguous
    DQ,             # (B, H, L, D) query gradient, contiguous
    CU_Q, CU_K,     # (B + 1,) cumulative query / key lengths (VARLEN; else None)
    H, L, S, D, DV, GROUP,
    stride_q, stride_k, stride_v, stride_do,   # (batch, head, row) strides of each tensor
    stride_m,                                  # (batch, head, query, key) strides of MASK
    sm_scale, qk_scale, causal_offset, dropout_p, seed,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_SEQLENS: tl.constexpr,   # the causal offset per row (common._key_length)
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, VARLEN: tl.constexpr = False,
    # Variants as in the forward kernel (mods.py), all off by default.
    SLOPES=None, PREFIX_LEN=None, DOC_Q=None, DOC_K=None, MOD_ARGS=None, LIST_CNT=None, LIST_IDX=None,
    stride_list=None, NN=0, var_args=None,
    SPARSE: tl.constexpr = False, VARIANT: tl.constexpr = PLAIN,
    PID1_BASE=0, GRID_SPLIT: tl.constexpr = False,   # a part of a split grid (_core.launch.split_grid)
):
    """VARLEN: packed sequences as in the forward (L = total_q, S = total_k, LSE2 / DELTA (H, total_q),
    DQ (H, total_q, D)). SPARSE and the other variants as in the forward kernel."""
    stride_kn, stride_vn, stride_mn = stride_k[2], stride_v[2], stride_m[3]    # key-row steps of the loops
    Q, K, V, DO, b, h, hk, bh, start_m, offs_m, row_ok, row0, seq_l, seq_s, c_off = _query_program(
        Q, K, V, DO, CU_Q, CU_K, H, L, S, GROUP, causal_offset, PID1_BASE,
        (stride_q[2], stride_kn, stride_vn, stride_do[2]),
        IS_CAUSAL=IS_CAUSAL, VARLEN=VARLEN, GRID_SPLIT=GRID_SPLIT, BLOCK_M=BLOCK_M)
    if VARLEN:
        if start_m >= seq_l:    # a query block past its packed sequence
            return
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _row_tile(Q, b, h, offs_m, row_ok, offs_d, stride_q, D, EVEN_C=EVEN_D, UPCAST=UPCAST)
    do = _row_tile(DO, b, h, offs_m, row_ok, offs_dv, stride_do, DV, EVEN_C=EVEN_DV, UPCAST=UPCAST)
    offs_n = tl.arange(0, BLOCK_N)
    lse2 = tl.load(LSE2 + row0 + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row0 + offs_m, mask=row_ok, other=0.0)
    k_base, v_base, m_base, k_offs, v_offs, m_offs = _key_walk(K, V, MASK, b, h, hk, offs_m, offs_n, offs_d, offs_dv,
                                                               stride_k, stride_v, stride_m)
    rng_row = ((row0 + offs_m) * S).to(tl.int64)
    kv_len, c_off = _key_length(SEQLENS, b, S, seq_s, c_off, HAS_SEQLENS=HAS_SEQLENS, VARLEN=VARLEN,
                                ALIGN_SEQLENS=ALIGN_SEQLENS)
    hi, full_hi = _key_range(start_m, kv_len, c_off, IS_CAUSAL=IS_CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    desc_at = (b.to(tl.int32), hk.to(tl.int32))
    dims = (offs_d, offs_dv, D, DV)
    drop = (seed, rng_row, dropout_p)
    vctx, win_right = _query_variants(var_args, sm_scale, SLOPES, PREFIX_LEN, DOC_Q, DOC_K, MOD_ARGS, b, h, bh,
                                      kv_len, c_off, seq_l, S, offs_m, VARIANT=VARIANT)
    if SPARSE:
        stride_lk, stride_lb, stride_lh = stride_list
        row = b * stride_lb + h * stride_lh + start_m // BLOCK_M
        for kind in tl.static_range(2):    # the full key blocks (no mask), then the partial ones
            n_blocks = tl.load(LIST_CNT + kind * stride_lk + row)
            for t in range(0, n_blocks):
                start_n = tl.load(LIST_IDX + (kind * stride_lk + row) * NN + t) * BLOCK_N
                dq = _dq_block(
                    dq, q, do, lse2, delta, start_n, k_base + start_n * stride_kn + k_offs,
                    v_base + start_n * stride_vn + v_offs, m_base + start_n * stride_mn + m_offs, K_DESC, V_DESC,
                    desc_at, offs_m, row_ok, offs_n, dims, S, kv_len, c_off + win_right, qk_scale, drop, vctx,
                    MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=kind == 1, FOLD_SCALE=FOLD_SCALE,
                    EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_KV_TAIL=HAS_SEQLENS, HAS_DROPOUT=HAS_DROPOUT,
                    UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                    BLOCK_DV=BLOCK_DV, VAR=VARIANT)
    else:
        # The mask-free key blocks [0, full_hi), then the bounds / causal-diagonal ones [full_hi, hi).
        for stage in tl.static_range(2):
            lo, stop = _stage_range(full_hi, hi, STAGE=stage)
            for start_n in range(lo, stop, BLOCK_N):
                dq = _dq_block(
                    dq, q, do, lse2, delta, start_n, k_base + k_offs, v_base + v_offs, m_base + m_offs, K_DESC,
                    V_DESC, desc_at, offs_m, row_ok, offs_n, dims, S, kv_len, c_off, qk_scale, drop, vctx,
                    MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL and stage == 1, CHECK_BOUNDS=stage == 1,
                    FOLD_SCALE=FOLD_SCALE, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_KV_TAIL=HAS_SEQLENS,
                    HAS_DROPOUT=HAS_DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, VAR=VARIANT)
                k_base, v_base, m_base = _next_key_block(k_base, v_base, m_base, stride_kn, stride_vn, stride_mn,
                                                         TMA=TMA, MASKED=MASK_KIND != MASK_NONE, BLOCK_N=BLOCK_N)
    dq *= sm_scale
    tl.store(DQ + (row0 + offs_m[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))

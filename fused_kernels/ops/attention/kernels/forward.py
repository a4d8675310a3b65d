"""Forward kernel: one program per (query block, batch * head) streams key/value blocks through an online
softmax (``_fwd_block``), with separate loops for the mask-free and the bounds/causal key blocks."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LN2,
    MASK_NONE,
    _finalize,
    _key_length,
    _key_range,
    _key_walk,
    _next_key_block,
    _query_program,
    _query_variants,
    _row_tile,
    _scores,
    _stage_range,
    _tile_pair,
)
from .mods import PLAIN, _mask


@triton.jit
def _fwd_block(
    acc, m_i, l_i, q, start_n,
    k_ptrs, v_ptrs, m_ptrs,     # (BLOCK_N, BLOCK_D) / (BLOCK_N, BLOCK_DV) / (BLOCK_M, BLOCK_N) pointers of this block
    K_DESC, V_DESC, desc_at,    # TMA descriptors of (B, Hkv, S, D) k / v and this program's (b, kv head) (TMA)
    q_pos, row_ok, offs_n, dims, kv_len, c_hi, qk_scale, drop, vctx,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK_BOUNDS: tl.constexpr, SAFE: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    ZERO_V_TAIL: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, VAR: tl.constexpr,
):
    """One key block of the online softmax: returns the updated (acc, m_i, l_i); m_i in log2 units.

    ``dims`` = (offs_d, offs_dv, D, DV); ``drop`` = (seed, rng_row, dropout_p); ``c_hi``: the band's upper
    diagonal (key j <= i + c_hi under IS_CAUSAL); ``vctx`` / ``VAR``: the variants (``mods.py``), their masks
    only on CHECK_BOUNDS blocks, their score mods on every block.
    FOLD_SCALE (scale > 0, no float mask): the row max is taken on the raw dot products and the scale is
    applied inside the exponent, ``exp2(s * qk_scale - m)``: one FFMA per score instead of FMUL + FADD.
    SAFE: a row may have seen only masked scores so far (m_i = -inf): guard -inf - -inf.
    TMA: k and v blocks come from tensor descriptors (zero-filled past S and D, one copy engine request per
    block instead of per-thread addresses); ZERO_V_TAIL: keys past kv_len < S exist (seqlens_k) and their
    values are zeroed in the bounds block. The row sums l_i (BLOCK_M, 1) are FADDs: on sm_90a the tensor-core
    form (p @ ones into (BLOCK_M, 16)) adds 6% tensor-core time (136 vs 128 modelled cycles per 1k scores,
    bf16 d=128) to save issue slots the loop does not lack (``python -m fused_kernels.aot --sass``)."""
    start_n = tl.multiple_of(start_n, BLOCK_N)
    cols = start_n + offs_n
    col_ok = cols < kv_len
    k, v = _tile_pair(k_ptrs, v_ptrs, K_DESC, V_DESC, desc_at, start_n, col_ok, dims, CHECK_ROWS=CHECK_BOUNDS,
                      ZERO_A=False, ZERO_B=ZERO_V_TAIL, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, UPCAST=UPCAST,
                      BLOCK_R=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)          # (BLOCK_M, BLOCK_N)
    if CHECK_BOUNDS:
        m_ok = row_ok[:, None] & col_ok[None, :]
    else:
        m_ok = row_ok[:, None]
    s, _ = _scores(s, m_ptrs, m_ok, q_pos[:, None], cols[None, :], qk_scale, vctx, MASK_KIND=MASK_KIND,
                   FOLD_SCALE=FOLD_SCALE, ACC=ACC, VAR=VAR, NEED_GRAD=False)
    if CHECK_BOUNDS:
        s = _mask(s, q_pos[:, None], cols[None, :], kv_len, c_hi, vctx, CHECK_KV=True, CAUSAL=IS_CAUSAL, VAR=VAR)
    if FOLD_SCALE:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if SAFE:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing seen yet: no NaN from -inf - -inf
    alpha = tl.math.exp2(m_i - m_use)
    if FOLD_SCALE:
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    else:
        p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha[:, None] + tl.sum(p, 1, keep_dims=True)
    if HAS_DROPOUT:
        seed, rng_row, dropout_p = drop
        keep_d = tl.rand(seed, rng_row[:, None] + cols[None, :]) >= dropout_p
        p = tl.where(keep_d, p, 0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["PID1_BASE"])
def _attn_fwd_kernel(
    Q, K, V,        # (B, H, L, D) / (B, Hkv, S, D) / (B, Hkv, S, DV), any strides, last dim contiguous
    K_DESC,         # TMA descriptor of K, block (1, 1, BLOCK_N, BLOCK_D) (TMA; else None)
    V_DESC,         # TMA descriptor of V, block (1, 1, BLOCK_N, BLOCK_DV) (TMA; else None)
    MASK,           # (B, H, L, S) bool (as uint8) or float mask, broadcast strides (MASK_KIND; else any tensor)
    SEQLENS,        # (B,) int valid key lengths (HAS_SEQLENS; else None)
    O,              # (B, H, L, DV) output
    LSE,            # (B, H, L) log-sum-exp, contiguous, accumulation dtype
    CU_Q, CU_K,     # (B + 1,) cumulative query / key lengths (VARLEN; else None)
    H, L, S, D, DV, GROUP,
    stride_q, stride_k, stride_v, stride_o,    # (batch, head, row) strides of each tensor
    stride_m,                                  # (batch, head, query, key) strides of MASK
    qk_scale, causal_offset, dropout_p, seed,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_SEQLENS: tl.constexpr,   # the causal offset per row (common._key_length)
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, VARLEN: tl.constexpr = False,
    # Variants (mods.py), all off by default: the plain kernels compile as without them.
    SLOPES=None,        # (B, H) float32 ALiBi slopes, contiguous (VARIANT.alibi)
    PREFIX_LEN=None,    # (B,) int32 prefix lengths (VARIANT.prefix)
    DOC_Q=None,         # (B, L) int32 query document ids, contiguous (VARIANT.docs)
    DOC_K=None,         # (B, S) int32 key document ids, contiguous (VARIANT.docs)
    MOD_ARGS=None,      # tuple of tensors handed to the user mods (VARIANT.mod_has_args)
    LIST_CNT=None,      # (2, Bm, Hm, n_query_blocks) int32 counts of full / partial key blocks (SPARSE)
    LIST_IDX=None,      # (2, Bm, Hm, n_query_blocks, NN) int32 their key-block indices, ascending (SPARSE)
    stride_list=None,   # (kind, batch, head) strides of LIST_CNT (SPARSE)
    NN=0, var_args=None,   # key blocks per list row; (sm_scale, softcap, win_left, win_right) of the variants
    SPARSE: tl.constexpr = False, VARIANT: tl.constexpr = PLAIN,
    PID1_BASE=0, GRID_SPLIT: tl.constexpr = False,   # a part of a split grid (_core.launch.split_grid)
    WARP_SPECIALIZE: tl.constexpr = False,
):
    """VARLEN: packed sequences, q (total_q, H, D) / k, v (total_k, Hkv, D) seen as (1, H, total, D)
    (batch strides unused, 0), L = total_q, S = total_k, LSE (H, total_q); program (query block, b * H + h)
    reads its sequence's rows from CU_Q / CU_K, returns at once when its block is past the sequence, and uses
    the sequence's own key count and bottom-right causal offset (causal_offset is ignored).

    SPARSE: the key blocks come from a block table's lists (the launcher builds them from the window, prefix,
    document and mask_mod classes and the bounds): the full ones without any mask, the partial ones through
    ``mods._mask``; the band is then key j in [i + causal_offset - win_left, i + causal_offset + win_right]
    (IS_CAUSAL: upper side bounded; VARIANT.band_lo: lower side). Score mods change every score.

    WARP_SPECIALIZE (sm_90a, TMA; the launcher's contract: every key block is full and mask-free, i.e. no causal,
    mask, seqlens_k, dropout, variants, packed or sparse keys, and S a multiple of BLOCK_N): the whole key loop is a
    ``tl.range(warp_specialize=True)`` loop: a producer warp group issues the TMA copies, two consumer warp groups
    (64 query rows each, registers raised by setmaxnreg) run the softmax and the matmuls, coupled by mbarriers
    instead of CTA-wide barriers. Triton's pass (3.6 and 3.9) needs every load the consumers wait on to be a
    descriptor load: q comes from a descriptor made in the kernel (a host descriptor's 128-row box does not fit
    the pass's 64-row halves on 3.9), which takes 128 bytes of global scratch per program (``scratch_launch``).
    It also rejects any other key block in the kernel (a second loop, unrolled blocks before or after, a block
    under ``if``): the bounds / causal-diagonal blocks have no place beside it, hence the contract."""
    stride_ob, stride_oh, stride_om = stride_o
    stride_kn, stride_vn, stride_mn = stride_k[2], stride_v[2], stride_m[3]    # key-row steps of the loops
    Q, K, V, O, b, h, hk, bh, start_m, offs_m, row_ok, row0, seq_l, seq_s, c_off = _query_program(
        Q, K, V, O, CU_Q, CU_K, H, L, S, GROUP, causal_offset, PID1_BASE,
        (stride_q[2], stride_kn, stride_vn, stride_om),
        IS_CAUSAL=IS_CAUSAL, VARLEN=VARLEN, GRID_SPLIT=GRID_SPLIT, BLOCK_M=BLOCK_M)
    if VARLEN:
        if start_m >= seq_l:    # a query block past its packed sequence
            return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if WARP_SPECIALIZE:
        tl.static_assert(TMA and MASK_KIND == MASK_NONE and not (IS_CAUSAL or HAS_SEQLENS or HAS_DROPOUT or VARLEN
                                                                   or SPARSE))
        stride_qb, stride_qh, stride_qm = stride_q
        q_desc = tl.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, shape=[L, D], strides=[stride_qm, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])      # rows past L / D read as 0
        q = q_desc.load([start_m, 0])
        if UPCAST:
            q = q.to(tl.float32)
    else:
        q = _row_tile(Q, b, h, offs_m, row_ok, offs_d, stride_q, D, EVEN_C=EVEN_D, UPCAST=UPCAST)
    k_base, v_base, m_base, k_offs, v_offs, m_offs = _key_walk(K, V, MASK, b, h, hk, offs_m, offs_n, offs_d, offs_dv,
                                                               stride_k, stride_v, stride_m)
    rng_row = ((row0 + offs_m) * S).to(tl.int64)
    kv_len, c_off = _key_length(SEQLENS, b, S, seq_s, c_off, HAS_SEQLENS=HAS_SEQLENS, VARLEN=VARLEN,
                                ALIGN_SEQLENS=ALIGN_SEQLENS)
    hi, full_hi = _key_range(start_m, kv_len, c_off, IS_CAUSAL=IS_CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M, 1], dtype=ACC)    # row sums
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    desc_at = (b.to(tl.int32), hk.to(tl.int32))
    dims = (offs_d, offs_dv, D, DV)
    drop = (seed, rng_row, dropout_p)
    vctx, win_right = _query_variants(var_args, 1.0, SLOPES, PREFIX_LEN, DOC_Q, DOC_K, MOD_ARGS, b, h, bh, kv_len,
                                      c_off, seq_l, S, offs_m, VARIANT=VARIANT)
    if SPARSE:
        stride_lk, stride_lb, stride_lh = stride_list
        row = b * stride_lb + h * stride_lh + start_m // BLOCK_M
        for kind in tl.static_range(2):    # the full key blocks (no mask), then the partial ones
            n_blocks = tl.load(LIST_CNT + kind * stride_lk + row)
            for t in range(0, n_blocks):
                start_n = tl.load(LIST_IDX + (kind * stride_lk + row) * NN + t) * BLOCK_N
                acc, m_i, l_i = _fwd_block(
                    acc, m_i, l_i, q, start_n, k_base + start_n * stride_kn + k_offs,
                    v_base + start_n * stride_vn + v_offs, m_base + start_n * stride_mn + m_offs, K_DESC, V_DESC,
                    desc_at, offs_m, row_ok, offs_n, dims, kv_len, c_off + win_right, qk_scale, drop, vctx,
                    MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=kind == 1, SAFE=True,
                    FOLD_SCALE=FOLD_SCALE, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_V_TAIL=HAS_SEQLENS,
                    HAS_DROPOUT=HAS_DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, VAR=VARIANT)
    elif WARP_SPECIALIZE:
        for start_n in tl.range(0, kv_len, BLOCK_N, warp_specialize=True):   # every block full and mask-free
            acc, m_i, l_i = _fwd_block(
                acc, m_i, l_i, q, start_n, k_base + k_offs, v_base + v_offs, m_base + m_offs, K_DESC, V_DESC,
                desc_at, offs_m, row_ok, offs_n, dims, kv_len, c_off, qk_scale, drop, vctx,
                MASK_KIND=MASK_KIND, IS_CAUSAL=False, CHECK_BOUNDS=False, SAFE=False, FOLD_SCALE=FOLD_SCALE,
                EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_V_TAIL=False, HAS_DROPOUT=False, UPCAST=UPCAST,
                PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                VAR=VARIANT)
    else:
        # The mask-free key blocks [0, full_hi), then the bounds / causal-diagonal ones [full_hi, hi).
        for stage in tl.static_range(2):
            lo, stop = _stage_range(full_hi, hi, STAGE=stage)
            for start_n in range(lo, stop, BLOCK_N):
                acc, m_i, l_i = _fwd_block(
                    acc, m_i, l_i, q, start_n, k_base + k_offs, v_base + v_offs, m_base + m_offs, K_DESC, V_DESC,
                    desc_at, offs_m, row_ok, offs_n, dims, kv_len, c_off, qk_scale, drop, vctx,
                    MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL and stage == 1, CHECK_BOUNDS=stage == 1,
                    SAFE=stage == 1 or MASK_KIND != MASK_NONE or VARIANT.score_mod is not None,
                    FOLD_SCALE=FOLD_SCALE, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_V_TAIL=HAS_SEQLENS,
                    HAS_DROPOUT=HAS_DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, VAR=VARIANT)
                k_base, v_base, m_base = _next_key_block(k_base, v_base, m_base, stride_kn, stride_vn, stride_mn,
                                                         TMA=TMA, MASKED=MASK_KIND != MASK_NONE, BLOCK_N=BLOCK_N)
    out, lse2, empty = _finalize(acc, m_i, l_i, dropout_p, HAS_DROPOUT=HAS_DROPOUT)
    lse = tl.where(empty, float("-inf"), lse2 * LN2)        # fully masked row: output 0, lse -inf
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + row0 + offs_m, lse, mask=row_ok)

"""Forward kernel: one program per (query block, batch * head) streams key/value blocks through an online
softmax (``_fwd_block``), with separate loops for the mask-free and the bounds/causal key blocks."""

from __future__ import annotations

import triton
import triton.language as tl

from .mods import _mask, _mod_scores


@triton.jit
def _load_tile(ptrs, rows_ok, offs_c, C, CHECK_ROWS: tl.constexpr, EVEN_C: tl.constexpr):
    """A (rows, cols) tile; masks only where rows may run past the end (CHECK_ROWS) or the head dim is not
    the block width (not EVEN_C), so the steady-state loop loads without predicates."""
    if CHECK_ROWS:
        if EVEN_C:
            return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=rows_ok[:, None] & (offs_c[None, :] < C), other=0.0)
    if EVEN_C:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_c[None, :] < C, other=0.0)


@triton.jit
def _fwd_block(
    acc, m_i, l_i, q,
    k_ptrs, v_ptrs, m_ptrs,  # (BLOCK_N, BLOCK_D) / (BLOCK_N, BLOCK_DV) / (BLOCK_M, BLOCK_N) pointers of this block
    K_DESC, V_DESC, b, hk,   # TMA descriptors of (B, Hkv, S, D) k / v and this program's coordinates (TMA)
    start_n, offs_n, offs_d, offs_dv, D, DV, kv_len,
    q_pos, row_ok, causal_offset,
    seed, rng_row, dropout_p, qk_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK_BOUNDS: tl.constexpr, SAFE: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    ZERO_V_TAIL: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ROWSUM_MMA: tl.constexpr,
    h=0, seq_l=1, c_off=0, c_lo=0, prefix_len=0, sm_scale=1.0, softcap=1.0, slope=0.0, S=1,
    DOC_Q=0, DOC_K=0, MOD_ARGS=0,
    BAND_LO: tl.constexpr = False, PREFIX: tl.constexpr = False, DOCS: tl.constexpr = False,
    MASK_MOD: tl.constexpr = None, SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False,
    SCORE_MOD: tl.constexpr = None, MOD_HAS_ARGS: tl.constexpr = False,
):
    """One key block of the online softmax: returns the updated (acc, m_i, l_i); m_i in log2 units.

    FOLD_SCALE (scale > 0, no float mask): the row max is taken on the raw dot products and the scale is
    applied inside the exponent, ``exp2(s * qk_scale - m)``: one FFMA per score instead of FMUL + FADD.
    SAFE: a row may have seen only masked scores so far (m_i = -inf): guard -inf - -inf.
    TMA: k and v blocks come from tensor descriptors (zero-filled past S and D, one copy engine request per
    block instead of per-thread addresses); ZERO_V_TAIL: keys past kv_len < S exist (seqlens_k) and their
    values are zeroed in the bounds block. ROWSUM_MMA: the row sums l_i (BLOCK_M, 16) come from the tensor
    cores, p @ ones, instead of a per-score FADD and shuffles; they sum the same bf16/fp16-rounded p the
    output's p @ v uses (l_i is (BLOCK_M, 1) otherwise).

    ``causal_offset`` is the upper diagonal of the band (key j <= i + causal_offset under IS_CAUSAL); the
    variants (``fused_kernels.attention.mods``: BAND_LO, PREFIX, DOCS, MASK_MOD on CHECK_BOUNDS blocks; SOFTCAP, ALIBI,
    SCORE_MOD on every block, with FOLD_SCALE off) default to off, so the callers that do not pass them
    (decode, paged) compile as before."""
    start_n = tl.multiple_of(start_n, BLOCK_N)
    cols = start_n + offs_n
    col_ok = cols < kv_len
    if TMA:
        k = K_DESC.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = V_DESC.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        if CHECK_BOUNDS and ZERO_V_TAIL:   # keys in [kv_len, S) are real memory: never 0 * NaN in p @ v
            v = tl.where(col_ok[:, None], v, 0.0)
    else:
        k = _load_tile(k_ptrs, col_ok, offs_d, D, CHECK_BOUNDS, EVEN_D)
        v = _load_tile(v_ptrs, col_ok, offs_dv, DV, CHECK_BOUNDS, EVEN_DV)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)          # (BLOCK_M, BLOCK_N)
    bias = 0.0
    if MASK_KIND == 2:
        if CHECK_BOUNDS:
            bias = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        else:
            bias = tl.load(m_ptrs, mask=row_ok[:, None], other=0.0).to(ACC)
    if SOFTCAP or ALIBI or SCORE_MOD is not None:   # scores in natural units through the mods, then log2
        z, _ = _mod_scores(s * sm_scale, q_pos[:, None], cols[None, :], b, h, c_off, softcap, slope, bias,
                           seq_l, S, MOD_ARGS, SOFTCAP=SOFTCAP, ALIBI=ALIBI, HAS_BIAS=MASK_KIND == 2,
                           SCORE_MOD=SCORE_MOD, SCORE_MOD_GRAD=None, MOD_HAS_ARGS=MOD_HAS_ARGS, NEED_GRAD=False)
        s = z * 1.4426950408889634
    else:
        if not FOLD_SCALE:
            s = s * qk_scale
        if MASK_KIND == 2:
            s += bias * 1.4426950408889634
    if MASK_KIND == 1:
        if CHECK_BOUNDS:
            keep = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
        else:
            keep = tl.load(m_ptrs, mask=row_ok[:, None], other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    if CHECK_BOUNDS:
        s = _mask(s, q_pos[:, None], cols[None, :], b, h, kv_len, causal_offset, c_lo, prefix_len, DOC_Q, DOC_K,
                  seq_l, S, MOD_ARGS, CHECK_KV=True, CAUSAL=IS_CAUSAL, BAND_LO=BAND_LO, PREFIX=PREFIX, DOCS=DOCS,
                  MASK_MOD=MASK_MOD, MOD_HAS_ARGS=MOD_HAS_ARGS)
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
    if ROWSUM_MMA:
        ones = tl.full([BLOCK_N, 16], 1.0, dtype=v.dtype)
        l_i = tl.dot(p.to(v.dtype), ones, l_i * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
    else:
        l_i = l_i * alpha[:, None] + tl.sum(p, 1, keep_dims=True)
    if HAS_DROPOUT:
        keep_d = tl.rand(seed, rng_row[:, None] + cols[None, :]) >= dropout_p
        p = tl.where(keep_d, p, 0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,          # (B, H, L, D) any strides, last dim contiguous
    K,          # (B, Hkv, S, D)
    V,          # (B, Hkv, S, DV)
    K_DESC,     # TMA descriptor of K, block (1, 1, BLOCK_N, BLOCK_D) (TMA; otherwise K again)
    V_DESC,     # TMA descriptor of V, block (1, 1, BLOCK_N, BLOCK_DV) (TMA; otherwise V again)
    MASK,       # (B, H, L, S) bool (as uint8) or float mask, broadcast strides (MASK_KIND != 0)
    SEQLENS,    # (B,) int valid key lengths (HAS_SEQLENS)
    O,          # (B, H, L, DV) output
    LSE,        # (B, H, L) log-sum-exp, contiguous, accumulation dtype
    CU_Q,       # (B + 1,) cumulative query lengths (VARLEN; otherwise unused)
    CU_K,       # (B + 1,) cumulative key lengths (VARLEN; otherwise unused)
    H, L, S, D, DV, GROUP,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    qk_scale, causal_offset, dropout_p, seed,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, VARLEN: tl.constexpr = False,
    # Variants (fused_kernels.attention.mods), all off by default: the plain kernels compile as before.
    SLOPES=None,       # (B, H) float32 ALiBi slopes, contiguous (ALIBI)
    PREFIX_LEN=None,   # (B,) int32 prefix lengths (PREFIX)
    DOC_Q=None,        # (B, L) int32 query document ids, contiguous (DOCS)
    DOC_K=None,        # (B, S) int32 key document ids, contiguous (DOCS)
    MOD_ARGS=None,     # tuple of tensors handed to the user mods (MOD_HAS_ARGS)
    LIST_CNT=None,     # (2, Bm, Hm, n_query_blocks) int32 counts of full / partial key blocks (SPARSE)
    LIST_IDX=None,     # (2, Bm, Hm, n_query_blocks, NN) int32 their key-block indices, ascending (SPARSE)
    stride_lk=0, stride_lb=0, stride_lh=0, NN=0, sm_scale=1.0, win_left=0, win_right=0, softcap=1.0,
    SPARSE: tl.constexpr = False, BAND_LO: tl.constexpr = False, PREFIX: tl.constexpr = False,
    DOCS: tl.constexpr = False, MASK_MOD: tl.constexpr = None, SOFTCAP: tl.constexpr = False,
    ALIBI: tl.constexpr = False, SCORE_MOD: tl.constexpr = None, MOD_HAS_ARGS: tl.constexpr = False,
):
    """VARLEN: packed sequences, q (total_q, H, D) / k, v (total_k, Hkv, D) seen as (1, H, total, D)
    (stride_*b unused, 0), L = total_q, S = total_k, LSE (H, total_q); program (query block, b * H + h) reads
    its sequence's rows from CU_Q / CU_K, returns at once when its block is past the sequence, and uses the
    sequence's own key count and bottom-right causal offset (causal_offset is ignored).

    SPARSE: the key blocks come from a block table's lists (the launcher builds them from the window, prefix,
    document and mask_mod classes and the bounds): the full ones without any mask, the partial ones through
    ``_mods._mask``; the band is then key j in [i + causal_offset - win_left, i + causal_offset + win_right]
    (IS_CAUSAL: upper side bounded; BAND_LO: lower side). SOFTCAP / ALIBI / SCORE_MOD change every score."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:   # heaviest query blocks first, so that the last wave of programs is the lightest
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seq_l = (tl.load(CU_Q + b + 1).to(tl.int64) - q_start).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seq_s = (tl.load(CU_K + b + 1).to(tl.int64) - k_start).to(tl.int32)
        if start_m >= seq_l:
            return
        Q += q_start * stride_qm
        K += k_start * stride_kn
        V += k_start * stride_vn
        O += q_start * stride_om
        row0 = h * L + q_start
        c_off = seq_s - seq_l
    else:
        seq_l = L
        row0 = bh * L
        c_off = causal_offset
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_l
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   row_ok, offs_d, D, True, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
    # Scalar bases advanced by one key block per iteration + loop-invariant offset tiles (carrying 2-D pointer
    # tiles through the loop costs two registers per element).
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = MASK + b * stride_mb + h * stride_mh
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :]
    m_offs = offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn
    rng_row = ((row0 + offs_m) * S).to(tl.int64)
    kv_len = S
    if VARLEN:
        kv_len = seq_s
    if HAS_SEQLENS:
        kv_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), S)
    # Key range [0, hi) this query block can see; blocks below full_hi need no bound or causal masks.
    hi = kv_len
    full_hi = kv_len
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(kv_len, start_m + BLOCK_M + c_off), 0)
        full_hi = tl.maximum(tl.minimum(kv_len, start_m + c_off + 1), 0)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M, 16 if TMA else 1], dtype=ACC)    # row sums, in 16 equal columns with TMA
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    b32 = b.to(tl.int32)
    hk32 = hk.to(tl.int32)
    h32 = h.to(tl.int32)
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + bh)
    prefix_len = 0
    if PREFIX:
        prefix_len = tl.minimum(tl.load(PREFIX_LEN + b), kv_len)
    SAFE_FULL: tl.constexpr = MASK_KIND != 0 or SCORE_MOD is not None
    if SPARSE:
        row = b * stride_lb + h * stride_lh + pid_m
        for kind in tl.static_range(2):    # the full key blocks (no mask), then the partial ones
            n_blocks = tl.load(LIST_CNT + kind * stride_lk + row)
            for t in range(0, n_blocks):
                start_n = tl.load(LIST_IDX + (kind * stride_lk + row) * NN + t) * BLOCK_N
                acc, m_i, l_i = _fwd_block(
                    acc, m_i, l_i, q, k_base + start_n * stride_kn + k_offs, v_base + start_n * stride_vn + v_offs,
                    m_base + start_n * stride_mn + m_offs, K_DESC, V_DESC, b32, hk32, start_n, offs_n, offs_d,
                    offs_dv, D, DV, kv_len, offs_m, row_ok, c_off + win_right, seed, rng_row, dropout_p, qk_scale,
                    MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=kind == 1, SAFE=True,
                    FOLD_SCALE=FOLD_SCALE, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_V_TAIL=HAS_SEQLENS,
                    HAS_DROPOUT=HAS_DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N,
                    BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, ROWSUM_MMA=TMA,
                    h=h32, seq_l=seq_l, c_off=c_off, c_lo=c_off - win_left, prefix_len=prefix_len,
                    sm_scale=sm_scale, softcap=softcap, slope=slope, S=S, DOC_Q=DOC_Q, DOC_K=DOC_K,
                    MOD_ARGS=MOD_ARGS, BAND_LO=BAND_LO, PREFIX=PREFIX, DOCS=DOCS, MASK_MOD=MASK_MOD,
                    SOFTCAP=SOFTCAP, ALIBI=ALIBI, SCORE_MOD=SCORE_MOD, MOD_HAS_ARGS=MOD_HAS_ARGS)
    else:
        for start_n in range(0, full_hi, BLOCK_N):
            acc, m_i, l_i = _fwd_block(
                acc, m_i, l_i, q, k_base + k_offs, v_base + v_offs, m_base + m_offs, K_DESC, V_DESC, b32, hk32,
                start_n, offs_n, offs_d, offs_dv,
                D, DV, kv_len, offs_m, row_ok, c_off, seed, rng_row, dropout_p, qk_scale,
                MASK_KIND=MASK_KIND, IS_CAUSAL=False, CHECK_BOUNDS=False, SAFE=SAFE_FULL, FOLD_SCALE=FOLD_SCALE,
                EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_V_TAIL=HAS_SEQLENS, HAS_DROPOUT=HAS_DROPOUT,
                UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                ROWSUM_MMA=TMA, h=h32, seq_l=seq_l, c_off=c_off, sm_scale=sm_scale, softcap=softcap, slope=slope, S=S,
                MOD_ARGS=MOD_ARGS, SOFTCAP=SOFTCAP, ALIBI=ALIBI, SCORE_MOD=SCORE_MOD, MOD_HAS_ARGS=MOD_HAS_ARGS)
            if not TMA:
                k_base += BLOCK_N * stride_kn
                v_base += BLOCK_N * stride_vn
            if MASK_KIND != 0:
                m_base += BLOCK_N * stride_mn
        for start_n in range(full_hi, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_block(
                acc, m_i, l_i, q, k_base + k_offs, v_base + v_offs, m_base + m_offs, K_DESC, V_DESC, b32, hk32,
                start_n, offs_n, offs_d, offs_dv,
                D, DV, kv_len, offs_m, row_ok, c_off, seed, rng_row, dropout_p, qk_scale,
                MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=True, SAFE=True, FOLD_SCALE=FOLD_SCALE,
                EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_V_TAIL=HAS_SEQLENS, HAS_DROPOUT=HAS_DROPOUT,
                UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                ROWSUM_MMA=TMA, h=h32, seq_l=seq_l, c_off=c_off, sm_scale=sm_scale, softcap=softcap, slope=slope, S=S,
                MOD_ARGS=MOD_ARGS, SOFTCAP=SOFTCAP, ALIBI=ALIBI, SCORE_MOD=SCORE_MOD, MOD_HAS_ARGS=MOD_HAS_ARGS)
            if not TMA:
                k_base += BLOCK_N * stride_kn
                v_base += BLOCK_N * stride_vn
            if MASK_KIND != 0:
                m_base += BLOCK_N * stride_mn
    l_i = tl.max(l_i, 1)
    empty = l_i == 0.0                                     # fully masked row: output 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + row0 + offs_m, lse, mask=row_ok)

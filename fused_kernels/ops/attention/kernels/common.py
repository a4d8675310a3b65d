"""What every attention kernel composes: the named constants, the tile load, the score pipeline, the
per-program bookkeeping (packed sequences, key lengths, the visible key range) and the end of the online
softmax. Each is inlined where it is called, so a helper costs nothing over writing it out."""

from __future__ import annotations

import triton
import triton.language as tl

from ...._core.launch import split_program_id
from .mods import _mod_scores, doc_ids, variant_context

LOG2E = tl.constexpr(1.4426950408889634)   # scores go through exp2: s * log2(e)
LN2 = tl.constexpr(0.6931471805599453)     # log2 units back to natural ones
MASK_NONE = tl.constexpr(0)                # the attn_mask kinds (MASK_KIND)
MASK_BOOL = tl.constexpr(1)                # True = attend, read as uint8
MASK_FLOAT = tl.constexpr(2)               # added to the scaled scores


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
def _tile_pair(a_ptrs, b_ptrs, A_DESC, B_DESC, desc_at, start, rows_ok, dims, CHECK_ROWS: tl.constexpr,
               ZERO_A: tl.constexpr, ZERO_B: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
               TMA: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr):
    """The two (BLOCK_R, BLOCK_D) / (BLOCK_R, BLOCK_DV) tiles a block of rows reads, at row ``start``: k and v of a
    key block (forward, dQ) or q and dO of a query block (dK / dV), in float32 when UPCAST; from the pointer
    tiles (rows past ``rows_ok`` as 0 when CHECK_ROWS), or with TMA from the descriptors at (b, head) =
    ``desc_at`` (zero-filled past the tensor's end and D, one copy-engine request per block instead of
    per-thread addresses). Keys in [kv_len, S) are real memory there: ZERO_A / ZERO_B zero them in a CHECK_ROWS
    block, so that no 0 * NaN reaches a dot."""
    offs_d, offs_dv, D, DV = dims
    if TMA:
        b, h = desc_at
        a = A_DESC.load([b, h, start, 0]).reshape(BLOCK_R, BLOCK_D)
        t = B_DESC.load([b, h, start, 0]).reshape(BLOCK_R, BLOCK_DV)
        if CHECK_ROWS and ZERO_A:
            a = tl.where(rows_ok[:, None], a, 0.0)
        if CHECK_ROWS and ZERO_B:
            t = tl.where(rows_ok[:, None], t, 0.0)
    else:
        a = _load_tile(a_ptrs, rows_ok, offs_d, D, CHECK_ROWS, EVEN_D)
        t = _load_tile(b_ptrs, rows_ok, offs_dv, DV, CHECK_ROWS, EVEN_DV)
    if UPCAST:
        a = a.to(tl.float32)
        t = t.to(tl.float32)
    return a, t


@triton.jit
def _scores(s, m_ptrs, m_ok, q_idx, kv_idx, qk_scale, vctx, MASK_KIND: tl.constexpr, FOLD_SCALE: tl.constexpr,
            ACC: tl.constexpr, VAR: tl.constexpr, NEED_GRAD: tl.constexpr):
    """The score pipeline of a tile of dot products ``s``: the float mask, the score mods, the scale, the bool
    mask; returns (scores in log2 units, dz/dx of the mods for the backward).

    FOLD_SCALE (scale > 0, no float mask, no mods): ``s`` stays unscaled and the caller applies ``qk_scale``
    inside the exponent (one FFMA per score). With mods the scaled scores go through ``_mod_scores`` in natural
    units. ``m_ptrs`` / ``m_ok``: the attn_mask tile and where it may be read."""
    bias = 0.0
    if MASK_KIND == MASK_FLOAT:
        bias = tl.load(m_ptrs, mask=m_ok, other=0.0).to(ACC)
    g = 1.0
    if VAR.softcap or VAR.alibi or VAR.score_mod is not None:
        z, g = _mod_scores(s, q_idx, kv_idx, bias, vctx, HAS_BIAS=MASK_KIND == MASK_FLOAT, VAR=VAR,
                           NEED_GRAD=NEED_GRAD)
        s = z * LOG2E
    else:
        if not FOLD_SCALE:
            s = s * qk_scale
        if MASK_KIND == MASK_FLOAT:
            s += bias * LOG2E
    if MASK_KIND == MASK_BOOL:
        keep = tl.load(m_ptrs, mask=m_ok, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    return s, g


@triton.jit
def _packed_bounds(CU_Q, CU_K, b):
    """(first query row, query count, first key row, key count) of packed sequence ``b`` (VARLEN)."""
    q_start = tl.load(CU_Q + b).to(tl.int64)
    seq_l = (tl.load(CU_Q + b + 1).to(tl.int64) - q_start).to(tl.int32)
    k_start = tl.load(CU_K + b).to(tl.int64)
    seq_s = (tl.load(CU_K + b + 1).to(tl.int64) - k_start).to(tl.int32)
    return q_start, seq_l, k_start, seq_s


@triton.jit
def _query_program(Q, K, V, X, CU_Q, CU_K, H, L, S, GROUP, causal_offset, PID1_BASE, row_steps,
                   IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr, GRID_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Who a query-block program (forward, dQ) is and where its rows lie. ``X``: the kernel's other per-query
    tensor (O, dO); ``row_steps``: the row strides of Q, K, V, X. Returns, as one flat tuple (triton 3.6
    cannot unpack nested ones): Q, K, V, X at the program's sequence; b, h, key head, b * H + h; the first query
    row, the query rows, their bounds, the first row in the (B, H, L) / (H, total_q) statistics; the query
    count, key count and causal offset.

    Causal grids run the heaviest query blocks first, so that the last wave of programs is the lightest. VARLEN:
    the packed sequence's own bounds and bottom-right offset (causal_offset unused); the caller returns when
    its block starts past the sequence."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = split_program_id(1, PID1_BASE, GRID_SPLIT).to(tl.int64)
    b = bh // H
    h = bh % H
    if VARLEN:
        q_start, seq_l, k_start, seq_s = _packed_bounds(CU_Q, CU_K, b)
        stride_qm, stride_kn, stride_vn, stride_xm = row_steps
        Q += q_start * stride_qm
        K += k_start * stride_kn
        V += k_start * stride_vn
        X += q_start * stride_xm
        row0 = h * L + q_start
        c_off = seq_s - seq_l
    else:
        seq_l, seq_s = L, S
        row0 = bh * L
        c_off = causal_offset
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return Q, K, V, X, b, h, h // GROUP, bh, start_m, offs_m, offs_m < seq_l, row0, seq_l, seq_s, c_off


@triton.jit
def _row_tile(PTR, b, h, offs_r, rows_ok, offs_c, strides, C, EVEN_C: tl.constexpr, UPCAST: tl.constexpr):
    """The (rows, C) tile of a (B, heads, rows, C) tensor at batch ``b``, head ``h`` (``strides``: its batch,
    head and row strides), rows past ``rows_ok`` read as 0, in float32 when UPCAST."""
    stride_b, stride_h, stride_r = strides
    t = _load_tile(PTR + b * stride_b + h * stride_h + offs_r[:, None] * stride_r + offs_c[None, :], rows_ok,
                   offs_c, C, CHECK_ROWS=True, EVEN_C=EVEN_C)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _key_walk(K, V, MASK, b, h, hk, offs_m, offs_n, offs_d, offs_dv, stride_k, stride_v, stride_m):
    """What a query-block program walks the keys with: the scalar bases of its key / value / mask rows (advanced
    by one key block per iteration) and the loop-invariant offset tiles (carrying 2-D pointer tiles through the
    loop costs two registers per element). Flat tuples: triton 3.6 cannot unpack nested ones."""
    stride_kb, stride_kh, stride_kn = stride_k
    stride_vb, stride_vh, stride_vn = stride_v
    stride_mb, stride_mh, stride_mm, stride_mn = stride_m
    return (K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
            MASK + b * stride_mb + h * stride_mh,
            offs_n[:, None] * stride_kn + offs_d[None, :], offs_n[:, None] * stride_vn + offs_dv[None, :],
            offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn)


@triton.jit
def _query_variants(var_args, sm_scale, SLOPES, PREFIX_LEN, DOC_Q, DOC_K, MOD_ARGS, b, h, bh, kv_len, c_off, seq_l,
                    S, offs_m, VARIANT: tl.constexpr):
    """(vctx, the band's upper side win_right) of a query-block program (``variant_context``): ``var_args`` =
    (sm_scale, softcap, win_left, win_right) when a variant is on, else None (``sm_scale`` then stands). The
    document ids of the program's query rows ``offs_m`` are loaded here, once (``doc_ids``)."""
    softcap, win_left, win_right = 1.0, 0, 0
    if var_args is not None:
        sm_scale, softcap, win_left, win_right = var_args
    slope = 0.0
    if VARIANT.alibi:
        slope = tl.load(SLOPES + bh)
    prefix_len = 0
    if VARIANT.prefix:
        prefix_len = tl.minimum(tl.load(PREFIX_LEN + b), kv_len)
    if VARIANT.docs:
        DOC_Q = doc_ids(DOC_Q, b, seq_l, offs_m[:, None])
    vctx = variant_context(b.to(tl.int32), h.to(tl.int32), c_off, c_off - win_left, prefix_len, sm_scale, softcap,
                           slope, seq_l, S, DOC_Q, DOC_K, MOD_ARGS)
    return vctx, win_right


@triton.jit
def _key_length(SEQLENS, b, S, seq_s, c_off, HAS_SEQLENS: tl.constexpr, VARLEN: tl.constexpr,
                ALIGN_SEQLENS: tl.constexpr):
    """(kv_len, c_off) of batch ``b``: the keys that exist (S, the packed sequence's own count (VARLEN) or
    seqlens_k[b] clipped to [0, S] (HAS_SEQLENS)) and the causal offset, key j <= i + c_off.

    ALIGN_SEQLENS (with HAS_SEQLENS; ``attention(causal=True, seqlens_k=...)``): the offset counts from the end
    of the row's own keys, c_off + kv_len - S, so query i of row b sits at seqlens_k[b] - L + i (a padded KV
    cache, as varlen and paged attention align each sequence); the causal diagonal, the window band and ALiBi
    all take it from here."""
    kv_len = S
    if VARLEN:
        kv_len = seq_s
    if HAS_SEQLENS:
        kv_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), S)
        if ALIGN_SEQLENS:
            c_off = c_off + kv_len - S
    return kv_len, c_off


@triton.jit
def _key_range(start_m, kv_len, c_off, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(hi, full_hi) of a query block: it sees keys [0, hi); the key blocks below full_hi need neither the
    bound nor the causal mask."""
    hi = kv_len
    full_hi = kv_len
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(kv_len, start_m + BLOCK_M + c_off), 0)
        full_hi = tl.maximum(tl.minimum(kv_len, start_m + c_off + 1), 0)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    return hi, full_hi


@triton.jit
def _stage_range(full_hi, hi, STAGE: tl.constexpr):
    """The key blocks of one stage of the analytic loops: 0, the mask-free ones [0, full_hi); 1, the bounds /
    causal-diagonal ones [full_hi, hi)."""
    if STAGE == 0:
        lo, stop = 0, full_hi
    else:
        lo, stop = full_hi, hi
    return lo, stop


@triton.jit
def _next_key_block(k_base, v_base, m_base, stride_kn, stride_vn, stride_mn, TMA: tl.constexpr,
                    MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key / value / mask bases one key block on (TMA descriptors take the block's index instead; an absent
    mask is never read)."""
    if not TMA:
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
    if MASKED:
        m_base += BLOCK_N * stride_mn
    return k_base, v_base, m_base


@triton.jit
def _finalize(acc, m_i, l_i, dropout_p, HAS_DROPOUT: tl.constexpr):
    """The end of the online softmax: (output acc / l, lse in log2 units, rows that saw no key). A fully masked
    row gives output 0 (the caller stores lse -inf there); dropout's kept values are scaled by 1 / (1 - p)."""
    l_i = tl.max(l_i, 1)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    return out, m_i + tl.math.log2(tl.where(empty, 1.0, l_i)), empty


@triton.jit
def _group_queries(Q, b, hk, rows, GROUP, L, stride_q, offs_d, D, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """The flash-decoding query tile: ``rows`` index the GROUP * L (query head, query) pairs that share key /
    value head ``hk``, head-major. Returns (rows that exist, query head and query index of each row, the q
    tile (rows, BLOCK_D), in float32 when UPCAST)."""
    stride_qb, stride_qh, stride_qm = stride_q
    row_ok = rows < GROUP * L
    h = hk * GROUP + rows // L
    i = rows % L
    q = _load_tile(Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :],
                   row_ok, offs_d, D, CHECK_ROWS=True, EVEN_C=EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
    return row_ok, h, i, q


@triton.jit
def _store_partial(OPART, LSEPART, acc, m_i, l_i, dropout_p, part, rows, row_ok, n_rows, offs_dv, DV,
                   HAS_DROPOUT: tl.constexpr):
    """Finalize one split of a flash-decoding tile and store its partial output and lse (log2 units, -inf for a
    row that saw no key) at split ``part`` of the (B * Hkv, SPLITS, n_rows) partials, for the combine kernel."""
    out, lse2, empty = _finalize(acc, m_i, l_i, dropout_p, HAS_DROPOUT=HAS_DROPOUT)
    tl.store(OPART + (part * n_rows + rows[:, None]) * DV + offs_dv[None, :], out,
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSEPART + part * n_rows + rows, tl.where(empty, float("-inf"), lse2), mask=row_ok)

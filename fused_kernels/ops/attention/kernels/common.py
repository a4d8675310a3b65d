"""What every attention kernel composes: the named constants, the tile load, the score pipeline, the
per-program bookkeeping (packed sequences, key lengths, the visible key range) and the end of the online
softmax. Each is inlined where it is called, so a helper costs nothing over writing it out."""

from __future__ import annotations

import triton
import triton.language as tl

from .mods import _mod_scores

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
def _finalize(acc, m_i, l_i, dropout_p, HAS_DROPOUT: tl.constexpr):
    """The end of the online softmax: (output acc / l, lse in log2 units, rows that saw no key). A fully masked
    row gives output 0 (the caller stores lse -inf there); dropout's kept values are scaled by 1 / (1 - p)."""
    l_i = tl.max(l_i, 1)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    return out, m_i + tl.math.log2(tl.where(empty, 1.0, l_i)), empty

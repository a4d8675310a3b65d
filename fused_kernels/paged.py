"""Paged KV cache: keys and values of many sequences in one pool of fixed-size blocks, read through a block table.

A padded KV cache reserves the longest length for every sequence of a batch; a paged one (vLLM's
PagedAttention, FlashAttention's ``block_table``) gives each sequence only the blocks it fills, so sequences of
very different lengths share one pool and a finished sequence's blocks go straight to the next one.

Conventions (the same for the Triton kernels and the PyTorch path):

- ``k_cache`` (num_blocks, block_size, Hkv, D) and ``v_cache`` (num_blocks, block_size, Hkv, Dv): the pool,
  last dim contiguous. Physical block ``p`` holds ``block_size`` consecutive positions of one sequence.
- ``block_table`` (B, max_blocks) int32 or int64: logical block ``n`` of sequence ``b`` (its positions
  ``n * block_size .. (n + 1) * block_size - 1``) lives in physical block ``block_table[b, n]``. Only the
  entries a sequence's length reaches are read; the others may hold anything (e.g. 0 or -1).
- ``cache_seqlens`` (B,) int32 or int64: the number of valid positions of each sequence. For
  ``paged_append`` it is the length *before* the new tokens (they go to positions ``len .. len + Lnew - 1``);
  for ``paged_attention`` the length *including* the new queries' own keys (append first, then attend).
- Causal is **bottom-right** aligned per sequence, as ``fused_kernels.attention(causal=True)``: query ``i`` of the
  ``Lq`` new queries of sequence ``b`` attends keys ``j <= i + cache_seqlens[b] - Lq``; rows that see no key
  (length < Lq) give 0.

Kernels: ``_paged_append_kernel`` scatters (B, Hkv, Lnew, D) keys/values into their slots in place;
``_paged_attn_fwd_kernel`` is the flash-decoding split kernel of ``fused_kernels.attention`` reading its key blocks
through the block table: the ``G * Lq`` query rows of a GQA group share one tile (tiled over row blocks for
long prefills), the keys of each sequence are split across programs, and ``_attn_combine_kernel`` merges the
splits by their log-sum-exps. A key block lies inside one physical block when ``block_size`` is a multiple of
the key tile (one table load per tile, contiguous rows); otherwise every key row finds its own page.
Forward only: paged attention is for inference. A query that requires grad runs the PyTorch path, which is
differentiable.

    paged_append(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new)          # in place
    paged_attention(q, k_cache, v_cache, block_table, cache_seqlens + Lnew)          # (B, H, Lq, Dv)
    PagedKVCache: the pool per layer, a free list of blocks, sequences by id.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import triton
import triton.language as tl

from . import _backend, _checks, fast_torch
from ._launch import acc_dtype, next_pow2, torch_acc_dtype
from .attention import (
    DECODE_MAX_ROWS,
    LOG2E,
    MAX_HEAD_DIM,
    _arch,
    _attn_combine_kernel,
    _check_scale,
    _fwd_block,
    _last_dim_contiguous,
    _load_tile,
    _precision,
    attention_config,
    decode_splits,
)

INDEX_DTYPES = (torch.int32, torch.int64)
APPEND_BLOCK_T = 16          # new tokens per program of the append kernel


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _paged_append_kernel(
    K_NEW,          # (B, HKV, LNEW, D) any strides, last dim contiguous
    V_NEW,          # (B, HKV, LNEW, DV) any strides, last dim contiguous
    K_CACHE,        # (NUM_BLOCKS, PAGE, HKV, D) pool, last dim contiguous
    V_CACHE,        # (NUM_BLOCKS, PAGE, HKV, DV) pool, last dim contiguous
    BLOCK_TABLE,    # (B, MAX_BLOCKS) int32/int64 physical block of each logical block
    SEQLENS,        # (B,) int32/int64 lengths before the append
    HKV, LNEW, D, DV, PAGE,
    stride_knb, stride_knh, stride_knt,
    stride_vnb, stride_vnh, stride_vnt,
    stride_kcb, stride_kcp, stride_kch,
    stride_vcb, stride_vcp, stride_vch,
    stride_tb, stride_tn,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """BLOCK_T new tokens of one (sequence, kv head): token t goes to position len + t, i.e. slot
    (len + t) % PAGE of physical block BLOCK_TABLE[b, (len + t) // PAGE]. Only those slots are written."""
    pid_t = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < LNEW
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = tl.load(SEQLENS + b).to(tl.int64) + t                                    # (BLOCK_T,) positions
    page = tl.load(BLOCK_TABLE + b * stride_tb + (pos // PAGE) * stride_tn, mask=t_ok, other=0).to(tl.int64)
    slot = pos % PAGE
    k = tl.load(K_NEW + b * stride_knb + hk * stride_knh + t[:, None] * stride_knt + offs_d[None, :],
                mask=t_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    tl.store(K_CACHE + (page * stride_kcb + slot * stride_kcp + hk * stride_kch)[:, None] + offs_d[None, :],
             k.to(K_CACHE.dtype.element_ty), mask=t_ok[:, None] & (offs_d[None, :] < D))
    v = tl.load(V_NEW + b * stride_vnb + hk * stride_vnh + t[:, None] * stride_vnt + offs_dv[None, :],
                mask=t_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    tl.store(V_CACHE + (page * stride_vcb + slot * stride_vcp + hk * stride_vch)[:, None] + offs_dv[None, :],
             v.to(V_CACHE.dtype.element_ty), mask=t_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _paged_attn_fwd_kernel(
    Q,              # (B, H, LQ, D) any strides, last dim contiguous
    K_CACHE,        # (NUM_BLOCKS, PAGE, HKV, D) pool, last dim contiguous
    V_CACHE,        # (NUM_BLOCKS, PAGE, HKV, DV) pool, last dim contiguous
    BLOCK_TABLE,    # (B, MAX_BLOCKS) int32/int64 physical block of each logical block
    SEQLENS,        # (B,) int32/int64 key lengths (the new queries' keys included)
    OPART,          # (B * HKV, SPLITS, GROUP * LQ, DV) partial outputs, contiguous, accumulation dtype
    LSEPART,        # (B * HKV, SPLITS, GROUP * LQ) partial lse (log2 units), contiguous
    HKV, LQ, D, DV, GROUP, SPLITS, chunk, PAGE, capacity,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_tb, stride_tn,
    qk_scale,
    IS_CAUSAL: tl.constexpr, FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    SINGLE_PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Rows [pid_m * BLOCK_M, ...) of the GROUP * LQ (query head, query) rows of one (sequence, kv head),
    head-major as the combine kernel reads them, over the keys [split * chunk, (split + 1) * chunk) of the
    sequence. SINGLE_PAGE (PAGE % BLOCK_N == 0): a key tile is BLOCK_N consecutive slots of one physical block."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    bhk = tl.program_id(2).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * LQ
    h = hk * GROUP + rows // LQ                            # (BLOCK_M,) query head of each row
    i = rows % LQ                                          # (BLOCK_M,) query index of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :],
                   row_ok, offs_d, D, True, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
    kv_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), capacity)
    causal_offset = kv_len - LQ                            # bottom-right: key j <= i + len - LQ
    hi = kv_len
    if IS_CAUSAL:
        last_i = tl.max(tl.where(row_ok, i, 0), 0)
        hi = tl.maximum(tl.minimum(kv_len, last_i + 1 + causal_offset), 0)
    lo = split * chunk
    hi = tl.minimum(hi, lo + chunk)
    table = BLOCK_TABLE + b * stride_tb
    k_head = K_CACHE + hk * stride_kh
    v_head = V_CACHE + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M, 1], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for start_n in range(lo, hi, BLOCK_N):
        if SINGLE_PAGE:
            page = tl.load(table + (start_n // PAGE) * stride_tn).to(tl.int64)
            slot = start_n % PAGE + offs_n                                           # (BLOCK_N,)
            k_rows = page * stride_kb + slot * stride_kp
            v_rows = page * stride_vb + slot * stride_vp
        else:
            cols = start_n + offs_n
            page = tl.load(table + (cols // PAGE) * stride_tn, mask=cols < hi, other=0).to(tl.int64)
            k_rows = page * stride_kb + (cols % PAGE) * stride_kp
            v_rows = page * stride_vb + (cols % PAGE) * stride_vp
        k_ptrs = k_head + k_rows[:, None] + offs_d[None, :]                          # (BLOCK_N, BLOCK_D)
        v_ptrs = v_head + v_rows[:, None] + offs_dv[None, :]                         # (BLOCK_N, BLOCK_DV)
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, k_ptrs, K_CACHE, V_CACHE, 0, 0,
            start_n, offs_n, offs_d, offs_dv, D, DV, hi,
            i, row_ok, causal_offset, 0, i, 0.0, qk_scale,
            MASK_KIND=0, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=True, SAFE=True, FOLD_SCALE=FOLD_SCALE,
            EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=False, ZERO_V_TAIL=False, HAS_DROPOUT=False,
            UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            ROWSUM_MMA=False)
    l_i = tl.max(l_i, 1)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    part = bhk * SPLITS + split
    tl.store(OPART + (part * GROUP * LQ + rows[:, None]) * DV + offs_dv[None, :], out,
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSEPART + part * GROUP * LQ + rows, lse2, mask=row_ok)


# ----------------------------------------------------------------------------- checks


def _check_index(op: str, name: str, t: object, dims: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise _checks.ArgumentTypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dims:
        raise _checks.ArgumentValueError(f"{op}: {name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise _checks.ArgumentValueError(f"{op}: {name} is on {t.device} but k_cache is on {device}")
    return t


def _check_pool(op: str, k_cache: object, v_cache: object) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.check_float_tensor(name, t, op)
        _checks.check_tensor_type(name, t, op)
        if t.dim() != 4:
            raise _checks.ArgumentValueError(f"{op}: {name} must be 4-D (num_blocks, block_size, kv_heads, "
                                             f"head_dim), got shape {tuple(t.shape)}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise _checks.ArgumentValueError(f"{op}: {name} must have a contiguous last dim (it is written in "
                                             f"place), got strides {t.stride()}")
        if not 1 <= t.shape[-1] <= MAX_HEAD_DIM:
            raise _checks.ArgumentValueError(f"{op}: head dim of {name} must be in [1, {MAX_HEAD_DIM}], got "
                                             f"{t.shape[-1]}")
    if v_cache.dtype != k_cache.dtype:
        raise _checks.ArgumentTypeError(f"{op}: v_cache has dtype {v_cache.dtype} but k_cache has {k_cache.dtype}")
    if v_cache.device != k_cache.device:
        raise _checks.ArgumentValueError(f"{op}: v_cache is on {v_cache.device} but k_cache is on {k_cache.device}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise _checks.ArgumentValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                                         f"must agree in (num_blocks, block_size, kv_heads)")
    if k_cache.shape[1] == 0 or k_cache.shape[2] == 0:
        raise _checks.ArgumentValueError(f"{op}: block_size and kv_heads must be >= 1, got k_cache shape "
                                         f"{tuple(k_cache.shape)}")


def _check_tables(op: str, k_cache: torch.Tensor, block_table: object, cache_seqlens: object, batch: int | None,
                  new: int, check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Types, shapes and devices of the index tensors; with ``check`` also their values (one reduction over
    each: a device sync on a GPU): 0 <= cache_seqlens, cache_seqlens + ``new`` <= max_blocks * block_size,
    and every block-table entry those lengths reach in [0, num_blocks)."""
    bt = _check_index(op, "block_table", block_table, 2, k_cache.device)
    sl = _check_index(op, "cache_seqlens", cache_seqlens, 1, k_cache.device)
    b = bt.shape[0] if batch is None else batch
    if bt.shape[0] != b:
        raise _checks.ArgumentValueError(f"{op}: block_table has {bt.shape[0]} rows but the batch is {b}")
    if tuple(sl.shape) != (b,):
        raise _checks.ArgumentValueError(f"{op}: cache_seqlens must have shape ({b},), got {tuple(sl.shape)}")
    if not check or b == 0:
        return bt, sl
    num_blocks, page = k_cache.shape[0], k_cache.shape[1]
    capacity = bt.shape[1] * page
    lo, hi = (int(x) for x in torch.aminmax(sl.long()))
    if lo < 0:
        raise _checks.ArgumentValueError(f"{op}: cache_seqlens must be >= 0, got a minimum of {lo}")
    if hi + new > capacity:
        raise _checks.ArgumentValueError(
            f"{op}: a sequence of {hi} cached{f' + {new} new' if new else ''} tokens does not fit its "
            f"block_table row: {bt.shape[1]} blocks x {page} = {capacity} positions")
    used = torch.arange(bt.shape[1], device=bt.device) < ((sl.long() + new + page - 1) // page)[:, None]
    if bool(used.any()):
        entries = bt[used]
        bad_lo, bad_hi = (int(x) for x in torch.aminmax(entries.long()))
        if bad_lo < 0 or bad_hi >= num_blocks:
            raise _checks.ArgumentValueError(
                f"{op}: block_table entries in use must be in [0, {num_blocks}) (the pool's num_blocks), got "
                f"values from {bad_lo} to {bad_hi}")
    return bt, sl


def _check_new(op: str, name: str, t: object, cache: torch.Tensor, cache_name: str) -> torch.Tensor:
    _checks.check_float_tensor(name, t, op)
    if t.dim() != 4:
        raise _checks.ArgumentValueError(f"{op}: {name} must be 4-D (batch, kv_heads, new tokens, head_dim), got "
                                         f"shape {tuple(t.shape)}")
    if t.dtype != cache.dtype:
        raise _checks.ArgumentTypeError(f"{op}: {name} has dtype {t.dtype} but {cache_name} has {cache.dtype}")
    if t.device != cache.device:
        raise _checks.ArgumentValueError(f"{op}: {name} is on {t.device} but {cache_name} is on {cache.device}")
    if t.shape[1] != cache.shape[2] or t.shape[3] != cache.shape[3]:
        raise _checks.ArgumentValueError(f"{op}: {name} of shape {tuple(t.shape)} must have {cache_name}'s "
                                         f"{cache.shape[2]} kv heads and head dim {cache.shape[3]}")
    return t


# ----------------------------------------------------------------------------- append


def paged_append(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 cache_seqlens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, *,
                 check: bool = True) -> None:
    """Write the new keys/values of every sequence into its blocks of the pool, in place.

    ``k_new`` (B, Hkv, Lnew, D) and ``v_new`` (B, Hkv, Lnew, Dv), any strides (the head-split projection of a
    model is a strided view): token ``t`` of sequence ``b`` goes to position ``cache_seqlens[b] + t``, i.e. slot
    ``(len + t) % block_size`` of physical block ``block_table[b, (len + t) // block_size]``. Nothing else of the
    pool is written. ``cache_seqlens`` is not advanced (the caller owns the lengths). Two sequences must not
    share a physical block they write. ``check=False`` skips the value checks (and their device sync)."""
    op = "paged_append"
    _check_pool(op, k_cache, v_cache)
    k_new = _check_new(op, "k_new", k_new, k_cache, "k_cache")
    v_new = _check_new(op, "v_new", v_new, v_cache, "v_cache")
    b, hkv, lnew, d = k_new.shape
    if v_new.shape[:3] != k_new.shape[:3]:
        raise _checks.ArgumentValueError(f"{op}: k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} must "
                                         f"agree in (batch, kv_heads, new tokens)")
    bt, sl = _check_tables(op, k_cache, block_table, cache_seqlens, b, lnew, check)
    if b * lnew == 0:
        return
    if _backend.choose(k_new, op) == "torch":
        _append_torch(k_cache, v_cache, bt, sl, k_new, v_new)
        return
    _append_launch(k_cache, v_cache, bt, sl, k_new, v_new)


def _append_launch(k_cache, v_cache, bt, sl, k_new, v_new) -> None:
    """Launch the append kernel (validated arguments); also what ``fused_kernels.aot`` runs on meta tensors."""
    b, hkv, lnew, d = k_new.shape
    k_new, v_new = _last_dim_contiguous(k_new), _last_dim_contiguous(v_new)
    dv = v_new.shape[3]
    _paged_append_kernel[(triton.cdiv(lnew, APPEND_BLOCK_T), b * hkv)](
        k_new, v_new, k_cache, v_cache, bt, sl, hkv, lnew, d, dv, k_cache.shape[1],
        *k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *bt.stride(),
        BLOCK_T=APPEND_BLOCK_T, BLOCK_D=next_pow2(d), BLOCK_DV=next_pow2(dv), num_warps=4)


def _append_torch(k_cache, v_cache, bt, sl, k_new, v_new) -> None:
    """The PyTorch path of ``paged_append``: one indexed write per pool."""
    page = k_cache.shape[1]
    pos = sl.long()[:, None] + torch.arange(k_new.shape[2], device=k_new.device)        # (B, Lnew)
    blocks = bt.long().gather(1, pos // page)                                           # (B, Lnew)
    k_cache[blocks, pos % page] = k_new.transpose(1, 2)                                 # (B, Lnew, Hkv, D)
    v_cache[blocks, pos % page] = v_new.transpose(1, 2)


# ----------------------------------------------------------------------------- attention


# Pipeline stages of the decode configuration where the split kernel spills with the block-table lookups
# (``python -m fused_kernels.aot --family paged``, triton 3.9): (dtype family, head-dim bucket, Hopper) -> stages.
# fp32 d=128 on sm_80 spilled 8+4 B with 1 stage; 16-bit d=128 on sm_90a 4+4 B with 3 (16-key tiles).
_DECODE_STAGES = {("fp32", 128, False): 2, ("16bit", 128, True): 2}


def paged_config(rows: int, page: int, d: int, dv: int, dtype: torch.dtype, arch: int | None) -> dict:
    """Tiles of the paged attention kernel for ``rows`` = G * Lq query rows per (sequence, kv head): one row
    tile of the GQA group (the flash-decoding configuration) up to ``DECODE_MAX_ROWS`` rows, else row tiles of
    the forward kernel's BLOCK_M (at most 64 at head dims above 128) with key tiles of at most 64. Every
    configuration compiles without spills for sm_80 / sm_90a (``python -m fused_kernels.aot --family paged``).
    The key tile is lowered to the block size when the block size is a smaller power of two (>= 16), so that
    a key tile never spans two physical blocks. Shared by the launcher and ``fused_kernels.aot``."""
    kind = "decode" if rows <= DECODE_MAX_ROWS else "fwd"
    cfg = dict(attention_config(kind, d, dv, dtype, arch))
    stages = cfg["num_stages"]
    if kind == "decode":
        block_m, block_n = max(16, next_pow2(rows)), cfg["BLOCK_N"]
        if arch is not None:
            family = {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "16bit")
            stages = _DECODE_STAGES.get((family, max(next_pow2(d), next_pow2(dv), 64), arch >= 90), stages)
    else:
        # The forward's 128 x 128 tiles (sm_90a, 16-bit, d = 128) rely on its TMA path: with pointer loads
        # they spill, and so do 128-row tiles at d = 256.
        block_m = cfg["BLOCK_M"] if max(d, dv) <= 128 else min(cfg["BLOCK_M"], 64)
        block_n = min(cfg["BLOCK_N"], 64)
    if page >= 16 and page & (page - 1) == 0:
        block_n = min(block_n, page)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PAGE=page % block_n == 0,
                num_warps=cfg["num_warps"], num_stages=stages)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    cache_seqlens: torch.Tensor, *, scale: float | None = None, causal: bool = True,
                    return_lse: bool = False, num_splits: int | None = None,
                    check: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of the new queries of every sequence over its keys in the paged pool (module docstring).

    ``q`` (B, H, Lq, D), Hkv dividing H (GQA: query head h reads kv head h // (H // Hkv)); the queries' own
    keys must already be appended (``cache_seqlens`` counts them). ``causal=True``: bottom-right per sequence,
    query i sees keys j <= i + cache_seqlens[b] - Lq; ``causal=False``: every valid key. Returns (B, H, Lq, Dv)
    in q's dtype, and with ``return_lse`` the log-sum-exp (B, H, Lq), float32 (float64 for float64), -inf
    where a row sees no key (its output is 0). ``num_splits``: key splits per sequence (default: as the
    flash-decoding path of ``fused_kernels.attention`` chooses for the block table's capacity). ``check=False``
    skips the value checks of the index tensors (and their device sync). Forward only: a query that requires
    grad runs the (differentiable) PyTorch path."""
    op = "paged_attention"
    _check_pool(op, k_cache, v_cache)
    _checks.check_float_tensor("q", q, op)
    _checks.check_tensor_type("q", q, op)
    if q.dim() != 4:
        raise _checks.ArgumentValueError(f"{op}: q must be 4-D (batch, heads, queries, head_dim), got shape "
                                         f"{tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        raise _checks.ArgumentTypeError(f"{op}: q has dtype {q.dtype} but k_cache has {k_cache.dtype}")
    if q.device != k_cache.device:
        raise _checks.ArgumentValueError(f"{op}: q is on {q.device} but k_cache is on {k_cache.device}")
    b, h, lq, d = q.shape
    hkv = k_cache.shape[2]
    if d != k_cache.shape[3]:
        raise _checks.ArgumentValueError(f"{op}: q's head dim {d} differs from k_cache's {k_cache.shape[3]}")
    if h % hkv != 0:
        raise _checks.ArgumentValueError(f"{op}: the pool's kv heads ({hkv}) must divide q's heads ({h})")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool)
                                   or num_splits < 1):
        raise _checks.ArgumentValueError(f"{op}: num_splits must be an int >= 1 or None, got {num_splits!r}")
    scale = _check_scale(op, scale, d)
    bt, sl = _check_tables(op, k_cache, block_table, cache_seqlens, b, 0, check)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    if needs_grad or _backend.choose(q, op) == "torch":
        out, lse = _attention_torch(q, k_cache, v_cache, bt, sl, float(scale), causal)
    else:
        out, lse = _paged_launch(q, k_cache, v_cache, bt, sl, float(scale), causal, num_splits, _arch(q.device))
    if return_lse:
        return out, (lse if lse.dtype == torch.float64 else lse.float())
    return out


def _paged_launch(q, k_cache, v_cache, bt, sl, scale, causal, num_splits, arch):
    """Allocate and launch the paged attention for compute capability ``arch`` (None: interpreter); also what
    ``fused_kernels.aot`` runs on meta tensors (kernels replaced by recorders) to see the launches."""
    q = _last_dim_contiguous(q)
    b, h, lq, d = q.shape
    _, page, hkv, dv = v_cache.shape
    acc = torch_acc_dtype(q.dtype)
    out = torch.empty((b, h, lq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=acc, device=q.device)
    capacity = bt.shape[1] * page
    if out.numel() == 0 or capacity == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    group = h // hkv
    rows = group * lq
    cfg = paged_config(rows, page, d, dv, q.dtype, arch)
    block_n = cfg["BLOCK_N"]
    if num_splits is None:
        num_splits = max(1, decode_splits(b, hkv, lq, h, capacity, q.device))
    chunk = triton.cdiv(triton.cdiv(capacity, num_splits), block_n) * block_n
    splits = triton.cdiv(capacity, chunk)
    opart = torch.empty((b * hkv, splits, rows, dv), dtype=acc, device=q.device)
    lsepart = torch.empty((b * hkv, splits, rows), dtype=acc, device=q.device)
    upcast = _backend.INTERPRET and q.dtype == torch.bfloat16
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    _paged_attn_fwd_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]), splits, b * hkv)](
        q, k_cache, v_cache, bt, sl, opart, lsepart, hkv, lq, d, dv, group, splits, chunk, page, capacity,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *bt.stride(), scale * LOG2E,
        IS_CAUSAL=causal, FOLD_SCALE=scale > 0, EVEN_D=d == block_d, EVEN_DV=dv == block_dv,
        SINGLE_PAGE=cfg["SINGLE_PAGE"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_DV=block_dv, UPCAST=upcast, PRECISION=_precision(q.dtype, upcast), ACC=acc_dtype(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _attn_combine_kernel[(rows, b * hkv)](
        opart, lsepart, out, lse, h, hkv, lq, dv, group, splits, *out.stride()[:3],
        BLOCK_S=next_pow2(splits), BLOCK_DV=block_dv, ACC=acc_dtype(q.dtype), num_warps=4)
    return out, lse


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 length: int) -> torch.Tensor:
    """The logical sequences of a pool as a dense (B, Hkv, length, D) tensor (a copy): position j of
    sequence b from block ``block_table[b, j // block_size]``; positions at or past ``cache_seqlens[b]`` are 0
    (whatever their blocks hold). What the PyTorch path attends over, and what tests compare with."""
    page = cache.shape[1]
    n = -(-length // page)
    blocks = block_table[:, :n].long().clamp(0, cache.shape[0] - 1)                     # (B, n)
    dense = cache[blocks].flatten(1, 2)[:, :length]                                      # (B, length, Hkv, D)
    valid = torch.arange(length, device=cache.device) < cache_seqlens.long()[:, None]    # (B, length)
    return torch.where(valid[:, :, None, None], dense, 0).transpose(1, 2)


def _attention_torch(q, k_cache, v_cache, bt, sl, scale, causal):
    """The PyTorch path: gather each sequence's blocks (up to the longest length) and run
    ``fused_kernels.fast_torch.attention`` with the per-sequence key lengths and causal alignment as a mask."""
    b, h, lq, _ = q.shape
    capacity = bt.shape[1] * k_cache.shape[1]
    sl = sl.long().clamp(0, capacity)
    length = int(sl.max()) if b else 0
    if length == 0 or q.numel() == 0:
        out = q.new_zeros((b, h, lq, v_cache.shape[3]))
        return out, torch.full((b, h, lq), float("-inf"), dtype=torch_acc_dtype(q.dtype), device=q.device)
    k = gather_pages(k_cache, bt, sl, length)                                            # (B, Hkv, S, D)
    v = gather_pages(v_cache, bt, sl, length)
    j = torch.arange(length, device=q.device)
    keep = j < sl[:, None, None]                                                         # (B, 1, S)
    if causal:
        i = torch.arange(lq, device=q.device)
        keep = keep & (j[None, None, :] <= i[None, :, None] + (sl - lq)[:, None, None])  # (B, Lq, S)
    return fast_torch.attention(q, k, v, False, keep[:, None], None, scale, 0.0, True)


# ----------------------------------------------------------------------------- the cache


class PagedKVCache:
    """A paged KV cache for many sequences: per layer one pool (num_blocks, block_size, Hkv, D) of keys and
    one of values, a free list of physical blocks shared by the layers (every layer of a sequence uses the same
    block ids), and per sequence (any hashable id) its blocks and its length in each layer.

        cache = PagedKVCache(num_blocks=256, block_size=16, num_kv_heads=4, head_dim=64, num_layers=2)
        cache.allocate("a"); cache.allocate("b")
        cache.append(["a", "b"], k, v, layer=0)        # (2, Hkv, Lnew, D): grows the sequences' blocks
        out = cache.attention(["a", "b"], q, layer=0)  # (2, H, Lnew, D), bottom-right causal
        cache.free("a")                                # its blocks go back to the free list

    Blocks are taken when a sequence grows (``reserve``; ``append`` reserves what it writes) and returned by
    ``free``; a sequence never holds more than ``ceil(length / block_size)`` blocks. Not thread-safe."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *, num_layers: int = 1,
                 head_dim_v: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PagedKVCache: {name} must be an int >= 1, got {value!r}")
        dv = head_dim if head_dim_v is None else head_dim_v
        self.num_blocks, self.block_size, self.num_layers = num_blocks, block_size, num_layers
        self.k_caches = [torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                         for _ in range(num_layers)]
        self.v_caches = [torch.empty(num_blocks, block_size, num_kv_heads, dv, dtype=dtype, device=device)
                         for _ in range(num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))       # pop() hands out the lowest id first
        self._blocks: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, list[int]] = {}

    @property
    def device(self) -> torch.device:
        return self.k_caches[0].device

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def __contains__(self, seq: Hashable) -> bool:
        return seq in self._blocks

    def length(self, seq: Hashable, layer: int = 0) -> int:
        return self._lengths[self._known(seq)][layer]

    def _known(self, seq: Hashable) -> Hashable:
        if seq not in self._blocks:
            raise KeyError(f"PagedKVCache: unknown sequence {seq!r}")
        return seq

    def allocate(self, seq: Hashable, num_tokens: int = 0) -> None:
        """Start sequence ``seq`` (length 0) with room for ``num_tokens`` positions."""
        if seq in self._blocks:
            raise ValueError(f"PagedKVCache: sequence {seq!r} is already allocated")
        self._blocks[seq] = []
        self._lengths[seq] = [0] * self.num_layers
        try:
            self.reserve(seq, num_tokens)
        except RuntimeError:
            self.free(seq)
            raise

    def reserve(self, seq: Hashable, num_tokens: int) -> None:
        """Make room for ``num_tokens`` positions past the sequence's longest layer; RuntimeError if the
        pool has too few free blocks (nothing is taken then)."""
        blocks = self._blocks[self._known(seq)]
        need = self.blocks_for(max(self._lengths[seq]) + num_tokens) - len(blocks)
        if need > len(self._free):
            raise RuntimeError(f"PagedKVCache: {need} more blocks needed for sequence {seq!r}, "
                               f"{len(self._free)} of {self.num_blocks} free")
        blocks.extend(self._free.pop() for _ in range(max(need, 0)))

    def free(self, seq: Hashable) -> None:
        """Forget ``seq`` and return its blocks to the free list."""
        self._free.extend(reversed(self._blocks.pop(self._known(seq))))
        del self._lengths[seq]

    def tables(self, seqs: Sequence[Hashable], layer: int = 0, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table (B, max blocks) int32, cache_seqlens (B,) int32 of ``layer``, plus ``extra``) of the
        sequences ``seqs``, on the pool's device; unused table entries are 0."""
        width = max([len(self._blocks[self._known(s)]) for s in seqs] + [1])
        rows = [self._blocks[s] + [0] * (width - len(self._blocks[s])) for s in seqs]
        table = torch.tensor(rows, dtype=torch.int32).reshape(len(seqs), width).to(self.device)
        lengths = torch.tensor([self._lengths[s][layer] + extra for s in seqs], dtype=torch.int32).to(self.device)
        return table, lengths

    def append(self, seqs: Sequence[Hashable], k_new: torch.Tensor, v_new: torch.Tensor, layer: int = 0) -> None:
        """Write (B, Hkv, Lnew, D) keys/values of the sequences ``seqs`` after their cached positions in
        ``layer`` (reserving blocks as needed) and advance that layer's lengths by Lnew."""
        lnew = k_new.shape[2] if isinstance(k_new, torch.Tensor) and k_new.dim() == 4 else 0
        for s in seqs:
            self.reserve(s, self._lengths[self._known(s)][layer] + lnew - max(self._lengths[s]))
        table, lengths = self.tables(seqs, layer)
        paged_append(self.k_caches[layer], self.v_caches[layer], table, lengths, k_new, v_new, check=False)
        for s in seqs:
            self._lengths[s][layer] += lnew

    def attention(self, seqs: Sequence[Hashable], q: torch.Tensor, layer: int = 0, *, causal: bool = True,
                  scale: float | None = None) -> torch.Tensor:
        """``paged_attention`` of (B, H, Lq, D) queries over the cached keys of ``seqs`` in ``layer`` (the
        queries' own keys appended first)."""
        table, lengths = self.tables(seqs, layer)
        return paged_attention(q, self.k_caches[layer], self.v_caches[layer], table, lengths, causal=causal,
                               scale=scale, check=False)

    def layer(self, seqs: Sequence[Hashable], layer: int) -> PagedLayer:
        """A view of ``layer`` for the sequences ``seqs`` that a model's attention layer calls (``attend``)."""
        return PagedLayer(self, list(seqs), layer)


class PagedLayer:
    """One layer of a ``PagedKVCache`` for a fixed list of sequences: what ``transformer.layers.Attention``
    takes as its ``cache`` (``paged`` tells it apart from a dense ``KVCache``)."""

    paged = True

    def __init__(self, cache: PagedKVCache, seqs: list[Hashable], layer: int) -> None:
        self.cache, self.seqs, self.index = cache, seqs, layer

    @property
    def length(self) -> int:
        """The longest cached length among the sequences (the dense cache's ``length``)."""
        return max((self.cache.length(s, self.index) for s in self.seqs), default=0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Append this step's (B, Hkv, L, D) keys/values and attend the (B, H, L, D) queries over the cache."""
        self.cache.append(self.seqs, k, v, self.index)
        return self.cache.attention(self.seqs, q, self.index, causal=causal)

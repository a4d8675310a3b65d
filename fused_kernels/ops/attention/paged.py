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

import torch
import triton

from ..._core import backend as _backend
from ..._core import checks as _checks
from ..._core.launch import acc_dtype, device_arch, dot_precision, launch, next_pow2, torch_acc_dtype, upcast_16bit
from . import torch_path
from .api import _check_scale
from .config import LOG2E, MAX_HEAD_DIM, decode_splits, paged_config
from .kernels.decode import _attn_combine_kernel
from .kernels.paged import _paged_append_kernel, _paged_attn_fwd_kernel
from .launch import _last_dim_contiguous, kernels_run

INDEX_DTYPES = (torch.int32, torch.int64)
APPEND_BLOCK_T = 16          # new tokens per program of the append kernel


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


def _check_like(op: str, name: str, t: object, layout: str, cache: torch.Tensor, cache_name: str) -> None:
    """``t`` is a 4-D float tensor (``layout`` names its dims) of the cache's dtype, on its device."""
    _checks.check_float_tensor(name, t, op)
    _checks.check_tensor_type(name, t, op)
    if t.dim() != 4:
        raise _checks.ArgumentValueError(f"{op}: {name} must be 4-D ({layout}), got shape {tuple(t.shape)}")
    if t.dtype != cache.dtype:
        raise _checks.ArgumentTypeError(f"{op}: {name} has dtype {t.dtype} but {cache_name} has {cache.dtype}")
    if t.device != cache.device:
        raise _checks.ArgumentValueError(f"{op}: {name} is on {t.device} but {cache_name} is on {cache.device}")


def _check_new(op: str, name: str, t: object, cache: torch.Tensor, cache_name: str) -> torch.Tensor:
    _check_like(op, name, t, "batch, kv_heads, new tokens, head_dim", cache, cache_name)
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
    append_launch(k_cache, v_cache, bt, sl, k_new, v_new)


def append_launch(k_cache, v_cache, bt, sl, k_new, v_new) -> None:
    """Launch the append kernel (validated arguments); also what ``fused_kernels.aot`` runs on meta tensors."""
    b, hkv, lnew, d = k_new.shape
    k_new, v_new = _last_dim_contiguous(k_new), _last_dim_contiguous(v_new)
    dv = v_new.shape[3]
    launch(_paged_append_kernel, (triton.cdiv(lnew, APPEND_BLOCK_T), b * hkv),
           k_new, v_new, k_cache, v_cache, bt, sl, hkv, lnew, d, dv, k_cache.shape[1],
           k_new.stride()[:3], v_new.stride()[:3], k_cache.stride()[:3], v_cache.stride()[:3], bt.stride(),
           BLOCK_T=APPEND_BLOCK_T, BLOCK_D=next_pow2(d), BLOCK_DV=next_pow2(dv), num_warps=4)


def _append_torch(k_cache, v_cache, bt, sl, k_new, v_new) -> None:
    """The PyTorch path of ``paged_append``: one indexed write per pool."""
    page = k_cache.shape[1]
    pos = sl.long()[:, None] + torch.arange(k_new.shape[2], device=k_new.device)        # (B, Lnew)
    blocks = bt.long().gather(1, pos // page)                                           # (B, Lnew)
    k_cache[blocks, pos % page] = k_new.transpose(1, 2)                                 # (B, Lnew, Hkv, D)
    v_cache[blocks, pos % page] = v_new.transpose(1, 2)


# ----------------------------------------------------------------------------- attention


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
    _check_like(op, "q", q, "batch, heads, queries, head_dim", k_cache, "k_cache")
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
    if needs_grad or _backend.choose(q, op) == "torch" or not kernels_run(q, v_cache, None, 0.0):
        out, lse = _attention_torch(q, k_cache, v_cache, bt, sl, float(scale), causal)
    else:
        out, lse = paged_launch(q, k_cache, v_cache, bt, sl, float(scale), causal, num_splits, device_arch(q.device))
    if return_lse:
        return out, (lse if lse.dtype == torch.float64 else lse.float())
    return out


def paged_launch(q, k_cache, v_cache, bt, sl, scale, causal, num_splits, arch):
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
    upcast = upcast_16bit(q.dtype, arch)
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    launch(_paged_attn_fwd_kernel, (triton.cdiv(rows, cfg["BLOCK_M"]), splits, b * hkv),
           q, k_cache, v_cache, bt, sl, opart, lsepart, hkv, lq, d, dv, group, splits, chunk, page, capacity,
           q.stride()[:3], k_cache.stride()[:3], v_cache.stride()[:3], bt.stride(), scale * LOG2E,
           IS_CAUSAL=causal, FOLD_SCALE=scale > 0, EVEN_D=d == block_d, EVEN_DV=dv == block_dv,
           SINGLE_PAGE=cfg["SINGLE_PAGE"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_D=block_d,
           BLOCK_DV=block_dv, UPCAST=upcast, PRECISION=dot_precision(q.dtype, upcast), ACC=acc_dtype(q.dtype),
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launch(_attn_combine_kernel, (rows, b * hkv),
           opart, lsepart, out, lse, h, hkv, lq, dv, group, splits, out.stride()[:3],
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
    ``fused_kernels.torch_path.attention`` with the per-sequence key lengths and causal alignment as a mask."""
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
    return torch_path.attention(q, k, v, False, keep[:, None], None, scale, 0.0, True)

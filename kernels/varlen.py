"""Variable-length (packed) attention: many sequences of different lengths in one tensor, no padding.

Conventions (FlashAttention's ``flash_attn_varlen_func``):

- ``q`` (total_q, H, D), ``k`` (total_k, Hkv, D), ``v`` (total_k, Hkv, Dv): the tokens of every sequence one
  after another, last dim contiguous. Hkv divides H (GQA/MQA as ``kernels.attention``).
- ``cu_seqlens_q`` / ``cu_seqlens_k`` (B + 1,) int32 or int64: cumulative lengths, starting at 0 and ending at
  total_q / total_k; sequence ``b`` owns query rows ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1`` and key rows
  ``cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1``. Empty sequences are allowed.
- ``max_seqlen_q`` / ``max_seqlen_k``: the longest sequence (ints); they size the launch grid, so they must be at
  least the longest length (checked with ``check=True``).
- ``causal=True`` is **bottom-right** aligned per sequence, as ``kernels.attention(causal=True)``: query i of
  sequence b attends keys j <= i + S_b - L_b. Rows that see no key give 0 (lse -inf, zero gradients).
- Returns ``out`` (total_q, H, Dv) and with ``return_lse=True`` also the lse (H, total_q), float32 (float64
  for float64 inputs), as FlashAttention's ``softmax_lse``.
"""

from __future__ import annotations

import torch

from . import _backend, _checks, fast_torch
from .attention import attention
from .attention.api import _check_head_dims, _check_qkv, _check_scale

INDEX_DTYPES = (torch.int32, torch.int64)


def _check_cu(op: str, name: str, cu: object, total: int, device: torch.device, check: bool) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in INDEX_DTYPES:
        raise _checks.ArgumentTypeError(f"{op}: {name} must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise _checks.ArgumentValueError(f"{op}: {name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise _checks.ArgumentValueError(f"{op}: {name} is on {cu.device} but q is on {device}")
    if check:
        vals = cu.tolist()
        if vals[0] != 0:
            raise _checks.ArgumentValueError(f"{op}: {name} must start at 0, got {vals[0]}")
        if any(b < a for a, b in zip(vals, vals[1:])):
            raise _checks.ArgumentValueError(f"{op}: {name} must be non-decreasing, got {vals}")
        if vals[-1] != total:
            raise _checks.ArgumentValueError(f"{op}: {name} must end at the number of packed tokens {total}, got "
                                             f"{vals[-1]}")
    return cu


def _check_max(op: str, name: str, value: object, lengths: torch.Tensor | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{op}: {name} must be a non-negative int, got {value!r}")
    if lengths is not None and lengths.numel() and int(lengths.max()) > value:
        raise _checks.ArgumentValueError(f"{op}: {name} is {value} but the longest sequence has "
                                         f"{int(lengths.max())} tokens")
    return value


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: float | None = None, dropout_p: float = 0.0, return_lse: bool = False,
                     check: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each packed sequence over its own keys: see the module docstring for the layout.

    ``scale`` defaults to 1 / sqrt(D); ``dropout_p`` drops attention probabilities as ``kernels.attention``.
    ``check=False`` skips the checks that read ``cu_seqlens`` on the host (a device sync): the caller promises
    they start at 0, never decrease, end at the totals and that no sequence is longer than ``max_seqlen_*``."""
    op = "varlen_attention"
    _check_qkv(op, q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise _checks.ArgumentValueError(f"{op}: {name} must be 3-D (total_tokens, heads, head_dim), got shape "
                                             f"{tuple(t.shape)}")
    total_q, h, d = q.shape
    total_k, hkv = k.shape[0], k.shape[1]
    if v.shape[0] != total_k or v.shape[1] != hkv:
        raise _checks.ArgumentValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same tokens "
                                         f"and heads")
    if k.shape[2] != d:
        raise _checks.ArgumentValueError(f"{op}: k's head dim {k.shape[2]} differs from q's {d}")
    if hkv == 0 or h % hkv != 0:
        raise _checks.ArgumentValueError(f"{op}: k/v heads ({hkv}) must divide q heads ({h})")
    _check_head_dims(op, d, v.shape[2])
    cu_q = _check_cu(op, "cu_seqlens_q", cu_seqlens_q, total_q, q.device, check)
    cu_k = _check_cu(op, "cu_seqlens_k", cu_seqlens_k, total_k, q.device, check)
    if cu_q.numel() != cu_k.numel():
        raise _checks.ArgumentValueError(f"{op}: cu_seqlens_q has {cu_q.numel() - 1} sequences but cu_seqlens_k has "
                                         f"{cu_k.numel() - 1}")
    len_q, len_k = (cu_q.diff(), cu_k.diff()) if check else (None, None)
    max_seqlen_q = _check_max(op, "max_seqlen_q", max_seqlen_q, len_q)
    max_seqlen_k = _check_max(op, "max_seqlen_k", max_seqlen_k, len_k)
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    scale = _check_scale(op, scale, d)
    dropout_p = _checks.check_probability("dropout_p", dropout_p, op)
    impl = _backend.choose(q, op)
    return _per_sequence(q, k, v, cu_q, cu_k, causal, scale, dropout_p, return_lse, impl)


def _per_sequence(q, k, v, cu_q, cu_k, causal, scale, dropout_p, return_lse, impl):
    """One dense call per sequence on (1, H, L_b, D) views of the packed tensors (no copies, no padding)."""
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        qb = q[starts_q[b]:starts_q[b + 1]].transpose(0, 1)[None]
        kb = k[starts_k[b]:starts_k[b + 1]].transpose(0, 1)[None]
        vb = v[starts_k[b]:starts_k[b + 1]].transpose(0, 1)[None]
        if impl == "torch":
            res = fast_torch.attention(qb, kb, vb, causal, None, None, scale, dropout_p, True)
        else:
            res = attention(qb, kb, vb, causal=causal, scale=scale, dropout_p=dropout_p, return_lse=True)
        outs.append(res[0][0].transpose(0, 1))
        lses.append(res[1][0])
    if not outs:
        out = q.new_empty((0, q.shape[1], v.shape[2]))
        lse = q.new_empty((q.shape[1], 0), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    else:
        out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return (out, lse) if return_lse else out

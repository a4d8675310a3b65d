"""Public functions: ``attention`` (bottom-right causal, GQA, seqlens_k, lse) and the SDPA drop-in
``scaled_dot_product_attention`` (top-left causal, torch's broadcasting), with their argument checks."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..._core import backend as _backend
from ..._core import checks as _checks
from ..._core.grad import mask_requires_grad
from ..._core.launch import device_arch
from . import sparse, torch_path
from .blockmask import BlockMask
from .config import MAX_HEAD_DIM, attention_config, decode_splits
from .launch import _heavy, attention_fwd, kernels_run, variant_attention
from .variants import Variants, check_variants, row_offsets

try:  # torch's causal-mask tensor subclass (torch >= 2.3), understood as a causal alignment
    from torch.nn.attention.bias import CausalBias as _CausalBias
    from torch.nn.attention.bias import CausalVariant as _CausalVariant
except ImportError:  # pragma: no cover
    _CausalBias = _CausalVariant = None


def _is_causal_bias(mask: object) -> bool:
    return _CausalBias is not None and isinstance(mask, _CausalBias)


def _check_mask(op: str, mask: object, shape: tuple[int, ...], ref: torch.Tensor, name: str = "attn_mask") -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    _checks.check_tensor_type(name, mask, op)
    if mask.dtype != torch.bool and mask.dtype not in _checks.FLOAT_DTYPES:
        raise _checks.ArgumentTypeError(f"{op}: {name} must be bool (True = attend) or a float additive mask, got "
                                        f"{mask.dtype}")
    if mask.device != ref.device:
        raise _checks.ArgumentValueError(f"{op}: {name} is on {mask.device} but query is on {ref.device}")
    if not _checks.broadcasts_to(mask.shape, shape):
        raise _checks.ArgumentValueError(f"{op}: {name} of shape {tuple(mask.shape)} does not broadcast to "
                                         f"{tuple(shape)}")


def _check_qkv(op: str, q: object, k: object, v: object, names=("q", "k", "v")) -> None:
    for name, t in zip(names, (q, k, v)):
        _checks.check_float_tensor(name, t, op)
        _checks.check_tensor_type(name, t, op)
    for name, t in zip(names[1:], (k, v)):
        if t.dtype != q.dtype:
            raise _checks.ArgumentTypeError(f"{op}: {name} has dtype {t.dtype} but {names[0]} has {q.dtype}; they "
                                            f"must match")
        if t.device != q.device:
            raise _checks.ArgumentValueError(f"{op}: {name} is on {t.device} but {names[0]} is on {q.device}")


def _mask_4d(mask: torch.Tensor, full: tuple[int, ...]) -> torch.Tensor:
    """A mask broadcastable to ``full`` (..., L, S) as a 4-D mask broadcastable to ``full`` viewed as (B, H, L, S),
    size-1 dims kept (the kernel broadcasts them by stride 0; a float mask's gradient is summed over them).
    Beyond four dims the leading ones merge into the batch, expanded (a copy) only where the mask has sizes
    other than 1 there."""
    m = mask[(None,) * (len(full) - mask.dim())]
    if m.dim() <= 4:
        return m[(None,) * (4 - m.dim())]
    if all(size == 1 for size in m.shape[:-3]):
        return m.reshape(1, *m.shape[-3:])
    return m.expand(*full[:-3], *m.shape[-3:]).reshape(-1, *m.shape[-3:])


def _check_seqlens_range(op: str, seqlens_k: torch.Tensor, s: int) -> None:
    """0 <= seqlens_k[b] <= S: one reduction (a device sync on a GPU; ``check=False`` skips it)."""
    bad = (seqlens_k < 0) | (seqlens_k > s)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise _checks.ArgumentValueError(
            f"{op}: seqlens_k[{i}] is {int(seqlens_k[i])}, outside [0, {s}] (0 to the keys' length S); pass "
            f"check=False to skip this check (a device sync) when the lengths are known to be valid")


def _choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str, attn_mask: torch.Tensor | None,
            dropout_p: float, variants: Variants | None = None) -> str:
    """The backend's choice, except that the PyTorch path runs a float mask whose gradient is wanted together with
    dropout (the kernels' dropout mask is drawn inside them; the mask gradient is computed outside) and a call the
    device's column of the tile table has no kernel for (``launch.kernels_run``)."""
    impl = _backend.choose(q, op)
    if impl == "triton" and dropout_p > 0 and mask_requires_grad(attn_mask):
        return "torch"
    if impl == "triton" and not kernels_run(q, v, variants, dropout_p, q, k, v, attn_mask):
        return "torch"
    return impl


def _check_scale(op: str, scale: object, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _check_head_dims(op: str, d: int, dv: int, names=("q/k", "v")) -> None:
    for name, size in zip(names, (d, dv)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise _checks.ArgumentValueError(f"{op}: head dim of {name} must be in [1, {MAX_HEAD_DIM}], got {size}")


def _attention_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                        seqlens_k: torch.Tensor | None, scale: float, causal: bool, dropout_p: float,
                        return_lse: bool, variants: Variants):
    """The kernels with the variants: always the main kernel (no flash-decoding split), any number of queries."""
    out, lse = variant_attention(q, k, v, attn_mask, seqlens_k, scale, causal, k.shape[2] - q.shape[2], dropout_p,
                                 variants, align_seqlens=seqlens_k is not None)
    if return_lse:
        return out, (lse if lse.dtype == torch.float64 else lse.float())
    return out


def _check_block_mask(op: str, block_mask: object, mask_mod: object, b: int, h: int, l: int, s: int) -> None:
    if block_mask is None:
        return
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"{op}: block_mask must be a fused_kernels.BlockMask (from fused_kernels.block_mask), got "
                        f"{type(block_mask).__name__}")
    if block_mask.mask_mod is not mask_mod:
        raise _checks.ArgumentValueError(f"{op}: block_mask was made for mask_mod {block_mask.mask_mod!r}, but "
                                         f"mask_mod is {mask_mod!r}; pass the same function to both")
    bb, hh, ll, ss = block_mask.shape
    if (ll, ss) != (l, s) or bb not in (None, b) or hh not in (None, h):
        raise _checks.ArgumentValueError(f"{op}: block_mask has shape {block_mask.shape} (B, H, L, S), but the call "
                                         f"is ({b}, {h}, {l}, {s})")


def attention_tiles(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
                    seqlens_k: torch.Tensor | None = None, kernel: str = "fwd", window: tuple[int, int] | None = None,
                    document_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                    prefix_lengths: torch.Tensor | None = None, mask_mod=None, mod_args: tuple = (),
                    block_mask=None) -> dict:
    """How many (query block, key block) tiles one attention kernel visits for a call with these masks.

    ``kernel``: "fwd", "bwd_dq" or "bwd_dkdv" (each has its own tiles, ``attention_config`` for q's device and
    dtype). Returns ``{"visited", "full", "partial", "total", "block": (block_m, block_n)}`` over all (B, H):
    full tiles run without evaluating any mask, partial ones evaluate them, the others are skipped. Score
    modifications (softcap, ALiBi, score_mod) do not change the counts."""
    op = "attention_tiles"
    if kernel not in ("fwd", "bwd_dq", "bwd_dkdv"):
        raise _checks.ArgumentValueError(f"{op}: kernel must be 'fwd', 'bwd_dq' or 'bwd_dkdv', got {kernel!r}")
    b, h, l, d = q.shape
    s = k.shape[2]
    variants = check_variants(op, q, k, causal, window, None, None, document_ids, prefix_lengths, None, None,
                              mask_mod, mod_args, block_mask)
    _check_block_mask(op, block_mask, mask_mod, b, h, l, s)
    # the launcher's tile for these variants (``launch._heavy``, the row-state and variant entries)
    cfg = attention_config(kernel, d, d, q.dtype, device_arch(q.device), _heavy(variants, 0.0),
                           row_state=variants is not None and variants.q_ids is not None, variant=variants is not None)
    return sparse.tile_counts(variants, q, k, seqlens_k, causal, cfg["BLOCK_M"], cfg["BLOCK_N"])


def _plain_qkv(q: object, k: object, v: object) -> bool:
    """q, k, v are plain 4-D tensors of the same shape, float dtype and device, with a head dim the kernels take:
    the arguments of self-attention that every check of ``attention`` passes."""
    return (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor and q.dim() == 4
            and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype and q.dtype in _checks.FLOAT_DTYPES
            and q.device == k.device == v.device and q.shape[1] > 0 and 1 <= q.shape[3] <= MAX_HEAD_DIM)


def _self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, op: str) -> torch.Tensor:
    """The common call of ``attention`` and ``scaled_dot_product_attention``, whose checks would cost more than
    torch's whole kernel at short sequences: ``_plain_qkv`` tensors (every check passes; L == S, so top-left and
    bottom-right causal agree), no mask, variant or dropout, the default scale."""
    scale = 1.0 / math.sqrt(q.shape[3])
    if _choose(q, k, v, op, None, 0.0) == "torch":        # the backend, or a column without this kernel
        return torch_path.self_attention(q, k, v, causal, scale)
    return attention_fwd(q, k, v, None, None, scale, causal, 0, 0.0, 0)[0]


def _checked_arguments(op: str, q, k, v, causal, attn_mask, seqlens_k, scale, dropout_p, window, alibi_slopes,
                       softcap, document_ids, prefix_lengths, score_mod, score_mod_grad, mask_mod, mod_args,
                       block_mask, check: bool) -> tuple[float, float, Variants | None]:
    """Every argument check of ``attention``; returns (scale, dropout_p, variants) normalized."""
    _check_qkv(op, q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise _checks.ArgumentValueError(f"{op}: {name} must be 4-D (batch, heads, seq, head_dim), got shape "
                                             f"{tuple(t.shape)}")
    b, h, l, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise _checks.ArgumentValueError(f"{op}: batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise _checks.ArgumentValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same "
                                         f"heads and length")
    if k.shape[3] != d:
        raise _checks.ArgumentValueError(f"{op}: k's head dim {k.shape[3]} differs from q's {d}")
    hkv, s = k.shape[1], k.shape[2]
    if hkv == 0 or h % hkv != 0:
        raise _checks.ArgumentValueError(f"{op}: k/v heads ({hkv}) must divide q heads ({h})")
    _check_head_dims(op, d, v.shape[3])
    if _is_causal_bias(attn_mask):
        raise TypeError(f"{op}: attn_mask is a torch.nn.attention.bias.CausalBias; pass causal=True instead "
                        f"(bottom-right aligned, as causal_lower_right), or use scaled_dot_product_attention, "
                        f"which takes both CausalBias variants")
    _check_mask(op, attn_mask, (b, h, l, s), q)
    if seqlens_k is not None:
        if not isinstance(seqlens_k, torch.Tensor):
            raise TypeError(f"{op}: seqlens_k must be an int tensor or None, got {type(seqlens_k).__name__}")
        if seqlens_k.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
            raise _checks.ArgumentTypeError(f"{op}: seqlens_k must be an integer tensor, got {seqlens_k.dtype}")
        if tuple(seqlens_k.shape) != (b,):
            raise _checks.ArgumentValueError(f"{op}: seqlens_k must have shape ({b},), got {tuple(seqlens_k.shape)}")
        if seqlens_k.device != q.device:
            raise _checks.ArgumentValueError(f"{op}: seqlens_k is on {seqlens_k.device} but q is on {q.device}")
        if check and b and not torch.compiler.is_compiling():   # a data-dependent branch has no place in a graph
            _check_seqlens_range(op, seqlens_k, s)
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    scale = _check_scale(op, scale, d)
    dropout_p = _checks.check_probability("dropout_p", dropout_p, op)
    variants = check_variants(op, q, k, causal, window, alibi_slopes, softcap, document_ids, prefix_lengths,
                              score_mod, score_mod_grad, mask_mod, mod_args, block_mask)
    _check_block_mask(op, block_mask, mask_mod, b, h, l, s)
    return scale, dropout_p, variants


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              attn_mask: torch.Tensor | None = None, seqlens_k: torch.Tensor | None = None,
              scale: float | None = None, dropout_p: float = 0.0,
              return_lse: bool = False, window: tuple[int, int] | None = None,
              alibi_slopes: torch.Tensor | None = None, softcap: float | None = None,
              document_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
              prefix_lengths: torch.Tensor | None = None, score_mod=None, score_mod_grad=None, mask_mod=None,
              mod_args: tuple = (), block_mask=None,
              check: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused attention ``softmax(scale * q @ k^T + mask) @ v`` for models and decoding.

    Shapes: ``q`` (B, H, L, D), ``k`` (B, Hkv, S, D), ``v`` (B, Hkv, S, Dv), with Hkv dividing H (GQA;
    Hkv = 1 is MQA; query head h uses key/value head h // (H // Hkv)); D, Dv up to 256. Returns
    (B, H, L, Dv) in q's dtype, and with ``return_lse=True`` also the log-sum-exp of the scaled, masked
    scores (B, H, L), float32 (float64 for float64 inputs), -inf for fully masked rows.

    - ``causal=True`` is **bottom-right** aligned: query i attends keys j <= i + S - L (the last query
      sees every key, as a KV cache needs); equal to torch's top-left ``is_causal`` when L == S. Rows with
      i + S - L < 0 are fully masked. With ``seqlens_k`` the alignment is per row, at the end of the row's
      valid keys: query i of row b sits at position seqlens_k[b] - L + i and attends keys
      j <= i + seqlens_k[b] - L (a padded KV cache; as varlen_attention and paged_attention).
    - ``attn_mask``: bool (True = attend) or float (added to the scaled scores), broadcastable to
      (B, H, L, S), read through broadcast strides; may be combined with ``causal`` and ``seqlens_k``. A float
      mask may require grad: it gets the gradient of the softmax input, summed over its broadcast dims.
    - ``seqlens_k``: int tensor (B,) of valid key lengths in [0, S]: keys j >= seqlens_k[b] are masked and
      their blocks skipped. ``check=True`` verifies the range (one reduction, a host sync on a GPU);
      ``check=False`` skips it: the caller promises it (a value out of range is clamped by the kernels).
    - ``dropout_p``: dropout on the attention probabilities (always applied when > 0), kept values scaled
      by 1 / (1 - p), drawn in the kernel from a seed taken from torch's default generator.
    Fully masked rows give output 0, lse -inf and zero gradients. With few queries (L <= 16) and long
    keys the forward splits the keys across programs (flash-decoding) with the same results.

    Variants (off = None; ``off = S - L``, or ``seqlens_k[b] - L`` with seqlens_k; query i, key j, batch b, query
    head h):

    - ``window=(left, right)``: ints >= -1 (-1 unbounded): keys ``i + off - left <= j <= i + off + right``;
      with ``causal=True`` right is 0.
    - ``prefix_lengths`` (B,) ints, needs ``causal=True``, no window: also keys ``j < prefix_lengths[b]``.
    - ``document_ids``: (B, S) ints when L == S, or a pair ``(q_ids (B, L), k_ids (B, S))``: keys of the
      query's document only.
    - ``alibi_slopes`` float32 (H,) or (B, H): adds ``-slope * |i + off - j|``.
    - ``softcap > 0``: the scaled score x becomes ``softcap * tanh(x / softcap)``.
    - ``score_mod(score, b, h, q_idx, kv_idx)``, ``mask_mod(b, h, q_idx, kv_idx) -> bool``: ``@triton.jit``
      functions (one more parameter ``args`` when ``mod_args``, a tuple of tensors, is non-empty);
      ``score_mod_grad`` (same signature, d score_mod / d score) is required when a gradient is wanted.
      On the PyTorch path their Python body runs on torch int64 index tensors broadcastable to (B, H, L, S).
    - ``block_mask``: a ``fused_kernels.block_mask(...)`` for the same mask_mod (block skipping), optional.

    Score pipeline: ``scale * q.k``, softcap, alibi, + float attn_mask, score_mod; then keep = seqlens_k &
    causal/window/prefix & documents & bool attn_mask & mask_mod; softmax over kept keys."""
    op = "attention"
    if (attn_mask is None and seqlens_k is None and scale is None and dropout_p == 0.0 and window is None
            and alibi_slopes is None and softcap is None and document_ids is None and prefix_lengths is None
            and score_mod is None and score_mod_grad is None and mask_mod is None and block_mask is None
            and not return_lse and isinstance(mod_args, tuple) and not mod_args and (causal is True or causal is False)
            and _plain_qkv(q, k, v)):
        return _self_attention(q, k, v, causal, op)
    scale, dropout_p, variants = _checked_arguments(
        op, q, k, v, causal, attn_mask, seqlens_k, scale, dropout_p, window, alibi_slopes, softcap,
        document_ids, prefix_lengths, score_mod, score_mod_grad, mask_mod, mod_args, block_mask, check)
    b, h, l, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if variants is not None and seqlens_k is not None:   # positions (causal, window, ALiBi) per row
        variants = dataclasses.replace(variants, off=row_offsets(s - l, seqlens_k, s))
    if _choose(q, k, v, op, attn_mask, dropout_p, variants) == "torch":
        return torch_path.attention(q, k, v, causal, attn_mask, seqlens_k, scale, dropout_p, return_lse,
                                    variants=variants)
    if variants is not None:
        return _attention_variants(q, k, v, attn_mask, seqlens_k, scale, causal, dropout_p, return_lse, variants)
    splits = decode_splits(b, hkv, l, h, s, q.device)
    out, lse, _ = attention_fwd(q, k, v, attn_mask, seqlens_k, scale, causal, s - l, dropout_p, splits,
                                align_seqlens=causal and seqlens_k is not None)
    if return_lse:
        return out, (lse if lse.dtype == torch.float64 else lse.float())
    return out


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on the fused kernel.

    ``query`` (..., L, E), ``key`` (..., S, E), ``value`` (..., S, Ev); leading dims broadcast like torch's (also
    between different numbers of dims).
    ``is_causal=True`` is **top-left** aligned, as in torch: query i attends keys j <= i (for L != S this
    differs from ``fused_kernels.attention(causal=True)``, which is bottom-right aligned). ``attn_mask``: bool
    (True = take part) or float (added to the scaled scores), broadcastable to (..., L, S); a float mask may
    require grad. Together with ``is_causal=True`` both apply (the mask and the top-left causal mask), as torch's
    CPU flash path does on 4-D inputs (torch's math path refuses the pair instead). ``attn_mask`` may also be a
    ``torch.nn.attention.bias.CausalBias`` for (L, S): ``causal_upper_left`` is ``is_causal=True``,
    ``causal_lower_right`` the bottom-right alignment of ``fused_kernels.attention(causal=True)``, neither
    materialized; together with ``is_causal=True`` it is refused, as by torch. ``enable_gqa=True``: key/value
    heads (dim -3) divide query heads. ``dropout_p > 0`` always drops, like torch's function. One difference: a
    fully masked row gives 0 (torch gives NaN)."""
    op = "scaled_dot_product_attention"
    if (attn_mask is None and dropout_p == 0.0 and scale is None and (is_causal is True or is_causal is False)
            and _plain_qkv(query, key, value)):
        # The common call, as in ``attention``: 4-D tensors of one shape (so L == S and top-left causal is
        # bottom-right causal) pass every check below, and broadcasting their batch dims is the identity.
        return _self_attention(query, key, value, is_causal, op)
    _check_qkv(op, query, key, value, ("query", "key", "value"))
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise _checks.ArgumentValueError(f"{op}: {name} must have at least 2 dims (..., seq, head_dim), got "
                                             f"shape {tuple(t.shape)}")
    l, e = query.shape[-2:]
    s, ev = value.shape[-2:]
    if key.shape[-1] != e:
        raise _checks.ArgumentValueError(f"{op}: key's last dim {key.shape[-1]} differs from query's {e}")
    if key.shape[-2] != s:
        raise _checks.ArgumentValueError(f"{op}: key's length {key.shape[-2]} differs from value's {s}")
    _check_head_dims(op, e, ev, ("query/key", "value"))
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    causal_offset = 0
    if _is_causal_bias(attn_mask):
        if is_causal:
            raise _checks.ArgumentValueError(f"{op}: CausalBias should not be used with causal=True (Explicit "
                                             f"attn_mask should not be set when is_causal=True)")
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (l, s):
            raise _checks.ArgumentValueError(
                f"{op}: attn_mask is a CausalBias for {attn_mask.seq_len_q} queries and {attn_mask.seq_len_kv} "
                f"keys, but query has {l} and key {s}")
        if attn_mask.variant == _CausalVariant.LOWER_RIGHT:
            causal_offset = s - l
        attn_mask, is_causal = None, True
    lead_q, lead_k, lead_v = query.shape[:-2], key.shape[:-2], value.shape[:-2]
    gqa = enable_gqa and min(query.dim(), key.dim(), value.dim()) >= 3 and (
        key.shape[-3] != query.shape[-3] or value.shape[-3] != query.shape[-3])
    if gqa:
        hq, hkv = query.shape[-3], key.shape[-3]
        if value.shape[-3] != hkv:
            raise _checks.ArgumentValueError(f"{op}: with enable_gqa key and value must have the same number of "
                                             f"heads, got {hkv} and {value.shape[-3]}")
        if hkv == 0 or hq % hkv != 0:
            raise _checks.ArgumentValueError(f"{op}: with enable_gqa the key/value heads ({hkv}) must divide the "
                                             f"query heads ({hq})")
        leads = (lead_q[:-1], lead_k[:-1], lead_v[:-1])
    else:
        leads = (lead_q, lead_k, lead_v)
    try:   # the leading (batch) dims of query, key and value broadcast together, as in torch
        batch = tuple(torch.broadcast_shapes(*leads))
    except RuntimeError:
        raise _checks.ArgumentValueError(f"{op}: the leading dims of query {tuple(query.shape)}, key "
                                         f"{tuple(key.shape)} and value {tuple(value.shape)} do not "
                                         f"broadcast") from None
    full = (*batch, hq, l, s) if gqa else (*batch, l, s)
    _check_mask(op, attn_mask, full, query)
    scale = _check_scale(op, scale, e)
    dropout_p = _checks.check_probability("dropout_p", dropout_p, op)
    if _choose(query, key, value, op, attn_mask, dropout_p) == "torch":
        return torch_path.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                       batch, gqa, causal_offset)
    # To (B, H, L, E): the dim before (L, E) is the head dim (where GQA happens), the others the batch.
    hk = hkv if gqa else None
    _to_4d = torch_path.to_4d
    q4 = _to_4d(query.expand(*batch, hq, l, e) if gqa else query.expand(*batch, l, e))
    k4 = _to_4d(key.expand(*batch, hk, s, e) if gqa else key.expand(*batch, s, e))
    v4 = _to_4d(value.expand(*batch, hk, s, ev) if gqa else value.expand(*batch, s, ev))
    mask4 = None if attn_mask is None else _mask_4d(attn_mask, full)
    out, _, _ = attention_fwd(q4, k4, v4, mask4, None, scale, is_causal, causal_offset, dropout_p, 0)
    return out.reshape(*full[:-1], ev)

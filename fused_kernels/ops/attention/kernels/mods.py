"""Masks and score modifications: the one place the forward, dK/dV and dQ kernels take them from.

Every function here works on broadcast index tiles, ``q_idx`` (M, 1) and ``kv_idx`` (1, N) in the forward and
dQ kernels, (1, M) and (N, 1) on the dK/dV kernel's transposed scores, so one definition serves both layouts.

- ``_mask``: -inf where query ``q_idx`` does not keep key ``kv_idx``: the key bound (``kv_len``), the causal /
  window band (``kv_idx <= q_idx + c_hi``, ``kv_idx >= q_idx + c_lo``), the prefix-LM prefix, document ids and a
  user ``mask_mod``. It runs only on the tiles that need it (the bounds / diagonal tiles of the analytic loops,
  the partial tiles of a block table); full tiles never evaluate it.
- ``_mod_scores``: softcap, ALiBi, the float mask and a user ``score_mod``, in that order, on scaled scores in
  natural-log units, with ``dz/dx`` for the backward (softcap's ``1 - tanh^2`` times ``score_mod_grad``).

A mod sees indices clamped into [0, L) x [0, S): padded rows and columns are masked anyway, and a mod that
looks its indices up in a tensor of ``mod_args`` never reads past its end.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mask(
    s, q_idx, kv_idx, b, h, kv_len, c_hi, c_lo, prefix_len,
    DOC_Q,      # (B, L) int32 document id of each query, contiguous (DOCS)
    DOC_K,      # (B, S) int32 document id of each key, contiguous (DOCS)
    L, S, MOD_ARGS,
    CHECK_KV: tl.constexpr, CAUSAL: tl.constexpr, BAND_LO: tl.constexpr, PREFIX: tl.constexpr,
    DOCS: tl.constexpr, MASK_MOD: tl.constexpr, MOD_HAS_ARGS: tl.constexpr,
):
    """``s`` with -inf where the key is not kept. The causal limit and the key bound are one compare (key j <=
    min(i + c_hi, kv_len - 1)); ``prefix_len`` (already clipped to kv_len) widens it to every key of the prefix."""
    if CAUSAL:
        if CHECK_KV:
            last = tl.minimum(q_idx + c_hi, kv_len - 1)
        else:
            last = q_idx + c_hi
        keep = kv_idx <= last
        if PREFIX:
            keep = keep | (kv_idx < prefix_len)
        s = tl.where(keep, s, float("-inf"))
    elif CHECK_KV:
        s = tl.where(kv_idx < kv_len, s, float("-inf"))
    if BAND_LO:
        s = tl.where(kv_idx >= q_idx + c_lo, s, float("-inf"))
    if DOCS or MASK_MOD is not None:
        qi = tl.minimum(q_idx, L - 1)
        ki = tl.minimum(kv_idx, S - 1)
        if DOCS:
            same = tl.load(DOC_Q + b.to(tl.int64) * L + qi) == tl.load(DOC_K + b.to(tl.int64) * S + ki)
            s = tl.where(same, s, float("-inf"))
        if MASK_MOD is not None:
            if MOD_HAS_ARGS:
                keep_mod = MASK_MOD(b, h, qi, ki, MOD_ARGS)
            else:
                keep_mod = MASK_MOD(b, h, qi, ki)
            s = tl.where(keep_mod != 0, s, float("-inf"))
    return s


@triton.jit
def _mod_scores(
    x, q_idx, kv_idx, b, h, c_off, softcap, slope, bias, L, S, MOD_ARGS,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, SCORE_MOD: tl.constexpr,
    SCORE_MOD_GRAD: tl.constexpr, MOD_HAS_ARGS: tl.constexpr, NEED_GRAD: tl.constexpr,
):
    """(z, dz/dx) of scaled scores ``x`` (natural-log units, accumulation dtype): softcap ``c * tanh(x / c)``,
    ALiBi ``- slope * |i + c_off - j|``, the float mask ``bias``, then ``score_mod``. dz/dx is 1.0 unless
    NEED_GRAD (the backward) and a softcap or score_mod is on."""
    g = 1.0
    if SOFTCAP:
        t = 2.0 * tl.sigmoid(x * (2.0 / softcap)) - 1.0     # tanh(x / c), without a libdevice call
        x = softcap * t
        if NEED_GRAD:
            g = 1.0 - t * t
    if ALIBI:
        x = x - slope * tl.abs(q_idx + c_off - kv_idx).to(x.dtype)
    if HAS_BIAS:
        x = x + bias
    if SCORE_MOD is not None:
        qi = tl.minimum(q_idx, L - 1)
        ki = tl.minimum(kv_idx, S - 1)
        if MOD_HAS_ARGS:
            if NEED_GRAD:
                g = g * SCORE_MOD_GRAD(x, b, h, qi, ki, MOD_ARGS)
            x = SCORE_MOD(x, b, h, qi, ki, MOD_ARGS).to(x.dtype)
        else:
            if NEED_GRAD:
                g = g * SCORE_MOD_GRAD(x, b, h, qi, ki)
            x = SCORE_MOD(x, b, h, qi, ki).to(x.dtype)
    return x, g

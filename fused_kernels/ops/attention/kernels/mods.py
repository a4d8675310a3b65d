"""Masks and score modifications: the one place the forward, dK/dV and dQ kernels take them from.

Every function here works on broadcast index tiles, ``q_idx`` (M, 1) and ``kv_idx`` (1, N) in the forward and
dQ kernels, (1, M) and (N, 1) on the dK/dV kernel's transposed scores, so one definition serves both layouts.

- ``_mask``: -inf where query ``q_idx`` does not keep key ``kv_idx``: the key bound (``kv_len``), the causal /
  window band (``kv_idx <= q_idx + c_hi``, ``kv_idx >= q_idx + c_lo``), the prefix-LM prefix, document ids and a
  user ``mask_mod``. It runs only on the tiles that need it (the bounds / diagonal tiles of the analytic loops,
  the partial tiles of a block table); full tiles never evaluate it.
- ``_mod_scores``: softcap, ALiBi, the float mask and a user ``score_mod``, in that order, on scaled scores in
  natural-log units, with ``dz/dx`` for the backward (softcap's ``1 - tanh^2`` times ``score_mod_grad``).

What a call's variants are travels in two values: ``VAR`` (a ``VariantFlags``, compile time: which variants are
on, and the user mods) and ``vctx`` (``variant_context``, run time: this program's values for them). Plain
calls pass ``VariantFlags()``: every branch below is then dead code and the kernels compile as without variants.

A mod sees indices clamped into [0, L) x [0, S): padded rows and columns are masked anyway, and a mod that
looks its indices up in a tensor of ``mod_args`` never reads past its end.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl


class VariantFlags(NamedTuple):
    """The attention variants a kernel is compiled for (one ``tl.constexpr``; all off by default)."""

    band_lo: bool = False       # a window's lower side: key j >= i + c_lo
    prefix: bool = False        # prefix-LM: the first prefix_len keys are visible to every query
    docs: bool = False          # document ids: keys of the query's document only
    softcap: bool = False       # softcap * tanh(x / softcap) on the scaled scores
    alibi: bool = False         # - slope * |i + c_off - j|
    mask_mod: Any = None        # user @triton.jit mask_mod(b, h, q_idx, kv_idx[, args]) -> bool
    score_mod: Any = None       # user @triton.jit score_mod(score, b, h, q_idx, kv_idx[, args])
    score_mod_grad: Any = None  # its derivative d score_mod / d score (the backward)
    mod_has_args: bool = False  # the user mods take ``mod_args`` (a tuple of tensors) as one more argument

    @property
    def mods_scores(self) -> bool:
        """A variant changes the scores themselves (they then go through ``_mod_scores``, in natural units).
        Host side only: inside a kernel a constexpr's properties are not visible in the interpreter, so the
        kernels spell the same test out."""
        return self.softcap or self.alibi or self.score_mod is not None


PLAIN = VariantFlags()      # every variant off: the kernels' default VARIANT

# -1 ids after each row of the document-id tensors (``doc_ids``): at least the largest tile's rows
DOC_PAD = tl.constexpr(128)


@triton.jit
def variant_context(b, h, c_off, c_lo, prefix_len, sm_scale, softcap, slope, L, S, DOC_Q, DOC_K, MOD_ARGS):
    """The run-time values of a program's variants, one tuple for ``_mask`` / ``_mod_scores``: batch and query
    head (int32), the causal offset (ALiBi's diagonal) and the band's lower diagonal, the prefix length (clipped
    to kv_len), the scale, softcap and ALiBi slope, the sequence lengths L / S (index clamps), the document ids
    (B, L) / (B, S) int32 and the user mods' tensors. An absent tensor (None) is held as 0: triton 3.6 cannot
    return a tuple holding None, and only the variants that have them read them."""
    if DOC_Q is None:
        DOC_Q = 0
    if DOC_K is None:
        DOC_K = 0
    if MOD_ARGS is None:
        MOD_ARGS = 0
    return (b, h, c_off, c_lo, prefix_len, sm_scale, softcap, slope, L, S, DOC_Q, DOC_K, MOD_ARGS)


@triton.jit
def doc_ids(DOC, b, n, idx):
    """The document ids of rows ``idx`` (< n + DOC_PAD) of batch ``b``: loaded from the int32 ``DOC``, (B, n +
    DOC_PAD) with -1 in each row's padding (``sparse.pad_doc_ids``), or ``DOC`` itself when a kernel loaded them once
    before its loop (the program's own query rows in the forward and dQ kernels, its key rows in dK/dV). The
    padding lets a tile read its ids without a clamp or a bounds mask: affine addresses, one base register pair
    and immediate offsets (with clamped indices triton 3.6's sm_80 d=64 forward spilled; a mask costs 4% of the
    partial tiles' instructions on triton 3.9)."""
    ids = DOC
    if DOC.dtype.is_ptr():
        ids = tl.load(DOC + b.to(tl.int64) * (n + DOC_PAD) + idx)
    return ids


@triton.jit
def no_variant_context():
    """The ``vctx`` of a kernel compiled without variants (``VariantFlags()``): never read."""
    return variant_context(0, 0, 0, 0, 0, 1.0, 1.0, 0.0, 1, 1, None, None, None)


@triton.jit
def _mask(s, q_idx, kv_idx, kv_len, c_hi, vctx, CHECK_KV: tl.constexpr, CAUSAL: tl.constexpr, VAR: tl.constexpr):
    """``s`` with -inf where the key is not kept. The causal limit and the key bound are one compare (key j <=
    min(i + c_hi, kv_len - 1)); ``prefix_len`` (already clipped to kv_len) widens it to every key of the prefix."""
    b, h, _, c_lo, prefix_len, _, _, _, L, S, DOC_Q, DOC_K, MOD_ARGS = vctx
    if CAUSAL:
        if CHECK_KV:
            last = tl.minimum(q_idx + c_hi, kv_len - 1)
        else:
            last = q_idx + c_hi
        keep = kv_idx <= last
        if VAR.prefix:
            keep = keep | (kv_idx < prefix_len)
        s = tl.where(keep, s, float("-inf"))
    elif CHECK_KV:
        s = tl.where(kv_idx < kv_len, s, float("-inf"))
    if VAR.band_lo:
        s = tl.where(kv_idx >= q_idx + c_lo, s, float("-inf"))
    if VAR.docs or VAR.mask_mod is not None:
        qi = tl.minimum(q_idx, L - 1)
        ki = tl.minimum(kv_idx, S - 1)
        if VAR.docs:
            same = doc_ids(DOC_Q, b, L, q_idx) == doc_ids(DOC_K, b, S, kv_idx)
            s = tl.where(same, s, float("-inf"))
        if VAR.mask_mod is not None:
            if VAR.mod_has_args:
                keep_mod = VAR.mask_mod(b, h, qi, ki, MOD_ARGS)
            else:
                keep_mod = VAR.mask_mod(b, h, qi, ki)
            s = tl.where(keep_mod != 0, s, float("-inf"))
    return s


@triton.jit
def _mod_scores(x, q_idx, kv_idx, bias, vctx, HAS_BIAS: tl.constexpr, VAR: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(z, dz/dx) of the dot products ``x`` (accumulation dtype), scaled into natural-log units first: softcap
    ``c * tanh(x / c)``, ALiBi ``- slope * |i + c_off - j|``, the float mask ``bias``, then ``score_mod``. dz/dx
    (per scaled score) is 1.0 unless NEED_GRAD (the backward) and a softcap or score_mod is on."""
    b, h, c_off, _, _, sm_scale, softcap, slope, L, S, _, _, MOD_ARGS = vctx
    x = x * sm_scale
    g = 1.0
    if VAR.softcap:
        t = 2.0 * tl.sigmoid(x * (2.0 / softcap)) - 1.0     # tanh(x / c), without a libdevice call
        x = softcap * t
        if NEED_GRAD:
            g = 1.0 - t * t
    if VAR.alibi:
        x = x - slope * tl.abs(q_idx + c_off - kv_idx).to(x.dtype)
    if HAS_BIAS:
        x = x + bias
    if VAR.score_mod is not None:
        qi = tl.minimum(q_idx, L - 1)
        ki = tl.minimum(kv_idx, S - 1)
        if VAR.mod_has_args:
            if NEED_GRAD:
                g = g * VAR.score_mod_grad(x, b, h, qi, ki, MOD_ARGS)
            x = VAR.score_mod(x, b, h, qi, ki, MOD_ARGS).to(x.dtype)
        else:
            if NEED_GRAD:
                g = g * VAR.score_mod_grad(x, b, h, qi, ki)
            x = VAR.score_mod(x, b, h, qi, ki).to(x.dtype)
    return x, g

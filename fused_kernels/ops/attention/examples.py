"""Example score and mask modifications for the programmable attention variants (``score_mod``, ``score_mod_grad``,
``mask_mod`` and ``mod_args`` of a call's variants).

Each is a module-level ``@triton.jit`` function, so it can be named by ``(module, qualname)``: ``fused_kernels.aot``
sends the mods to its compile processes that way (a ``JITFunction`` does not pickle). Signatures, as the kernels
call them (``fused_kernels.attention.mods``):

- ``score_mod(score, b, h, q_idx, kv_idx) -> score``: ``score`` the scaled score in natural-log units (float32),
  ``q_idx`` / ``kv_idx`` broadcast index tiles (clamped into [0, L) x [0, S)), ``b`` / ``h`` the batch and head;
- ``score_mod_grad(score, b, h, q_idx, kv_idx) -> d score_mod / d score`` (the backward needs it);
- ``mask_mod(b, h, q_idx, kv_idx) -> bool``: True keeps the key;
- with ``mod_args`` (a tuple of tensors) every mod takes one more parameter, ``args``, that tuple.

``distance_penalty`` and ``stripes`` use Python operators only, so their Python bodies (``fn.fn``) also run on
torch tensors: ``block_mask`` evaluates a mask that way on CPU, and a reference can call them directly.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Half-width of the ``relative_bias`` table: offsets q_idx - kv_idx are clamped into [-REL_R, REL_R], so the
# table has 2 * REL_R + 1 columns. A kernel cannot read a tensor's shape, hence a fixed constant.
REL_R = tl.constexpr(128)


@triton.jit
def distance_penalty(score, b, h, q_idx, kv_idx):
    """``score - 0.125 * |q_idx - kv_idx|`` (an ALiBi-like linear penalty with one slope for every head)."""
    d = q_idx - kv_idx
    return score - 0.125 * (d * ((d > 0) * 2 - 1))   # |d| with operators only (no tl.abs on torch)


@triton.jit
def distance_penalty_grad(score, b, h, q_idx, kv_idx):
    """d distance_penalty / d score = 1."""
    return 1.0


@triton.jit
def relative_bias(score, b, h, q_idx, kv_idx, args):
    """``score + table[h, clamp(q_idx - kv_idx, -REL_R, REL_R) + REL_R]`` (a T5-style learned relative position
    bias): ``args[0]`` the (H, 2 * REL_R + 1) float32 table, contiguous."""
    table = args[0]
    rel = tl.minimum(tl.maximum(q_idx - kv_idx, -REL_R), REL_R) + REL_R
    return score + tl.load(table + h * (2 * REL_R + 1) + rel)


@triton.jit
def relative_bias_grad(score, b, h, q_idx, kv_idx, args):
    """d relative_bias / d score = 1 (the bias table itself gets no gradient from the kernels)."""
    return 1.0


@triton.jit
def stripes(b, h, q_idx, kv_idx):
    """Keep the keys with ``kv_idx % 4 != 3`` (every fourth key dropped): a mask with partial tiles only."""
    return kv_idx % 4 != 3

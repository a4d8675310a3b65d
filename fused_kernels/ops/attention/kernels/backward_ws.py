"""The warp-specialized dK/dV kernel (sm_90a): the backward's key-side loop as one ``tl.range(warp_specialize=True)``
loop, for the calls where every query block is mask-free.

It lives apart from ``backward.py`` because triton's Hopper pass (3.6 and 3.9) takes a kernel only in this shape,
every condition found by compiling (``python -m fused_kernels.aot --sass``; docs/aot.md):

- one specialized loop and nothing beside it: a second query loop (the causal diagonal, a masked tail) fails the
  pass's dominance assertion, and GQA's loop over the group's heads around it fails "value not sliced"; so MHA,
  non-causal, no mask, ``seqlens_k``, dropout or variants (the launcher's contract);
- every tile the consumers wait on comes from a descriptor: k and v too, though they are loaded once before the
  loop (pointer loads there: "unsupported load type for producer commit"); the descriptors are made in the kernel
  (128 bytes of global scratch per program each: ``_core.launch.scratch_launch``);
- a 4-warp program (with 8 the pass is silently skipped), which it splits into a producer warp group (TMA, 40
  registers after setmaxnreg) and two consumer groups of 64 keys each (232 registers); 128 keys x 64 queries, 2
  stages: 128 x 128 fails ("producer commit") or, with the row vectors through descriptors too, spills and
  overflows shared memory.

Rows past L read as zeros from the descriptors (q = do = 0) and their lse2 / delta load as +inf / 0, so a partial
last query block adds exactly nothing; keys past S are computed and not stored.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attn_bwd_dkdv_ws_kernel(
    Q, K, V, DO,    # (B, H, L, D) / (B, H, S, D) / (B, H, S, DV) / (B, H, L, DV) 16-bit, last dim contiguous
    LSE2,           # (B, H, L) lse in log2 units (+inf: fully masked row), contiguous
    DELTA,          # (B, H, L) from the preprocess kernel, contiguous
    DK,             # (B, H, S, D) key gradient, contiguous
    DV_,            # (B, H, S, DV) value gradient, contiguous
    H, L, S, D, DV,
    stride_q, stride_k, stride_v, stride_do,   # (batch, head, row) strides of each tensor
    sm_scale, qk_scale,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one (batch, head) over every query block, as ``_attn_bwd_dkdv_kernel``'s
    mask-free stage computes them (scale folded into the exponent, ``exp2(s * qk_scale - lse2)``)."""
    stride_qb, stride_qh, stride_qm = stride_q
    stride_kb, stride_kh, stride_kn = stride_k
    stride_vb, stride_vh, stride_vn = stride_v
    stride_dob, stride_doh, stride_dom = stride_do
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    k_desc = tl.make_tensor_descriptor(K + b * stride_kb + h * stride_kh, shape=[S, D], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + b * stride_vb + h * stride_vh, shape=[S, DV], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, BLOCK_DV])
    q_desc = tl.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, shape=[L, D], strides=[stride_qm, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    do_desc = tl.make_tensor_descriptor(DO + b * stride_dob + h * stride_doh, shape=[L, DV],
                                        strides=[stride_dom, 1], block_shape=[BLOCK_M, BLOCK_DV])
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    offs_m0 = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for start_m in tl.range(0, L, BLOCK_M, warp_specialize=True):
        q = q_desc.load([start_m, 0])
        do = do_desc.load([start_m, 0])
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        offs_m = start_m + offs_m0
        lse2 = tl.load(LSE2 + bh * L + offs_m, mask=offs_m < L, other=float("inf"))
        delta = tl.load(DELTA + bh * L + offs_m, mask=offs_m < L, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC)       # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=ACC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=ACC)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_n[:, None] < S
    tl.store(DK + (bh * S + offs_n[:, None]) * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=row_ok & (offs_d[None, :] < D))
    tl.store(DV_ + (bh * S + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=row_ok & (offs_dv[None, :] < DV))

"""Fused attention (FlashAttention-2 style): forward, deterministic backward, and a flash-decoding path.

``softmax(scale * q @ k^T + mask) @ v`` without ever materializing the (L, S) score matrix: each program
keeps a block of queries in registers and streams key/value blocks through an online softmax (base-2
exponentials, fp32 accumulation, fp64 for fp64). Supports GQA/MQA natively (a query head h reads key/value
head ``h // (H // Hkv)``), bool/float masks read through broadcast strides, per-batch key lengths
(``seqlens_k``: key blocks past the length are skipped), two causal alignments, in-kernel dropout, any head
dim up to 256 (padded to a power of two with masked loads) and strided q/k/v (last dim contiguous).

Causal conventions (``j`` key index, ``i`` query index, ``L`` queries, ``S`` keys):
- ``attention(causal=True)``: **bottom-right** aligned, ``j <= i + S - L`` (the last query sees every key:
  what a KV cache and chunked prefill need);
- ``scaled_dot_product_attention(is_causal=True)``: **top-left** aligned, ``j <= i``, as torch.
They agree when ``L == S``. In the kernels both are ``j <= i + causal_offset``.

The forward saves only the output and the log-sum-exp (natural log, accumulation dtype). The backward
is atomics-free and therefore deterministic: a preprocess kernel computes ``delta = rowsum(dO * O)``
(minus the incoming lse gradient), one kernel per key block accumulates dK and dV over every query block
of every query head of its GQA group, one kernel per query block accumulates dQ.

Decoding (few queries, long cache): ``_attn_fwd_split_kernel`` packs all the queries of a GQA group
(``G * L`` rows) into one tile, splits the keys across programs, and writes a partial output and lse per
split; ``_attn_combine_kernel`` merges the splits by their lse.

    _attn_fwd_kernel, _attn_fwd_split_kernel, _attn_combine_kernel      (Triton, forward)
    _attn_bwd_preprocess_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel   (Triton, backward)
    attention_fwd / attention_bwd        (torch.library custom ops, registered autograd)
    attention, scaled_dot_product_attention   (public functions)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer path only
    TensorDescriptor = None

from . import _backend, _checks, _grad, fast_torch
from ._launch import acc_dtype, next_pow2, torch_acc_dtype

MAX_HEAD_DIM = 256
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Flash-decoding: used when there are at most this many queries, the GQA group's rows fit one tile
# and the keys are long enough to be worth splitting.
DECODE_MAX_L = 16
DECODE_MAX_ROWS = 64
DECODE_MIN_S = 256


# ----------------------------------------------------------------------------- configs


# Tiles per kernel kind and head-dim bucket (64, 128, 256): (BLOCK_M, BLOCK_N, num_warps, num_stages) for
# Ampere (sm_80), Hopper (sm_90), and the same two with dropout (the in-kernel RNG is register-hungry).
# 16-bit dtypes run on tensor cores; on Hopper their d <= 128 kernels stream tiles with TMA. float32 dots
# are true fp32 (or tf32) and float64 is the correctness dtype: small tiles. Each entry is what
# `python -m kernels.aot --sass` reads best among the configurations that compile without spills.
_TILES = {
    "16bit": {
        #                  ampere              hopper              ampere + dropout    hopper + dropout
        ("fwd", 64):       ((128, 128, 8, 3),  (128, 128, 8, 3),   (128, 32, 8, 3),    (128, 32, 8, 3)),
        ("fwd", 128):      ((128, 64, 8, 2),   (128, 128, 8, 2),   (64, 32, 8, 2),     (128, 32, 8, 2)),
        ("fwd", 256):      ((64, 64, 8, 2),    (128, 64, 8, 2),    (64, 32, 8, 2),     (64, 32, 8, 2)),
        ("decode", 64):    ((0, 64, 4, 3),     (0, 64, 4, 3),      (0, 64, 4, 3),      (0, 64, 4, 2)),
        ("decode", 128):   ((0, 64, 4, 3),     (0, 64, 4, 3),      (0, 64, 4, 3),      (0, 64, 4, 3)),
        ("decode", 256):   ((0, 32, 4, 2),     (0, 32, 4, 2),      (0, 32, 4, 2),      (0, 32, 4, 2)),
        ("bwd_dkdv", 64):  ((32, 64, 4, 1),    (64, 128, 8, 2),    (32, 32, 4, 1),     (32, 32, 4, 1)),
        ("bwd_dkdv", 128): ((64, 64, 8, 1),    (32, 128, 8, 2),    (16, 32, 4, 2),     (32, 32, 8, 1)),
        ("bwd_dkdv", 256): ((16, 32, 8, 1),    (16, 32, 8, 1),     (16, 16, 8, 1),     (16, 16, 8, 1)),
        ("bwd_dq", 64):    ((64, 32, 4, 2),    (128, 64, 8, 2),    (64, 32, 8, 2),     (64, 32, 8, 3)),
        ("bwd_dq", 128):   ((64, 32, 4, 2),    (128, 64, 8, 2),    (64, 32, 8, 2),     (64, 32, 8, 2)),
        ("bwd_dq", 256):   ((32, 32, 4, 1),    (32, 32, 4, 1),     (32, 32, 8, 1),     (32, 32, 8, 1)),
    },
    "fp32": {
        ("fwd", 64):       ((32, 32, 4, 1),    (32, 32, 4, 1),     (32, 32, 8, 1),     (32, 32, 8, 1)),
        ("fwd", 128):      ((32, 16, 8, 1),    (32, 16, 8, 1),     (32, 16, 8, 1),     (32, 16, 8, 1)),
        ("fwd", 256):      ((32, 16, 8, 1),    (32, 16, 8, 1),     (32, 16, 4, 1),     (32, 16, 4, 1)),
        ("decode", 64):    ((0, 32, 4, 1),     (0, 32, 4, 1),      (0, 32, 8, 1),      (0, 32, 8, 1)),
        ("decode", 128):   ((0, 16, 8, 1),     (0, 16, 8, 1),      (0, 16, 8, 1),      (0, 16, 8, 1)),
        ("decode", 256):   ((0, 16, 8, 1),     (0, 16, 8, 1),      (0, 16, 8, 1),      (0, 16, 8, 1)),
        ("bwd_dkdv", 64):  ((16, 32, 4, 1),    (16, 32, 4, 1),     (16, 16, 4, 1),     (16, 16, 8, 1)),
        ("bwd_dkdv", 128): ((16, 32, 8, 1),    (16, 32, 8, 1),     (16, 32, 8, 1),     (16, 16, 8, 1)),
        ("bwd_dkdv", 256): ((16, 16, 8, 1),    (16, 16, 8, 1),     (32, 16, 8, 1),     (32, 16, 8, 1)),
        ("bwd_dq", 64):    ((32, 32, 4, 1),    (32, 32, 4, 1),     (16, 32, 4, 1),     (16, 32, 4, 1)),
        ("bwd_dq", 128):   ((32, 16, 8, 1),    (32, 16, 8, 1),     (32, 16, 8, 1),     (32, 16, 8, 1)),
        ("bwd_dq", 256):   ((32, 16, 8, 1),    (32, 16, 8, 1),     (16, 16, 4, 1),     (16, 16, 4, 1)),
    },
    "fp64": {key: ((16, 16, 8 if key[1] > 64 else 4, 1),) * 4
             for key in [(kind, d) for kind in ("fwd", "decode", "bwd_dkdv", "bwd_dq") for d in (64, 128, 256)]},
}


# Entries a triton release needs changed because its compiler allocates registers differently (found with
# `python -m kernels.aot --sass` under that release): (major, minor) -> {(family, kind, d): {column: tile}}.
_TILE_OVERRIDES = {
    (3, 6): {("16bit", "bwd_dkdv", 64): {1: (64, 128, 8, 1)}, ("16bit", "bwd_dkdv", 128): {1: (32, 128, 8, 1)},
             ("fp32", "bwd_dkdv", 128): {2: (16, 16, 4, 1)}},
}
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])


def attention_config(kind: str, head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int | None,
                     dropout: bool = False) -> dict:
    """Block sizes, warps, stages and TMA use of one kernel ``kind`` ("fwd", "decode", "bwd_dkdv", "bwd_dq").

    ``arch`` is the CUDA compute capability as an int (80, 90, ...) or None under the interpreter (small
    blocks, so that small test shapes still cross several blocks). For "fwd" and "bwd_dq" BLOCK_M is the
    query block a program owns and BLOCK_N the key block of its loop; for "bwd_dkdv" BLOCK_N is the key
    block a program owns and BLOCK_M the query block of its loop; "decode" only sets BLOCK_N (its BLOCK_M
    is the GQA group's query rows). ``TMA``: the kernel streams its tiles through tensor descriptors (the
    launcher falls back to pointers where a tensor's strides or alignment do not allow it). Every
    configuration is compiled by ``python -m kernels.aot`` for sm_80 and sm_90a (no spills, shared memory
    within limits). Shared by the launcher and ``kernels.aot``."""
    if kind not in ("fwd", "decode", "bwd_dkdv", "bwd_dq"):
        raise ValueError(f"attention_config: unknown kernel kind {kind!r}")
    if arch is None:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    d = max(next_pow2(head_dim), next_pow2(head_dim_v), 64)
    hopper = arch >= 90
    family = {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "16bit")
    column = 2 * dropout + hopper
    bm, bn, w, st = _TILE_OVERRIDES.get(_TRITON_VERSION, {}).get((family, kind, d), {}).get(
        column, _TILES[family][(kind, d)][column])
    tma = family == "16bit" and hopper and not dropout and d <= 128 and kind != "decode"
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "TMA": tma}


def _arch(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _precision(dtype: torch.dtype, upcast: bool) -> str:
    """tl.dot input precision: true fp32 for fp32 (unless TF32 is allowed), fp64 and upcast bf16."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype == torch.float64 or upcast:
        return "ieee"
    return "tf32"  # the default; irrelevant for 16-bit inputs


# ----------------------------------------------------------------------------- forward kernels


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
def _fwd_block(
    acc, m_i, l_i, q,
    k_ptrs, v_ptrs, m_ptrs,  # (BLOCK_N, BLOCK_D) / (BLOCK_N, BLOCK_DV) / (BLOCK_M, BLOCK_N) pointers of this block
    K_DESC, V_DESC, b, hk,   # TMA descriptors of (B, Hkv, S, D) k / v and this program's coordinates (TMA)
    start_n, offs_n, offs_d, offs_dv, D, DV, kv_len,
    q_pos, row_ok, causal_offset,
    seed, rng_row, dropout_p, qk_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK_BOUNDS: tl.constexpr, SAFE: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    ZERO_V_TAIL: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ROWSUM_MMA: tl.constexpr,
):
    """One key block of the online softmax: returns the updated (acc, m_i, l_i); m_i in log2 units.

    FOLD_SCALE (scale > 0, no float mask): the row max is taken on the raw dot products and the scale is
    applied inside the exponent, ``exp2(s * qk_scale - m)``: one FFMA per score instead of FMUL + FADD.
    SAFE: a row may have seen only masked scores so far (m_i = -inf): guard -inf - -inf.
    TMA: k and v blocks come from tensor descriptors (zero-filled past S and D, one copy engine request per
    block instead of per-thread addresses); ZERO_V_TAIL: keys past kv_len < S exist (seqlens_k) and their
    values are zeroed in the bounds block. ROWSUM_MMA: the row sums l_i (BLOCK_M, 16) come from the tensor
    cores, p @ ones, instead of a per-score FADD and shuffles; they sum the same bf16/fp16-rounded p the
    output's p @ v uses (l_i is (BLOCK_M, 1) otherwise)."""
    start_n = tl.multiple_of(start_n, BLOCK_N)
    cols = start_n + offs_n
    col_ok = cols < kv_len
    if TMA:
        k = K_DESC.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = V_DESC.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        if CHECK_BOUNDS and ZERO_V_TAIL:   # keys in [kv_len, S) are real memory: never 0 * NaN in p @ v
            v = tl.where(col_ok[:, None], v, 0.0)
    else:
        k = _load_tile(k_ptrs, col_ok, offs_d, D, CHECK_BOUNDS, EVEN_D)
        v = _load_tile(v_ptrs, col_ok, offs_dv, DV, CHECK_BOUNDS, EVEN_DV)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)          # (BLOCK_M, BLOCK_N)
    if not FOLD_SCALE:
        s = s * qk_scale
    if MASK_KIND == 1:
        if CHECK_BOUNDS:
            keep = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
        else:
            keep = tl.load(m_ptrs, mask=row_ok[:, None], other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    if MASK_KIND == 2:
        if CHECK_BOUNDS:
            bias = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            bias = tl.load(m_ptrs, mask=row_ok[:, None], other=0.0)
        s += bias.to(ACC) * 1.4426950408889634
    if CHECK_BOUNDS:   # key bound and causal limit as one compare: key j <= min(i + causal_offset, kv_len - 1)
        if IS_CAUSAL:
            last = tl.minimum(q_pos + causal_offset, kv_len - 1)
            s = tl.where(cols[None, :] <= last[:, None], s, float("-inf"))
        else:
            s = tl.where(col_ok[None, :], s, float("-inf"))
    if FOLD_SCALE:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if SAFE:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing seen yet: no NaN from -inf - -inf
    alpha = tl.math.exp2(m_i - m_use)
    if FOLD_SCALE:
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    else:
        p = tl.math.exp2(s - m_use[:, None])
    if ROWSUM_MMA:
        ones = tl.full([BLOCK_N, 16], 1.0, dtype=v.dtype)
        l_i = tl.dot(p.to(v.dtype), ones, l_i * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
    else:
        l_i = l_i * alpha[:, None] + tl.sum(p, 1, keep_dims=True)
    if HAS_DROPOUT:
        keep_d = tl.rand(seed, rng_row[:, None] + cols[None, :]) >= dropout_p
        p = tl.where(keep_d, p, 0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,          # (B, H, L, D) any strides, last dim contiguous
    K,          # (B, Hkv, S, D)
    V,          # (B, Hkv, S, DV)
    K_DESC,     # TMA descriptor of K, block (1, 1, BLOCK_N, BLOCK_D) (TMA; otherwise K again)
    V_DESC,     # TMA descriptor of V, block (1, 1, BLOCK_N, BLOCK_DV) (TMA; otherwise V again)
    MASK,       # (B, H, L, S) bool (as uint8) or float mask, broadcast strides (MASK_KIND != 0)
    SEQLENS,    # (B,) int valid key lengths (HAS_SEQLENS)
    O,          # (B, H, L, DV) output
    LSE,        # (B, H, L) log-sum-exp, contiguous, accumulation dtype
    H, L, S, D, DV, GROUP,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    qk_scale, causal_offset, dropout_p, seed,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:   # heaviest query blocks first, so that the last wave of programs is the lightest
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   row_ok, offs_d, D, True, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
    # Scalar bases advanced by one key block per iteration + loop-invariant offset tiles (carrying 2-D pointer
    # tiles through the loop costs two registers per element).
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = MASK + b * stride_mb + h * stride_mh
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :]
    m_offs = offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn
    rng_row = ((bh * L + offs_m) * S).to(tl.int64)
    kv_len = S
    if HAS_SEQLENS:
        kv_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), S)
    # Key range [0, hi) this query block can see; blocks below full_hi need no bound or causal masks.
    hi = kv_len
    full_hi = kv_len
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(kv_len, start_m + BLOCK_M + causal_offset), 0)
        full_hi = tl.maximum(tl.minimum(kv_len, start_m + causal_offset + 1), 0)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M, 16 if TMA else 1], dtype=ACC)    # row sums, in 16 equal columns with TMA
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    b32 = b.to(tl.int32)
    hk32 = hk.to(tl.int32)
    for start_n in range(0, full_hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, k_base + k_offs, v_base + v_offs, m_base + m_offs, K_DESC, V_DESC, b32, hk32,
            start_n, offs_n, offs_d, offs_dv,
            D, DV, kv_len, offs_m, row_ok, causal_offset, seed, rng_row, dropout_p, qk_scale,
            MASK_KIND=MASK_KIND, IS_CAUSAL=False, CHECK_BOUNDS=False, SAFE=MASK_KIND != 0, FOLD_SCALE=FOLD_SCALE,
            EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_V_TAIL=HAS_SEQLENS, HAS_DROPOUT=HAS_DROPOUT,
            UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            ROWSUM_MMA=TMA)
        if not TMA:
            k_base += BLOCK_N * stride_kn
            v_base += BLOCK_N * stride_vn
        if MASK_KIND != 0:
            m_base += BLOCK_N * stride_mn
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, k_base + k_offs, v_base + v_offs, m_base + m_offs, K_DESC, V_DESC, b32, hk32,
            start_n, offs_n, offs_d, offs_dv,
            D, DV, kv_len, offs_m, row_ok, causal_offset, seed, rng_row, dropout_p, qk_scale,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=True, SAFE=True, FOLD_SCALE=FOLD_SCALE,
            EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=TMA, ZERO_V_TAIL=HAS_SEQLENS, HAS_DROPOUT=HAS_DROPOUT,
            UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            ROWSUM_MMA=TMA)
        if not TMA:
            k_base += BLOCK_N * stride_kn
            v_base += BLOCK_N * stride_vn
        if MASK_KIND != 0:
            m_base += BLOCK_N * stride_mn
    l_i = tl.max(l_i, 1)
    empty = l_i == 0.0                                     # fully masked row: output 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh * L + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_fwd_split_kernel(
    Q,          # (B, H, L, D) any strides, last dim contiguous
    K,          # (B, Hkv, S, D)
    V,          # (B, Hkv, S, DV)
    MASK,       # (B, H, L, S) bool (as uint8) or float mask, broadcast strides (MASK_KIND != 0)
    SEQLENS,    # (B,) int valid key lengths (HAS_SEQLENS)
    OPART,      # (B * Hkv, SPLITS, GROUP * L, DV) partial outputs, contiguous, accumulation dtype
    LSEPART,    # (B * Hkv, SPLITS, GROUP * L) partial lse (log2 units), contiguous
    H, HKV, L, S, D, DV, GROUP, SPLITS, chunk,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    qk_scale, causal_offset, dropout_p, seed,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Flash-decoding: the rows of one tile are the GROUP * L (query head, query) pairs sharing a key/value
    head, so each key/value block is read once per group; program ``split`` owns keys
    [split * chunk, (split + 1) * chunk)."""
    split = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * L
    h = hk * GROUP + rows // L                             # (BLOCK_M,) query head of each row
    i = rows % L                                           # (BLOCK_M,) query index of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :],
                   row_ok, offs_d, D, True, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
    m_row = b * stride_mb + h.to(tl.int64) * stride_mh + i.to(tl.int64) * stride_mm
    rng_row = (((b * H + h) * L + i) * S).to(tl.int64)
    kv_len = S
    if HAS_SEQLENS:
        kv_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), S)
    hi = kv_len
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(kv_len, L + causal_offset), 0)
    lo = split * chunk
    hi = tl.minimum(hi, lo + chunk)
    k_base = K + b * stride_kb + hk * stride_kh + lo * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + lo * stride_vn
    m_base = MASK + lo * stride_mn
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :]
    m_offs = m_row[:, None] + offs_n[None, :] * stride_mn
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M, 1], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for start_n in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, k_base + k_offs, v_base + v_offs, m_base + m_offs, K, V, 0, 0,
            start_n, offs_n, offs_d, offs_dv, D, DV, hi,
            i, row_ok, causal_offset, seed, rng_row, dropout_p, qk_scale,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=True, SAFE=True, FOLD_SCALE=FOLD_SCALE,
            EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=False, ZERO_V_TAIL=False, HAS_DROPOUT=HAS_DROPOUT,
            UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            ROWSUM_MMA=False)
        k_base += BLOCK_N * stride_kn
        v_base += BLOCK_N * stride_vn
        if MASK_KIND != 0:
            m_base += BLOCK_N * stride_mn
    l_i = tl.max(l_i, 1)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    part = bhk * SPLITS + split
    tl.store(OPART + (part * GROUP * L + rows[:, None]) * DV + offs_dv[None, :], out,
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSEPART + part * GROUP * L + rows, lse2, mask=row_ok)


@triton.jit
def _attn_combine_kernel(
    OPART,      # (B * Hkv, SPLITS, GROUP * L, DV) partial outputs, contiguous
    LSEPART,    # (B * Hkv, SPLITS, GROUP * L) partial lse (log2 units), contiguous
    O,          # (B, H, L, DV) output
    LSE,        # (B, H, L) log-sum-exp (natural log), contiguous
    H, HKV, L, DV, GROUP, SPLITS,
    stride_ob, stride_oh, stride_om,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
):
    """Merge the splits of one (b, kv head, row) by their log-sum-exps."""
    bhk = tl.program_id(1).to(tl.int64)
    row = tl.program_id(0)
    b = bhk // HKV
    h = (bhk % HKV) * GROUP + row // L
    i = row % L
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < SPLITS
    lse2 = tl.load(LSEPART + (bhk * SPLITS + offs_s) * GROUP * L + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse2 - m_safe)                        # (BLOCK_S,)
    total = tl.sum(w, 0)
    o = tl.load(OPART + ((bhk * SPLITS + offs_s[:, None]) * GROUP * L + row) * DV + offs_dv[None, :],
                mask=s_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), (m_safe + tl.math.log2(tl.where(total == 0.0, 1.0, total)))
                   * 0.6931471805599453)
    tl.store(O + b * stride_ob + h * stride_oh + i * stride_om + offs_dv, out.to(O.dtype.element_ty),
             mask=offs_dv < DV)
    tl.store(LSE + (b * H + h) * L + i, lse.to(ACC))


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _attn_bwd_preprocess_kernel(
    O,          # (B, H, L, DV) forward output
    DO,         # (B, H, L, DV) its gradient, any strides, last dim contiguous
    DLSE,       # (B, H, L) gradient of the lse, contiguous (HAS_DLSE)
    LSE,        # (B, H, L) forward log-sum-exp (natural log), contiguous
    DELTA,      # (B, H, L) rowsum(dO * O) - dlse, contiguous, accumulation dtype
    LSE2,       # (B, H, L) lse in log2 units, +inf for fully masked rows (p = exp2(s - lse2) = 0), contiguous
    H, L, DV,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < L) & (offs_dv[None, :] < DV)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                mask=ok, other=0.0).to(ACC)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=ok, other=0.0).to(ACC)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * L + offs_m, mask=offs_m < L, other=0.0).to(ACC)
    tl.store(DELTA + bh * L + offs_m, delta, mask=offs_m < L)
    lse = tl.load(LSE + bh * L + offs_m, mask=offs_m < L, other=0.0)
    tl.store(LSE2 + bh * L + offs_m, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634),
             mask=offs_m < L)


@triton.jit
def _dkdv_block(
    dk, dv, k, v,
    q_ptrs, do_ptrs, m_ptrs,   # (BLOCK_M, BLOCK_D) / (BLOCK_M, BLOCK_DV) / (BLOCK_N, BLOCK_M) pointers of this block
    Q_DESC, DO_DESC, b, h,     # TMA descriptors of (B, H, L, D) q / (B, H, L, DV) do, this program's coordinates
    LSE2, DELTA,               # (L,) rows of this (b, h)
    start_m, offs_m0, offs_n, offs_d, offs_dv, D, DV, L, S, causal_offset,
    seed, rng_base, dropout_p, qk_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK_ROWS: tl.constexpr, FOLD_SCALE: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One query block's contribution to this program's dK, dV, on transposed scores (BLOCK_N, BLOCK_M).
    Rows past L contribute nothing: their lse2 is +inf (p = 0) and q / do load as 0. Keys past kv_len are
    not masked here: their rows of dK / dV are zeroed once at the end."""
    offs_m = start_m + offs_m0
    row_ok = offs_m < L
    if TMA:
        q = Q_DESC.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = DO_DESC.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
    else:
        q = _load_tile(q_ptrs, row_ok, offs_d, D, CHECK_ROWS, EVEN_D)
        do = _load_tile(do_ptrs, row_ok, offs_dv, DV, CHECK_ROWS, EVEN_DV)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if CHECK_ROWS:
        lse2 = tl.load(LSE2 + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(LSE2 + offs_m)
        delta = tl.load(DELTA + offs_m)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC)     # (BLOCK_N, BLOCK_M)
    if not FOLD_SCALE:
        sT = sT * qk_scale
    if MASK_KIND == 1:
        keep = tl.load(m_ptrs, mask=row_ok[None, :] & (offs_n[:, None] < S), other=0)
        sT = tl.where(keep != 0, sT, float("-inf"))
    if MASK_KIND == 2:
        bias = tl.load(m_ptrs, mask=row_ok[None, :] & (offs_n[:, None] < S), other=0.0)
        sT += bias.to(ACC) * 1.4426950408889634
    if IS_CAUSAL:
        sT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, sT, float("-inf"))
    if FOLD_SCALE:
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
    else:
        pT = tl.math.exp2(sT - lse2[None, :])
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)    # (BLOCK_N, BLOCK_M)
    if HAS_DROPOUT:
        keep_d = tl.rand(seed, rng_base + offs_m[None, :].to(tl.int64) * S + offs_n[:, None]) >= dropout_p
        pdT = tl.where(keep_d, pT * (1.0 / (1.0 - dropout_p)), 0.0)
        dpT = tl.where(keep_d, dpT * (1.0 / (1.0 - dropout_p)), 0.0)
    else:
        pdT = pT
    dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=ACC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=ACC)
    return dk, dv


@triton.jit
def _dkdv_loop(
    dk, dv, k, v, lo, hi,
    q_ptrs, do_ptrs, m_ptrs,   # (BLOCK_M, BLOCK_D) / (BLOCK_M, BLOCK_DV) / (BLOCK_N, BLOCK_M) pointers of query block 0
    stride_qm, stride_dom, stride_mm, Q_DESC, DO_DESC, b, h, LSE2, DELTA,
    offs_m0, offs_n, offs_d, offs_dv, D, DV, L, S, causal_offset, seed, rng_base, dropout_p, qk_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK_ROWS: tl.constexpr, FOLD_SCALE: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK, dV over the query blocks [lo, hi) of one head, every block with the same masks."""
    for start_m in range(lo, hi, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, q_ptrs + start_m * stride_qm, do_ptrs + start_m * stride_dom, m_ptrs + start_m * stride_mm,
            Q_DESC, DO_DESC, b, h, LSE2, DELTA, start_m, offs_m0, offs_n, offs_d, offs_dv, D, DV, L, S,
            causal_offset, seed, rng_base, dropout_p, qk_scale,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_ROWS=CHECK_ROWS, FOLD_SCALE=FOLD_SCALE, EVEN_D=EVEN_D,
            EVEN_DV=EVEN_DV, TMA=TMA, HAS_DROPOUT=HAS_DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC,
            BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,          # (B, H, L, D) any strides, last dim contiguous
    K,          # (B, Hkv, S, D)
    V,          # (B, Hkv, S, DV)
    Q_DESC,     # TMA descriptor of Q, block (1, 1, BLOCK_M, BLOCK_D) (TMA; otherwise Q again)
    DO_DESC,    # TMA descriptor of DO, block (1, 1, BLOCK_M, BLOCK_DV) (TMA; otherwise DO again)
    MASK,       # (B, H, L, S) bool (as uint8) or float mask, broadcast strides (MASK_KIND != 0)
    SEQLENS,    # (B,) int valid key lengths (HAS_SEQLENS)
    DO,         # (B, H, L, DV) output gradient, any strides, last dim contiguous
    LSE2,       # (B, H, L) lse in log2 units (+inf: fully masked row), contiguous
    DELTA,      # (B, H, L) from the preprocess kernel, contiguous
    DK,         # (B, Hkv, S, D) key gradient, contiguous
    DV_,        # (B, Hkv, S, DV) value gradient, contiguous
    H, HKV, L, S, D, DV, GROUP,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    sm_scale, qk_scale, causal_offset, dropout_p, seed,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    SPLIT_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One key block: dK, dV summed over every query block of every query head of its GQA group, in a
    fixed order (deterministic, no atomics). Per head (SPLIT_BLOCKS, the tensor-core dtypes): the diagonal
    query blocks (causal mask), the full ones (no mask at all), the last partial one (row bounds);
    otherwise one loop with every mask."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_len = S
    if HAS_SEQLENS:
        kv_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), S)
    col_ok = offs_n < kv_len
    k = _load_tile(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                   col_ok, offs_d, D, True, EVEN_D)
    v = _load_tile(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :],
                   col_ok, offs_dv, DV, True, EVEN_DV)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    # Query blocks [lo, diag_hi) see part of this key block (causal mask); [diag_hi, rows_full) all of it;
    # [max(diag_hi, rows_full), L) is the last partial block. A key block past kv_len gets no work.
    lo = 0
    diag_hi = 0
    if IS_CAUSAL:
        lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M, L)
        diag_hi = tl.maximum(diag_hi, lo)
    hi = L
    if start_n >= kv_len:
        hi = 0
    rows_full = (hi // BLOCK_M) * BLOCK_M
    tail_lo = tl.maximum(diag_hi, rows_full)
    b32 = b.to(tl.int32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m0[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m0[:, None] * stride_dom + offs_dv[None, :]
        m_ptrs = (MASK + b * stride_mb + h * stride_mh + offs_m0[None, :].to(tl.int64) * stride_mm
                  + offs_n[:, None] * stride_mn)
        # Query blocks [lo, diag_hi): causal mask; [diag_hi, rows_full): no mask; then the partial tail.
        if SPLIT_BLOCKS:
            dk, dv = _dkdv_loop(
                dk, dv, k, v, lo, tl.minimum(diag_hi, hi), q_ptrs, do_ptrs, m_ptrs, stride_qm, stride_dom, stride_mm,
                Q_DESC, DO_DESC,
                b32, h.to(tl.int32), LSE2 + bh * L, DELTA + bh * L, offs_m0, offs_n, offs_d, offs_dv, D, DV, L, S,
                causal_offset, seed, bh * L * S, dropout_p, qk_scale, MASK_KIND, IS_CAUSAL, True, FOLD_SCALE,
                EVEN_D, EVEN_DV, TMA, HAS_DROPOUT, UPCAST, PRECISION, ACC, BLOCK_M, BLOCK_D, BLOCK_DV)
            dk, dv = _dkdv_loop(
                dk, dv, k, v, diag_hi, rows_full, q_ptrs, do_ptrs, m_ptrs, stride_qm, stride_dom, stride_mm,
                Q_DESC, DO_DESC,
                b32, h.to(tl.int32), LSE2 + bh * L, DELTA + bh * L, offs_m0, offs_n, offs_d, offs_dv, D, DV, L, S,
                causal_offset, seed, bh * L * S, dropout_p, qk_scale, MASK_KIND, False, False, FOLD_SCALE,
                EVEN_D, EVEN_DV, TMA, HAS_DROPOUT, UPCAST, PRECISION, ACC, BLOCK_M, BLOCK_D, BLOCK_DV)
            dk, dv = _dkdv_loop(
                dk, dv, k, v, tail_lo, hi, q_ptrs, do_ptrs, m_ptrs, stride_qm, stride_dom, stride_mm, Q_DESC, DO_DESC,
                b32, h.to(tl.int32), LSE2 + bh * L, DELTA + bh * L, offs_m0, offs_n, offs_d, offs_dv, D, DV, L, S,
                causal_offset, seed, bh * L * S, dropout_p, qk_scale, MASK_KIND, False, True, FOLD_SCALE,
                EVEN_D, EVEN_DV, TMA, HAS_DROPOUT, UPCAST, PRECISION, ACC, BLOCK_M, BLOCK_D, BLOCK_DV)
        else:   # one loop, every mask on: fewer live registers for the fp32 / fp64 tiles
            dk, dv = _dkdv_loop(
                dk, dv, k, v, lo, hi, q_ptrs, do_ptrs, m_ptrs, stride_qm, stride_dom, stride_mm, Q_DESC, DO_DESC,
                b32, h.to(tl.int32), LSE2 + bh * L, DELTA + bh * L, offs_m0, offs_n, offs_d, offs_dv, D, DV, L, S,
                causal_offset, seed, bh * L * S, dropout_p, qk_scale, MASK_KIND, IS_CAUSAL, True, FOLD_SCALE,
                EVEN_D, EVEN_DV, TMA, HAS_DROPOUT, UPCAST, PRECISION, ACC, BLOCK_M, BLOCK_D, BLOCK_DV)
    dk = tl.where(col_ok[:, None], dk * sm_scale, 0.0)      # keys past kv_len: no gradient
    dv = tl.where(col_ok[:, None], dv, 0.0)
    out_ok = offs_n[:, None] < S
    tl.store(DK + (bhk * S + offs_n[:, None]) * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=out_ok & (offs_d[None, :] < D))
    tl.store(DV_ + (bhk * S + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=out_ok & (offs_dv[None, :] < DV))


@triton.jit
def _dq_block(
    dq, q, do, lse2, delta,
    k_ptrs, v_ptrs, m_ptrs,    # (BLOCK_N, BLOCK_D) / (BLOCK_N, BLOCK_DV) / (BLOCK_M, BLOCK_N) pointers of this block
    K_DESC, V_DESC, b, hk,     # TMA descriptors of (B, Hkv, S, D) k / v, this program's coordinates
    start_n, offs_m, offs_n, offs_d, offs_dv, D, DV, S, kv_len, row_ok, causal_offset,
    seed, rng_row, dropout_p, qk_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK_BOUNDS: tl.constexpr, FOLD_SCALE: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr, ZERO_KV_TAIL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One key block's contribution to this program's dQ; masks (key bound + causal limit as one compare)
    only in the CHECK_BOUNDS blocks. Keys in [kv_len, S) are zeroed (ZERO_KV_TAIL) where TMA loads them:
    ds = 0 must not meet a NaN there."""
    cols = start_n + offs_n
    col_ok = cols < kv_len
    if TMA:
        k = K_DESC.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = V_DESC.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        if CHECK_BOUNDS and ZERO_KV_TAIL:
            k = tl.where(col_ok[:, None], k, 0.0)
            v = tl.where(col_ok[:, None], v, 0.0)
    else:
        k = _load_tile(k_ptrs, col_ok, offs_d, D, CHECK_BOUNDS, EVEN_D)
        v = _load_tile(v_ptrs, col_ok, offs_dv, DV, CHECK_BOUNDS, EVEN_DV)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)          # (BLOCK_M, BLOCK_N)
    if not FOLD_SCALE:
        s = s * qk_scale
    if MASK_KIND == 1:
        keep = tl.load(m_ptrs, mask=row_ok[:, None] & (cols[None, :] < S), other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    if MASK_KIND == 2:
        bias = tl.load(m_ptrs, mask=row_ok[:, None] & (cols[None, :] < S), other=0.0)
        s += bias.to(ACC) * 1.4426950408889634
    if CHECK_BOUNDS:
        if IS_CAUSAL:
            last = tl.minimum(offs_m + causal_offset, kv_len - 1)
            s = tl.where(cols[None, :] <= last[:, None], s, float("-inf"))
        else:
            s = tl.where(col_ok[None, :], s, float("-inf"))
    if FOLD_SCALE:
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
    else:
        p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)           # (BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        keep_d = tl.rand(seed, rng_row[:, None] + cols[None, :]) >= dropout_p
        dp = tl.where(keep_d, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,          # (B, H, L, D) any strides, last dim contiguous
    K,          # (B, Hkv, S, D)
    V,          # (B, Hkv, S, DV)
    K_DESC,     # TMA descriptor of K, block (1, 1, BLOCK_N, BLOCK_D) (TMA; otherwise K again)
    V_DESC,     # TMA descriptor of V, block (1, 1, BLOCK_N, BLOCK_DV) (TMA; otherwise V again)
    MASK,       # (B, H, L, S) bool (as uint8) or float mask, broadcast strides (MASK_KIND != 0)
    SEQLENS,    # (B,) int valid key lengths (HAS_SEQLENS)
    DO,         # (B, H, L, DV) output gradient, any strides, last dim contiguous
    LSE2,       # (B, H, L) lse in log2 units (+inf: fully masked row), contiguous
    DELTA,      # (B, H, L) from the preprocess kernel, contiguous
    DQ,         # (B, H, L, D) query gradient, contiguous
    H, L, S, D, DV, GROUP,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    sm_scale, qk_scale, causal_offset, dropout_p, seed,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:   # heaviest query blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   row_ok, offs_d, D, True, EVEN_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                    row_ok, offs_dv, DV, True, EVEN_DV)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE2 + bh * L + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
    # Scalar bases advanced by one key block per iteration + loop-invariant offset tiles (carrying 2-D pointer
    # tiles through the loop costs two registers per element).
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = MASK + b * stride_mb + h * stride_mh
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :]
    m_offs = offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn
    rng_row = ((bh * L + offs_m) * S).to(tl.int64)
    kv_len = S
    if HAS_SEQLENS:
        kv_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), S)
    hi = kv_len
    full_hi = kv_len
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(kv_len, start_m + BLOCK_M + causal_offset), 0)
        full_hi = tl.maximum(tl.minimum(kv_len, start_m + causal_offset + 1), 0)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    b32 = b.to(tl.int32)
    hk32 = hk.to(tl.int32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, full_hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base + k_offs, v_base + v_offs, m_base + m_offs, K_DESC, V_DESC, b32, hk32,
            start_n, offs_m, offs_n,
            offs_d, offs_dv, D, DV, S, kv_len, row_ok, causal_offset, seed, rng_row, dropout_p, qk_scale,
            MASK_KIND=MASK_KIND, IS_CAUSAL=False, CHECK_BOUNDS=False, FOLD_SCALE=FOLD_SCALE, EVEN_D=EVEN_D,
            EVEN_DV=EVEN_DV, TMA=TMA, ZERO_KV_TAIL=HAS_SEQLENS, HAS_DROPOUT=HAS_DROPOUT, UPCAST=UPCAST,
            PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
        if not TMA:
            k_base += BLOCK_N * stride_kn
            v_base += BLOCK_N * stride_vn
        if MASK_KIND != 0:
            m_base += BLOCK_N * stride_mn
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base + k_offs, v_base + v_offs, m_base + m_offs, K_DESC, V_DESC, b32, hk32,
            start_n, offs_m, offs_n,
            offs_d, offs_dv, D, DV, S, kv_len, row_ok, causal_offset, seed, rng_row, dropout_p, qk_scale,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=True, FOLD_SCALE=FOLD_SCALE, EVEN_D=EVEN_D,
            EVEN_DV=EVEN_DV, TMA=TMA, ZERO_KV_TAIL=HAS_SEQLENS, HAS_DROPOUT=HAS_DROPOUT, UPCAST=UPCAST,
            PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
        if not TMA:
            k_base += BLOCK_N * stride_kn
            v_base += BLOCK_N * stride_vn
        if MASK_KIND != 0:
            m_base += BLOCK_N * stride_mn
    dq *= sm_scale
    tl.store(DQ + (bh * L + offs_m[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------- launchers


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _tma_desc(t: torch.Tensor, block_rows: int, block_cols: int) -> TensorDescriptor | None:
    """A TMA descriptor of the (B, H, S, D) tensor ``t`` with a (1, 1, block_rows, block_cols) box, or None
    where the copy engine cannot address it: TMA needs a 16-byte aligned base, 16-byte aligned strides
    (broadcast stride-0 dims excluded) and a contiguous last dim. A size-1 dim's stride is never used, so it
    gets the contiguous value."""
    if TensorDescriptor is None or t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1:
        return None
    elem = t.element_size()
    strides, inner = list(t.stride()), t.shape[-1]
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            strides[i] = inner
        if strides[i] <= 0 or strides[i] * elem % 16:
            return None
        inner = strides[i] * t.shape[i]
    if t.data_ptr() % 16:
        return None
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, block_rows, block_cols])


def _kv_descs(k: torch.Tensor, v: torch.Tensor, cfg: dict, meta: dict) -> tuple:
    """(k, v) TMA descriptors with a BLOCK_N-key box where the configuration asks for TMA and both tensors
    allow it, else (None, None): the kernel then takes the pointer path."""
    if not cfg.get("TMA"):
        return None, None
    k_desc = _tma_desc(k, cfg["BLOCK_N"], meta["BLOCK_D"])
    v_desc = _tma_desc(v, cfg["BLOCK_N"], meta["BLOCK_DV"])
    return (k_desc, v_desc) if k_desc is not None and v_desc is not None else (None, None)


def _fold_flags(scale: float, d: int, dv: int, meta: dict) -> dict:
    """FOLD_SCALE: the scale can go into the exponent (positive, no float mask added after scaling);
    EVEN_D / EVEN_DV: the head dims fill their blocks, so no head-dim masks."""
    return dict(FOLD_SCALE=scale > 0 and meta["MASK_KIND"] != MASK_FLOAT, EVEN_D=d == meta["BLOCK_D"],
                EVEN_DV=dv == meta["BLOCK_DV"])


def _mask_args(mask: torch.Tensor | None, shape: tuple[int, int, int, int], like: torch.Tensor):
    """(tensor, kind, strides) of a mask broadcast to (B, H, L, S) as a view (stride 0 where broadcast)."""
    if mask is None:
        return like, MASK_NONE, (0, 0, 0, 0)
    m = mask.expand(shape)
    kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
    if kind == MASK_BOOL:
        m = m.view(torch.uint8)
    return m, kind, tuple(m.stride())


def _common(q, k, v, mask, seqlens_k):
    b, h, l, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    m, kind, mstrides = _mask_args(mask, (b, h, l, s), q)
    upcast = _backend.INTERPRET and q.dtype == torch.bfloat16
    meta = dict(MASK_KIND=kind, HAS_SEQLENS=seqlens_k is not None,
                BLOCK_D=max(16, next_pow2(d)), BLOCK_DV=max(16, next_pow2(dv)),
                UPCAST=upcast, PRECISION=_precision(q.dtype, upcast), ACC=acc_dtype(q.dtype))
    seq = seqlens_k if seqlens_k is not None else q
    return (b, h, l, d, hkv, s, dv), m, mstrides, seq, meta


def decode_splits(b: int, hkv: int, l: int, h: int, s: int, device: torch.device) -> int:
    """Number of key splits of the flash-decoding path, or 0 for the main path."""
    if l > DECODE_MAX_L or (h // hkv) * l > DECODE_MAX_ROWS or s < DECODE_MIN_S:
        return 0
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = triton.cdiv(2 * sms, max(1, b * hkv))                # about two waves of programs
    else:
        splits = 4
    return max(1, min(splits, triton.cdiv(s, 128), 128))


@torch.library.custom_op("kernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, seqlens_k: torch.Tensor | None,
    scale: float, is_causal: bool, causal_offset: int, dropout_p: float, num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of (B, H, L, D) ``q`` over (B, Hkv, S, D) ``k`` / (B, Hkv, S, Dv) ``v``.

    ``mask`` broadcastable to (B, H, L, S), bool (True = attend) or float (added to the scaled scores);
    causal: key j <= i + ``causal_offset``; ``num_splits`` > 0 runs the flash-decoding path. Returns
    ``(out (B, H, L, Dv), lse (B, H, L) in the accumulation dtype, seed)``; ``seed`` is the dropout seed
    as an int64 CPU tensor of one element."""
    seed = _checks.dropout_seed() if dropout_p > 0 else 0
    out, lse = _fwd_launch(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, num_splits, seed,
                           _arch(q.device))
    return out, lse, torch.tensor([seed], dtype=torch.int64)


def _fwd_launch(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, num_splits, seed, arch):
    """Allocate and launch the forward for compute capability ``arch`` (None: interpreter); also what
    ``kernels.aot`` runs (on meta tensors, kernels replaced by recorders) to see the launches."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    (b, h, l, d, hkv, s, dv), m, ms, seq, meta = _common(q, k, v, mask, seqlens_k)
    acc = torch_acc_dtype(q.dtype)
    out = torch.empty((b, h, l, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, l), dtype=acc, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if s == 0 or out.numel() == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    group = h // hkv
    args = (scale * LOG2E, causal_offset, dropout_p, seed)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms)
    flags = dict(IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0, **_fold_flags(scale, d, dv, meta), **meta)
    if num_splits > 0:
        cfg = attention_config("decode", d, dv, q.dtype, arch, dropout_p > 0)
        block_n = cfg["BLOCK_N"]
        chunk = triton.cdiv(triton.cdiv(s, num_splits), block_n) * block_n
        splits = triton.cdiv(s, chunk)
        rows = group * l
        opart = torch.empty((b * hkv, splits, rows, dv), dtype=acc, device=q.device)
        lsepart = torch.empty((b * hkv, splits, rows), dtype=acc, device=q.device)
        _attn_fwd_split_kernel[(splits, b * hkv)](
            q, k, v, m, seq, opart, lsepart, h, hkv, l, s, d, dv, group, splits, chunk, *strides, *args,
            BLOCK_M=max(16, next_pow2(rows)), BLOCK_N=block_n,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags)
        _attn_combine_kernel[(rows, b * hkv)](
            opart, lsepart, out, lse, h, hkv, l, dv, group, splits, *out.stride()[:3],
            BLOCK_S=next_pow2(splits), BLOCK_DV=meta["BLOCK_DV"], ACC=meta["ACC"], num_warps=4)
    else:
        cfg = attention_config("fwd", d, dv, q.dtype, arch, dropout_p > 0)
        grid = (triton.cdiv(l, cfg["BLOCK_M"]), b * h)
        k_desc, v_desc = _kv_descs(k, v, cfg, meta)
        _attn_fwd_kernel[grid](
            q, k, v, k_desc or k, v_desc or v, m, seq, out, lse, h, l, s, d, dv, group, *strides,
            *out.stride()[:3], *args, TMA=k_desc is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, num_splits):
    b, h, l, _ = q.shape
    return (q.new_empty((b, h, l, v.shape[3])), q.new_empty((b, h, l), dtype=torch_acc_dtype(q.dtype)),
            torch.empty(1, dtype=torch.int64))


@torch.library.custom_op("kernels::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None, seqlens_k: torch.Tensor | None,
    seed: torch.Tensor, scale: float, is_causal: bool, causal_offset: int, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``attention_fwd``; for GQA dk/dv are summed over each group's query
    heads. ``dlse`` (optional) is the gradient of the returned lse. No atomics: deterministic."""
    return _bwd_launch(do, dlse, q, k, v, out, lse, mask, seqlens_k, int(seed[0]), scale, is_causal, causal_offset,
                       dropout_p, _arch(q.device))


def _bwd_launch(do, dlse, q, k, v, out, lse, mask, seqlens_k, seed, scale, is_causal, causal_offset, dropout_p,
                arch):
    """Allocate and launch the backward for compute capability ``arch`` (None: interpreter)."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    do = _last_dim_contiguous(do)
    (b, h, l, d, hkv, s, dv), m, ms, seq, meta = _common(q, k, v, mask, seqlens_k)
    dq = torch.empty((b, h, l, d), dtype=q.dtype, device=q.device)     # every element is written
    dk = torch.empty((b, hkv, s, d), dtype=k.dtype, device=k.device)
    dvv = torch.empty((b, hkv, s, dv), dtype=v.dtype, device=v.device)
    if b * h * l == 0 or s == 0:
        return dq.zero_(), dk.zero_(), dvv.zero_()
    acc = torch_acc_dtype(q.dtype)
    group = h // hkv
    delta = torch.empty((b, h, l), dtype=acc, device=q.device)
    lse2 = torch.empty((b, h, l), dtype=acc, device=q.device)
    dlse_c = dlse.contiguous() if dlse is not None else delta
    row_bytes = meta["BLOCK_DV"] * q.element_size()
    pre_block = 32 if arch is None else (64 if row_bytes <= 256 else 32 if row_bytes <= 512 else 16)
    _attn_bwd_preprocess_kernel[(triton.cdiv(l, pre_block), b * h)](
        out, do, dlse_c, lse.contiguous(), delta, lse2, h, l, dv, *out.stride()[:3], *do.stride()[:3],
        HAS_DLSE=dlse is not None, BLOCK_M=pre_block, BLOCK_DV=meta["BLOCK_DV"], ACC=meta["ACC"], num_warps=4)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms, *do.stride()[:3])
    args = (scale, scale * LOG2E, causal_offset, dropout_p, seed)
    flags = dict(IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0, **_fold_flags(scale, d, dv, meta), **meta)
    cfg = attention_config("bwd_dkdv", d, dv, q.dtype, arch, dropout_p > 0)
    bm = cfg["BLOCK_M"]
    q_desc = _tma_desc(q, bm, meta["BLOCK_D"]) if cfg.get("TMA") else None
    do_desc = _tma_desc(do, bm, meta["BLOCK_DV"]) if q_desc is not None else None
    tma = do_desc is not None
    _attn_bwd_dkdv_kernel[(triton.cdiv(s, cfg["BLOCK_N"]), b * hkv)](
        q, k, v, q_desc if tma else q, do_desc if tma else do, m, seq, do, lse2, delta, dk, dvv,
        h, hkv, l, s, d, dv, group, *strides, *args, TMA=tma, SPLIT_BLOCKS=q.dtype in (torch.float16, torch.bfloat16),
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags)
    cfg = attention_config("bwd_dq", d, dv, q.dtype, arch, dropout_p > 0)
    k_desc, v_desc = _kv_descs(k, v, cfg, meta)
    _attn_bwd_dq_kernel[(triton.cdiv(l, cfg["BLOCK_M"]), b * h)](
        q, k, v, k_desc or k, v_desc or v, m, seq, do, lse2, delta, dq, h, l, s, d, dv, group, *strides, *args,
        TMA=k_desc is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **flags)
    return dq, dk, dvv


@attention_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, mask, seqlens_k, seed, scale, is_causal, causal_offset, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, _ = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seqlens_k, seed)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
    ctx.scale, ctx.is_causal, ctx.causal_offset, ctx.dropout_p = scale, is_causal, causal_offset, dropout_p


def _backward(ctx, dout, dlse, _dseed):
    """(dq, dk, dv) from the kernel backward; a float mask that requires grad gets ``dS`` summed to its shape
    (``_grad.attention_mask_grad``); when a graph of the backward is built (double backward) every gradient is
    computed with differentiable PyTorch ops instead (``_grad.attention_backward``)."""
    q, k, v, out, lse, mask, seqlens_k, seed = ctx.saved_tensors
    rest = (None,) * 6
    if dout is None and dlse is None:
        return (None,) * 4 + rest
    needs = tuple(ctx.needs_input_grad[:4])
    if _grad.create_graph():
        return (*_grad.attention_backward(q, k, v, mask, seqlens_k, dout, dlse, ctx.scale, ctx.is_causal,
                                          ctx.causal_offset, ctx.dropout_p, needs), *rest)
    dq = dk = dv = dmask = None
    if any(needs[:3]):
        dq, dk, dv = attention_bwd(dout if dout is not None else torch.zeros_like(out), dlse, q, k, v, out, lse,
                                   mask, seqlens_k, seed, ctx.scale, ctx.is_causal, ctx.causal_offset, ctx.dropout_p)
    if needs[3]:
        if ctx.dropout_p > 0:   # the public functions send this case to the PyTorch path
            raise NotImplementedError("attention: the kernels give no attn_mask gradient with dropout_p > 0")
        dmask = _grad.attention_mask_grad(q, k, v, out, lse, dout, dlse, mask, ctx.scale, ctx.is_causal,
                                          ctx.causal_offset, seqlens_k)
    return dq, dk, dv, dmask, *rest


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public functions


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


def _choose(q: torch.Tensor, op: str, attn_mask: torch.Tensor | None, dropout_p: float) -> str:
    """The backend's choice, except that a float mask whose gradient is wanted together with dropout runs the
    PyTorch path (the kernels' dropout mask is drawn inside them; the mask gradient is computed outside)."""
    impl = _backend.choose(q, op)
    if impl == "triton" and dropout_p > 0 and _grad.mask_requires_grad(attn_mask):
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              attn_mask: torch.Tensor | None = None, seqlens_k: torch.Tensor | None = None,
              scale: float | None = None, dropout_p: float = 0.0,
              return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused attention ``softmax(scale * q @ k^T + mask) @ v`` for models and decoding.

    Shapes: ``q`` (B, H, L, D), ``k`` (B, Hkv, S, D), ``v`` (B, Hkv, S, Dv), with Hkv dividing H (GQA;
    Hkv = 1 is MQA; query head h uses key/value head h // (H // Hkv)); D, Dv up to 256. Returns
    (B, H, L, Dv) in q's dtype, and with ``return_lse=True`` also the log-sum-exp of the scaled, masked
    scores (B, H, L), float32 (float64 for float64 inputs), -inf for fully masked rows.

    - ``causal=True`` is **bottom-right** aligned: query i attends keys j <= i + S - L (the last query
      sees every key, as a KV cache needs); equal to torch's top-left ``is_causal`` when L == S. Rows with
      i + S - L < 0 are fully masked.
    - ``attn_mask``: bool (True = attend) or float (added to the scaled scores), broadcastable to
      (B, H, L, S), read through broadcast strides; may be combined with ``causal`` and ``seqlens_k``. A float
      mask may require grad: it gets the gradient of the softmax input, summed over its broadcast dims.
    - ``seqlens_k``: int tensor (B,) of valid key lengths: keys j >= seqlens_k[b] are masked and their
      blocks skipped.
    - ``dropout_p``: dropout on the attention probabilities (always applied when > 0), kept values scaled
      by 1 / (1 - p), drawn in the kernel from a seed taken from torch's default generator.
    Fully masked rows give output 0, lse -inf and zero gradients. With few queries (L <= 16) and long
    keys the forward splits the keys across programs (flash-decoding) with the same results."""
    op = "attention"
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
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    scale = _check_scale(op, scale, d)
    dropout_p = _checks.check_probability("dropout_p", dropout_p, op)
    if _choose(q, op, attn_mask, dropout_p) == "torch":
        return fast_torch.attention(q, k, v, causal, attn_mask, seqlens_k, scale, dropout_p, return_lse)
    splits = decode_splits(b, hkv, l, h, s, q.device)
    out, lse, _ = attention_fwd(q, k, v, attn_mask, seqlens_k, scale, causal, s - l, dropout_p, splits)
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
    differs from ``kernels.attention(causal=True)``, which is bottom-right aligned). ``attn_mask``: bool
    (True = take part) or float (added to the scaled scores), broadcastable to (..., L, S); a float mask may
    require grad. Together with ``is_causal=True`` both apply (the mask and the top-left causal mask), as torch's
    CPU flash path does on 4-D inputs (torch's math path refuses the pair instead). ``attn_mask`` may also be a
    ``torch.nn.attention.bias.CausalBias`` for (L, S): ``causal_upper_left`` is ``is_causal=True``,
    ``causal_lower_right`` the bottom-right alignment of ``kernels.attention(causal=True)``, neither
    materialized; together with ``is_causal=True`` it is refused, as by torch. ``enable_gqa=True``: key/value
    heads (dim -3) divide query heads. ``dropout_p > 0`` always drops, like torch's function. One difference: a
    fully masked row gives 0 (torch gives NaN)."""
    op = "scaled_dot_product_attention"
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
    if _choose(query, op, attn_mask, dropout_p) == "torch":
        return fast_torch.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                       batch, gqa, causal_offset)
    # To (B, H, L, E): the dim before (L, E) is the head dim (where GQA happens), the others the batch.
    hk = hkv if gqa else None
    _to_4d = fast_torch.to_4d
    q4 = _to_4d(query.expand(*batch, hq, l, e) if gqa else query.expand(*batch, l, e))
    k4 = _to_4d(key.expand(*batch, hk, s, e) if gqa else key.expand(*batch, s, e))
    v4 = _to_4d(value.expand(*batch, hk, s, ev) if gqa else value.expand(*batch, s, ev))
    mask4 = None if attn_mask is None else _mask_4d(attn_mask, full)
    out, _, _ = attention_fwd(q4, k4, v4, mask4, None, scale, is_causal, causal_offset, dropout_p, 0)
    return out.reshape(*full[:-1], ev)

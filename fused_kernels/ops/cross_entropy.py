"""Cross-entropy of a language model's output layer without its logits: ``linear_cross_entropy`` (the output
Linear, an optional soft-cap, softmax and the loss, chunk by chunk of rows) and ``cross_entropy`` (on given logits).

The loss of row i with target t, logits z = x_i W^T + b, capped logits c = softcap * tanh(z / softcap) (or z),
lse = logsumexp(c), smoothing eps and z-loss weight lam (PaLM)::

    loss_i = lse - (1 - eps) c_t - eps / V * sum_j c_j + lam * lse^2        (0 where t == ignore_index)

reduced as ``F.cross_entropy`` reduces (mean over the rows that are not ignored, sum, or none). Its gradient
with respect to the capped logits is ``(1 + 2 lam lse) softmax(c) - eps / V - (1 - eps) onehot(t)``, times
``1 - (c / softcap)^2`` through the cap, times the row's share of the upstream gradient.

How little is held: rows are processed in chunks (``chunk_rows``: at most an eighth of the rows and about
``CHUNK_BYTES`` of logits); each chunk's logits are computed, turned into their gradient in place, and
multiplied into ``dX`` (the chunk's rows) and ``dW`` / ``db`` (accumulated in float32, float64 for float64)
before the next chunk starts. With reductions "mean" and "sum" this happens in the forward (the upstream
gradient is one scalar, applied in the backward); "none" recomputes the chunks in the backward with each
row's upstream gradient (the ``dW`` sum needs it inside). Peak extra memory: one chunk of logits (two on the
PyTorch path), never the (N, V) logits.

Kernels (``_core.launch.launch``), per chunk:

    _lce_logits_kernel    chunk logits = X_c W^T (+ b) on tensor cores, one pass over W per chunk; the
                          epilogue applies the cap, stores the tile and its per-row partial max / sum of
                          exponentials / sum of logits / target logit
    _ce_softmax_kernel    "the softmax part": combines a row's partials into lse and the loss, then reads the
                          row's logits once and writes their gradient once (in place)
    _ce_stats_kernel      the partials of given logits (``cross_entropy``), in place of the epilogue
    _lce_dx_kernel        dX_c = dZ_c W
    _lce_dw_kernel        dW += dZ_c^T X_c and db += colsum(dZ_c), in the float32 accumulators

    linear_cross_entropy_fwd / _bwd, cross_entropy_fwd / _bwd   (torch.library custom ops, registered autograd;
                          their ``use_triton`` argument picks the kernels or the PyTorch path: the same chunks
                          with torch's matmuls, ``_lce_torch`` / ``_ce_torch``)
    cross_entropy_fwd_inplace                                  (the gradient written over the logits)
    linear_cross_entropy / cross_entropy                       (public functions)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._core import backend as _backend
from .._core import checks as _checks
from .._core import grad as _grad
from .._core.launch import (
    ArchFamily,
    ArchValue,
    acc_dtype,
    arch_family,
    device_arch,
    dot_precision,
    launch,
    next_pow2,
    torch_acc_dtype,
    upcast_16bit,
)

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
NONE, MEAN, SUM = 0, 1, 2
# Logits held per chunk: a chunk has at most this many bytes of float32 logits and at most an eighth of the rows
# (so the chunk stays a small fraction of the (N, V) logits the unfused form holds, whatever the sizes).
CHUNK_BYTES = 256 * 1024 * 1024
CHUNK_FRACTION = 8
MIN_CHUNK = 16


class TargetIndexError(ValueError, IndexError):
    """A target outside [0, V) that is not ignore_index: a ValueError, and the IndexError torch raises."""


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _tanh(x):
    # libdevice's tanh is not in the interpreter; through exp(-2|x|), which never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _row_partials(z, rows, cols, row_ok, col_ok, col_start, TARGET, PART_M, PART_S, PART_C, TLOGIT, part, stride_pm,
                  SMOOTH: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-row max, sum of exp(z - max), sum of z over this tile's columns, and the target's logit if it is here."""
    zm = tl.where(col_ok[None, :], z, float("-inf"))
    m = tl.max(zm, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)          # a tile of -inf logits (a -inf bias) adds nothing
    s = tl.sum(tl.exp(zm - m_safe[:, None]), axis=1)
    tl.store(PART_M + rows * stride_pm + part, m, mask=row_ok)
    tl.store(PART_S + rows * stride_pm + part, s, mask=row_ok)
    if SMOOTH:
        tl.store(PART_C + rows * stride_pm + part, tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1), mask=row_ok)
    t = tl.load(TARGET + rows, mask=row_ok, other=-1)
    zt = tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), axis=1)
    mine = (t >= col_start) & (t < col_start + BLOCK_N)
    tl.store(TLOGIT + rows, zt, mask=row_ok & mine)


@triton.jit
def _lce_logits_kernel(
    X,              # (M, H) the chunk's input rows, any strides
    W,              # (V, H) weight, any strides
    B,              # (V,) bias (HAS_BIAS)
    TARGET,         # (M,) int64 targets of the chunk
    Z,              # (M, V) capped logits, contiguous rows (STORE_LOGITS)
    PART_M, PART_S, PART_C,   # (M, n_parts) float32 partials, row stride stride_pm
    TLOGIT,         # (M,) the target's capped logit
    M, V, H, num_m,
    stride_xm, stride_xk, stride_wv, stride_wk, stride_zm, stride_pm,
    PARAMS,         # (3,) accumulation dtype: label_smoothing, z_loss, softcap (float64 stays exact)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, STORE_LOGITS: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    # The row blocks of one vocabulary tile are neighbouring programs: the chunk's few row blocks share each
    # weight tile through L2, so the weight streams from memory once per chunk.
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < V
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + cols[:, None].to(tl.int64) * stride_wv + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < H - k
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION, out_dtype=ACC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if SOFTCAP:
        softcap = tl.load(PARAMS + 2)
        acc = softcap * _tanh(acc / softcap)
    if STORE_LOGITS:
        z_ptrs = Z + rows[:, None].to(tl.int64) * stride_zm + cols[None, :]
        tl.store(z_ptrs, acc.to(Z.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    _row_partials(acc, rows, cols, row_ok, col_ok, pid_n * BLOCK_N, TARGET, PART_M, PART_S, PART_C, TLOGIT,
                  pid_n, stride_pm, SMOOTH, BLOCK_N)


@triton.jit
def _ce_stats_kernel(
    Z,              # (N, V) logits, any strides
    TARGET,         # (N,) int64
    PART_M, PART_S, PART_C,   # (N, n_parts) float32
    TLOGIT,         # (N,)
    V, cols_per_part, stride_zm, stride_zn, stride_pm,
    PARAMS,         # (3,) label_smoothing, z_loss, softcap
    SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """The partials ``_lce_logits_kernel``'s epilogue would give, from given logits: one program per (row, part
    of the columns), an online max / sum per lane."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    softcap = 1.0
    if SOFTCAP:
        softcap = tl.load(PARAMS + 2)
    start = part * cols_per_part
    end = tl.minimum(start + cols_per_part, V)
    offs = tl.arange(0, BLOCK_V)
    base = Z + row * stride_zm
    m_i = tl.full([BLOCK_V], float("-inf"), dtype=ACC)
    s_i = tl.zeros([BLOCK_V], dtype=ACC)
    c_i = tl.zeros([BLOCK_V], dtype=ACC)
    for v0 in range(start, end, BLOCK_V):
        cols = v0 + offs
        ok = cols < end
        c = tl.load(base + cols.to(tl.int64) * stride_zn, mask=ok, other=0.0).to(ACC)
        if SOFTCAP:
            c = softcap * _tanh(c / softcap)
        if SMOOTH:
            c_i += tl.where(ok, c, 0.0)
        c = tl.where(ok, c, float("-inf"))
        m_new = tl.maximum(m_i, c)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_safe) + tl.exp(c - m_safe)
        m_i = m_new
    m = tl.max(m_i, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tl.store(PART_M + row * stride_pm + part, m)
    tl.store(PART_S + row * stride_pm + part, tl.sum(s_i * tl.exp(m_i - m_safe), axis=0))
    if SMOOTH:
        tl.store(PART_C + row * stride_pm + part, tl.sum(c_i, axis=0))
    t = tl.load(TARGET + row)
    if (t >= start) & (t < end):
        zt = tl.load(base + t * stride_zn).to(ACC)
        if SOFTCAP:
            zt = softcap * _tanh(zt / softcap)
        tl.store(TLOGIT + row, zt)


@triton.jit
def _ce_softmax_kernel(
    Z,              # (M, V) logits (capped ones when not CAP_ON_LOAD), any strides
    DZ,             # (M, V) their gradient (may be Z itself: in place), any strides
    TARGET,         # (M,) int64
    PART_M, PART_S, PART_C,   # (M, n_parts) float32 partials
    TLOGIT,         # (M,) the target's capped logit
    LOSS, LSE,      # (M,) per-row loss (0 where ignored) and logsumexp, accumulation dtype
    G,              # upstream gradient per row (GRAD_MODE 2), stride stride_g (0: one scalar)
    NVALID,         # (1,) number of rows not ignored (DIV_NVALID)
    V, n_parts, stride_zm, stride_zn, stride_dm, stride_dn, stride_pm, stride_g,
    ignore_index,
    PARAMS,         # (3,) label_smoothing, z_loss, softcap
    CAP_ON_LOAD: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, Z_LOSS: tl.constexpr,
    GRAD_MODE: tl.constexpr, DIV_NVALID: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    """One row: lse and the loss from the partials; with GRAD_MODE 1 (factor 1) or 2 (the row's upstream
    gradient) the row's gradient, reading each logit once and writing each gradient once. Ignored rows get a
    zero loss and a zero gradient without reading their logits."""
    row = tl.program_id(0).to(tl.int64)
    label_smoothing = 0.0
    z_loss = 0.0
    softcap = 1.0
    if SMOOTH:
        label_smoothing = tl.load(PARAMS).to(ACC)
    if Z_LOSS:
        z_loss = tl.load(PARAMS + 1).to(ACC)
    if SOFTCAP:
        softcap = tl.load(PARAMS + 2).to(ACC)
    offs_p = tl.arange(0, BLOCK_P)
    m_i = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
    s_i = tl.zeros([BLOCK_P], dtype=ACC)
    c_i = tl.zeros([BLOCK_P], dtype=ACC)
    for p0 in range(0, n_parts, BLOCK_P):
        ok = p0 + offs_p < n_parts
        pm = tl.load(PART_M + row * stride_pm + p0 + offs_p, mask=ok, other=float("-inf")).to(ACC)
        ps = tl.load(PART_S + row * stride_pm + p0 + offs_p, mask=ok, other=0.0).to(ACC)
        m_new = tl.maximum(m_i, pm)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_safe) + ps * tl.exp(pm - m_safe)
        m_i = m_new
        if SMOOTH:
            c_i += tl.load(PART_C + row * stride_pm + p0 + offs_p, mask=ok, other=0.0).to(ACC)
    m = tl.max(m_i, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = m_safe + tl.log(tl.sum(s_i * tl.exp(m_i - m_safe), axis=0))
    t = tl.load(TARGET + row)
    ignored = t == ignore_index
    zt = tl.load(TLOGIT + row).to(ACC)
    loss = lse - (1.0 - label_smoothing) * zt
    if SMOOTH:
        loss -= label_smoothing / V * tl.sum(c_i, axis=0)
    if Z_LOSS:
        loss += z_loss * lse * lse
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss))
    tl.store(LSE + row, lse)
    if GRAD_MODE != 0:
        offs = tl.arange(0, BLOCK_V)
        d_base = DZ + row * stride_dm
        if ignored:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                tl.store(d_base + cols.to(tl.int64) * stride_dn, tl.zeros([BLOCK_V], dtype=DZ.dtype.element_ty),
                         mask=cols < V)
        else:
            g = 1.0
            if GRAD_MODE == 2:
                g = tl.load(G + row * stride_g).to(ACC)
            if DIV_NVALID:
                g = g / tl.load(NVALID).to(ACC)
            coef = g
            if Z_LOSS:
                coef = g * (1.0 + 2.0 * z_loss * lse)
            z_base = Z + row * stride_zm
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                ok = cols < V
                c = tl.load(z_base + cols.to(tl.int64) * stride_zn, mask=ok, other=0.0).to(ACC)
                if CAP_ON_LOAD:
                    c = softcap * _tanh(c / softcap)
                d = coef * tl.exp(c - lse)
                d = tl.where(cols == t, d - g * (1.0 - label_smoothing), d)
                if SMOOTH:
                    d -= g * label_smoothing / V
                if SOFTCAP:
                    r = c / softcap
                    d *= 1.0 - r * r
                tl.store(d_base + cols.to(tl.int64) * stride_dn, d.to(DZ.dtype.element_ty), mask=ok)


@triton.jit
def _lce_dx_kernel(
    DZ,             # (M, V) logit gradient of the chunk, contiguous rows
    W,              # (V, H) weight, any strides
    DX,             # (M, H) the chunk's rows of dX, any strides
    M, V, H, num_m,
    stride_dm, stride_wv, stride_wk, stride_xm, stride_xk,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_k = pid // num_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    k_ok = ks < H
    d_ptrs = DZ + rows[:, None].to(tl.int64) * stride_dm + offs_n[None, :]
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wv + ks[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for v0 in range(0, V, BLOCK_N):
        n_ok = offs_n < V - v0
        d = tl.load(d_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            d = d.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(d, w, acc, input_precision=PRECISION, out_dtype=ACC)
        d_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_wv
    x_ptrs = DX + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
    tl.store(x_ptrs, acc.to(DX.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _lce_dw_kernel(
    DZ,             # (M, V) logit gradient of the chunk, contiguous rows
    X,              # (M, H) the chunk's input rows, any strides
    DW,             # (V, H) accumulation-dtype dW, contiguous (NEED_W)
    DB,             # (V,) accumulation-dtype db (HAS_BIAS)
    M, V, H, num_k,
    stride_dm, stride_xm, stride_xk,
    ACCUMULATE: tl.constexpr, NEED_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    # The hidden tiles of one vocabulary tile are neighbouring programs: they share the chunk's dZ tile in L2.
    pid = tl.program_id(0)
    pid_k = pid % num_k
    pid_v = pid // num_k
    vs = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    v_ok = vs < V
    k_ok = ks < H
    d_ptrs = DZ + offs_m[:, None].to(tl.int64) * stride_dm + vs[None, :]
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        m_ok = offs_m < M - m0
        d = tl.load(d_ptrs, mask=m_ok[:, None] & v_ok[None, :], other=0.0)
        if UPCAST:
            d = d.to(tl.float32)
        if NEED_W:
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            acc = tl.dot(tl.trans(d), x, acc, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            if pid_k == 0:       # one program per vocabulary tile sums the bias gradient
                db += tl.sum(d.to(ACC), axis=0)
        d_ptrs += BLOCK_M * stride_dm
        x_ptrs += BLOCK_M * stride_xm
    if NEED_W:
        w_ptrs = DW + vs[:, None].to(tl.int64) * H + ks[None, :]
        w_mask = v_ok[:, None] & k_ok[None, :]
        if ACCUMULATE:
            acc += tl.load(w_ptrs, mask=w_mask, other=0.0)
        tl.store(w_ptrs, acc, mask=w_mask)
    if HAS_BIAS:
        if pid_k == 0:
            if ACCUMULATE:
                db += tl.load(DB + vs, mask=v_ok, other=0.0)
            tl.store(DB + vs, db, mask=v_ok)


# ----------------------------------------------------------------------------- configuration


def chunk_rows(n: int, v: int) -> int:
    """Rows per chunk: all of them when they are few, else at most ``N / CHUNK_FRACTION`` rows and about
    ``CHUNK_BYTES`` of float32 logits (at least ``MIN_CHUNK`` rows)."""
    if n <= MIN_CHUNK:
        return max(n, 1)
    budget = max(MIN_CHUNK, CHUNK_BYTES // (4 * max(v, 1)))
    return max(MIN_CHUNK, min(n, budget, -(-n // CHUNK_FRACTION)))


def lce_config(dtype: torch.dtype, arch: ArchValue) -> dict[str, int]:
    """Tiles of the matmul kernels (BLOCK_M rows x BLOCK_N vocabulary x BLOCK_K hidden), warps and stages per
    dtype and architecture family (``python -m fused_kernels.aot --family cross_entropy --arch ...``: no spills,
    shared memory within the family's limit: docs/architectures.md); small tiles under the interpreter (arch
    None). ``DX_BLOCK_N`` (the vocabulary depth of dX's reduction) and ``DW_BLOCK_M`` (the row depth of dW's)
    are the backward matmuls' own: they only set how far each loop iteration reaches, so a family can shorten
    them where its compiler spills, without changing the logits tiles, the vocabulary tiles of dW or the
    partials."""
    family = arch_family(arch)
    cfg = _lce_tiles(dtype, family) if family is not None else \
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=1)
    cfg.setdefault("DX_BLOCK_N", cfg["BLOCK_N"])
    cfg.setdefault("DW_BLOCK_M", cfg["BLOCK_M"])
    return cfg


def _lce_tiles(dtype: torch.dtype, family: ArchFamily) -> dict[str, int]:
    stages = 1 if family.vendor == "hip" else 3   # AMD: 64 KB of LDS (3 stages of 128 x 128 x 32 need 80 KB)
    half = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    if half is not None and half not in family.mma_dtypes:
        dtype = torch.float32   # no tensor cores for it (sm_70 / sm_75): fp32 math (``upcast_16bit``), fp32 tiles
    if dtype in (torch.float16, torch.bfloat16):
        if family.mma in ("wgmma", "tcgen05"):   # warpgroup MMA: 64-deep K tiles
            return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=stages)
        if family.name == "sm_120":   # dX at 128 vocabulary columns a step spills 12 + 12 B there (triton 3.9)
            cfg["DX_BLOCK_N"] = 64
        if family.name == "gfx1100":  # dW with bias at 128 rows a step: 24-28 B of scratch (256 VGPRs)
            cfg["DW_BLOCK_M"] = 64
        return cfg
    if dtype == torch.float32:   # true fp32 dots are FMA loops: 64-wide reductions spill on sm_80 (dX, dW)
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=stages)
    # fp64: no software pipelining (two stages spill 8 + 8 B in dX on sm_90a with triton 3.6)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    if family.name == "gfx1100":      # dW with bias at 32 rows a step: ~200 B of scratch
        cfg["DW_BLOCK_M"] = 16
    return cfg


def softmax_config(dtype: torch.dtype, arch: ArchValue) -> dict[str, int]:
    """BLOCK_V and warps of the row kernels (``_ce_softmax_kernel``, ``_ce_stats_kernel``)."""
    if arch is None:
        return dict(BLOCK_V=128, num_warps=4)
    return dict(BLOCK_V=2048 if dtype != torch.float64 else 1024, num_warps=8)


def _stat_parts(n: int, v: int, block_v: int, device: torch.device) -> int:
    """Column parts of ``_ce_stats_kernel``: enough programs to fill a GPU (4 per SM; 512 when planning without
    one: the interpreter, or meta tensors in ``python -m fused_kernels.aot``) when the rows are few."""
    from .._core.launch import num_persistent_programs
    programs = num_persistent_programs(device, 1 << 30) if device.type == "cuda" else 512
    return max(1, min(triton.cdiv(v, block_v), triton.cdiv(programs, max(n, 1))))


# ----------------------------------------------------------------------------- Triton path


def _params(label_smoothing: float, z_loss: float, softcap: float, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    # A tensor, not scalar arguments: triton passes Python floats as float32, which float64 must not round to.
    return torch.tensor([label_smoothing, z_loss, softcap], dtype=dtype).to(device, non_blocking=True)


def _lce_triton(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor, ignore_index: int,
                label_smoothing: float, z_loss: float, softcap: float, need_x: bool, need_w: bool, need_b: bool,
                row_grad: torch.Tensor | None, n_valid: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-row losses (accumulation dtype) and, when any ``need_*``, dX (x's dtype) and the accumulation-dtype dW,
    db of the loss weighted per row by ``row_grad`` (None: 1, divided by ``n_valid`` when given)."""
    n, h = x.shape
    v = w.shape[0]
    dev = x.device
    acc_t = torch_acc_dtype(x.dtype)
    arch = device_arch(dev)
    cfg = lce_config(x.dtype, arch)
    scfg = softmax_config(x.dtype, arch)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    upcast = upcast_16bit(x.dtype, arch)
    prec = dot_precision(x.dtype, upcast)
    grad = need_x or need_w or need_b
    chunk = chunk_rows(n, v)
    n_parts = triton.cdiv(v, bn)
    loss = torch.empty(n, dtype=acc_t, device=dev)
    lse = torch.empty(n, dtype=acc_t, device=dev)
    z = torch.empty((min(chunk, n), v), dtype=x.dtype, device=dev) if grad else loss
    parts = torch.empty((3, min(chunk, n), n_parts), dtype=acc_t, device=dev)
    tlogit = torch.zeros(min(chunk, n), dtype=acc_t, device=dev)
    dx = torch.empty((n, h), dtype=x.dtype, device=dev) if need_x else None
    alloc = torch.empty if n else torch.zeros           # without rows no kernel writes dW / db
    dw = alloc((v, h), dtype=acc_t, device=dev) if need_w else None
    db = alloc(v, dtype=acc_t, device=dev) if need_b else None
    g = row_grad if row_grad is not None else loss
    params = _params(label_smoothing, z_loss, softcap, acc_t, dev)
    smooth, cap = label_smoothing > 0, softcap > 0
    for i, r0 in enumerate(range(0, n, chunk)):
        r1 = min(n, r0 + chunk)
        m = r1 - r0
        xc, tc = x[r0:r1], target[r0:r1]
        num_m = triton.cdiv(m, bm)
        launch(_lce_logits_kernel, (num_m * n_parts,),
               xc, w, b if b is not None else w, tc, z, parts[0], parts[1], parts[2], tlogit,
               m, v, h, num_m, xc.stride(0), xc.stride(1), w.stride(0), w.stride(1), z.stride(0) if grad else 0,
               parts.stride(1), params,
               HAS_BIAS=b is not None, SOFTCAP=cap, SMOOTH=smooth, STORE_LOGITS=grad, EVEN_K=h % bk == 0,
               UPCAST=upcast, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACC=acc_dtype(x.dtype), **opts)
        gc = g[r0:r1] if row_grad is not None else g
        launch(_ce_softmax_kernel, (m,),
               z, z, tc, parts[0], parts[1], parts[2], tlogit, loss[r0:r1], lse[r0:r1], gc,
               n_valid if n_valid is not None else loss,
               v, n_parts, z.stride(0) if grad else 0, 1, z.stride(0) if grad else 0, 1, parts.stride(1),
               gc.stride(0) if row_grad is not None else 0, int(ignore_index), params,
               CAP_ON_LOAD=False, SOFTCAP=cap, SMOOTH=smooth, Z_LOSS=z_loss > 0,
               GRAD_MODE=(2 if row_grad is not None else 1) if grad else 0, DIV_NVALID=n_valid is not None,
               BLOCK_P=min(1024, next_pow2(n_parts)), BLOCK_V=scfg["BLOCK_V"], ACC=acc_dtype(x.dtype),
               num_warps=scfg["num_warps"])
        if not grad:
            continue
        zc = z[:m]
        if need_x:
            dxc = dx[r0:r1]
            num_k = triton.cdiv(h, bk)
            launch(_lce_dx_kernel, (num_m * num_k,), zc, w, dxc, m, v, h, num_m,
                   zc.stride(0), w.stride(0), w.stride(1), dxc.stride(0), dxc.stride(1),
                   UPCAST=upcast, PRECISION=prec, BLOCK_M=bm, BLOCK_N=cfg["DX_BLOCK_N"], BLOCK_K=bk,
                   ACC=acc_dtype(x.dtype), **opts)
        if need_w or need_b:
            num_k = triton.cdiv(h, bk) if need_w else 1
            launch(_lce_dw_kernel, (num_k * n_parts,), zc, xc, dw if dw is not None else z,
                   db if db is not None else z, m, v, h, num_k, zc.stride(0), xc.stride(0), xc.stride(1),
                   ACCUMULATE=i > 0, NEED_W=need_w, HAS_BIAS=need_b, UPCAST=upcast, PRECISION=prec,
                   BLOCK_M=cfg["DW_BLOCK_M"], BLOCK_N=bn, BLOCK_K=bk, ACC=acc_dtype(x.dtype), **opts)
    return loss, dx, dw, db


def _ce_triton(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
               softcap: float, dlogits: torch.Tensor | None) -> torch.Tensor:
    """Per-row losses of given (N, V) logits; with ``dlogits`` (which may be ``logits`` itself) each row's
    gradient for an upstream gradient of 1 is written there."""
    n, v = logits.shape
    dev = logits.device
    acc_t = torch_acc_dtype(logits.dtype)
    scfg = softmax_config(logits.dtype, device_arch(dev))
    block_v = scfg["BLOCK_V"]
    n_parts = _stat_parts(n, v, block_v, dev)
    cols_per_part = triton.cdiv(triton.cdiv(v, n_parts), block_v) * block_v
    n_parts = triton.cdiv(v, cols_per_part)
    loss = torch.empty(n, dtype=acc_t, device=dev)
    lse = torch.empty(n, dtype=acc_t, device=dev)
    if n == 0:
        return loss
    parts = torch.empty((3, n, n_parts), dtype=acc_t, device=dev)
    tlogit = torch.zeros(n, dtype=acc_t, device=dev)
    params = _params(label_smoothing, z_loss, softcap, acc_t, dev)
    smooth, cap = label_smoothing > 0, softcap > 0
    launch(_ce_stats_kernel, (n, n_parts), logits, target, parts[0], parts[1], parts[2], tlogit,
           v, cols_per_part, logits.stride(0), logits.stride(1), parts.stride(1), params,
           SOFTCAP=cap, SMOOTH=smooth, BLOCK_V=block_v, ACC=acc_dtype(logits.dtype), num_warps=scfg["num_warps"])
    d = dlogits if dlogits is not None else logits
    launch(_ce_softmax_kernel, (n,), logits, d, target, parts[0], parts[1], parts[2], tlogit, loss, lse,
           loss, loss, v, n_parts, logits.stride(0), logits.stride(1), d.stride(0), d.stride(1), parts.stride(1), 0,
           int(ignore_index), params,
           CAP_ON_LOAD=cap, SOFTCAP=cap, SMOOTH=smooth, Z_LOSS=z_loss > 0, GRAD_MODE=1 if dlogits is not None else 0,
           DIV_NVALID=False, BLOCK_P=min(1024, next_pow2(n_parts)), BLOCK_V=block_v, ACC=acc_dtype(logits.dtype),
           num_warps=scfg["num_warps"])
    return loss


# ----------------------------------------------------------------------------- PyTorch path


def _chunk_terms(c: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, label_smoothing: float,
                 z_loss: float, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, lse, softmax) of capped logits ``c`` (M, V); the softmax in ``out`` (or a new buffer)."""
    mx = c.amax(1, keepdim=True)
    mx = mx.masked_fill(mx == float("-inf"), 0.0)
    p = torch.sub(c, mx, out=out).exp_()
    s = p.sum(1, keepdim=True)
    lse = (mx + s.log()).squeeze(1)
    zt = c.gather(1, t.clamp(0, c.shape[1] - 1)[:, None]).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * zt
    if label_smoothing > 0:
        loss = loss - label_smoothing / c.shape[1] * c.sum(1)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    return loss.masked_fill(~valid, 0.0), lse, p.div_(s)


def _unit_grad_(p: torch.Tensor, c: torch.Tensor | None, t: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor,
                factor: torch.Tensor, label_smoothing: float, z_loss: float, softcap: float) -> torch.Tensor:
    """Turn the softmax ``p`` (M, V) into the gradient of the capped-logit loss, in place, rows scaled by
    ``factor`` (M,) and zero where not ``valid``; ``c`` (the capped logits, consumed) for the cap's derivative."""
    scale = factor.masked_fill(~valid, 0.0)              # 0, not inf * 0, when every row is ignored
    if z_loss > 0:
        p.mul_((scale * (1.0 + 2.0 * z_loss * lse))[:, None])
    else:
        p.mul_(scale[:, None])
    if label_smoothing > 0:
        p.sub_((scale * (label_smoothing / p.shape[1]))[:, None])
    rows = torch.arange(p.shape[0], device=p.device)
    p.index_put_((rows, t.clamp(0, p.shape[1] - 1)), -(1.0 - label_smoothing) * scale, accumulate=True)
    if softcap > 0:
        p.mul_(c.div_(softcap).square_().neg_().add_(1.0))
    return p


def _lce_torch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor, ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float, need_x: bool, need_w: bool, need_b: bool,
               row_grad: torch.Tensor | None, n_valid: torch.Tensor | None,
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``_lce_triton``'s results with torch's matmuls, chunk by chunk (logits and gradients in the accumulation
    dtype: half-precision weights are upcast once)."""
    n, h = x.shape
    v = w.shape[0]
    acc_t = torch_acc_dtype(x.dtype)
    wc = w if w.dtype == acc_t else w.to(acc_t)
    bc = None if b is None else b.to(acc_t)
    grad = need_x or need_w or need_b
    chunk = chunk_rows(n, v)
    loss = torch.empty(n, dtype=acc_t, device=x.device)
    dx = torch.empty((n, h), dtype=x.dtype, device=x.device) if need_x else None
    dw = torch.zeros((v, h), dtype=acc_t, device=x.device) if need_w else None
    db = torch.zeros(v, dtype=acc_t, device=x.device) if need_b else None
    # two chunk buffers for every chunk: the capped logits and their softmax (then gradient)
    buf = torch.empty((2, min(chunk, n), v), dtype=acc_t, device=x.device)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        xc, tc = x[r0:r1].to(acc_t), target[r0:r1]
        c = torch.mm(xc, wc.t(), out=buf[0, : r1 - r0])                     # (M, V)
        if bc is not None:
            c.add_(bc)
        if softcap > 0:
            c.div_(softcap).tanh_().mul_(softcap)
        valid = tc != ignore_index
        loss[r0:r1], lse, p = _chunk_terms(c, tc, valid, label_smoothing, z_loss, out=buf[1, : r1 - r0])
        if not grad:
            continue
        factor = torch.ones(r1 - r0, dtype=acc_t, device=x.device) if row_grad is None else row_grad[r0:r1].to(acc_t)
        if n_valid is not None:
            factor = factor / n_valid.to(acc_t)
        dz = _unit_grad_(p, c, tc, valid, lse, factor, label_smoothing, z_loss, softcap)
        if need_x:
            if x.dtype == acc_t:
                torch.mm(dz, wc, out=dx[r0:r1])
            else:
                dx[r0:r1] = dz @ wc
        if need_w:
            dw.addmm_(dz.t(), xc)
        if need_b:
            db.add_(dz.sum(0))
    return loss, dx, dw, db


def _ce_torch(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
              softcap: float, dlogits: torch.Tensor | None) -> torch.Tensor:
    """``_ce_triton`` with torch's ops, chunk by chunk of rows."""
    n, v = logits.shape
    acc_t = torch_acc_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc_t, device=logits.device)
    chunk = chunk_rows(n, v)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        tc = target[r0:r1]
        c = logits[r0:r1].to(acc_t, copy=softcap > 0)     # the cap is applied in place: never on the caller's logits
        if softcap > 0:
            c.div_(softcap).tanh_().mul_(softcap)
        valid = tc != ignore_index
        loss[r0:r1], lse, p = _chunk_terms(c, tc, valid, label_smoothing, z_loss)
        if dlogits is not None:
            factor = torch.ones(r1 - r0, dtype=acc_t, device=logits.device)
            dlogits[r0:r1] = _unit_grad_(p, c, tc, valid, lse, factor, label_smoothing, z_loss, softcap)
    return loss


# ----------------------------------------------------------------------------- custom ops


def _reduce(rows: torch.Tensor, reduction: int, n_valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if reduction == NONE:
        return rows.to(dtype)
    total = rows.sum()
    return (total / n_valid if reduction == MEAN else total).to(dtype)


def _n_valid(target: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    return (target != ignore_index).sum().to(dtype)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


@torch.library.custom_op("fused_kernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, ignore_index: int,
    reduction: int, label_smoothing: float, z_loss: float, softcap: float, need_x: bool, need_w: bool, need_b: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, dx, dw, db)`` of x (N, H), weight (V, H), target (N,): the loss reduced (per row for "none") in the
    accumulation dtype, and for "mean" / "sum" the gradients the ``need_*`` flags ask for (for an upstream
    gradient of 1), empty otherwise; dw / db in the accumulation dtype."""
    acc_t = torch_acc_dtype(x.dtype)
    n_valid = _n_valid(target, ignore_index, acc_t) if reduction == MEAN else None
    grads = reduction != NONE
    run = _lce_triton if use_triton else _lce_torch
    rows, dx, dw, db = run(x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap,
                           need_x and grads, need_w and grads, need_b and grads, None, n_valid)
    loss = _reduce(rows, reduction, n_valid, acc_t)
    return loss, dx if dx is not None else _empty(x), dw if dw is not None else _empty(x), \
        db if db is not None else _empty(x)


@linear_cross_entropy_fwd.register_fake
def _(x, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap, need_x, need_w, need_b,
      use_triton):
    acc_t = torch_acc_dtype(x.dtype)
    grads = reduction != NONE
    loss = x.new_empty(x.shape[0], dtype=acc_t) if reduction == NONE else x.new_empty((), dtype=acc_t)
    return (loss, x.new_empty(x.shape) if need_x and grads else _empty(x),
            x.new_empty(weight.shape, dtype=acc_t) if need_w and grads else _empty(x),
            x.new_empty(weight.shape[0], dtype=acc_t) if need_b and grads else _empty(x))


@torch.library.custom_op("fused_kernels::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, need_x: bool, need_w: bool,
    need_b: bool, use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dw, db)`` of the per-row losses weighted by ``grad`` (N,) (reduction "none"), recomputing
    the chunks; dw / db in the accumulation dtype, empty where not asked."""
    run = _lce_triton if use_triton else _lce_torch
    _, dx, dw, db = run(x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, need_x, need_w,
                        need_b, grad, None)
    return dx if dx is not None else _empty(x), dw if dw is not None else _empty(x), \
        db if db is not None else _empty(x)


@linear_cross_entropy_bwd.register_fake
def _(grad, x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, need_x, need_w, need_b,
      use_triton):
    acc_t = torch_acc_dtype(x.dtype)
    return (x.new_empty(x.shape) if need_x else _empty(x),
            x.new_empty(weight.shape, dtype=acc_t) if need_w else _empty(x),
            x.new_empty(weight.shape[0], dtype=acc_t) if need_b else _empty(x))


def _lce_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap, need_x, need_w, need_b, \
        use_triton = inputs
    _, dx, dw, db = output
    ctx.reduction = reduction
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
    ctx.use_triton = use_triton
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    # The inputs, for the "none" reduction (the chunks are recomputed with each row's gradient), a graph of the
    # backward, or a second backward. The forward's gradients ("mean" / "sum") are handed to the first backward,
    # which scales them in place and gives them away: no copy of dW. In eager mode they live on ctx, not among the
    # saved tensors, so that nothing keeps them once given away; traced (fake / functional tensors,
    # torch.compile) they are saved tensors.
    ctx.forward_grads = None
    if torch.compiler.is_compiling() or type(dw) is not torch.Tensor:
        ctx.save_for_backward(x, weight, bias, target, dx, dw, db)
    else:
        ctx.save_for_backward(x, weight, bias, target)
        if reduction != NONE:
            ctx.forward_grads = (dx, dw, db)


def _lce_backward(ctx, dloss, _dx, _dw, _db):
    saved = ctx.saved_tensors
    x, weight, bias, target = saved[:4]
    forward_grads = saved[4:] if len(saved) > 4 else ctx.forward_grads
    ctx.forward_grads = None                 # given away once: a retained graph's next backward recomputes
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if dloss is None:
        return (None,) * 13
    xd, wd, bd = ctx.dtypes
    if _grad.create_graph():
        gx, gw, gb = _lce_graph_grads(dloss, x, weight, bias, target, ctx.reduction, *ctx.options,
                                      need_x, need_w, need_b)
    elif ctx.reduction == NONE or forward_grads is None:
        rows = dloss
        if ctx.reduction != NONE:            # the scalar gradient as each row's share
            rows = dloss.expand(target.shape[0])
            if ctx.reduction == MEAN:
                rows = rows / _n_valid(target, ctx.options[0], dloss.dtype)
        gx, gw, gb = linear_cross_entropy_bwd(rows, x, weight, bias, target, *ctx.options, need_x, need_w, need_b,
                                              ctx.use_triton)
        gx, gw, gb = (gx if need_x else None, gw.to(wd) if need_w else None, gb.to(bd) if need_b else None)
    else:
        g = dloss.to(torch_acc_dtype(xd))
        dx, dw, db = forward_grads
        in_place = len(saved) == 4            # eager: the tensors are ours to scale
        scale = (lambda t: t.mul_(g)) if in_place else (lambda t: t * g)
        gx = scale(dx).to(xd) if need_x else None
        gw = scale(dw).to(wd) if need_w else None
        gb = scale(db).to(bd) if need_b else None
    return gx, gw, gb, *(None,) * 10


def _lce_graph_grads(dloss, x, weight, bias, target, reduction, ignore_index, label_smoothing, z_loss, softcap,
                     need_x, need_w, need_b):
    """The backward as differentiable PyTorch ops (double backward): the loss formula re-run on the saved
    inputs (materializing the logits) and differentiated with a graph."""
    from ..reference import linear_cross_entropy_ref

    name = {NONE: "none", MEAN: "mean", SUM: "sum"}[reduction]
    loss = linear_cross_entropy_ref(x, weight, target, bias, ignore_index=ignore_index, reduction=name,
                                    label_smoothing=label_smoothing, z_loss=z_loss,
                                    softcap=softcap if softcap > 0 else None)
    return tuple(_grad.grads([loss], [dloss], [x if need_x else None, weight if need_w else None,
                                                bias if need_b and bias is not None else None]))


linear_cross_entropy_fwd.register_autograd(_lce_backward, setup_context=_lce_setup_context)


@torch.library.custom_op("fused_kernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: int, label_smoothing: float,
    z_loss: float, softcap: float, need_grad: bool, use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, unit_grad)`` of (N, V) logits: the reduced loss and, when ``need_grad``, each row's gradient for
    an upstream gradient of 1 (unreduced; the backward scales the rows), in a new (N, V) tensor."""
    acc_t = torch_acc_dtype(logits.dtype)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_grad else None
    run = _ce_triton if use_triton else _ce_torch
    rows = run(logits, target, ignore_index, label_smoothing, z_loss, softcap, dlogits)
    n_valid = _n_valid(target, ignore_index, acc_t) if reduction == MEAN else None
    return _reduce(rows, reduction, n_valid, logits.dtype), dlogits if dlogits is not None else _empty(logits)


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap, need_grad, use_triton):
    loss = logits.new_empty(logits.shape[0]) if reduction == NONE else logits.new_empty(())
    return loss, logits.new_empty(logits.shape) if need_grad else _empty(logits)


@torch.library.custom_op("fused_kernels::cross_entropy_fwd_inplace", mutates_args=("logits",))
def cross_entropy_fwd_inplace(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: int, label_smoothing: float,
    z_loss: float, softcap: float, use_triton: bool,
) -> torch.Tensor:
    """The loss of (N, V) logits; their unit gradient (as ``cross_entropy_fwd``'s) is written over them."""
    acc_t = torch_acc_dtype(logits.dtype)
    run = _ce_triton if use_triton else _ce_torch
    rows = run(logits, target, ignore_index, label_smoothing, z_loss, softcap, logits)
    n_valid = _n_valid(target, ignore_index, acc_t) if reduction == MEAN else None
    return _reduce(rows, reduction, n_valid, logits.dtype)


@cross_entropy_fwd_inplace.register_fake
def _(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap, use_triton):
    return logits.new_empty(logits.shape[0]) if reduction == NONE else logits.new_empty(())


def _row_factor(dloss: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: int,
                dtype: torch.dtype) -> torch.Tensor:
    """What multiplies each row's unit gradient: the row's upstream gradient ("none"), the scalar one divided by
    the rows not ignored ("mean"), or the scalar one ("sum"), as an (N, 1) or (1, 1) tensor."""
    g = dloss.to(dtype)
    if reduction == NONE:
        return g[:, None]
    if reduction == MEAN:
        g = g / _n_valid(target, ignore_index, dtype)
    return g.reshape(1, 1)


def _ce_setup_context(ctx, inputs, output) -> None:
    logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap, need_grad, use_triton = inputs
    unit = output[1]
    ctx.reduction, ctx.options, ctx.use_triton = reduction, (ignore_index, label_smoothing, z_loss, softcap), \
        use_triton
    # As linear_cross_entropy's: the unit gradient is handed to the first backward (scaled in place, given away);
    # traced, it is a saved tensor.
    ctx.unit = None
    if torch.compiler.is_compiling() or type(unit) is not torch.Tensor:
        ctx.save_for_backward(logits, target, unit)
    else:
        ctx.save_for_backward(logits, target)
        ctx.unit = unit if unit.numel() == logits.numel() else None


def _ce_backward(ctx, dloss, _dunit):
    saved = ctx.saved_tensors
    logits, target = saved[:2]
    unit = saved[2] if len(saved) > 2 else ctx.unit
    ctx.unit = None                          # given away once: a retained graph's next backward recomputes
    if dloss is None or not ctx.needs_input_grad[0]:
        return (None,) * 9
    ignore_index, label_smoothing, z_loss, softcap = ctx.options
    if _grad.create_graph():
        from ..reference import cross_entropy_ref
        name = {NONE: "none", MEAN: "mean", SUM: "sum"}[ctx.reduction]
        loss = cross_entropy_ref(logits, target, ignore_index=ignore_index, reduction=name,
                                 label_smoothing=label_smoothing, z_loss=z_loss,
                                 softcap=softcap if softcap > 0 else None)
        return (_grad.grads([loss], [dloss], [logits])[0], *(None,) * 8)
    factor = _row_factor(dloss, target, ignore_index, ctx.reduction, torch_acc_dtype(logits.dtype))
    if unit is None or unit.numel() != logits.numel():
        unit = cross_entropy_fwd(logits.detach(), target, ignore_index, ctx.reduction, label_smoothing, z_loss,
                                 softcap, True, ctx.use_triton)[1]
    elif len(saved) > 2:                     # traced: the saved tensor is not ours to change
        return ((unit * factor).to(logits.dtype), *(None,) * 8)
    return (unit.mul_(factor), *(None,) * 8)


cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup_context)


class _CrossEntropyInplace(torch.autograd.Function):
    """``cross_entropy`` with ``inplace_backward=True`` (eager mode): the unit gradient overwrites the logits in
    the forward (their version counter moves, so autograd refuses any other use of them saved for a backward),
    and the backward scales it in place: one (N, V) tensor in all. Its backward can run once."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap, use_triton):
        loss = cross_entropy_fwd_inplace(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap,
                                         use_triton)
        ctx.save_for_backward(logits, target)
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        return loss

    @staticmethod
    def backward(ctx, dloss):
        unit, target = ctx.saved_tensors
        factor = _row_factor(dloss, target, ctx.ignore_index, ctx.reduction, torch_acc_dtype(unit.dtype))
        return unit.mul_(factor), *(None,) * 7


# ----------------------------------------------------------------------------- public functions


def _check_options(op: str, ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                   softcap: float | None) -> tuple[int, float, float, float]:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: {reduction} is not a valid value for reduction (one of 'none', 'mean', 'sum')")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise _checks.ArgumentValueError(f"{op}: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not math.isfinite(z_loss) or z_loss < 0:
        raise _checks.ArgumentValueError(f"{op}: z_loss must be a finite float >= 0, got {z_loss}")
    if softcap is not None:
        if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
            raise TypeError(f"{op}: softcap must be a float or None, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise _checks.ArgumentValueError(f"{op}: softcap must be a finite float > 0 or None, got {softcap}")
    return REDUCTIONS[reduction], float(label_smoothing), float(z_loss), float(softcap or 0.0)


def _check_target(op: str, target: object, batch: tuple[int, ...], v: int, ignore_index: int,
                  device: torch.device) -> torch.Tensor:
    """The class-index target, as int64 (N,): torch's dtype and batch checks, and its range check (on the CPU as
    torch's IndexError; on a GPU an asynchronous device assert, as torch's kernels assert)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise _checks.ArgumentTypeError(f"{op}: expected target dtype to be Long or Byte, but got {target.dtype}")
    if tuple(target.shape) != batch:
        raise _checks.ArgumentValueError(f"{op}: target must have shape {batch} (the input's batch dims), got "
                                         f"{tuple(target.shape)}")
    if target.device != device:
        raise _checks.ArgumentValueError(f"{op}: target is on {target.device} but the input is on {device}")
    t = target.reshape(-1).long().contiguous()             # the kernels index targets densely
    if t.numel() and not torch.compiler.is_compiling():
        bad = ((t < 0) | (t >= v)) & (t != ignore_index)
        if t.is_cuda:
            torch._assert_async(~bad.any(), f"{op}: a target is out of bounds [0, {v})")
        elif bool(bad.any()):
            raise TargetIndexError(f"{op}: Target {int(t[bad][0])} is out of bounds (the classes are 0..{v - 1} and "
                                   f"ignore_index is {ignore_index}).")
    return t


def linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias), target, ignore_index=..., reduction=...,
    label_smoothing=...)`` without the (N, V) logits, plus ``z_loss * logsumexp^2`` (PaLM's z-loss, averaged
    like the loss) and an optional logit soft-cap ``softcap * tanh(logits / softcap)`` (Gemma 2) before the loss.

    ``input`` (N, H) or (..., H) with ``target`` (N,) or (...) of class indices (int64; entries equal to
    ``ignore_index`` are left out: loss 0, no gradient, not counted by "mean"); ``weight`` (V, H), e.g. a tied
    embedding matrix; ``bias`` (V,). Gradients flow to input, weight and bias (float32 accumulation of dW / db),
    for every reduction. The loss comes back in the input's dtype ((...) for "none"), as torch's, or in
    ``out_dtype`` (e.g. float32 for a bf16 model, as models that upcast their logits before the loss get: the
    kernels compute in float32 either way); every target ignored gives NaN for "mean" and 0 for "sum", as torch.
    At most one chunk of rows' logits exists at a time (``chunk_rows``)."""
    op = "linear_cross_entropy"
    _checks.check_float_tensor("input", input, op)
    _checks.check_float_tensor("weight", weight, op)
    _checks.check_tensor_type("input", input, op)
    _checks.check_tensor_type("weight", weight, op)
    if input.dim() < 1 or weight.dim() != 2:
        raise _checks.ArgumentValueError(f"{op}: input must be (..., H) and weight (V, H), got shapes "
                                         f"{tuple(input.shape)} and {tuple(weight.shape)}")
    v, h = weight.shape
    if input.shape[-1] != h:
        raise _checks.ArgumentValueError(f"{op}: input's last dim {input.shape[-1]} does not match weight's "
                                         f"in_features {h} (weight shape {tuple(weight.shape)})")
    if v < 1:
        raise _checks.ArgumentValueError(f"{op}: weight must have at least one class (row), got shape "
                                         f"{tuple(weight.shape)}")
    if weight.device != input.device:
        raise _checks.ArgumentValueError(f"{op}: weight is on {weight.device} but input is on {input.device}")
    if weight.dtype != input.dtype:
        raise _checks.ArgumentTypeError(f"{op}: weight must have the input's dtype {input.dtype} (as F.linear), got "
                                        f"{weight.dtype}")
    _checks.check_like("bias", bias, input, op, shape=(v,))
    red, ls, zl, cap = _check_options(op, ignore_index, reduction, label_smoothing, z_loss, softcap)
    t = _check_target(op, target, tuple(input.shape[:-1]), v, ignore_index, input.device)
    x = input.reshape(-1, h)
    use_triton = _backend.choose(input, op) == "triton"
    grad_on = torch.is_grad_enabled()
    need_x = grad_on and input.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise _checks.DtypeNotImplementedError(f"{op}: out_dtype must be a float dtype or None, got {out_dtype}")
    loss = linear_cross_entropy_fwd(x, weight, bias, t, ignore_index, red, ls, zl, cap, need_x, need_w, need_b,
                                    use_triton)[0].to(out_dtype or input.dtype)
    return loss.reshape(target.shape) if red == NONE else loss


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: float | None = None, inplace_backward: bool = False) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` (same positional arguments) on (N, C) or (C,) logits with class-index
    targets, plus the keyword-only ``z_loss`` and ``softcap`` of ``linear_cross_entropy``. The forward computes the
    gradient along with the loss, so the backward is one scaling; ``log_softmax`` is never stored.

    ``inplace_backward=True`` writes that gradient over ``input`` (eager mode only; under ``torch.compile`` the
    gradient goes to a new tensor): the logits' memory is reused, and afterwards ``input`` holds the gradient,
    not the logits (autograd raises if anything saved them for its backward). Cases the kernels do not cover
    run ``F.cross_entropy`` itself: class ``weight``, probability targets, inputs with extra dims (N, C, d1, ...);
    ``z_loss`` / ``softcap`` with those raise."""
    op = "cross_entropy"
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    red, ls, zl, cap = _check_options(op, ignore_index, reduction, label_smoothing, z_loss, softcap)
    _checks.check_float_tensor("input", input, op)
    unsupported = weight is not None or input.dim() > 2 or (isinstance(target, torch.Tensor)
                                                            and target.is_floating_point())
    if unsupported:
        if zl > 0 or cap > 0:
            raise _checks.ArgumentValueError(f"{op}: z_loss and softcap need class-index targets, no class weight "
                                             f"and (N, C) or (C,) logits")
        return F.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    _checks.check_tensor_type("input", input, op)
    if input.dim() == 0:
        raise _checks.ArgumentValueError(f"{op}: input must be (N, C) or (C,) logits, got a scalar")
    logits = input if input.dim() == 2 else input[None]
    batch = tuple(input.shape[:1]) if input.dim() == 2 else ()
    if input.dim() == 2 and isinstance(target, torch.Tensor) and target.dim() == 1 and target.shape[0] != \
            input.shape[0]:
        raise ValueError(f"{op}: Expected input batch_size ({input.shape[0]}) to match target batch_size "
                         f"({target.shape[0]}).")
    t = _check_target(op, target, batch, logits.shape[1], ignore_index, input.device)
    use_triton = _backend.choose(input, op) == "triton"
    need = torch.is_grad_enabled() and input.requires_grad
    # In place only over an intermediate tensor (a model's logits), never over a caller's leaf.
    if inplace_backward and need and not input.is_leaf and not torch.compiler.is_compiling():
        loss = _CrossEntropyInplace.apply(logits, t, ignore_index, red, ls, zl, cap, use_triton)
    else:
        loss = cross_entropy_fwd(logits, t, ignore_index, red, ls, zl, cap, need, use_triton)[0]
    return loss.reshape(target.shape) if red == NONE else loss

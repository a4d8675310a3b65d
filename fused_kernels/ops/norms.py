"""LayerNorm, RMSNorm and fused residual-add (+ dropout) + LayerNorm.

One forward and one backward kernel serve all three ops through constexpr switches. A program owns
one row in the forward and a strip of rows in the backward, where it also accumulates its partial
dW/dB in float32 registers; the launcher sums those partials (deterministic, no atomics, no locks).
Rows that fit one block stay in registers; longer rows (up to any length) loop over blocks in the
forward, in three passes (mean, variance, normalize). In the backward a longer row is cut into column
chunks (``CHUNK_BWD``): a first kernel reduces each row's two gradient sums, then each
backward program owns a strip of rows of one chunk, exactly as for a short row (about 10 bytes moved per
element in 16-bit, where a row-by-row second pass rewrote the dW/dB partial rows every row: 30).

    _layer_norm_fwd_kernel / _layer_norm_bwd_kernel   (Triton)
    _layer_norm_bwd_sums_kernel                       (Triton: the row sums of the chunked backward)
    layer_norm_fwd / layer_norm_bwd                   (torch.library custom ops, registered autograd)
    _layer_norm_torch / _rms_norm_torch / _add_layer_norm_torch
                                                      (the PyTorch path: ``F.layer_norm`` / ``F.rms_norm`` in the
                                                       input's dtype, add + one ``F.layer_norm``)
    layer_norm / rms_norm / add_layer_norm            (public functions)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._core import backend as _backend
from .._core import checks as _checks
from .._core import grad as _grad
from .._core.launch import (
    ArchValue,
    acc_dtype,
    arch_family,
    device_arch,
    dtype_family,
    launch,
    next_pow2,
    num_persistent_programs,
    row_warps,
    torch_acc_dtype,
)

# Largest row (elements) kept in registers; longer rows take the multi-pass path. The backward's row loop is
# software-pipelined (the next row's loads land in shared memory while this row computes), which leaves the
# registers for 8192-element rows in every dtype but float64 with every feature on (python -m fused_kernels.aot,
# triton 3.9 and 3.6: no spills at 8192; float64 with every feature on spills 228+212 B at 4096 on sm_90a
# (3.9) and 8+12 B at 2048 on sm_80 (3.6), so 1024 there).
MAX_FUSED_FWD = 16384
MAX_FUSED_BWD = 8192
# Block of the multi-pass path (4096 spilled 12+12 B in the fp64 backward on sm_90a, triton 3.9).
MULTIPASS_BLOCK = 2048
# Column chunk of the backward for rows longer than MAX_FUSED_BWD (8192 with every feature spilled 16+20 B in
# bf16 and 56+56 B in fp32 on sm_90a, triton 3.9).
CHUNK_BWD = 4096


@triton.jit
def _keep_mask(seed, row, cols, N, dropout_p):
    # Same stream in forward and backward: the element's flat index is the Philox counter.
    return tl.rand(seed, (row * N + cols).to(tl.int32)) >= dropout_p


@triton.jit
def _prenorm_chunk(
    X, R, RES_OUT,               # (M, N) each
    row, cols, N,
    stride_xm, stride_xn, stride_rm, stride_rn, stride_om,
    dropout_p, seed,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_RES_OUT: tl.constexpr, ACC: tl.constexpr,
):
    """residual + dropout(x) for one block of a row, stored to RES_OUT when asked."""
    valid = cols < N
    x = tl.load(X + row * stride_xm + cols * stride_xn, mask=valid, other=0.0).to(ACC)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, row, cols, N, dropout_p)
        x = tl.where(keep, x / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_rm + cols * stride_rn, mask=valid, other=0.0).to(ACC)
    if STORE_RES_OUT:
        # Normalize the value as stored (rounded to its dtype), so the backward, which reloads it,
        # differentiates exactly the function the forward computed.
        x_stored = x.to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_om + cols, x_stored, mask=valid)
        x = x_stored.to(ACC)
    return x


@triton.jit
def _layer_norm_fwd_kernel(
    X,          # (M, N) input
    R,          # (M, N) residual (HAS_RESIDUAL)
    W, B,       # (N,) weight, bias
    Y,          # (M, N) output, contiguous
    RES_OUT,    # (M, N) residual + dropout(x), contiguous (STORE_RES_OUT)
    MEAN, RSTD,  # (M,) statistics for the backward (MEAN unused for RMSNorm)
    stride_xm, stride_xn, stride_rm, stride_rn, stride_ym, stride_om,
    N, eps, dropout_p, seed,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_RES_OUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS_NORM: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        x = _prenorm_chunk(X, R, RES_OUT, row, offs, N, stride_xm, stride_xn, stride_rm, stride_rn,
                           stride_om, dropout_p, seed, HAS_RESIDUAL, HAS_DROPOUT, STORE_RES_OUT, ACC)
        if IS_RMS_NORM:
            xc = x
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(offs < N, x - mean, 0.0)
            tl.store(MEAN + row, mean)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        y = xc * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + offs, mask=offs < N, other=0.0).to(ACC)
        if HAS_BIAS:
            y = y + tl.load(B + offs, mask=offs < N, other=0.0).to(ACC)
        tl.store(Y + row * stride_ym + offs, y.to(Y.dtype.element_ty), mask=offs < N)
    else:
        # Pass 1: the mean (and residual_out, stored for passes 2 and 3 to reread).
        acc = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            acc += _prenorm_chunk(X, R, RES_OUT, row, start + offs, N, stride_xm, stride_xn, stride_rm,
                                  stride_rn, stride_om, dropout_p, seed,
                                  HAS_RESIDUAL, HAS_DROPOUT, STORE_RES_OUT, ACC)
        mean = 0.0
        if not IS_RMS_NORM:
            mean = tl.sum(acc, axis=0) / N
            tl.store(MEAN + row, mean)
        # Pass 2: the variance around that mean (two passes stay accurate when |mean| >> std).
        acc = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            if STORE_RES_OUT:
                x = tl.load(RES_OUT + row * stride_om + cols, mask=cols < N, other=0.0).to(ACC)
            else:
                x = tl.load(X + row * stride_xm + cols * stride_xn, mask=cols < N, other=0.0).to(ACC)
            xc = tl.where(cols < N, x - mean, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        # Pass 3: normalize.
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            if STORE_RES_OUT:
                x = tl.load(RES_OUT + row * stride_om + cols, mask=cols < N, other=0.0).to(ACC)
            else:
                x = tl.load(X + row * stride_xm + cols * stride_xn, mask=cols < N, other=0.0).to(ACC)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(ACC)
            tl.store(Y + row * stride_ym + cols, y.to(Y.dtype.element_ty), mask=cols < N)


@triton.jit
def _grad_chunk(
    X, W, DY, MEAN_ROW, RSTD_ROW, row, cols, N, stride_xm, stride_xn, stride_dym, stride_dyn,
    HAS_WEIGHT: tl.constexpr, IS_RMS_NORM: tl.constexpr, ACC: tl.constexpr,
):
    """x_hat, dy and w * dy for one block of a row (zero beyond N)."""
    valid = cols < N
    x = tl.load(X + row * stride_xm + cols * stride_xn, mask=valid, other=0.0).to(ACC)
    xhat = tl.where(valid, (x - MEAN_ROW) * RSTD_ROW, 0.0)
    dy = tl.load(DY + row * stride_dym + cols * stride_dyn, mask=valid, other=0.0).to(ACC)
    wdy = dy
    if HAS_WEIGHT:
        wdy = dy * tl.load(W + cols, mask=valid, other=0.0).to(ACC)
    return xhat, dy, wdy


@triton.jit
def _input_grads(
    g, DRES_OUT, DX, DRES, row, cols, N, stride_drm, stride_drn, dropout_p, seed,
    HAS_DRES_OUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DRES: tl.constexpr, ACC: tl.constexpr,
):
    """Route the gradient of the pre-norm value to residual and x (through the dropout mask)."""
    valid = cols < N
    if HAS_DRES_OUT:
        g += tl.load(DRES_OUT + row * stride_drm + cols * stride_drn, mask=valid, other=0.0).to(ACC)
    if STORE_DRES:
        tl.store(DRES + row * N + cols, g.to(DRES.dtype.element_ty), mask=valid)
    if HAS_DROPOUT:
        g = tl.where(_keep_mask(seed, row, cols, N, dropout_p), g / (1.0 - dropout_p), 0.0)
    tl.store(DX + row * N + cols, g.to(DX.dtype.element_ty), mask=valid)


@triton.jit
def _layer_norm_bwd_sums_kernel(
    X, W, DY,       # (M, N), (N,), (M, N)
    MEAN, RSTD,     # (M,)
    SUMS,           # (2, M): sum(x_hat * w * dy) / N and sum(w * dy) / N of each row
    stride_xm, stride_xn, stride_dym, stride_dyn, M, N,
    HAS_WEIGHT: tl.constexpr, IS_RMS_NORM: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """The two row reductions of the LayerNorm gradient, for rows longer than one block."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mean = 0.0
    if not IS_RMS_NORM:
        mean = tl.load(MEAN + row).to(ACC)
    rstd = tl.load(RSTD + row).to(ACC)
    acc1 = tl.zeros([BLOCK_N], dtype=ACC)
    acc2 = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        xhat, dy, wdy = _grad_chunk(X, W, DY, mean, rstd, row, start + offs, N, stride_xm, stride_xn,
                                    stride_dym, stride_dyn, HAS_WEIGHT, IS_RMS_NORM, ACC)
        acc1 += xhat * wdy
        acc2 += wdy
    tl.store(SUMS + row, tl.sum(acc1, axis=0) / N)
    tl.store(SUMS + M + row, tl.sum(acc2, axis=0) / N)


@triton.jit
def _layer_norm_bwd_kernel(
    X,              # (M, N) the normalized value (residual_out if it was stored, else the input)
    W,              # (N,) weight (HAS_WEIGHT)
    DY,             # (M, N) gradient of the output
    DRES_OUT,       # (M, N) gradient of residual_out (HAS_DRES_OUT)
    DX,             # (M, N) gradient of x, contiguous
    DRES,           # (M, N) gradient of residual, contiguous (STORE_DRES; otherwise it equals DX)
    DW_PART, DB_PART,  # (programs along dim 0, N) float32 partial sums
    MEAN, RSTD,     # (M,)
    SUMS,           # (2, M) row sums from _layer_norm_bwd_sums_kernel (not ROW_SUMS)
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_drm, stride_drn,
    M, N, rows_per_program, dropout_p, seed,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRES_OUT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_DRES: tl.constexpr, IS_RMS_NORM: tl.constexpr,
    ROW_SUMS: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Program (p, c) owns rows [p * rows_per_program, ...) and columns [c * BLOCK_N, ...): the whole row
    when ROW_SUMS (it reduces the row's sums itself), else one column chunk of rows longer than a block."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    if not ROW_SUMS:
        cols += tl.program_id(1) * BLOCK_N
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    for row in tl.range(row_start, row_end, num_stages=2):
        mean = 0.0
        if not IS_RMS_NORM:
            mean = tl.load(MEAN + row).to(ACC)
        rstd = tl.load(RSTD + row).to(ACC)
        xhat, dy, wdy = _grad_chunk(X, W, DY, mean, rstd, row, cols, N, stride_xm, stride_xn,
                                    stride_dym, stride_dyn, HAS_WEIGHT, IS_RMS_NORM, ACC)
        if ROW_SUMS:
            c1 = tl.sum(xhat * wdy, axis=0) / N
            c2 = tl.sum(wdy, axis=0) / N
        else:
            c1 = tl.load(SUMS + row).to(ACC)
            c2 = tl.load(SUMS + M + row).to(ACC)
        if IS_RMS_NORM:
            g = (wdy - xhat * c1) * rstd
        else:
            g = (wdy - (xhat * c1 + c2)) * rstd
        _input_grads(g, DRES_OUT, DX, DRES, row, cols, N, stride_drm, stride_drn, dropout_p, seed,
                     HAS_DRES_OUT, HAS_DROPOUT, STORE_DRES, ACC)
        dw += dy * xhat
        db += dy
    part = pid.to(tl.int64) * N
    if HAS_WEIGHT:
        tl.store(DW_PART + part + cols, dw, mask=cols < N)
    if HAS_BIAS:
        tl.store(DB_PART + part + cols, db, mask=cols < N)


# Single-block limits an architecture family needs lower than the defaults (``python -m fused_kernels.aot --family
# layer_norm --quick --arch ...``, triton 3.9, every feature on): family -> {(dtype family, backward): limit}.
# sm_70 caps a 16-warp program at 128 registers: the 16-bit forward at 16,384 and backward at 8,192 spilled 8+8 B,
# the fp32 backward 52+52 B; sm_75's fp32 backward at 8,192 spilled 12+12 B; the fp32 backward's two pipelined
# rows at 8,192 need 131,156 B of shared memory, over the 101,376 B of sm_86 / sm_89 / sm_120. (sm_100a's fp64
# backward at 1,024 columns spilled 4+4 B with 4 warps, in 512-column chunks too: ``norm_warps`` gives it 8.)
_FAMILY_LIMITS: dict[str, dict[tuple[str, bool], int]] = {
    "sm_70": {("16bit", False): MAX_FUSED_FWD // 2, ("16bit", True): MAX_FUSED_BWD // 2,
              ("fp32", True): MAX_FUSED_BWD // 2},
    "sm_75": {("fp32", True): MAX_FUSED_BWD // 2},
    "sm_86": {("fp32", True): MAX_FUSED_BWD // 2},
    "sm_120": {("fp32", True): MAX_FUSED_BWD // 2},
}


def fused_limit(dtype: torch.dtype, backward: bool, arch: ArchValue = None) -> int:
    """Longest row the single-block path takes on ``arch`` (None: the interpreter, and the defaults): float64
    rows hold half as many elements in registers (an eighth in the backward, whose pipelined loads keep two rows
    in flight); ``_FAMILY_LIMITS`` lowers it where a family's registers or shared memory do not hold it."""
    family = arch_family(arch)
    own = _FAMILY_LIMITS.get(family.name, {}).get((dtype_family(dtype), backward)) if family is not None else None
    if own is not None:
        return own
    if backward:
        return MAX_FUSED_BWD // 8 if dtype == torch.float64 else MAX_FUSED_BWD
    return MAX_FUSED_FWD // 2 if dtype == torch.float64 else MAX_FUSED_FWD


def _block(n: int, limit: int) -> tuple[int, bool]:
    """(BLOCK_N, SINGLE_BLOCK) for rows of n elements under a single-block ``limit``."""
    if n <= limit:
        return next_pow2(n), True
    return MULTIPASS_BLOCK, False


def fwd_kernel_compiles(n: int, dtype: torch.dtype, dropout: bool, arch: ArchValue) -> bool:
    """Whether triton compiles the forward kernel for rows of ``n`` elements on ``arch``: not the multi-pass
    float64 form with dropout on CDNA (gfx90a, gfx942), where triton 3.9's AMD backend segfaults in LLVM's
    optimization of it (``make_llir``; without dropout, and on gfx1100, it compiles: ``python -m
    fused_kernels.aot --family layer_norm --arch gfx90a gfx942``). Such calls take the PyTorch path: a crash at
    compile time would take the user's process with it."""
    family = arch_family(arch)
    return not (dropout and dtype == torch.float64 and not _block(n, fused_limit(dtype, False, arch))[1]
                and family is not None and family.name in ("gfx90a", "gfx942"))


def bwd_block(n: int, dtype: torch.dtype, arch: ArchValue = None) -> tuple[int, bool]:
    """(BLOCK_N, ROW_SUMS) of the backward for rows of n elements on ``arch``: a longer row than one block is
    cut into chunks of at most ``CHUNK_BWD`` elements (a power of two)."""
    limit = fused_limit(dtype, backward=True, arch=arch)
    return (next_pow2(n), True) if n <= limit else (min(limit, CHUNK_BWD), False)


def norm_warps(block: int, dtype: torch.dtype, backward: bool) -> int:
    """Warps for a block of ``block`` columns of ``dtype``: ``row_warps`` except where its 16 warps made ptxas cap
    the registers at 64 and spill with every feature on: the backward at 4096 (4+4 B on sm_80 for a 16-bit column
    chunk, triton 3.9; 16+16 B on sm_90a for fp32 rows, triton 3.6) and the forward at 8192 (fp32, 8+8 B on
    sm_80, triton 3.6). The backward at 8192 keeps 16: 8 spilled 52+52 B (fp32, sm_90a, triton 3.9). The float64
    backward at 1024 (its single-block limit and its chunk) takes 8: with 4 its 8-byte elements spilled 4+4 B at
    128 registers on sm_100a with every feature on (triton 3.9); 8 are clean on every ``--arch all`` target."""
    if backward and dtype == torch.float64 and block == 1024:
        return 8
    return 8 if block == (4096 if backward else 8192) else row_warps(block)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


@torch.library.custom_op("fused_kernels::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, dropout_p: float, is_rms_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize the last dim of ``x`` (``(..., N)``; ``residual`` the same shape).

    Returns ``(out, residual_out, mean, rstd, seed)``; ``residual_out`` is empty when there is neither
    residual nor dropout (it would equal ``x``); ``mean``/``rstd`` are ``(M,)`` in the accumulation
    dtype; ``seed`` is the dropout seed as an int64 CPU tensor of one element."""
    n = x.shape[-1]
    m = math.prod(x.shape[:-1])  # not reshape(-1, n): with n == 0 the -1 would be ambiguous
    x2 = x.reshape(m, n)                                    # (M, N), a view unless strides forbid it
    acc = torch_acc_dtype(x.dtype)
    store_res = residual is not None or dropout_p > 0
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty((m, n), dtype=x.dtype, device=x.device) if store_res else _empty(x)
    # RMSNorm has no mean: zeros, so that no output of the op is uninitialized memory (torch.compile and
    # opcheck compare every output).
    mean = (torch.zeros if is_rms_norm else torch.empty)(m, dtype=acc, device=x.device)
    rstd = torch.empty(m, dtype=acc, device=x.device)
    seed = _checks.dropout_seed() if dropout_p > 0 else 0
    if m > 0 and n > 0:
        r2 = x2 if residual is None else residual.reshape(m, n)
        block, single = _block(n, fused_limit(x.dtype, backward=False, arch=device_arch(x.device)))
        launch(_layer_norm_fwd_kernel, (m,),
               x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
               out, res_out if store_res else out, mean, rstd,
               x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1), out.stride(0), n,
               n, eps, dropout_p, seed,
               HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0, STORE_RES_OUT=store_res,
               HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, IS_RMS_NORM=is_rms_norm,
               SINGLE_BLOCK=single, BLOCK_N=block, ACC=acc_dtype(x.dtype),
               num_warps=norm_warps(block, x.dtype, backward=False),
           )
    res_out = res_out.view(x.shape) if store_res else res_out
    return out.view(x.shape), res_out, mean, rstd, torch.tensor([seed], dtype=torch.int64)


@layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, is_rms_norm):
    m = math.prod(x.shape[:-1])
    acc = torch_acc_dtype(x.dtype)
    store_res = residual is not None or dropout_p > 0
    return (x.new_empty(x.shape), x.new_empty(x.shape) if store_res else _empty(x),
            x.new_empty(m, dtype=acc), x.new_empty(m, dtype=acc), torch.empty(1, dtype=torch.int64))


@torch.library.custom_op("fused_kernels::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: torch.Tensor, dres_out: torch.Tensor | None, prenorm: torch.Tensor, weight: torch.Tensor | None,
    has_bias: bool, mean: torch.Tensor, rstd: torch.Tensor, seed: torch.Tensor, dropout_p: float,
    is_rms_norm: bool, has_residual: bool, bias_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dresidual, dweight, dbias)`` of ``layer_norm_fwd``; ``dresidual`` is empty
    unless there is dropout and a residual (otherwise it equals ``dx``); absent parameters give empty
    tensors."""
    n = prenorm.shape[-1]
    m = math.prod(prenorm.shape[:-1])
    x2 = prenorm.reshape(m, n)                              # (M, N)
    dy2 = dy.reshape(m, n)                                  # (M, N), any strides
    store_dres = has_residual and dropout_p > 0
    dx = torch.empty((m, n), dtype=prenorm.dtype, device=prenorm.device)
    dres = torch.empty_like(dx) if store_dres else _empty(dx)
    block, row_sums = bwd_block(n, prenorm.dtype, device_arch(prenorm.device))
    chunks = 1 if row_sums else triton.cdiv(n, block)
    # The persistent programs share out the chunks: each writes one partial row of every chunk it owns.
    programs = max(1, num_persistent_programs(prenorm.device, m) // chunks)
    part_dtype = torch_acc_dtype(prenorm.dtype)
    # Each program writes its partial row of each chunk once (zeros where it got no rows); no rows, no launch.
    alloc = torch.empty if m > 0 else torch.zeros
    dw_part = alloc((programs, n), dtype=part_dtype, device=prenorm.device) if weight is not None else None
    db_part = alloc((programs, n), dtype=part_dtype, device=prenorm.device) if has_bias else None
    if m > 0 and n > 0:
        dr2 = dy2 if dres_out is None else dres_out.reshape(m, n)
        acc = acc_dtype(prenorm.dtype)
        w = weight if weight is not None else x2
        sums = rstd
        if not row_sums:
            sums = torch.empty((2, m), dtype=part_dtype, device=prenorm.device)
            launch(_layer_norm_bwd_sums_kernel, (m,), x2, w, dy2, mean, rstd, sums,
                   x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1), m, n,
                   HAS_WEIGHT=weight is not None, IS_RMS_NORM=is_rms_norm, BLOCK_N=MULTIPASS_BLOCK, ACC=acc,
                   num_warps=row_warps(MULTIPASS_BLOCK))
        launch(_layer_norm_bwd_kernel, (programs, chunks),
               x2, w, dy2, dr2, dx, dres if store_dres else dx,
               dw_part if dw_part is not None else dx, db_part if db_part is not None else dx, mean, rstd, sums,
               x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1), dr2.stride(0), dr2.stride(1),
               m, n, triton.cdiv(m, programs), dropout_p, int(seed[0]),
               HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, HAS_DRES_OUT=dres_out is not None,
               HAS_DROPOUT=dropout_p > 0, STORE_DRES=store_dres, IS_RMS_NORM=is_rms_norm,
               ROW_SUMS=row_sums, BLOCK_N=block, ACC=acc, num_warps=norm_warps(block, prenorm.dtype, backward=True),
           )
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else _empty(dx)
    db = db_part.sum(0).to(bias_dtype) if has_bias else _empty(dx)
    return dx.view(prenorm.shape), dres.view(prenorm.shape) if store_dres else dres, dw, db


@layer_norm_bwd.register_fake
def _(dy, dres_out, prenorm, weight, has_bias, mean, rstd, seed, dropout_p, is_rms_norm, has_residual,
      bias_dtype):
    n = prenorm.shape[-1]
    dres = prenorm.new_empty(prenorm.shape) if has_residual and dropout_p > 0 else _empty(prenorm)
    dw = prenorm.new_empty(n, dtype=weight.dtype) if weight is not None else _empty(prenorm)
    db = prenorm.new_empty(n, dtype=bias_dtype) if has_bias else _empty(prenorm)
    return prenorm.new_empty(prenorm.shape), dres, dw, db


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, eps, dropout_p, is_rms_norm = inputs
    _, res_out, mean, rstd, seed = output
    prenorm = res_out if (residual is not None or dropout_p > 0) else x
    ctx.save_for_backward(prenorm, weight, mean, rstd, seed)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zeros to read
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.dropout_p, ctx.is_rms_norm, ctx.eps = dropout_p, is_rms_norm, eps


def _backward(ctx, dy, dres_out, _dmean, _drstd, _dseed):
    prenorm, weight, mean, rstd, seed = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    if dres_out is not None and dres_out.numel() != prenorm.numel():  # residual_out was x itself
        dres_out = None
    if _grad.create_graph():
        return _backward_graph(ctx, dy, dres_out, prenorm, weight, mean, rstd, seed)
    if dy is None:
        dy = torch.zeros_like(prenorm)
    dx, dres, dw, db = layer_norm_bwd(
        dy, dres_out, prenorm, weight, has_bias, mean, rstd, seed, ctx.dropout_p, ctx.is_rms_norm,
        ctx.has_residual, ctx.bias_dtype or prenorm.dtype)
    dres = (dres if ctx.dropout_p > 0 else dx) if ctx.has_residual else None
    return dx, dres, dw if weight is not None else None, db if has_bias else None, None, None, None


def _backward_graph(ctx, dy, dres_out, prenorm, weight, mean, rstd, seed):
    """The backward as differentiable PyTorch ops (double backward): the norm's formula re-run on the saved
    pre-norm tensor (``residual + dropout(x)``, an output of the op, or ``x``), differentiated with a graph.
    The dropout scale ``mask / (1 - p)`` is regenerated by the kernel from the saved seed (a constant)."""
    has_bias = ctx.bias_dtype is not None
    need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
    dpre = dw = None
    if dy is not None:
        need_pre = prenorm.requires_grad and (need_x or need_res)
        dpre, dw = _grad.norm_backward(prenorm, weight, dy, ctx.eps, ctx.is_rms_norm, need_pre, need_w)
    total = dpre if dres_out is None else (dres_out if dpre is None else dpre + dres_out)
    if total is None:
        total = torch.zeros_like(prenorm)
    dx = total
    if ctx.dropout_p > 0 and need_x:
        with torch.no_grad():   # dres_out = 1, dy = 0 gives dx = mask / (1 - p) exactly
            keep_scale = layer_norm_bwd(
                torch.zeros_like(prenorm), torch.ones_like(prenorm), prenorm.detach(),
                None if weight is None else weight.detach(), has_bias, mean, rstd, seed, ctx.dropout_p,
                ctx.is_rms_norm, ctx.has_residual, ctx.bias_dtype or prenorm.dtype)[0]
        dx = total * keep_scale
    db = None
    if has_bias and need_b and dy is not None:
        ct = torch.float64 if prenorm.dtype == torch.float64 else torch.float32
        db = dy.reshape(-1, prenorm.shape[-1]).to(ct).sum(0).to(ctx.bias_dtype)
    if dw is None and need_w and weight is not None:
        dw = torch.zeros_like(weight)
    return (dx if need_x else None, total if ctx.has_residual and need_res else None, dw, db, None, None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- PyTorch path


def _layer_norm_torch(input: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def _rms_norm_torch(input: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None,
                    eps: float | None) -> torch.Tensor:
    if eps is None:  # torch's default is the input dtype's epsilon; ours the computation dtype's
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    return F.rms_norm(input, normalized_shape, weight, eps)


def _add_layer_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, eps: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = F.dropout(x, dropout_p) if dropout_p > 0 else x
    if residual is not None:
        residual_out = residual + residual_out
    if residual_out is not x:  # a fresh contiguous tensor, as the kernel writes it (whatever the inputs' strides)
        residual_out = residual_out.contiguous()
    return F.layer_norm(residual_out, (x.shape[-1],), weight, bias, eps), residual_out


# ----------------------------------------------------------------------------- public functions


def _check_normalized(op: str, input: torch.Tensor, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _checks.ArgumentValueError(f"{op}: normalized_shape must be a non-empty sequence of ints >= 0, "
                                         f"got {normalized_shape!r}")
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise _checks.ArgumentValueError(f"{op}: input of shape {tuple(input.shape)} does not end with "
                                         f"normalized_shape {shape}")
    return shape


def _flat_param(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


def layer_norm(input: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.layer_norm``: normalize over the trailing ``normalized_shape`` dims,
    statistics in float32 (float64 for float64 input). ``weight``/``bias`` may be float32 with a
    half-precision input."""
    op = "layer_norm"
    _checks.check_float_tensor("input", input, op)
    shape = _check_normalized(op, input, normalized_shape)
    _checks.check_like("weight", weight, input, op, shape=shape, dtypes=_checks.param_dtypes(input))
    _checks.check_like("bias", bias, input, op, shape=shape, dtypes=_checks.param_dtypes(input))
    if _backend.choose(input, op) == "torch":
        return _layer_norm_torch(input, shape, weight, bias, eps)
    x = input.reshape(*input.shape[: input.dim() - len(shape)], math.prod(shape))
    out = layer_norm_fwd(x, None, _flat_param(weight), _flat_param(bias), float(eps), 0.0, False)[0]
    return out.view(input.shape)


def rms_norm(input: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """``torch.nn.functional.rms_norm``: ``x / sqrt(mean(x^2) + eps) * weight`` over the trailing
    ``normalized_shape`` dims; ``eps=None`` means torch's default, the machine epsilon of the computation
    dtype: ``torch.finfo(torch.float32).eps`` for float16/bfloat16/float32 inputs, float64's for float64."""
    op = "rms_norm"
    _checks.check_float_tensor("input", input, op)
    shape = _check_normalized(op, input, normalized_shape)
    _checks.check_like("weight", weight, input, op, shape=shape, dtypes=_checks.param_dtypes(input))
    if _backend.choose(input, op) == "torch":
        return _rms_norm_torch(input, shape, weight, eps)
    eps = torch.finfo(torch_acc_dtype(input.dtype)).eps if eps is None else eps
    x = input.reshape(*input.shape[: input.dim() - len(shape)], math.prod(shape))
    out = layer_norm_fwd(x, None, _flat_param(weight), None, float(eps), 0.0, True)[0]
    return out.view(input.shape)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``residual_out = residual + dropout(x)``, ``out = layer_norm(residual_out)`` over the last
    dim; returns ``(out, residual_out)``. One kernel pass forward, one backward.

    ``residual`` may be None (then ``residual_out = dropout(x)``). Dropout is inverted (kept values
    scaled by ``1 / (1 - dropout_p)``), always applied when ``dropout_p > 0``, drawn in the kernel
    from a seed taken from torch's default generator (``torch.manual_seed`` reproduces it); the
    backward regenerates the mask instead of storing it.

    Post-LN block: ``h, _ = add_layer_norm(sublayer(h), h)``. Pre-LN block, with the add of one
    sublayer fused into the norm of the next: ``normed, res = add_layer_norm(sublayer_out, res)``."""
    op = "add_layer_norm"
    _checks.check_float_tensor("x", x, op)
    if x.dim() < 1:
        raise _checks.ArgumentValueError(f"{op}: x must have at least one dimension, got a scalar")
    _checks.check_like("residual", residual, x, op)
    n = x.shape[-1]
    _checks.check_like("weight", weight, x, op, shape=(n,), dtypes=_checks.param_dtypes(x))
    _checks.check_like("bias", bias, x, op, shape=(n,), dtypes=_checks.param_dtypes(x))
    dropout_p = _checks.check_probability("dropout_p", dropout_p, op)
    if _backend.choose(x, op) == "torch" or not fwd_kernel_compiles(n, x.dtype, dropout_p > 0, device_arch(x.device)):
        return _add_layer_norm_torch(x, residual, weight, bias, eps, dropout_p)
    out, res_out, *_ = layer_norm_fwd(x, residual, weight, bias, float(eps), dropout_p, False)
    return out, (res_out if residual is not None or dropout_p > 0 else x)

"""Softmax with masking: ``softmax(scale * x + mask)`` along any dim, bool/float/causal masks.

Rows run along ``dim``; every other dim is a "leading" dim, collapsed to at most three whose strides
the kernel takes for each tensor, so a mask broadcast against the input (stride 0) is read in place,
never expanded in memory. Rows that fit a block stay in registers; longer rows take an online-softmax
path (one pass for the running max and sum, one to write). Fully masked rows give 0, not NaN.

    _softmax_fwd_kernel / _softmax_bwd_kernel   (Triton)
    softmax_fwd / softmax_bwd                   (torch.library custom ops, registered autograd)
    _softmax_torch                              (the PyTorch path: ``torch.softmax`` of one temporary
                                                 ``scale * x + mask``; rows with nothing left found from a
                                                 NaN first entry of the output instead of a separate pass)
    softmax                                     (public function)
"""

from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl

from .._core import backend as _backend
from .._core import checks as _checks
from .._core import grad as _grad
from .._core.launch import acc_dtype, launch, next_pow2, row_warps
from ..reference import causal_mask

NEG_INF = float("-inf")
MAX_FUSED = 16384     # longest row (elements) kept in registers
MULTIPASS_BLOCK = 4096

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


@triton.jit
def _row_offset(row, D1, D2, s0, s1, s2):
    """Offset of row ``row`` of a (D0, D1, D2) grid of rows with strides (s0, s1, s2)."""
    i2 = row % D2
    i1 = (row // D2) % D1
    i0 = row // (D1 * D2)
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def _scores(
    X, MASK, x_off, m_off, cols, N, stride_xn, stride_mn, scale, q_idx,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, ACC: tl.constexpr,
):
    """scale * x + mask for one block of a row; masked and out-of-range entries are -inf."""
    valid = cols < N
    z = tl.load(X + x_off + cols * stride_xn, mask=valid, other=0.0).to(ACC) * scale
    if MASK_KIND == 1:
        keep = tl.load(MASK + m_off + cols * stride_mn, mask=valid, other=0)
        valid = valid & (keep != 0)
    if MASK_KIND == 2:
        z += tl.load(MASK + m_off + cols * stride_mn, mask=valid, other=0.0).to(ACC)
    if IS_CAUSAL:
        valid = valid & (cols <= q_idx)
    return tl.where(valid, z, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(
    X,          # (D0, D1, D2, N) input, any strides
    MASK,       # (D0, D1, D2, N) bool (as uint8) or float mask, broadcast strides (MASK_KIND != 0)
    Y,          # (D0, D1, D2, N) output
    D1, D2, N,
    stride_x0, stride_x1, stride_x2, stride_xn,
    stride_m0, stride_m1, stride_m2, stride_mn,
    stride_y0, stride_y1, stride_y2, stride_yn,
    scale, causal_len,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_off = _row_offset(row, D1, D2, stride_x0, stride_x1, stride_x2)
    m_off = _row_offset(row, D1, D2, stride_m0, stride_m1, stride_m2)
    y_off = _row_offset(row, D1, D2, stride_y0, stride_y1, stride_y2)
    # With is_causal the rows' innermost leading dim is the query dim (the input's dim -2).
    q_idx = row % causal_len
    offs = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        z = _scores(X, MASK, x_off, m_off, offs, N, stride_xn, stride_mn, scale, q_idx,
                    MASK_KIND, IS_CAUSAL, ACC)
        zmax = tl.max(z, axis=0)
        zmax = tl.where(zmax == float("-inf"), 0.0, zmax)
        e = tl.exp(z - zmax)
        total = tl.sum(e, axis=0)
        y = e / tl.where(total == 0.0, 1.0, total)  # a fully masked row has e == 0: y = 0
        tl.store(Y + y_off + offs * stride_yn, y.to(Y.dtype.element_ty), mask=offs < N)
    else:
        # Pass 1: per-lane running max and rescaled running sum (online softmax).
        m_i = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
        s_i = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            z = _scores(X, MASK, x_off, m_off, start + offs, N, stride_xn, stride_mn, scale, q_idx,
                        MASK_KIND, IS_CAUSAL, ACC)
            m_new = tl.maximum(m_i, z)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_i = s_i * tl.exp(m_i - m_safe) + tl.exp(z - m_safe)
            m_i = m_new
        zmax = tl.max(m_i, axis=0)
        zmax = tl.where(zmax == float("-inf"), 0.0, zmax)
        total = tl.sum(s_i * tl.exp(m_i - zmax), axis=0)
        # Pass 2: normalize.
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            z = _scores(X, MASK, x_off, m_off, cols, N, stride_xn, stride_mn, scale, q_idx,
                        MASK_KIND, IS_CAUSAL, ACC)
            y = tl.exp(z - zmax) / tl.where(total == 0.0, 1.0, total)
            tl.store(Y + y_off + cols * stride_yn, y.to(Y.dtype.element_ty), mask=cols < N)


@triton.jit
def _softmax_bwd_kernel(
    Y,          # (D0, D1, D2, N) forward output
    DY,         # (D0, D1, D2, N) its gradient, any strides
    DX,         # (D0, D1, D2, N) input gradient
    D1, D2, N,
    stride_y0, stride_y1, stride_y2, stride_yn,
    stride_dy0, stride_dy1, stride_dy2, stride_dyn,
    stride_dx0, stride_dx1, stride_dx2, stride_dxn,
    scale,
    SINGLE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    # dx = scale * y * (dy - sum(y * dy)): masked entries have y = 0, so they get no gradient.
    row = tl.program_id(0).to(tl.int64)
    y_off = _row_offset(row, D1, D2, stride_y0, stride_y1, stride_y2)
    dy_off = _row_offset(row, D1, D2, stride_dy0, stride_dy1, stride_dy2)
    dx_off = _row_offset(row, D1, D2, stride_dx0, stride_dx1, stride_dx2)
    offs = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        valid = offs < N
        y = tl.load(Y + y_off + offs * stride_yn, mask=valid, other=0.0).to(ACC)
        dy = tl.load(DY + dy_off + offs * stride_dyn, mask=valid, other=0.0).to(ACC)
        dot = tl.sum(y * dy, axis=0)
        dx = scale * y * (dy - dot)
        tl.store(DX + dx_off + offs * stride_dxn, dx.to(DX.dtype.element_ty), mask=valid)
    else:
        acc = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            y = tl.load(Y + y_off + cols * stride_yn, mask=cols < N, other=0.0).to(ACC)
            dy = tl.load(DY + dy_off + cols * stride_dyn, mask=cols < N, other=0.0).to(ACC)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            y = tl.load(Y + y_off + cols * stride_yn, mask=cols < N, other=0.0).to(ACC)
            dy = tl.load(DY + dy_off + cols * stride_dyn, mask=cols < N, other=0.0).to(ACC)
            dx = scale * y * (dy - dot)
            tl.store(DX + dx_off + cols * stride_dxn, dx.to(DX.dtype.element_ty), mask=cols < N)


def collapse_rows(shape: tuple[int, ...], *strides: tuple[int, ...]) -> tuple[list[int], list[list[int]]] | None:
    """Merge the leading dims of ``shape`` that every tensor (given by its strides) lays out
    contiguously, and drop size-1 dims; returns sizes and per-tensor strides padded to three dims,
    or None when more than three dims remain."""
    dims = [(size, [s[i] for s in strides]) for i, size in enumerate(shape) if size != 1]
    merged: list[tuple[int, list[int]]] = []
    for size, st in dims:
        if merged and all(prev == cur * size for prev, cur in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    if len(merged) > 3:
        return None
    merged = [(1, [0] * len(strides))] * (3 - len(merged)) + merged
    return [size for size, _ in merged], [[st[k] for _, st in merged] for k in range(len(strides))]


def launch_rows(kernel, tensors: list[torch.Tensor], n: int, args: tuple, dtype: torch.dtype, **meta) -> None:
    """Launch ``kernel`` over every row of ``tensors`` (each ``(..., N)``, last dim the row)."""
    lead = tuple(tensors[0].shape[:-1])
    rows = 1
    for size in lead:
        rows *= size
    if rows == 0 or n == 0:
        return
    collapsed = collapse_rows(lead, *[tuple(t.stride()[:-1]) for t in tensors])
    if collapsed is None:
        # More than three leading dims that the tensors do not lay out alike (5-D and up): run on
        # contiguous copies, which collapse to one leading dim, and copy the result back.
        out = tensors[-1]
        dense = [t.contiguous() for t in tensors[:-1]] + [torch.empty(out.shape, dtype=out.dtype, device=out.device)]
        launch_rows(kernel, dense, n, args, dtype, **meta)
        out.copy_(dense[-1])
        return
    sizes, strides = collapsed
    block = next_pow2(n) if n <= (MAX_FUSED // 2 if dtype == torch.float64 else MAX_FUSED) else MULTIPASS_BLOCK
    flat_strides = [v for t, st in zip(tensors, strides) for v in (*st, t.stride(-1))]
    launch(kernel, (rows,), *tensors, sizes[1], sizes[2], n, *flat_strides, *args,
           SINGLE_BLOCK=block >= n, BLOCK_N=block, ACC=acc_dtype(dtype),
           num_warps=row_warps(block), **meta)


@torch.library.custom_op("fused_kernels::softmax_fwd", mutates_args=())
def softmax_fwd(x: torch.Tensor, mask: torch.Tensor | None, dim: int, scale: float,
                is_causal: bool) -> torch.Tensor:
    """softmax(scale * x + mask) along ``dim``; ``mask`` broadcastable to ``x``, bool or float."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, whatever x's strides
    xs, ys = x.movedim(dim, -1), y.movedim(dim, -1)
    if mask is None:
        kind, ms = MASK_NONE, xs
    else:
        ms = mask.expand(x.shape).movedim(dim, -1)            # a view: stride 0 where broadcast
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
        ms = ms.view(torch.uint8) if kind == MASK_BOOL else ms
    causal_len = x.shape[-2] if is_causal else 1
    launch_rows(_softmax_fwd_kernel, [xs, ms, ys], xs.shape[-1], (scale, causal_len), x.dtype,
                 MASK_KIND=kind, IS_CAUSAL=is_causal)
    return y


@softmax_fwd.register_fake
def _(x, mask, dim, scale, is_causal):
    return x.new_empty(x.shape)


@torch.library.custom_op("fused_kernels::softmax_bwd", mutates_args=())
def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    tensors = [y.movedim(dim, -1), dy.movedim(dim, -1), dx.movedim(dim, -1)]
    launch_rows(_softmax_bwd_kernel, tensors, y.shape[dim], (scale,), y.dtype)
    return dx


@softmax_bwd.register_fake
def _(y, dy, dim, scale):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output) -> None:
    _, mask, dim, scale, _ = inputs
    ctx.save_for_backward(output)
    ctx.set_materialize_grads(False)
    ctx.dim, ctx.scale = dim, scale
    ctx.mask_shape = None if mask is None else tuple(mask.shape)
    ctx.mask_dtype = None if mask is None else mask.dtype


def _backward(ctx, dy):
    """dx = scale * dz and dmask = dz summed to the mask's shape, with dz the gradient of the softmax input;
    differentiable PyTorch ops when a graph of the backward is built (double backward)."""
    (y,) = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None
    need_x, need_mask = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if _grad.create_graph():
        dz = _grad.softmax_input_grad(y, dy, ctx.dim)
        dx = dz * ctx.scale if need_x else None
    elif need_mask:
        dz = softmax_bwd(y, dy, ctx.dim, 1.0)
        dx = dz * ctx.scale if need_x else None
    else:
        return softmax_bwd(y, dy, ctx.dim, ctx.scale), None, None, None, None
    dmask = _grad.sum_to(dz, ctx.mask_shape, ctx.mask_dtype) if need_mask else None
    return dx, dmask, None, None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- PyTorch path


def _zero_dead_rows(y: torch.Tensor, z: torch.Tensor, dim: int) -> torch.Tensor:
    """Set the rows of ``y = softmax(z)`` whose every entry of ``z`` is -inf to 0 (torch gives NaN).

    torch's softmax makes a whole row NaN or none of it, so only rows whose first entry is NaN are
    looked at (their entries of ``z`` decide between "nothing left" and a NaN input); in eager mode
    this costs one strided read of a column instead of a pass over ``z``."""
    if y.numel() == 0:
        return y
    if torch.compiler.is_compiling():  # no data-dependent branch in a graph: one fused reduction
        return y.masked_fill((z == NEG_INF).all(dim, keepdim=True), 0.0)
    nan_rows = y.select(dim, 0).isnan()
    if not bool(nan_rows.any()):
        return y
    index = nan_rows.nonzero(as_tuple=True)
    dead = (z.movedim(dim, -1)[index] == NEG_INF).all(-1)
    y.movedim(dim, -1)[tuple(i[dead] for i in index)] = 0.0
    return y


class _SoftmaxTorch(torch.autograd.Function):
    """softmax(scale * x + mask) along ``dim``: saves only the output; the backward is torch's softmax
    backward times ``scale``, which is 0 wherever the output is 0 (masked entries, dead rows). A float mask
    that requires grad gets the softmax-input gradient summed to its shape; when a graph of the backward is
    built (double backward) the backward is made of differentiable ops."""

    @staticmethod
    def forward(ctx, x, mask, dim, scale, is_causal):
        keep = causal_mask(x.shape[-2], x.shape[-1], x.device) if is_causal else None
        if mask is not None and mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        float_mask = mask if mask is not None and mask.dtype != torch.bool else None
        if scale == 1.0 and float_mask is None:
            z = x if keep is None else torch.where(keep, x, NEG_INF)
        else:  # one temporary, contiguous whatever x's strides, updated in place
            z = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            torch.mul(x, scale, out=z) if scale != 1.0 else z.copy_(x)
            if float_mask is not None:
                z.add_(float_mask)
            if keep is not None:
                z.masked_fill_(~keep, NEG_INF)
        y = _zero_dead_rows(torch.softmax(z, dim), z, dim)
        ctx.save_for_backward(y)
        ctx.dim, ctx.scale = dim, scale
        ctx.mask_shape = None if mask is None else tuple(mask.shape)
        ctx.mask_dtype = None if mask is None else mask.dtype
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None, None
        (y,) = ctx.saved_tensors
        need_x, need_mask = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if _grad.create_graph():
            dz = _grad.softmax_input_grad(y, dy, ctx.dim)
            dx = dz * ctx.scale if need_x else None
        else:
            dz = torch._softmax_backward_data(dy, y, ctx.dim, y.dtype)
            if not need_mask:
                if ctx.scale != 1.0:
                    dz.mul_(ctx.scale)     # a fresh tensor: no second full-size one
                return dz, None, None, None, None
            dx = dz * ctx.scale if need_x else None
        dmask = _grad.sum_to(dz, ctx.mask_shape, ctx.mask_dtype) if need_mask else None
        return dx, dmask, None, None, None


def _softmax_torch(input: torch.Tensor, dim: int, mask: torch.Tensor | None, scale: float,
                   is_causal: bool) -> torch.Tensor:
    """``fused_kernels.softmax`` (validated arguments, ``dim`` normalized, ``input`` at least 1-D)."""
    if mask is None and not is_causal and scale == 1.0 and input.numel() and not torch.compiler.is_compiling():
        # Nothing to apply: torch's softmax with its own autograd (the least work per call), unless a row
        # came out NaN (a whole row does): then it may be a row of -inf, which must give 0 and gradient 0.
        y = torch.softmax(input, dim)
        if not math.isnan(y.detach().select(dim, 0).sum()):   # one read per row; a NaN makes the sum NaN
            return y
    return _SoftmaxTorch.apply(input, mask, dim, float(scale), is_causal)


# ----------------------------------------------------------------------------- public function


def _check_mask(op: str, mask: torch.Tensor | None, input: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    _checks.check_tensor_type("mask", mask, op)
    if mask.dtype != torch.bool and mask.dtype not in _checks.FLOAT_DTYPES:
        raise _checks.ArgumentTypeError(f"{op}: mask must be bool (True = keep) or a float additive mask, got "
                                        f"{mask.dtype}")
    if mask.device != input.device:
        raise _checks.ArgumentValueError(f"{op}: mask is on {mask.device} but input is on {input.device}")
    if not _checks.broadcasts_to(mask.shape, input.shape):
        raise _checks.ArgumentValueError(f"{op}: mask of shape {tuple(mask.shape)} does not broadcast to the input "
                                         f"shape {tuple(input.shape)}")


def _legacy_softmax_dim(ndim: int) -> int:
    """torch's implicit dim for ``dim=None`` (deprecated there): 0 for 0-, 1- and 3-D inputs, else 1."""
    return 0 if ndim in (0, 1, 3) else 1


def softmax(input: torch.Tensor, dim: int | None = -1, _stacklevel: int = 3, dtype: torch.dtype | None = None, *,
            mask: torch.Tensor | None = None, scale: float = 1.0, is_causal: bool = False) -> torch.Tensor:
    """Softmax of ``scale * input`` along ``dim``, with masking.

    The positional arguments are ``torch.nn.functional.softmax``'s ``(input, dim, _stacklevel, dtype)``:
    ``dtype`` casts the input before the softmax (the output has that dtype; ``torch.softmax``'s third
    positional ``dtype`` is accepted there too), ``_stacklevel`` only places torch's warning for
    ``dim=None`` (torch's legacy implicit dim: 0 for 0-, 1- and 3-D inputs, else 1). Our default ``dim`` is -1.
    The extra arguments are keyword-only:
    ``mask``: bool (True = keep) or float (added to the scaled input), broadcastable to ``input``; a float
    mask may require grad (it gets the gradient of the softmax input, summed over its broadcast dims).
    ``is_causal``: mask the upper triangle of the last two dims (key j > query i, top-left aligned as
    in ``scaled_dot_product_attention``); needs ``dim`` to be the last dim. Masked entries get 0; a row
    with every entry masked (or -inf) gives 0 and a zero gradient, never NaN. NaN inputs propagate."""
    op = "softmax"
    if isinstance(_stacklevel, torch.dtype) and dtype is None:   # torch.softmax(input, dim, dtype)
        _stacklevel, dtype = 3, _stacklevel
    elif isinstance(_stacklevel, torch.Tensor):
        raise TypeError(f"{op}: the third positional argument is torch's _stacklevel (an int); pass the mask as "
                        f"mask=... (mask, scale and is_causal are keyword-only)")
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{op}: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        if dtype not in _checks.FLOAT_DTYPES:
            raise _checks.DtypeNotImplementedError(f"{op}: dtype must be float16, bfloat16, float32 or float64, got "
                                                   f"{dtype}")
        if isinstance(input, torch.Tensor) and input.dtype != dtype:
            input = input.to(dtype)
    _checks.check_float_tensor("input", input, op)
    if dim is None:
        warnings.warn("Implicit dimension choice for softmax has been deprecated. Change the call to include "
                      "dim=X as an argument.", stacklevel=_stacklevel if isinstance(_stacklevel, int) else 3)
        dim = _legacy_softmax_dim(input.dim())
    dim = _checks.normalize_dim(dim, input.dim(), op)
    _check_mask(op, mask, input)
    if is_causal and (input.dim() < 2 or dim != input.dim() - 1):
        raise _checks.ArgumentValueError(f"{op}: is_causal needs an input of at least 2 dims softmaxed along its "
                                         f"last dim, got shape {tuple(input.shape)} and dim={dim}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{op}: scale must be a float, got {type(scale).__name__}")
    if input.dim() == 0:
        input_1d = input.reshape(1)
        return softmax(input_1d, 0, mask=None if mask is None else mask.reshape(1), scale=scale).reshape(())
    if _backend.choose(input, op) == "torch":
        return _softmax_torch(input, dim, mask, float(scale), bool(is_causal))
    return softmax_fwd(input, mask, dim, float(scale), bool(is_causal))

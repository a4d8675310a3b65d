"""Rotary position embeddings (RoPE): transformers' ``apply_rotary_pos_emb`` in one kernel for q and k, and the
cos / sin tables with transformers' scalings.

With R = cos.shape[-1] rotary dims (R < head dim: partial rotary, the rest passes through, as Phi / GPT-NeoX):

- rotate-half (Llama, the default): ``out = x * cos + rotate_half(x) * sin`` on the first R dims, with
  ``rotate_half(x) = cat(-x[R/2:R], x[:R/2])``;
- ``interleaved=True`` (GPT-J / Meta): pairs (2i, 2i+1) rotate: ``out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i]``,
  ``out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]``.

Every entry of cos / sin is used as given (no assumption that the two halves repeat), so the result is that of the
formula for any tables. The backward is the same map with sin's halves (pairs) swapped and negated: it needs
only cos and sin, never q or k, so q and k may be changed in place after the forward.

    _rope_kernel            (Triton) one program per position: cos / sin read once, then every head of q and of
                            k (GQA: fewer k heads) rotated, the pass-through dims copied in chunks sized for
                            them; forward and backward (BACKWARD) alike
    rope_fwd / rope_bwd     (torch.library custom ops, registered autograd)
    _RopeTorch              (the PyTorch path: the formula on half-rows with ``out=`` and ``addcmul_``, no
                            ``rotate_half`` temporaries)
    apply_rotary_pos_emb / apply_rotary    (public functions)
    rope_frequencies / rope_cos_sin        (the tables: default, linear, dynamic NTK, YaRN, Llama 3 scaling)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from .._core import backend as _backend
from .._core import checks as _checks
from .._core import grad as _grad
from .._core.launch import acc_dtype, launch, next_pow2

# ----------------------------------------------------------------------------- Triton kernel


@triton.jit
def _rotate_tile(x_ptrs, o_ptrs, d_stride, o_stride, heads_ok, c1, c2, s1, s2, j_ok,
                 HALF: tl.constexpr, INTERLEAVED: tl.constexpr, ACC: tl.constexpr):
    """Rotate one (BLOCK_H, R) tile of rows given the first (even) and second (odd) halves of cos / sin."""
    mask = heads_ok[:, None] & j_ok[None, :]
    if INTERLEAVED:
        # the even and odd entries of the first R dims: two strided reads that together read each element once
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
        x2 = tl.load(x_ptrs + d_stride, mask=mask, other=0.0).to(ACC)
        tl.store(o_ptrs, (x1 * c1[None, :] - x2 * s1[None, :]).to(o_ptrs.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + o_stride, (x2 * c2[None, :] + x1 * s2[None, :]).to(o_ptrs.dtype.element_ty), mask=mask)
    else:
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
        x2 = tl.load(x_ptrs + HALF * d_stride, mask=mask, other=0.0).to(ACC)
        tl.store(o_ptrs, (x1 * c1[None, :] - x2 * s1[None, :]).to(o_ptrs.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + HALF * o_stride, (x2 * c2[None, :] + x1 * s2[None, :]).to(o_ptrs.dtype.element_ty),
                 mask=mask)


@triton.jit
def _rope_heads(X, O, pos_x, pos_o, n_heads, stride_xh, stride_xd, stride_oh, stride_od,
                c1, c2, s1, s2, offs_j, j_ok,
                HALF: tl.constexpr, PASS: tl.constexpr, INTERLEAVED: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """Every head of one position of X (rotated part, then the pass-through dims) into O."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    # interleaved: the first of a pair is at 2j; rotate-half: at j (its partner HALF further)
    step = 2 if INTERLEAVED else 1
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + offs_h
        h_ok = heads < n_heads
        hx = heads[:, None].to(tl.int64) * stride_xh
        ho = heads[:, None].to(tl.int64) * stride_oh
        _rotate_tile(X + pos_x + hx + (offs_j * step)[None, :] * stride_xd,
                     O + pos_o + ho + (offs_j * step)[None, :] * stride_od,
                     stride_xd, stride_od, h_ok, c1, c2, s1, s2, j_ok, HALF, INTERLEAVED, ACC)
        # the pass-through dims (partial rotary): a plain copy in chunks of BLOCK_P columns, chosen by rope_config
        # so that the chunks cover PASS with little padding (48 = 3 x 16, not one 64-wide tile); only a chunk that
        # runs past PASS masks its columns
        for c0 in tl.static_range(0, PASS, BLOCK_P):
            cols = 2 * HALF + c0 + offs_p
            if c0 + BLOCK_P > PASS:
                mask = h_ok[:, None] & (c0 + offs_p < PASS)[None, :]
            else:
                mask = h_ok[:, None]
            rest = tl.load(X + pos_x + hx + cols[None, :] * stride_xd, mask=mask, other=0.0)
            tl.store(O + pos_o + ho + cols[None, :] * stride_od, rest.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K,           # (P0, P1, Hq, D) / (P0, P1, Hk, D) inputs (or output gradients), any strides
    COS, SIN,       # (P0, P1, R) tables, any strides (0 where broadcast)
    QO, KO,         # outputs (or input gradients), any strides
    P1, HQ, HK,
    sq0, sq1, sqh, sqd, sk0, sk1, skh, skd,
    sc0, sc1, scd, ss0, ss1, ssd,
    sqo0, sqo1, sqoh, sqod, sko0, sko1, skoh, skod,
    HALF: tl.constexpr, PASS: tl.constexpr, INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64)
    p0 = pos // P1
    p1 = pos % P1
    offs_j = tl.arange(0, BLOCK_J)
    j_ok = offs_j < HALF
    step = 2 if INTERLEAVED else 1
    far = 1 if INTERLEAVED else HALF            # where the second of a pair sits, relative to the first
    c_base = COS + p0 * sc0 + p1 * sc1 + offs_j * step * scd
    s_base = SIN + p0 * ss0 + p1 * ss1 + offs_j * step * ssd
    c1 = tl.load(c_base, mask=j_ok, other=0.0).to(ACC)
    c2 = tl.load(c_base + far * scd, mask=j_ok, other=0.0).to(ACC)
    s1 = tl.load(s_base, mask=j_ok, other=0.0).to(ACC)
    s2 = tl.load(s_base + far * ssd, mask=j_ok, other=0.0).to(ACC)
    if BACKWARD:
        # the transpose of the rotation: the same map with sin's halves swapped and negated
        s1, s2 = -s2, -s1
    _rope_heads(Q, QO, p0 * sq0 + p1 * sq1, p0 * sqo0 + p1 * sqo1, HQ, sqh, sqd, sqoh, sqod,
                c1, c2, s1, s2, offs_j, j_ok, HALF=HALF, PASS=PASS, INTERLEAVED=INTERLEAVED, BLOCK_H=BLOCK_H,
                BLOCK_P=BLOCK_P, ACC=ACC)
    _rope_heads(K, KO, p0 * sk0 + p1 * sk1, p0 * sko0 + p1 * sko1, HK, skh, skd, skoh, skod,
                c1, c2, s1, s2, offs_j, j_ok, HALF=HALF, PASS=PASS, INTERLEAVED=INTERLEAVED, BLOCK_H=BLOCK_H,
                BLOCK_P=BLOCK_P, ACC=ACC)


# ----------------------------------------------------------------------------- layout


def _canonical(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A view of ``t`` (..., D) as (P0, P1, H, D): ``head_dim`` (an index of the leading dims) moved to -2, the
    other leading dims (at most two) as positions, padded with size-1 dims in front."""
    t = t.movedim(head_dim, -2)
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _table(c: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The (..., 1, ..., R) table as (P0, P1, R): the head dim dropped, padded in front."""
    c = c.select(head_dim, 0)
    while c.dim() < 3:
        c = c.unsqueeze(0)
    return c


def _pass_block(pass_dims: int) -> int:
    """Columns per chunk of the pass-through copy: of the powers of two from next_pow2(pass_dims) down to an
    eighth of it (at most 8 chunks) and no narrower than 8, the one whose chunks pad ``pass_dims`` least, the widest
    of equals (48 -> 16: three exact chunks where one 64-wide tile moves a third more bytes than it copies)."""
    top = next_pow2(pass_dims)
    widths = [top >> i for i in range(4) if top >> i >= min(8, top)]
    return min(widths, key=lambda w: (-(-pass_dims // w) * w, -w))


def rope_config(head_dim: int, rot: int, n_heads: int) -> dict[str, int]:
    """Block sizes and warps: the half-row (pair) block, the pass-through chunk, heads per tile."""
    half = rot // 2
    block_j = max(1, next_pow2(half))
    block_p = _pass_block(head_dim - rot)
    block_h = min(next_pow2(max(n_heads, 1)), max(1, 4096 // (block_j * 2)), 16)
    warps = 4 if block_h * block_j * 2 >= 1024 else (2 if block_h * block_j * 2 >= 256 else 1)
    return dict(BLOCK_J=block_j, BLOCK_P=block_p, BLOCK_H=block_h, num_warps=warps)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qo: torch.Tensor,
            ko: torch.Tensor, head_dim: int, interleaved: bool, backward: bool) -> None:
    """Rotate (or, with ``backward``, un-rotate) q and k into qo and ko; ``cos`` / ``sin`` broadcast to q's shape
    with size 1 at ``head_dim``."""
    q4, k4, qo4, ko4 = (_canonical(t, head_dim) for t in (q, k, qo, ko))
    c3, s3 = _table(cos, head_dim), _table(sin, head_dim)
    p0, p1 = q4.shape[0], q4.shape[1]
    d, rot = q4.shape[-1], c3.shape[-1]
    if p0 * p1 == 0 or (q4.shape[2] == 0 and k4.shape[2] == 0):
        return
    cfg = rope_config(d, rot, max(q4.shape[2], k4.shape[2]))
    launch(_rope_kernel, (p0 * p1,), q4, k4, c3, s3, qo4, ko4, p1, q4.shape[2], k4.shape[2],
           *q4.stride(), *k4.stride(), *c3.stride(), *s3.stride(), *qo4.stride(), *ko4.stride(),
           HALF=rot // 2, PASS=d - rot, INTERLEAVED=interleaved, BACKWARD=backward, BLOCK_J=cfg["BLOCK_J"],
           BLOCK_P=cfg["BLOCK_P"], BLOCK_H=cfg["BLOCK_H"],
           ACC=acc_dtype(torch.float64 if torch.float64 in (q.dtype, cos.dtype) else torch.float32),
           num_warps=cfg["num_warps"])


# ----------------------------------------------------------------------------- custom ops


def _out_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    """What ``x * cos + rotate_half(x) * sin`` gives in torch: the promoted dtype."""
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


@torch.library.custom_op("fused_kernels::rope_fwd", mutates_args=())
def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
             interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k), fresh contiguous tensors; cos / sin broadcast to q's and k's leading dims with size 1 at
    ``head_dim``."""
    qo = torch.empty(q.shape, dtype=_out_dtype(q, cos, sin), device=q.device)
    ko = torch.empty(k.shape, dtype=_out_dtype(k, cos, sin), device=k.device)
    _launch(q, k, cos, sin, qo, ko, head_dim, interleaved, False)
    return qo, ko


@rope_fwd.register_fake
def _(q, k, cos, sin, head_dim, interleaved):
    return q.new_empty(q.shape, dtype=_out_dtype(q, cos, sin)), k.new_empty(k.shape, dtype=_out_dtype(k, cos, sin))


@torch.library.custom_op("fused_kernels::rope_bwd", mutates_args=())
def rope_bwd(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
             interleaved: bool, q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of q and k (in their dtypes) from those of the outputs: the inverse rotation."""
    gq = torch.empty(dq.shape, dtype=q_dtype, device=dq.device)
    gk = torch.empty(dk.shape, dtype=k_dtype, device=dk.device)
    _launch(dq, dk, cos, sin, gq, gk, head_dim, interleaved, True)
    return gq, gk


@rope_bwd.register_fake
def _(dq, dk, cos, sin, head_dim, interleaved, q_dtype, k_dtype):
    return dq.new_empty(dq.shape, dtype=q_dtype), dk.new_empty(dk.shape, dtype=k_dtype)


def _table_grads(ctx, dq: torch.Tensor, dk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of cos and sin (rare: tables usually come from buffers): the formula's, summed to their shapes."""
    need_c, need_s = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    if not (need_c or need_s):
        return None, None
    with torch.enable_grad():
        c, s = cos.detach().requires_grad_(need_c), sin.detach().requires_grad_(need_s)
        outs = [rope_reference(x.detach(), c, s, ctx.interleaved) for x in (q, k)]
        got = torch.autograd.grad(outs, [t for t, n in ((c, need_c), (s, need_s)) if n], [dq, dk])
    found = iter(got)
    return (next(found) if need_c else None), (next(found) if need_s else None)


def _setup_context(ctx, inputs, output) -> None:
    q, k, cos, sin, head_dim, interleaved = inputs
    tables_grad = cos.requires_grad or sin.requires_grad
    # q and k only when a table needs its gradient: the inputs' own gradients need just cos and sin
    ctx.save_for_backward(cos, sin, q if tables_grad else None, k if tables_grad else None)
    ctx.head_dim, ctx.interleaved = head_dim, interleaved
    ctx.dtypes = (q.dtype, k.dtype)


def _backward(ctx, dq, dk):
    cos, sin, q, k = ctx.saved_tensors
    if _grad.create_graph():       # double backward: the transpose as differentiable ops
        gq, gk = (_grad_of_formula(d, cos, sin, ctx.interleaved).to(t) for d, t in zip((dq, dk), ctx.dtypes))
    else:
        gq, gk = rope_bwd(dq, dk, cos, sin, ctx.head_dim, ctx.interleaved, *ctx.dtypes)
    gc, gs = _table_grads(ctx, dq, dk, q, k, cos, sin)
    return gq, gk, gc, gs, None, None


rope_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- PyTorch path


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The formula with torch ops (what the tables' gradients differentiate): cos / sin broadcast to x."""
    rot = cos.shape[-1]
    xr, rest = x[..., :rot], x[..., rot:]
    if interleaved:
        partner = torch.stack([-xr[..., 1::2], xr[..., 0::2]], dim=-1).flatten(-2)
    else:
        partner = torch.cat([-xr[..., rot // 2:], xr[..., :rot // 2]], dim=-1)
    out = xr * cos + partner * sin
    return torch.cat([out, rest.to(out.dtype)], dim=-1) if rest.shape[-1] else out


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, backward: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """The rotation of ``_rope_kernel`` with torch ops: each half (or each of the even / odd entries) written once
    by ``mul(out=)`` and updated by ``addcmul_``, the pass-through dims copied."""
    rot = cos.shape[-1]
    if interleaved:
        first, second = slice(0, rot, 2), slice(1, rot, 2)
    else:
        first, second = slice(0, rot // 2), slice(rot // 2, rot)
    x1, x2 = x[..., first], x[..., second]
    c1, c2, s1, s2 = cos[..., first], cos[..., second], sin[..., first], sin[..., second]
    if backward:
        s1, s2 = -s2, -s1
    if torch.compiler.is_compiling():     # out= views do not trace; the compiler fuses the plain formula anyway
        o1 = torch.addcmul(x1 * c1, x2, s1, value=-1).to(dtype)     # the eager path's ops: the same roundings
        o2 = torch.addcmul(x2 * c2, x1, s2).to(dtype)
        pair = torch.stack([o1, o2], -1).flatten(-2) if interleaved else torch.cat([o1, o2], -1)
        rest = x[..., rot:].to(dtype).expand(*pair.shape[:-1], -1)
        return torch.cat([pair, rest], -1)
    shape = torch.broadcast_shapes(x.shape[:-1], cos.shape[:-1], sin.shape[:-1]) + (x.shape[-1],)
    out = torch.empty(shape, dtype=dtype, device=x.device)
    o1, o2 = out[..., first], out[..., second]
    torch.mul(x1, c1, out=o1).addcmul_(x2, s1, value=-1)
    torch.mul(x2, c2, out=o2).addcmul_(x1, s2)
    if rot < x.shape[-1]:
        out[..., rot:] = x[..., rot:]
    return out


class _RopeTorch(torch.autograd.Function):
    """q and k rotated by the PyTorch path; the backward un-rotates the gradients (cos / sin only), and
    differentiates the formula for tables that require grad."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved):
        tables_grad = cos.requires_grad or sin.requires_grad
        ctx.save_for_backward(cos, sin, q if tables_grad else None, k if tables_grad else None)
        ctx.interleaved, ctx.dtypes = interleaved, (q.dtype, k.dtype)
        return (_rotate_torch(q, cos, sin, interleaved, False, _out_dtype(q, cos, sin)),
                _rotate_torch(k, cos, sin, interleaved, False, _out_dtype(k, cos, sin)))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, q, k = ctx.saved_tensors
        if _grad.create_graph():         # a graph of the backward (double backward): the formula's own
            gq, gk = (_grad_of_formula(d, cos, sin, ctx.interleaved).to(t) for d, t in zip((dq, dk), ctx.dtypes))
        else:
            gq = _rotate_torch(dq, cos, sin, ctx.interleaved, True, ctx.dtypes[0])
            gk = _rotate_torch(dk, cos, sin, ctx.interleaved, True, ctx.dtypes[1])
        gc, gs = _table_grads(ctx, dq, dk, q, k, cos, sin) if q is not None else (None, None)
        return gq, gk, gc, gs, None


def _grad_of_formula(d: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The input gradient as differentiable ops: the formula's transpose, linear in ``d``."""
    rot = cos.shape[-1]
    if interleaved:
        first, second = slice(0, rot, 2), slice(1, rot, 2)
    else:
        first, second = slice(0, rot // 2), slice(rot // 2, rot)
    d1, d2 = d[..., first], d[..., second]
    g1 = d1 * cos[..., first] + d2 * sin[..., second]
    g2 = d2 * cos[..., second] - d1 * sin[..., first]
    if interleaved:
        g = torch.stack([g1, g2], dim=-1).flatten(-2)
    else:
        g = torch.cat([g1, g2], dim=-1)
    return torch.cat([g, d[..., rot:].to(g.dtype)], dim=-1) if rot < d.shape[-1] else g


# ----------------------------------------------------------------------------- public functions


def _check(op: str, x: torch.Tensor, name: str, cos: torch.Tensor, sin: torch.Tensor) -> None:
    _checks.check_float_tensor(name, x, op)
    _checks.check_tensor_type(name, x, op)
    if x.device != cos.device:
        raise _checks.ArgumentValueError(f"{op}: {name} is on {x.device} but cos is on {cos.device}")
    rot = cos.shape[-1]
    if x.dim() < 1 or rot > x.shape[-1]:
        raise _checks.ArgumentValueError(f"{op}: cos / sin have {rot} rotary dims, more than {name}'s head dim "
                                         f"{x.shape[-1] if x.dim() else 0} (shape {tuple(x.shape)})")
    if not _checks.broadcasts_to(cos.shape[:-1], x.shape[:-1]) or cos.dim() > x.dim():
        raise _checks.ArgumentValueError(
            f"{op}: cos / sin of shape {tuple(cos.shape)} (after unsqueeze) do not broadcast to {name}'s "
            f"{tuple(x.shape)} (its leading dims)")


def _tables(op: str, cos: torch.Tensor, sin: torch.Tensor, position_ids: Any,
            unsqueeze_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.check_float_tensor(name, t, op)
        _checks.check_tensor_type(name, t, op)
    if cos.shape != sin.shape:
        raise _checks.ArgumentValueError(f"{op}: cos and sin must have the same shape, got {tuple(cos.shape)} and "
                                         f"{tuple(sin.shape)}")
    if cos.device != sin.device:
        raise _checks.ArgumentValueError(f"{op}: cos is on {cos.device} but sin is on {sin.device}")
    if cos.dim() < 1 or cos.shape[-1] % 2:
        raise _checks.ArgumentValueError(f"{op}: cos / sin must end with an even number of rotary dims, got shape "
                                         f"{tuple(cos.shape)}")
    if position_ids is not None and cos.dim() == 2:
        # transformers < 4.38: cos / sin are (max_positions, R) tables indexed by position_ids
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
            raise TypeError(f"{op}: position_ids must be an integer tensor, got {type(position_ids).__name__}")
        cos, sin = cos[position_ids], sin[position_ids]
    if not isinstance(unsqueeze_dim, int) or isinstance(unsqueeze_dim, bool):
        raise TypeError(f"{op}: unsqueeze_dim must be an int, got {type(unsqueeze_dim).__name__}")
    if not -cos.dim() - 1 <= unsqueeze_dim <= cos.dim():
        raise _checks.DimIndexError(f"{op}: unsqueeze_dim {unsqueeze_dim} is out of range for cos / sin of "
                                    f"{cos.dim()} dims (expected to be in range of [{-cos.dim() - 1}, {cos.dim()}])")
    return cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)


def _kernel_layout(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head: int) -> bool:
    """Whether the kernel takes this call: 2- to 4-D q and k of one dtype, tables of q's rank with size 1 at the
    head dim, and q, k and the tables alike in every other leading dim (the positions)."""
    if cos.dim() != q.dim() or not 0 <= head < q.dim() - 1 or q.dim() > 4 or q.dtype != k.dtype:
        return False
    if cos.shape[head] != 1:
        return False

    def positions(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(t.shape[:head]) + tuple(t.shape[head + 1:-1])
    return positions(q) == positions(k) and all(c == 1 or c == p for c, p in zip(positions(cos), positions(q)))


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_ids: torch.Tensor | int | None = None, unsqueeze_dim: int = 1, *,
                         interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: ``(q_embed, k_embed)`` with
    ``q * cos + rotate_half(q) * sin`` on the first ``cos.shape[-1]`` dims (the rest passes through: partial
    rotary), cos / sin unsqueezed at ``unsqueeze_dim`` and broadcast (q (B, H, L, D) with cos (B, L, R) and
    ``unsqueeze_dim=1``; (B, L, H, D) with ``unsqueeze_dim=2``). k may have fewer heads (GQA) and any strides.
    ``interleaved=True``: GPT-J / Meta's convention (pairs of neighbouring dims rotate, cos / sin laid out per dim
    as ``repeat_interleave(freqs, 2)``). ``position_ids``: as transformers before 4.38, indexes (max_positions, R)
    tables; with per-position tables it is unused, as in transformers now (an int there is taken as
    ``unsqueeze_dim``, the fifth positional argument of transformers 5). The outputs are new tensors of the
    promoted dtype of q (k) and cos / sin, as the formula gives in torch."""
    op = "apply_rotary_pos_emb"
    if isinstance(position_ids, int) and not isinstance(position_ids, bool):
        position_ids, unsqueeze_dim = None, position_ids
    cos, sin = _tables(op, cos, sin, position_ids, unsqueeze_dim)
    _check(op, q, "q", cos, sin)
    _check(op, k, "k", cos, sin)
    if q.dim() != k.dim() or q.shape[-1] != k.shape[-1]:
        raise _checks.ArgumentValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same number "
                                         f"of dims and head dim")
    head = unsqueeze_dim % cos.dim() - (cos.dim() - q.dim())     # the broadcast (head) dim, as an index of q
    if _backend.choose(q, op) == "torch" or not _kernel_layout(q, k, cos, sin, head):
        # the PyTorch path also covers layouts the kernel does not take (tables not broadcast over one head dim,
        # q and k of other batch / position shapes or dtypes): the same formula
        return _RopeTorch.apply(q, k, cos, sin, bool(interleaved))
    lead = (*q.shape[:head], 1, *q.shape[head + 1:-1])
    cos, sin = cos.expand(*lead, cos.shape[-1]), sin.expand(*lead, sin.shape[-1])
    return rope_fwd(q, k, cos, sin, head, bool(interleaved))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1, *,
                 interleaved: bool = False) -> torch.Tensor:
    """``apply_rotary_pos_emb`` on one tensor (queries only, or keys being appended to a cache)."""
    rank = cos.dim() + 1 if isinstance(cos, torch.Tensor) else 0
    head = unsqueeze_dim % rank - (rank - x.dim()) if isinstance(unsqueeze_dim, int) and rank and \
        -rank <= unsqueeze_dim < rank and isinstance(x, torch.Tensor) else -1
    partner = x.narrow(head, 0, 0) if 0 <= head < x.dim() - 1 else x     # no heads: only x is rotated
    return apply_rotary_pos_emb(x, partner, cos, sin, None, unsqueeze_dim, interleaved=interleaved)[0]


# ----------------------------------------------------------------------------- cos / sin tables

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None, *,
                     max_position_embeddings: int | None = None, seq_len: int | None = None,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)`` of RoPE over ``dim`` rotary dims: ``inv_freq`` float32 (dim / 2,), as
    transformers' ``ROPE_INIT_FUNCTIONS`` compute them. ``scaling`` is transformers' ``rope_parameters`` /
    ``rope_scaling`` dict: ``rope_type`` (or ``type``) one of ``ROPE_TYPES`` with its fields ("linear": factor;
    "dynamic": factor, stretching the base once ``seq_len`` exceeds ``max_position_embeddings``; "yarn": factor,
    original_max_position_embeddings, optional attention_factor, beta_fast, beta_slow, mscale, mscale_all_dim,
    truncate; "llama3": factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    ``attention_factor`` multiplies cos and sin (YaRN's; 1.0 otherwise)."""
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise _checks.ArgumentValueError(f"rope_frequencies: dim must be an even int >= 2, got {dim!r}")
    params = dict(scaling or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise _checks.ArgumentValueError(f"rope_frequencies: rope_type must be one of {ROPE_TYPES}, got {kind!r}")
    base = float(params.get("rope_theta", theta))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    if kind == "dynamic":
        max_pos = params.get("original_max_position_embeddings", max_position_embeddings)
        if max_pos is None:
            raise _checks.ArgumentValueError("rope_frequencies: dynamic scaling needs max_position_embeddings")
        factor = float(params["factor"])
        length = max(seq_len or max_pos, max_pos)
        base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponent)
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif kind == "yarn":
        original = params.get("original_max_position_embeddings", max_position_embeddings)
        factor = params.get("factor")
        if factor is None:
            factor = max_position_embeddings / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                                if mscale and mscale_all_dim else _yarn_mscale(factor))
        beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(inv_freq.device)
        extrapolation = 1 - ramp
        pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    elif kind == "llama3":
        factor, low_f, high_f = (float(params[n]) for n in ("factor", "low_freq_factor", "high_freq_factor"))
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low_f, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low_f) / (high_f - low_f)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high_f) * ~(wavelen > old / low_f)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq, float(attention_factor)


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float = 10000.0,
                 scaling: Mapping[str, Any] | None = None, *, interleaved: bool = False,
                 max_position_embeddings: int | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables (..., dim) for ``position_ids`` (an integer tensor, e.g. (B, L)), as transformers' rotary
    embedding modules build them: angles ``position * inv_freq`` in float32, laid out ``cat(freqs, freqs)``
    (rotate-half) or ``repeat_interleave(freqs, 2)`` (``interleaved``), times the scaling's attention factor,
    cast to ``dtype``. Dynamic NTK scaling takes the sequence length from the largest position."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
        raise TypeError("rope_cos_sin: position_ids must be an integer tensor")
    seq_len = int(position_ids.max()) + 1 if position_ids.numel() else None
    inv_freq, factor = rope_frequencies(dim, theta, scaling, max_position_embeddings=max_position_embeddings,
                                        seq_len=seq_len, device=position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)

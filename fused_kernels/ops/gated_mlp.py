"""Gated feed-forward activations: ``swiglu(gate, up) = silu(gate) * up`` (Llama, Qwen, Mistral) and
``geglu(gate, up) = gelu(gate) * up`` (Gemma; ``approximate="tanh"`` or exact), on two tensors or on one
concatenated ``gate_up`` tensor (first half the gate, as Phi-3's ``gate_up_proj``) split inside the kernel.

Unfused, ``act(gate) * up`` writes ``act(gate)`` and reads it back in the forward, and its backward writes the
gradient of ``act(gate)`` before the activation's own backward; here one kernel reads gate and up and writes
the product, and one backward kernel reads gate, up and the output gradient and writes both input gradients
(into one (..., 2F) tensor for the concatenated form). The activation is recomputed in the backward instead
of being stored.

    _glu_fwd_kernel / _glu_bwd_kernel   (Triton) elementwise over (rows, F), any row and column strides
    glu_fwd / glu_bwd                   (torch.library custom ops, registered autograd)
    _GluTorch                           (the PyTorch path: torch's activation and its fused backward, the
                                         concatenated form's gradients written into one tensor)
    swiglu / geglu                      (public functions)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._core import backend as _backend
from .._core import checks as _checks
from .._core import grad as _grad
from .._core.launch import acc_dtype, launch, next_pow2

SILU, GELU, GELU_TANH = 0, 1, 2
BLOCK_F_MAX = 1024


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(act(g), act'(g)) in the accumulation dtype (act'(g) only with NEED_GRAD; else 0). Constants:
    1 / sqrt(2) = 0.70710678..., 1 / sqrt(2 pi) = 0.39894228..., sqrt(2 / pi) = 0.79788456..., 3 * 0.044715."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        d = s * (1.0 + g * (1.0 - s)) if NEED_GRAD else 0.0
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        d = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327 if NEED_GRAD else 0.0
    else:
        k = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # tanh through exp(-2|k|), which never overflows (no libdevice tanh in the interpreter)
        e = tl.exp(-2.0 * tl.abs(k))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(k < 0, -t, t)
        a = 0.5 * g * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g) \
            if NEED_GRAD else 0.0
    return a, d


@triton.jit
def _gate_up_tiles(G, U, M, F, num_f, stride_gm, stride_gf, stride_um, stride_uf, BLOCK_M: tl.constexpr,
                   BLOCK_F: tl.constexpr, ACC: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_F) tile of gate and up (programs ordered row block-major): (its rows as
    int64 offsets (BLOCK_M, 1), its columns, the in-bounds mask, g and u in the accumulation dtype)."""
    pid = tl.program_id(0)
    rows = (pid // num_f) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % num_f) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    r = rows[:, None].to(tl.int64)
    g = tl.load(G + r * stride_gm + cols[None, :] * stride_gf, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + r * stride_um + cols[None, :] * stride_uf, mask=mask, other=0.0).to(ACC)
    return r, cols, mask, g, u


@triton.jit
def _glu_fwd_kernel(
    G, U,           # (M, F) gate and up, any strides
    O,              # (M, F) output, contiguous
    M, F, num_f,
    stride_gm, stride_gf, stride_um, stride_uf,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr,
):
    r, cols, mask, g, u = _gate_up_tiles(G, U, M, F, num_f, stride_gm, stride_gf, stride_um, stride_uf,
                                         BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, ACC=ACC)
    a, _ = _act_and_grad(g, ACT, False)
    tl.store(O + r * F + cols[None, :], (a * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    G, U, DO,       # (M, F) gate, up and the output gradient, any strides
    DG, DU,         # (M, F) their gradients, row strides stride_dgm / stride_dum, unit column stride
    M, F, num_f,
    stride_gm, stride_gf, stride_um, stride_uf, stride_om, stride_of, stride_dgm, stride_dum,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr,
):
    r, cols, mask, g, u = _gate_up_tiles(G, U, M, F, num_f, stride_gm, stride_gf, stride_um, stride_uf,
                                         BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, ACC=ACC)
    do = tl.load(DO + r * stride_om + cols[None, :] * stride_of, mask=mask, other=0.0).to(ACC)
    a, da = _act_and_grad(g, ACT, True)
    tl.store(DG + r * stride_dgm + cols[None, :], (do * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + r * stride_dum + cols[None, :], (do * a).to(DU.dtype.element_ty), mask=mask)


def glu_config(f: int) -> dict[str, int]:
    """(BLOCK_M, BLOCK_F, warps): up to 1,024 columns and 4,096 elements per program, 8 per thread."""
    block_f = min(BLOCK_F_MAX, next_pow2(f))
    block_m = max(1, 4096 // block_f)
    return dict(BLOCK_M=block_m, BLOCK_F=block_f, num_warps=max(1, min(16, block_m * block_f // 256)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) as (M, F): a view when the leading dims collapse, else a copy."""
    return t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t


# ----------------------------------------------------------------------------- custom ops


def _split(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if up is None:
        f = gate.shape[-1] // 2
        return gate[..., :f], gate[..., f:]
    return gate, up


def fwd_launch(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor, act: int) -> None:
    """``out = act(g) * u`` over (..., F) tensors (``out`` contiguous)."""
    f = g.shape[-1]
    g2, u2, o2 = _rows(g), _rows(u), out.view(-1, f) if f else out
    m = g2.shape[0] if g.dim() else 1
    if m and f:
        cfg = glu_config(f)
        num_f = triton.cdiv(f, cfg["BLOCK_F"])
        launch(_glu_fwd_kernel, (triton.cdiv(m, cfg["BLOCK_M"]) * num_f,), g2, u2, o2, m, f, num_f,
               g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1), ACT=act, BLOCK_M=cfg["BLOCK_M"],
               BLOCK_F=cfg["BLOCK_F"], ACC=acc_dtype(out.dtype), num_warps=cfg["num_warps"])


def bwd_launch(g: torch.Tensor, u: torch.Tensor, dout: torch.Tensor, dg: torch.Tensor, du: torch.Tensor,
               act: int) -> None:
    """``dg = dout * u * act'(g)``, ``du = dout * act(g)`` over (..., F) tensors (``dg`` / ``du`` with a unit
    column stride: contiguous, or the halves of one contiguous (..., 2F) tensor)."""
    f = g.shape[-1]
    g2, u2, o2 = _rows(g), _rows(u), _rows(dout)
    dg2, du2 = dg.reshape(-1, f) if f else dg, du.reshape(-1, f) if f else du
    m = g2.shape[0] if g.dim() else 1
    if m and f:
        cfg = glu_config(f)
        num_f = triton.cdiv(f, cfg["BLOCK_F"])
        launch(_glu_bwd_kernel, (triton.cdiv(m, cfg["BLOCK_M"]) * num_f,), g2, u2, o2, dg2, du2, m, f, num_f,
               g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1), o2.stride(0), o2.stride(1),
               dg2.stride(0), du2.stride(0), ACT=act, BLOCK_M=cfg["BLOCK_M"], BLOCK_F=cfg["BLOCK_F"],
               ACC=acc_dtype(torch.promote_types(g.dtype, u.dtype)), num_warps=cfg["num_warps"])


@torch.library.custom_op("fused_kernels::glu_fwd", mutates_args=())
def glu_fwd(gate: torch.Tensor, up: torch.Tensor | None, act: int) -> torch.Tensor:
    """``act(gate) * up`` (``up`` None: the halves of ``gate``), a new contiguous tensor."""
    g, u = _split(gate, up)
    out = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
    fwd_launch(g, u, out, act)
    return out


@glu_fwd.register_fake
def _(gate, up, act):
    g, u = _split(gate, up)
    return g.new_empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype))


@torch.library.custom_op("fused_kernels::glu_bwd", mutates_args=())
def glu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, act: int) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Gradients of gate and up: ``(dgate, dup)``, or ``(dgate_up, empty)`` for the concatenated form."""
    g, u = _split(gate, up)
    if up is None:
        dgu = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        dg, du = _split(dgu, None)
    else:
        dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    bwd_launch(g, u, dout, dg, du, act)
    if up is None:
        return dgu, gate.new_empty(0)
    return dg, du


@glu_bwd.register_fake
def _(dout, gate, up, act):
    if up is None:
        return gate.new_empty(gate.shape), gate.new_empty(0)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _graph_grads(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, act: int):
    """Differentiable gradients (double backward): the formula re-run on the saved inputs."""
    g, u = _split(gate, up)
    out = _act_torch(g, act) * u
    grads = _grad.grads([out], [dout], [gate, up])
    return grads[0], grads[1]


def _setup_context(ctx, inputs, output) -> None:
    gate, up, act = inputs
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    if _grad.create_graph():
        dg, du = _graph_grads(dout, gate, up, ctx.act)
        return dg, du, None
    dg, du = glu_bwd(dout, gate, up, ctx.act)
    return dg, (du if up is not None else None), None


glu_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- PyTorch path


def _act_torch(g: torch.Tensor, act: int) -> torch.Tensor:
    if act == SILU:
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if act == GELU_TANH else "none")


def _act_backward(grad: torch.Tensor, g: torch.Tensor, act: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The activation's gradient ``grad * act'(g)``; with ``out`` (which may be ``grad`` itself: elementwise, the
    same elements) written there, so the backward allocates no temporary for it."""
    if out is None:
        if act == SILU:
            return torch.ops.aten.silu_backward(grad, g)
        return torch.ops.aten.gelu_backward(grad, g, approximate="tanh" if act == GELU_TANH else "none")
    if act == SILU:
        return torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=out)
    return torch.ops.aten.gelu_backward.grad_input(grad, g, approximate="tanh" if act == GELU_TANH else "none",
                                                   grad_input=out)


class _GluTorch(torch.autograd.Function):
    """``act(gate) * up`` with torch's activation, its fused backward, and the concatenated form's two gradients
    written into one tensor (no concatenation in the backward)."""

    @staticmethod
    def forward(ctx, gate, up, act):
        g, u = _split(gate, up)
        a = _act_torch(g, act)
        ctx.save_for_backward(gate, up, a)
        ctx.act, ctx.split = act, up is None
        return a * u

    @staticmethod
    def backward(ctx, dout):
        gate, up, a = ctx.saved_tensors
        if _grad.create_graph():
            dg, du = _graph_grads(dout, gate, up, ctx.act)
            return dg, du, None
        g, u = _split(gate, up)
        # dout * u, then the activation's gradient written over it (one pass less over memory than torch's autograd,
        # which allocates both); only where that product is already in gate's dtype (else rounded as torch does)
        in_place = not torch.compiler.is_compiling() and torch.promote_types(dout.dtype, u.dtype) == gate.dtype
        if ctx.split:
            if torch.compiler.is_compiling():        # out= views do not trace; the compiler plans the memory
                return torch.cat([_act_backward(dout * u, g, ctx.act), dout * a], -1).to(gate.dtype), None, None
            dgu = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
            dg, du = _split(dgu, None)
            if in_place:
                _act_backward(torch.mul(dout, u, out=dg), g, ctx.act, out=dg)
            else:
                dg.copy_(_act_backward(dout * u, g, ctx.act))
            torch.mul(dout, a, out=du)
            return dgu, None, None
        # the activation's gradient first: its temporary is freed before du is allocated (the peak of PyTorch's
        # own autograd of act(gate) * up)
        if in_place:
            prod = dout * u
            dg = _act_backward(prod, g, ctx.act, out=prod)
        else:
            dg = _act_backward((dout * u).to(g.dtype), g, ctx.act)
        du = (dout * a).to(up.dtype)
        return dg, du, None


def _glu_torch(gate: torch.Tensor, up: torch.Tensor | None, act: int) -> torch.Tensor:
    """The PyTorch path: with autograd, ``_GluTorch``; without, the activation's output multiplied in place (one
    tensor allocated, not two)."""
    if torch.is_grad_enabled() and (gate.requires_grad or (up is not None and up.requires_grad)):
        return _GluTorch.apply(gate, up, act)
    g, u = _split(gate, up)
    a = _act_torch(g, act)
    if a.dtype == torch.promote_types(a.dtype, u.dtype) and not torch.compiler.is_compiling():
        return a.mul_(u)
    return a * u


# ----------------------------------------------------------------------------- public functions


def _glu(op: str, gate: torch.Tensor, up: torch.Tensor | None, act: int) -> torch.Tensor:
    _checks.check_float_tensor("gate", gate, op)
    _checks.check_tensor_type("gate", gate, op)
    if gate.dim() < 1:
        raise _checks.ArgumentValueError(f"{op}: gate must have at least one dimension, got a scalar")
    if up is None:
        if gate.shape[-1] % 2:
            raise _checks.ArgumentValueError(f"{op}: a concatenated gate_up tensor needs an even last dim (gate | up), "
                                             f"got shape {tuple(gate.shape)}")
    else:
        _checks.check_float_tensor("up", up, op)
        _checks.check_tensor_type("up", up, op)
        if up.device != gate.device:
            raise _checks.ArgumentValueError(f"{op}: up is on {up.device} but gate is on {gate.device}")
        if up.shape != gate.shape:
            raise _checks.ArgumentValueError(f"{op}: up must have gate's shape {tuple(gate.shape)}, got "
                                             f"{tuple(up.shape)}")
    if _backend.choose(gate, op) == "torch" or (up is not None and up.dtype != gate.dtype):
        # mixed dtypes run torch's formula, which promotes them
        return _glu_torch(gate, up, act)
    return glu_fwd(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``F.silu(gate) * up``; with ``up=None``, ``gate`` is the concatenated (..., 2F) ``gate_up`` tensor (first
    half the gate). Any strides; the output is a new (..., F) tensor."""
    return _glu("swiglu", gate, up, SILU)


def geglu(gate: torch.Tensor, up: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(gate, approximate=approximate) * up`` (``approximate`` "none" or "tanh", as ``F.gelu``); with
    ``up=None`` the concatenated form, as ``swiglu``."""
    if approximate not in ("none", "tanh"):
        raise _checks.ArgumentValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _glu("geglu", gate, up, GELU_TANH if approximate == "tanh" else GELU)


"""Attention's PyTorch path: the fastest PyTorch implementation with our semantics, what attention runs
wherever its Triton kernels do not (a CPU tensor without the interpreter, and backend "torch" on any device).
Each op keeps its own PyTorch path beside its kernels (``ops/norms.py``, ``ops/softmax.py``).

The public functions (``fused_kernels.attention``, ``fused_kernels.scaled_dot_product_attention``, ...) validate
their arguments first, then call one of these with the validated values, so the error messages are the same on
every path. torch's flash-attention kernel (on a CPU ``aten._scaled_dot_product_flash_attention_for_cpu``,
what ``F.scaled_dot_product_attention`` runs there) is called through that function where it can (the
least work per call) and directly where only the op will do: it takes a mask together with
``is_causal``, does GQA without repeating key/value heads on every torch version, and returns the
log-sum-exp. Masks reach it at their broadcast size. On top of it: bottom-right causal (rows that see
no key are cut off and padded with zeros; L < S takes a (L, S) mask), ``seqlens_k`` as a (B, 1, 1, S)
key mask, ``return_lse`` (-inf for fully masked rows, differentiable), and fully masked rows give 0
with zero gradients. Dropout, ``Ev != E`` and non-CPU tensors take ``F.scaled_dot_product_attention``
(torch's generator draws the dropout mask, as the reference does).

Where torch's own result differs from ours: torch gives NaN for a fully masked attention row in old
versions and on some GPU backends; ``_TORCH_ZEROES_DEAD_ROWS`` (probed once at import on the CPU) says
whether this torch already gives 0 and zero gradients, otherwise the rows are found from the mask,
unmasked before the call and zeroed after it. One documented difference from the kernels: keys past
``seqlens_k`` (and keys under a mask) are read, so NaN/inf stored there propagate as in torch's SDPA;
the kernels never read blocks past ``seqlens_k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..._core.grad import create_graph
from ...reference import attention_ref, causal_mask, scaled_dot_product_attention_ref
from . import grad as _grad
from .variants import row_offsets

NEG_INF = float("-inf")
_HALF = (torch.float16, torch.bfloat16)


def _op(name: str):
    packet = getattr(torch.ops.aten, name, None)
    return None if packet is None else packet.default


_FLASH = _op("_scaled_dot_product_flash_attention_for_cpu")
_FLASH_BWD = _op("_scaled_dot_product_flash_attention_for_cpu_backward")


def _probe_dead_rows() -> bool:
    """Whether this torch's CPU attention (flash kernel and math path) gives a fully masked row output 0
    and finite, zero gradients (torch >= 2.5 does; earlier versions give NaN)."""
    if _FLASH is None:
        return False
    try:
        with torch.enable_grad():
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 1, n, 8, generator=gen, dtype=torch.float64).requires_grad_()
                       for n in (3, 4, 4))
            keep = torch.ones(3, 4, dtype=torch.bool)
            keep[1] = False
            bias = torch.zeros(3, 4, dtype=torch.float64).masked_fill(~keep, NEG_INF)
            out = _FLASH(q, k, v, 0.0, False, attn_mask=bias)[0]
            math_out = F.scaled_dot_product_attention(q, k, v[..., :5], attn_mask=keep)   # Ev != E: math
            ok = True
            for o in (out, math_out):
                grads = torch.autograd.grad(o.sum(), (q, k, v))
                ok &= bool((o[0, 0, 1] == 0).all()) and all(bool(g.isfinite().all()) for g in grads)
                ok &= bool((grads[0][0, 0, 1] == 0).all())
            return ok
    except Exception:  # an unexpected torch: take the safe path
        return False


# Probed once at import (a few microseconds of work), never while torch.compile traces.
_TORCH_ZEROES_DEAD_ROWS = _probe_dead_rows()


def _combine(mask: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """``mask`` (bool True = keep, or float added) restricted to ``keep`` (bool), broadcasting."""
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, NEG_INF)


def _dead_rows(mask: torch.Tensor, is_causal: bool, l: int, s: int) -> torch.Tensor:
    """Bool (..., L, 1), broadcastable to (B, H, L, S): rows that no key takes part in, for ``mask``
    and top-left ``is_causal`` (key j visible to query i when j <= i)."""
    visible = mask if mask.dtype == torch.bool else mask != NEG_INF
    if not is_causal:
        return ~visible.any(-1, keepdim=True)
    visible = visible.expand(*visible.shape[:-2], l, s)
    first = torch.where(visible.any(-1), visible.to(torch.uint8).argmax(-1), s)   # first visible key
    return (first > torch.arange(l, device=mask.device))[..., None]


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The flash kernel reads rows as contiguous: a last dim with another stride is copied (as the kernels do)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """The smallest view of ``mask`` that broadcasts the same: expanded (stride-0) dims back to size 1."""
    if 0 in mask.stride():
        mask = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
    return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as the flash kernel takes it: additive (0 / -inf for a bool mask), in the query's dtype,
    at the mask's own (broadcast) size, rows contiguous."""
    mask = _unit_last_stride(_compact(mask))
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.full((), NEG_INF, dtype=dtype, device=mask.device))
    return mask if mask.dtype == dtype else mask.to(dtype)


def _sanitize(device: torch.device) -> bool:
    """Whether fully masked rows must be handled here: torch gives them NaN (old torch, other devices)."""
    return not (device.type == "cpu" and _TORCH_ZEROES_DEAD_ROWS)


def _materialize_causal(mask: torch.Tensor | None, l: int, s: int, device: torch.device) -> torch.Tensor:
    return _combine(mask, causal_mask(l, s, device))


class _Flash(torch.autograd.Function):
    """The CPU flash kernel (top-left ``is_causal``, an additive mask at its broadcast size) with the gradients
    torch's own derivative of the op lacks: a differentiable log-sum-exp (torch's treats it as a constant), the
    gradient of a float mask that requires grad (``_grad.attention_mask_grad``, chunked over query blocks; the
    flash op itself refuses such a mask), and, when a graph of the backward is built, a backward of
    differentiable ops (double backward). Used only where those are needed: an autograd.Function costs more
    Python work per call than torch's own node with ``_differentiable_backward`` hooked on.

    The lse terms: d lse_i / d s_ij = P_ij, so the lse gradient adds ``scale * dlse * (P @ K)`` to dq (P @ K:
    one more flash forward, with K as the values) and ``scale * P^T (dlse * Q)`` to dk (the value gradient of
    one more flash backward, with ``dlse * Q`` as the output gradient).

    Half precision: the forward is torch's (in float16 / bfloat16), the backward runs the flash backward in
    float32 on the upcast tensors. torch's half-precision CPU backward keeps dK / dV in the input's dtype while
    it adds every query block into them: with many queries per key (FlashAttention's split-KV shapes, 339 or
    20,000 queries against 1-16 keys) its error is 2-4x plain half-precision PyTorch's; in float32 it is below
    it, at the same speed on the CPU (the float32 backward is not slower than torch's half one there)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale):
        out, lse = _FLASH(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None
        needs = tuple(ctx.needs_input_grad[:4])
        if create_graph():
            return (*_grad.attention_backward(q, k, v, mask, None, dout, dlse, ctx.scale, ctx.is_causal, 0, 0.0,
                                              needs), None, None)
        dq = dk = dv = dmask = None
        if any(needs[:3]):
            g_out = dout if dout is not None else torch.zeros_like(out)
            ts, m = (q, k, v, out, g_out), mask
            if q.dtype in _HALF:     # accumulate in float32 (see the class docstring)
                ts, m = tuple(t.float() for t in ts), None if mask is None else mask.float()
            qc, kc, vc, oc, gc = ts
            flags = dict(attn_mask=m, scale=ctx.scale)
            dq, dk, dv = _FLASH_BWD(gc, qc, kc, vc, oc, lse, 0.0, ctx.is_causal, **flags)
            if dlse is not None:
                pk = _FLASH(qc, kc, kc, 0.0, ctx.is_causal, **flags)[0]                  # P @ K
                g = dlse.unsqueeze(-1)
                dq = dq + (ctx.scale * g * pk).to(dq.dtype)
                dk_lse = _FLASH_BWD((g * qc).to(qc.dtype), qc, kc, kc, pk, lse, 0.0, ctx.is_causal, **flags)[2]
                dk = dk + ctx.scale * dk_lse
            dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        if needs[3]:
            dmask = _grad.attention_mask_grad(q, k, v, out, lse, dout, dlse, mask, ctx.scale, ctx.is_causal, 0, None)
        return dq, dk, dv, dmask, None, None


def _nan_query(q: torch.Tensor) -> bool:
    """Whether ``q`` may hold a NaN (its sum is NaN: a NaN, or infinities of both signs). torch's CPU flash
    kernel without a mask gives such a query row 0 where the contract is NaN (the reference, torch's math path,
    the kernels); such calls take the reference instead. One reduction, a few microseconds. Not under
    torch.compile (a data-dependent branch): a compiled CPU graph keeps torch's zero row."""
    return q.is_cpu and not torch.compiler.is_compiling() and math.isnan(q.sum().item())


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_FLASH_NODE = "ScaledDotProductFlashAttentionForCpuBackward0"


def _differentiable_backward(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None, is_causal: bool, scale: float) -> torch.Tensor:
    """Give torch's CPU flash node (``out.grad_fn``; its backward has no derivative) second derivatives: a hook
    that, only when a graph of the backward is built, replaces the node's (dq, dk, dv) by the same gradients
    from differentiable PyTorch ops (``_grad.attention_backward`` on the node's inputs). Costs a hook per call
    (a few microseconds) instead of an autograd.Function; torch's other attention nodes have their own."""
    if torch.compiler.is_compiling():   # no double backward under torch.compile: nothing to hook
        return out
    node = out.grad_fn
    if node is None or type(node).__name__ != _FLASH_NODE:
        return out

    def hook(grad_inputs, grad_outputs):
        if not create_graph() or grad_outputs[0] is None:
            return None
        # the gradients this backward computes: autograd.grad(..., inputs=(q,)) leaves dk and dv None
        needs = (*(g is not None for g in grad_inputs[:3]), False)
        dq, dk, dv, _ = _grad.attention_backward(q, k, v, mask, None, grad_outputs[0], None, scale, is_causal, 0,
                                                 0.0, needs)
        return (dq, dk, dv, *grad_inputs[3:])

    node.register_hook(hook)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
            scale: float, dropout_p: float, need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, H, L, D) attention with a mask (bool or float, broadcastable) and top-left ``is_causal``;
    fully masked rows give 0 (and lse -inf). Returns (out, lse or None); ``need_lse`` only on the flash path.

    torch's flash kernel runs wherever it applies: through ``F.scaled_dot_product_attention`` (the least
    overhead per call) unless the call needs what only the op itself takes (the lse, a mask together with
    ``is_causal``, GQA without repeating heads on every torch version). With gradients, torch's flash node
    gets a hook for second derivatives (``_differentiable_backward``), and ``_Flash`` runs where torch's node
    cannot give what is asked (a mask gradient, a differentiable lse)."""
    l, s = q.shape[-2], k.shape[-2]
    cpu = q.device.type == "cpu"
    flash = _FLASH is not None and cpu and dropout_p == 0.0 and v.shape[-1] == q.shape[-1]
    if mask is not None:
        mask = _compact(mask)
        if mask.dim() < 4:
            mask = mask[(None,) * (4 - mask.dim())]
    sanitize = mask is not None and not (cpu and _TORCH_ZEROES_DEAD_ROWS)
    dead = _dead_rows(mask, is_causal, l, s) if mask is not None and (sanitize or need_lse) else None
    if sanitize:  # let dead rows see every key, so that nothing NaN reaches the output or the gradients
        mask = mask | dead if mask.dtype == torch.bool else mask.masked_fill(dead, 0.0)
    lse = None
    gqa = k.shape[1] != q.shape[1]
    if flash:
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    grad = flash and _needs_grad(q, k, v, mask)
    mask_grad = grad and _needs_grad(mask)
    half_grad = grad and q.dtype in _HALF     # a float32 backward (see _Flash)
    if flash and (mask_grad or need_lse or gqa or (is_causal and mask is not None) or half_grad):
        fmask = None if mask is None else _additive(mask, q.dtype)
        if grad and (mask_grad or need_lse or half_grad):   # what torch's node lacks (see _Flash)
            out, lse = _Flash.apply(q, k, v, fmask, is_causal, scale)
        else:
            out, lse = _FLASH(q, k, v, 0.0, is_causal, attn_mask=fmask, scale=scale)
            if grad:
                out = _differentiable_backward(out, q, k, v, fmask, is_causal, scale)
        if need_lse and dead is not None:
            lse = lse.masked_fill(dead.squeeze(-1), NEG_INF)
    else:
        if is_causal and mask is not None:  # torch's function takes one or the other
            mask, is_causal = _materialize_causal(mask, l, s, q.device), False
        if gqa:   # the math path (dropout, Ev != E, other devices): torch's enable_gqa repeats the heads too
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        if mask is not None and flash:   # rows contiguous, as the kernel reads them; a float mask in q's dtype
            mask = _unit_last_stride(mask) if mask.dtype == torch.bool else _additive(mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale)
        if grad:
            out = _differentiable_backward(out, q, k, v, mask, is_causal, scale)
    if sanitize:
        out = out.masked_fill(dead, 0.0)
    return out, lse


def _flash_self(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Self-attention (one shape, so L == S) that torch's CPU flash kernel takes as it is: unit last strides,
    not empty, no half-precision gradient (see ``_Flash``)."""
    return (q.is_cpu and _FLASH is not None and q.shape == k.shape == v.shape and q.stride(-1) == 1
            and k.stride(-1) == 1 and v.stride(-1) == 1 and q.numel() > 0
            and not (q.dtype in _HALF and _needs_grad(q, k, v)))


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """``attention`` of q, k, v of one shape without mask, variant or dropout at the default scale ``scale``
    (1 / sqrt(D)): straight to torch's function where its flash kernel runs (a NaN query excepted), with the
    fewest steps a call can take."""
    if _flash_self(q, k, v) and not _nan_query(q):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)   # torch's default scale: the same double
        return _differentiable_backward(out, q, k, v, None, causal, scale) if out.requires_grad else out
    return attention(q, k, v, causal, None, None, scale, 0.0, False)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, attn_mask: torch.Tensor | None,
              seqlens_k: torch.Tensor | None, scale: float, dropout_p: float,
              return_lse: bool, variants=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``fused_kernels.attention`` (validated arguments; ``scale`` resolved): see the module docstring."""
    if variants is not None:
        return _attention_variants(q, k, v, causal, attn_mask, seqlens_k, scale, dropout_p, return_lse, variants)
    if attn_mask is None and seqlens_k is None and _nan_query(q):   # with a mask the flash kernel propagates it
        return attention_ref(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p, return_lse=return_lse)
    if dropout_p == 0.0 and seqlens_k is None and not return_lse and _flash_self(q, k, v):
        # The common case in as few steps as possible (a call's Python work shows at short sequences):
        # self-attention (L == S, so causal is top-left too) without a mask, or with a plain key mask.
        if attn_mask is None:
            # torch's default scale is the same double (1 / sqrt(E)): leaving it out saves parsing a keyword
            if scale == 1.0 / math.sqrt(q.shape[-1]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
            return _differentiable_backward(out, q, k, v, None, causal, scale) if out.requires_grad else out
        if (not causal and attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.stride(-1) == 1
                and _TORCH_ZEROES_DEAD_ROWS and 0 not in attn_mask.stride()):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            return _differentiable_backward(out, q, k, v, attn_mask, False, scale) if out.requires_grad else out
    b, h, l, _ = q.shape
    s = k.shape[2]
    flash_lse = _FLASH is not None and q.device.type == "cpu" and dropout_p == 0.0 and v.shape[-1] == q.shape[-1]
    if q.numel() == 0 or s == 0 or (return_lse and not flash_lse):
        # Nothing to compute (torch's flash kernel does not take empty sequences), or an lse that only
        # the flash kernel returns: the reference (with dropout it materializes the scores anyway).
        return attention_ref(q, k, v, causal=causal, attn_mask=attn_mask, seqlens_k=seqlens_k, scale=scale,
                             dropout_p=dropout_p, return_lse=return_lse)
    mask = attn_mask
    if seqlens_k is not None:
        valid = torch.arange(s, device=q.device) < seqlens_k.to(q.device)[:, None]        # (B, S)
        mask = _combine(mask, valid[:, None, None, :])
    is_causal, first_row = False, 0
    if causal and l > 1:                 # one query sees every key: nothing to mask
        if seqlens_k is not None:        # bottom-right per row: key j <= i + seqlens_k[b] - L
            last = torch.arange(l, device=q.device)[:, None] + row_offsets(s - l, seqlens_k.to(q.device), s)
            mask = _combine(mask, torch.arange(s, device=q.device) <= last)                # (B, 1, L, S)
        elif s > l:                      # bottom-right, keys ahead: key j <= i + S - L
            mask = _combine(mask, causal_mask(l, s, q.device, bottom_right=True))
        else:                            # rows i < L - S see no key; the others are top-left causal
            is_causal, first_row = True, l - s
    if first_row:
        q = q[:, :, first_row:]
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] == l:
            mask = mask[..., first_row:, :]
    out, lse = _attend(q, k, v, mask, is_causal, scale, dropout_p, return_lse)
    if first_row:
        out = F.pad(out, (0, 0, first_row, 0))
        lse = None if lse is None else F.pad(lse, (first_row, 0), value=NEG_INF)
    if not return_lse:
        return out
    return out, (lse if lse.dtype == torch.float64 else lse.float())


def _attention_variants(q, k, v, causal, attn_mask, seqlens_k, scale, dropout_p, return_lse, variants):
    """The variants on materialized scores (float32, float64 for float64), gradients through autograd."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, l, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    if hkv != h:
        kc, vc = kc.repeat_interleave(h // hkv, dim=1), vc.repeat_interleave(h // hkv, dim=1)
    x = variants.scores((qc @ kc.transpose(-2, -1)) * scale, attn_mask)
    keep = torch.ones(1, 1, l, s, dtype=torch.bool, device=q.device)
    if causal and variants.prefix_lengths is None:   # with a prefix, variants.keep has causal OR prefix
        i = torch.arange(l, device=q.device).view(l, 1)
        keep = keep & (torch.arange(s, device=q.device) <= i + variants.off)    # off: S - L, or per row
    if seqlens_k is not None:
        keep = keep & (torch.arange(s, device=q.device) < seqlens_k.to(q.device)[:, None, None, None])
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
    vk = variants.keep(b, h, l, s, q.device)
    if vk is not None:
        keep = keep & vk
    x = x.masked_fill(~keep, NEG_INF)
    empty = (x == NEG_INF).all(dim=-1, keepdim=True)
    x = torch.where(empty, torch.zeros_like(x), x)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    p = torch.where(empty | ~keep, torch.zeros_like(x), torch.exp(x - lse))
    lse = torch.where(empty, torch.full_like(lse, NEG_INF), lse).squeeze(-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = (p @ vc).to(q.dtype)
    return (out, lse if ct == torch.float64 else lse.float()) if return_lse else out


def to_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., X, Y) to (B, H, X, Y): size-1 dims in front of fewer dims (a view), leading dims merged
    into the batch beyond four (a view where the strides allow, a copy otherwise)."""
    if t.dim() < 4:
        return t[(None,) * (4 - t.dim())]
    return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float,
                                 batch: Sequence[int], gqa: bool, causal_offset: int = 0) -> torch.Tensor:
    """``fused_kernels.scaled_dot_product_attention`` (validated; ``batch``: the broadcast leading dims before
    the head dim when ``gqa``, before (L, E) otherwise; ``is_causal`` with ``causal_offset``: key j <= i +
    causal_offset, 0 for top-left, S - L for a ``causal_lower_right`` CausalBias, which comes without a mask)."""
    l, e = query.shape[-2:]
    s, ev = value.shape[-2:]
    hq = query.shape[-3] if gqa else None
    full = (*batch, hq, l, s) if gqa else (*batch, l, s)
    if math.prod(full) == 0 or ev == 0 or (attn_mask is None and not causal_offset and _nan_query(query)):
        # nothing to compute (no row sees a key, or nothing to see), or a NaN the flash kernel would zero
        return scaled_dot_product_attention_ref(query, key, value, attn_mask, dropout_p, is_causal, scale, gqa)
    if is_causal and causal_offset and (ev != e or dropout_p > 0 or query.device.type != "cpu" or _FLASH is None):
        attn_mask, is_causal = causal_mask(l, s, query.device, bottom_right=True), False   # torch's math path
    if ev != e or dropout_p > 0 or query.device.type != "cpu" or _FLASH is None:
        # torch's function does these on its math path; ours only adds the dead-row convention
        if gqa:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        mask = attn_mask
        if is_causal and mask is not None:   # both apply; torch's math path takes one or the other
            mask, is_causal = _materialize_causal(mask, l, s, query.device), False
        sanitize = mask is not None and _sanitize(query.device)
        dead = _dead_rows(mask, is_causal, l, s) if sanitize else None
        if sanitize:
            mask = mask | dead if mask.dtype == torch.bool else mask.masked_fill(dead, 0.0)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale)
        return out.masked_fill(dead, 0.0) if sanitize else out
    hk = key.shape[-3] if gqa else None
    q4 = to_4d(query.expand(*batch, hq, l, e) if gqa else query.expand(*batch, l, e))
    k4 = to_4d(key.expand(*batch, hk, s, e) if gqa else key.expand(*batch, s, e))
    v4 = to_4d(value.expand(*batch, hk, s, ev) if gqa else value.expand(*batch, s, ev))
    if is_causal and causal_offset:   # bottom-right (CausalBias lower-right, L != S): our attention's causal
        return attention(q4, k4, v4, True, None, None, scale, 0.0, False).reshape(*full[:-1], ev)
    mask4 = None
    if attn_mask is not None:  # converted at its own (broadcast) size, then a stride-0 view
        mask4 = to_4d(_additive(attn_mask, query.dtype).expand(full))
    out, _ = _attend(q4, k4, v4, mask4, is_causal, scale, 0.0, False)
    return out.reshape(*full[:-1], ev)

"""Attention gradients beyond the kernels' backward: the differentiable attention math (double backward) and
the gradient of a float attention mask.

- **Attention mask gradient.** The gradient of a float ``attn_mask`` that requires grad is ``dS``, the gradient of
  the softmax input, summed over the dims the mask is broadcast along. ``attention_mask_grad`` computes it in
  PyTorch from the saved output and log-sum-exp, one block of queries at a time (at most ``MASK_GRAD_BLOCK``
  scores in memory, plus the mask-sized result), deterministically. It is the one place to swap for a fused
  kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..._core import grad as _grad
from ...reference import _attention_core

# Scores of one block of queries in ``attention_mask_grad``: about 4M elements (16 MB in float32).
MASK_GRAD_BLOCK = 1 << 22


def _keep(l: int, s: int, rows: slice, is_causal: bool, causal_offset: int | torch.Tensor,
          seqlens_k: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Bool, broadcastable to (B, H, rows, S): key j visible to query i (causal j <= i + offset, j < seqlens_k);
    ``causal_offset`` an int or per row, (B, 1, 1, 1) (``variants.row_offsets``)."""
    keep = None
    if is_causal:
        i = torch.arange(l, device=device)[rows, None]
        keep = torch.arange(s, device=device)[None, :] <= i + causal_offset
    if seqlens_k is not None:
        valid = (torch.arange(s, device=device) < seqlens_k.to(device)[:, None])[:, None, None, :]
        keep = valid if keep is None else keep & valid
    return keep


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   seqlens_k: torch.Tensor | None, scale: float, is_causal: bool,
                   causal_offset: int | torch.Tensor, variants=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (B, H, L, D) attention with the kernels' semantics: (out in q's dtype, lse in the compute
    dtype). GQA by repeating key/value heads; causal ``j <= i + causal_offset``; fully masked rows give 0.
    With ``variants`` (fused_kernels.attention.variants.Variants; causal_offset must be S - L) the variant math path."""
    if variants is not None:
        from .torch_path import _attention_variants  # torch_path imports this module
        out, lse = _attention_variants(q, k, v, is_causal, mask, seqlens_k, scale, 0.0, True, variants)
        return out, lse
    ct = _grad.compute_dtype(q)
    h, hkv, l, s = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    if hkv != h:
        kc, vc = kc.repeat_interleave(h // hkv, dim=1), vc.repeat_interleave(h // hkv, dim=1)
    keep = _keep(l, s, slice(None), is_causal, causal_offset, seqlens_k, q.device)
    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            bias = mask.to(ct)
    out, lse = _attention_core(qc, kc, vc, scale, keep, bias, 0.0)
    return out.to(q.dtype), lse


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       seqlens_k: torch.Tensor | None, dout: torch.Tensor | None, dlse: torch.Tensor | None,
                       scale: float, is_causal: bool, causal_offset: int | torch.Tensor, dropout_p: float,
                       needs: Sequence[bool], variants=None) -> list[torch.Tensor | None]:
    """Differentiable (dq, dk, dv, dmask) of attention (``needs``: which of the four are wanted)."""
    if dropout_p > 0:
        raise NotImplementedError(
            "attention: double backward (create_graph=True) with dropout_p > 0 is not supported: the dropout "
            "mask is drawn inside the kernel; use dropout_p=0 there, or the 'torch' backend with a dropout outside "
            "the attention")
    out, lse = attention_math(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, variants)
    wanted = [t if need else None for t, need in zip((q, k, v, mask), needs)]
    return _grad.grads([out, lse], [dout, dlse], wanted)


def _block(t: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows [start, start + length) of ``t`` along ``dim``; ``t`` itself when that is all of it (a view of a
    whole dim is an ``aten::alias``, which torch's legacy vmap, used for batched gradients, cannot batch)."""
    return t if start == 0 and length == t.shape[dim] else t.narrow(dim, start, length)


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    return mask[(None,) * (4 - mask.dim())] if mask.dim() < 4 else mask


def attention_mask_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        dout: torch.Tensor | None, dlse: torch.Tensor | None, mask: torch.Tensor, scale: float,
                        is_causal: bool, causal_offset: int | torch.Tensor,
                        seqlens_k: torch.Tensor | None) -> torch.Tensor:
    """Gradient of the float ``mask`` (broadcastable to (B, H, L, S), added to the scaled scores) of (B, H, L, D)
    attention, from its output ``out`` and natural-log ``lse`` (B, H, L): ``dS = P * (dO V^T - delta)`` with
    ``delta = rowsum(dO * O) - dlse``, summed over the mask's broadcast dims. Returns a tensor of ``mask``'s
    shape (an expanded view where the mask itself is one) and dtype."""
    b, h, l, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    group = h // hkv
    ct = _grad.compute_dtype(q)
    m4 = _as_4d(mask)
    dims = tuple(i for i in range(4) if m4.shape[i] == 1)          # the dims the mask is broadcast along
    if (dout is None and dlse is None) or b * h * l * s == 0:
        return torch.zeros(mask.shape, dtype=mask.dtype, device=q.device)
    delta = torch.zeros((b, h, l), dtype=ct, device=q.device)
    if dout is not None:
        delta = (dout.to(ct) * out.to(ct)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(ct)
    lse_c = lse.to(ct)
    dead = ~torch.isfinite(lse_c)          # rows that see no key (-inf; whatever a kernel stores there)
    lse_c = lse_c.masked_fill(dead, 0.0)
    # (B, Hkv, G, rows, .): the query heads of a GQA group against their key/value head, no repeated k/v.
    qg = q.reshape(b, hkv, group, l, d)
    kt = k.to(ct)[:, :, None].transpose(-1, -2)                     # (B, Hkv, 1, D, S)
    vt = v.to(ct)[:, :, None].transpose(-1, -2)                     # (B, Hkv, 1, Dv, S)
    dog = None if dout is None else dout.reshape(b, hkv, group, l, dv)
    rows_per_block = max(1, min(l, MASK_GRAD_BLOCK // max(1, b * h * s)))
    mexp = m4.expand(b, h, l, s)
    # Built without in-place writes (a list of blocks, then one cat or sum) and without views of a whole dim
    # (``_block``), so that it also runs under vmap: gradcheck's batched gradients, torch.func transforms.
    parts = []
    for i0 in range(0, l, rows_per_block):
        rows = slice(i0, min(l, i0 + rows_per_block))
        n = rows.stop - i0
        scores = (_block(qg, 3, i0, n).to(ct) @ kt).reshape(b, h, -1, s) * scale + _block(mexp, 2, i0, n).to(ct)
        p = torch.exp(scores - _block(lse_c, 2, i0, n)[..., None])
        keep = _keep(l, s, rows, is_causal, causal_offset, seqlens_k, q.device)
        if keep is not None:
            p = p.masked_fill(~keep, 0.0)
        p = p.masked_fill(_block(dead, 2, i0, n)[..., None], 0.0)
        dp = -_block(delta, 2, i0, n)[..., None]
        if dog is not None:
            dp = (_block(dog, 3, i0, n).to(ct) @ vt).reshape(b, h, -1, s) + dp
        ds = p * dp                                                  # (B, H, rows, S)
        other = tuple(i for i in dims if i != 2)
        if other:
            ds = ds.sum(other, keepdim=True)
        parts.append(ds.sum(2, keepdim=True) if 2 in dims else ds)
    grad = torch.stack(parts).sum(0) if 2 in dims else torch.cat(parts, 2)
    return grad.reshape(mask.shape).to(mask.dtype)

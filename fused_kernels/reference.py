"""Pure-PyTorch references: one per op, with the op's signature and semantics.

They are what the tests compare every implementation with (called on float64 inputs for a
high-precision reference): the Triton kernels and each op's PyTorch path (what the "torch" backend and
CPU tensors run). Readable rather than fast: attention materializes the (L, S)
scores. The PyTorch paths fall back to them only where there is nothing to speed up (empty inputs) or
torch's fused kernel cannot give the result (``return_lse`` with dropout or a value head dim != E).
Arithmetic happens in float32 (float64 for float64 inputs), results come back in the input's dtype,
as the kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _up(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def layer_norm_ref(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    ct = _compute_dtype(input)
    out = F.layer_norm(input.to(ct), tuple(normalized_shape), _up(weight, ct), _up(bias, ct), eps)
    return out.to(input.dtype)


def rms_norm_ref(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
                 eps: float | None = None) -> torch.Tensor:
    ct = _compute_dtype(input)
    # torch's default: the epsilon of the computation dtype (float32 for half inputs), not the input's.
    eps = torch.finfo(ct).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.to(ct)
    out = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(ct)
    return out.to(input.dtype)


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, eps: float = 1e-5,
                       dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_out = residual + dropout(x)``; ``out = layer_norm(residual_out)`` over the last dim."""
    residual_out = F.dropout(x, dropout_p) if dropout_p > 0 else x
    if residual is not None:
        residual_out = residual + residual_out
    out = layer_norm_ref(residual_out, (x.shape[-1],), weight, bias, eps)
    return out, residual_out


def causal_mask(l: int, s: int, device: torch.device | str | None = None, *,
                bottom_right: bool = False) -> torch.Tensor:
    """Bool ``(l, s)`` mask, True where query i may attend key j: ``j <= i`` (top-left aligned, as
    torch's ``is_causal``) or ``j <= i + s - l`` (bottom-right aligned, as a KV cache needs)."""
    i = torch.arange(l, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return j <= i + (s - l if bottom_right else 0)


def softmax_ref(input: torch.Tensor, dim: int = -1, mask: torch.Tensor | None = None, scale: float = 1.0,
                is_causal: bool = False) -> torch.Tensor:
    """Softmax of ``scale * input (+ mask)`` along ``dim``; a bool ``mask`` keeps True entries.

    Entries that are masked out (or -inf) get probability 0; a row with nothing left gives 0."""
    ct = _compute_dtype(input)
    z = input.to(ct) * scale
    if is_causal:
        z = z.masked_fill(~causal_mask(z.shape[-2], z.shape[-1], z.device), float("-inf"))
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(ct)
    zmax = z.amax(dim, keepdim=True)
    zmax = torch.where(zmax == float("-inf"), torch.zeros_like(zmax), zmax)
    e = torch.exp(z - zmax)
    total = e.sum(dim, keepdim=True)
    out = torch.where(total == 0, torch.zeros_like(e), e / total)
    return out.to(input.dtype)


def _attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    keep: torch.Tensor | None, bias: torch.Tensor | None,
                    dropout_p: float, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scale * q @ k^T + bias, masked where ~keep) @ v`` in q's (float32/float64) dtype, with
    the log-sum-exp of the masked scaled scores. Masked entries and fully masked rows give 0 (lse -inf)."""
    s = (q @ k.transpose(-2, -1)) * scale if scores is None else scores
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)              # fully masked rows
    s = torch.where(empty, torch.zeros_like(s), s)                      # keeps their gradients finite
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(empty, torch.zeros_like(s), torch.exp(s - lse))
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse).squeeze(-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return p @ v, lse


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  attn_mask: torch.Tensor | None = None, seqlens_k: torch.Tensor | None = None,
                  scale: float | None = None, dropout_p: float = 0.0,
                  return_lse: bool = False, window=None, alibi_slopes=None, softcap=None, document_ids=None,
                  prefix_lengths=None, score_mod=None, score_mod_grad=None, mask_mod=None, mod_args=(),
                  block_mask=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``fused_kernels.attention``: (B, H, L, D) q, (B, Hkv, S, D) k, (B, Hkv, S, Dv) v, GQA by
    repeating key/value heads; ``causal`` is bottom-right aligned (key j <= i + off, ``off = S - L``; with
    ``seqlens_k`` per row, ``off = seqlens_k[b] - L``: query i of row b at position seqlens_k[b] - L + i, the
    offset of causal, window, ALiBi and prefix alike). The variants straight
    from their definitions on dense index tensors (``score_mod_grad`` unused: autograd differentiates this;
    ``block_mask`` ignored); mods may be triton JITFunctions (their ``.fn`` runs) or plain callables."""
    ct = _compute_dtype(q)
    b, h, l, d = q.shape
    hkv, s_len = k.shape[1], k.shape[2]
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    if hkv != h:
        kc, vc = kc.repeat_interleave(h // hkv, dim=1), vc.repeat_interleave(h // hkv, dim=1)
    sc = d ** -0.5 if scale is None else scale
    dev, off = q.device, s_len - l
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    hi = torch.arange(h, device=dev).view(1, h, 1, 1)
    ii = torch.arange(l, device=dev).view(1, 1, l, 1)
    jj = torch.arange(s_len, device=dev).view(1, 1, 1, s_len)
    keep = torch.ones(1, 1, l, s_len, dtype=torch.bool, device=q.device)
    if seqlens_k is not None:
        lens = seqlens_k.to(dev).long().view(b, 1, 1, 1)
        keep = keep & (jj < lens)
        off = lens - l
    if causal and prefix_lengths is None:   # prefix-LM: causal OR inside the prefix, below
        keep = keep & (jj <= ii + off)
    extra = tuple(mod_args) if mod_args else ()

    def call(mod, *args):
        fn = getattr(mod, "fn", mod)
        return fn(*args, extra) if extra else fn(*args)
    x = (qc @ kc.transpose(-2, -1)) * sc
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(ct).expand(b, h).reshape(b, h, 1, 1)
        x = x - slopes * (ii + off - jj).abs().to(ct)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            x = x + attn_mask.to(ct)
    if score_mod is not None:
        x = call(score_mod, x, bi, hi, ii, jj)
    if window is not None:
        left, right = window
        right = 0 if causal else right
        if left != -1:
            keep = keep & (jj >= ii + off - left)
        if right != -1:
            keep = keep & (jj <= ii + off + right)
    if prefix_lengths is not None:
        keep = keep & ((jj <= ii + off) | (jj < prefix_lengths.view(b, 1, 1, 1)))
    if document_ids is not None:
        qi, ki = document_ids if isinstance(document_ids, (tuple, list)) else (document_ids, document_ids)
        keep = keep & (qi.view(b, 1, l, 1) == ki.view(b, 1, 1, s_len))
    if mask_mod is not None:
        keep = keep & torch.as_tensor(call(mask_mod, bi, hi, ii, jj), device=dev).to(torch.bool)
    out, lse = _attention_core(qc, kc, vc, 1.0, keep, None, dropout_p, scores=x)
    out = out.to(q.dtype)
    return (out, lse.to(ct if ct == torch.float64 else torch.float32)) if return_lse else out


def scaled_dot_product_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                     is_causal: bool = False, scale: float | None = None,
                                     enable_gqa: bool = False) -> torch.Tensor:
    """Reference of ``fused_kernels.scaled_dot_product_attention`` (torch's semantics, ``is_causal`` top-left
    aligned: key j <= i), except that fully masked rows give 0 instead of NaN."""
    ct = _compute_dtype(query)
    q, k, v = query.to(ct), key.to(ct), value.to(ct)
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    l, s_len = q.shape[-2], k.shape[-2]
    keep = causal_mask(l, s_len, q.device) if is_causal else None
    bias = None
    if attn_mask is not None:   # together with is_causal both apply
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            bias = attn_mask.to(ct)
    out, _ = _attention_core(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, keep, bias, dropout_p)
    return out.to(query.dtype)


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                         scale: float | None = None, dropout_p: float = 0.0, return_lse: bool = False,
                         check: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``fused_kernels.varlen_attention``: ``attention_ref`` on each packed sequence; out (total_q, H, Dv),
    lse (H, total_q)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb, kb, vb = (t[lo:hi].transpose(0, 1)[None] for t, lo, hi in
                      ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]), (v, ck[b], ck[b + 1])))
        out, lse = attention_ref(qb, kb, vb, causal=causal, scale=scale, dropout_p=dropout_p, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_empty((0, q.shape[1], v.shape[2]))
    lse = torch.cat(lses, 1) if lses else q.new_empty((q.shape[1], 0), dtype=_compute_dtype(q))
    return (out, lse) if return_lse else out


def cross_entropy_ref(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                      reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                      softcap: float | None = None) -> torch.Tensor:
    """Reference of ``fused_kernels.cross_entropy`` on (N, V) logits and (N,) class targets: with
    ``c = softcap * tanh(logits / softcap)`` (or the logits), ``loss_i = lse - (1 - eps) c_t - eps / V sum_j c_j
    + z_loss * lse^2`` (0 where the target is ``ignore_index``), reduced as ``F.cross_entropy`` (mean over the
    rows not ignored)."""
    ct = _compute_dtype(logits)
    c = logits.to(ct)
    if softcap is not None:
        c = softcap * torch.tanh(c / softcap)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    lse = torch.logsumexp(c, dim=-1)
    loss = lse - (1.0 - label_smoothing) * c.gather(-1, t[..., None]).squeeze(-1)
    if label_smoothing > 0:
        loss = loss - label_smoothing * c.mean(-1)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.to(logits.dtype)
    total = loss.sum()
    return (total / valid.sum() if reduction == "mean" else total).to(logits.dtype)


def linear_cross_entropy_ref(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                             label_smoothing: float = 0.0, z_loss: float = 0.0,
                             softcap: float | None = None) -> torch.Tensor:
    """Reference of ``fused_kernels.linear_cross_entropy``: ``cross_entropy_ref(F.linear(input, weight, bias))``
    with the logits materialized, on (..., H) input and (...) targets."""
    ct = _compute_dtype(input)
    logits = F.linear(input.to(ct), weight.to(ct), _up(bias, ct)).reshape(-1, weight.shape[0])
    loss = cross_entropy_ref(logits, target.reshape(-1), ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return (loss.reshape(target.shape) if reduction == "none" else loss).to(input.dtype)


def apply_rotary_pos_emb_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             unsqueeze_dim: int = 1, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``fused_kernels.apply_rotary_pos_emb``: transformers' ``q * cos + rotate_half(q) * sin`` (or
    GPT-J's rotate-every-two with ``interleaved``) on the first ``cos.shape[-1]`` dims, the rest passed through;
    computed in float32 (float64), returned in the promoted dtype of the input and the tables."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        ct = _compute_dtype(torch.empty(0, dtype=out_dtype))
        xc, c, s = x.to(ct), cos.to(ct), sin.to(ct)
        xr = xc[..., :rot]
        if interleaved:
            turned = torch.stack([-xr[..., 1::2], xr[..., 0::2]], dim=-1).flatten(-2)
        else:
            turned = torch.cat([-xr[..., rot // 2:], xr[..., :rot // 2]], dim=-1)
        return torch.cat([xr * c + turned * s, xc[..., rot:].expand(*(xr * c).shape[:-1], -1)], -1).to(out_dtype)

    return rotate(q), rotate(k)


def gated_activation_ref(gate: torch.Tensor, up: torch.Tensor | None = None, activation: str = "silu") -> torch.Tensor:
    """Reference of ``fused_kernels.swiglu`` (``activation="silu"``) and ``geglu`` ("gelu", "gelu_tanh"):
    ``act(gate) * up`` in float32 (float64), ``up=None`` meaning the two halves of ``gate``; the promoted dtype."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    ct = _compute_dtype(torch.empty(0, dtype=out_dtype))
    g = gate.to(ct)
    if activation == "silu":
        a = g * torch.sigmoid(g)
    elif activation == "gelu":
        a = 0.5 * g * (1.0 + torch.erf(g / 2.0 ** 0.5))
    else:
        a = 0.5 * g * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (g + 0.044715 * g ** 3)))
    return (a * up.to(ct)).to(out_dtype)

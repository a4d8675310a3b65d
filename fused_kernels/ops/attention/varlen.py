"""Variable-length (packed) attention: many sequences of different lengths in one tensor, no padding.

Conventions (FlashAttention's ``flash_attn_varlen_func``):

- ``q`` (total_q, H, D), ``k`` (total_k, Hkv, D), ``v`` (total_k, Hkv, Dv): the tokens of every sequence one
  after another, last dim contiguous. Hkv divides H (GQA/MQA as ``fused_kernels.attention``).
- ``cu_seqlens_q`` / ``cu_seqlens_k`` (B + 1,) int32 or int64: cumulative lengths, starting at 0 and ending at
  total_q / total_k; sequence ``b`` owns query rows ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1`` and key rows
  ``cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1``. Empty sequences are allowed.
- ``max_seqlen_q`` / ``max_seqlen_k``: the longest sequence (ints); they size the launch grid, so they must be at
  least the longest length (checked with ``check=True``).
- ``causal=True`` is **bottom-right** aligned per sequence, as ``fused_kernels.attention(causal=True)``: query i of
  sequence b attends keys j <= i + S_b - L_b. Rows that see no key give 0 (lse -inf, zero gradients).
- Returns ``out`` (total_q, H, Dv) and with ``return_lse=True`` also the lse (H, total_q), float32 (float64
  for float64 inputs), as FlashAttention's ``softmax_lse``.

The Triton path is one launch per kernel over every sequence (custom ops ``fused_kernels::varlen_attention_fwd`` /
``fused_kernels::varlen_attention_bwd``): the dense attention kernels with ``VARLEN=True``, programs over (query
block, sequence x head) on a grid of cdiv(max_seqlen_q, BLOCK_M) x (B * H) (dK/dV: key blocks of
max_seqlen_k); a program whose block lies past its sequence returns at once, so padding costs no work. Each
program reads its sequence's start and length from ``cu_seqlens`` on the device. It always runs the main
kernel (no flash-decoding split-KV path, even for L_b = 1) and streams tiles through pointers (no TMA).
Dropout draws the same in-kernel mask in forward and backward, its stream indexed by the packed row (sequences
get distinct streams). The backward is deterministic (no atomics). The PyTorch path runs one
``torch_path.attention`` per sequence.
"""

from __future__ import annotations

import torch
import triton

from ..._core import backend as _backend
from ..._core import checks as _checks
from ..._core.grad import create_graph
from ..._core.launch import acc_dtype, device_arch, dot_precision, launch, next_pow2, torch_acc_dtype, upcast_16bit
from . import torch_path
from .api import _check_head_dims, _check_qkv, _check_scale, attention
from .config import LOG2E, MASK_NONE, preprocess_rows, varlen_config
from .kernels.backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .kernels.forward import _attn_fwd_kernel
from .launch import _fold_flags, _last_dim_contiguous, kernels_run

INDEX_DTYPES = (torch.int32, torch.int64)


def _check_cu(op: str, name: str, cu: object, total: int, device: torch.device, check: bool) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in INDEX_DTYPES:
        raise _checks.ArgumentTypeError(f"{op}: {name} must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise _checks.ArgumentValueError(f"{op}: {name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise _checks.ArgumentValueError(f"{op}: {name} is on {cu.device} but q is on {device}")
    if check:
        vals = cu.tolist()
        if vals[0] != 0:
            raise _checks.ArgumentValueError(f"{op}: {name} must start at 0, got {vals[0]}")
        if any(b < a for a, b in zip(vals, vals[1:])):
            raise _checks.ArgumentValueError(f"{op}: {name} must be non-decreasing, got {vals}")
        if vals[-1] != total:
            raise _checks.ArgumentValueError(f"{op}: {name} must end at the number of packed tokens {total}, got "
                                             f"{vals[-1]}")
    return cu


def _check_max(op: str, name: str, value: object, lengths: torch.Tensor | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{op}: {name} must be a non-negative int, got {value!r}")
    if lengths is not None and lengths.numel() and int(lengths.max()) > value:
        raise _checks.ArgumentValueError(f"{op}: {name} is {value} but the longest sequence has "
                                         f"{int(lengths.max())} tokens")
    return value


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: float | None = None, dropout_p: float = 0.0, return_lse: bool = False,
                     check: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each packed sequence over its own keys: see the module docstring for the layout.

    ``scale`` defaults to 1 / sqrt(D); ``dropout_p`` drops attention probabilities as ``fused_kernels.attention``.
    ``check=False`` skips the checks that read ``cu_seqlens`` on the host (a device sync): the caller promises
    they start at 0, never decrease, end at the totals and that no sequence is longer than ``max_seqlen_*``."""
    op = "varlen_attention"
    _check_qkv(op, q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise _checks.ArgumentValueError(f"{op}: {name} must be 3-D (total_tokens, heads, head_dim), got shape "
                                             f"{tuple(t.shape)}")
    total_q, h, d = q.shape
    total_k, hkv = k.shape[0], k.shape[1]
    if v.shape[0] != total_k or v.shape[1] != hkv:
        raise _checks.ArgumentValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same tokens "
                                         f"and heads")
    if k.shape[2] != d:
        raise _checks.ArgumentValueError(f"{op}: k's head dim {k.shape[2]} differs from q's {d}")
    if hkv == 0 or h % hkv != 0:
        raise _checks.ArgumentValueError(f"{op}: k/v heads ({hkv}) must divide q heads ({h})")
    _check_head_dims(op, d, v.shape[2])
    cu_q = _check_cu(op, "cu_seqlens_q", cu_seqlens_q, total_q, q.device, check)
    cu_k = _check_cu(op, "cu_seqlens_k", cu_seqlens_k, total_k, q.device, check)
    if cu_q.numel() != cu_k.numel():
        raise _checks.ArgumentValueError(f"{op}: cu_seqlens_q has {cu_q.numel() - 1} sequences but cu_seqlens_k has "
                                         f"{cu_k.numel() - 1}")
    len_q, len_k = (cu_q.diff(), cu_k.diff()) if check else (None, None)
    max_seqlen_q = _check_max(op, "max_seqlen_q", max_seqlen_q, len_q)
    max_seqlen_k = _check_max(op, "max_seqlen_k", max_seqlen_k, len_k)
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    scale = _check_scale(op, scale, d)
    dropout_p = _checks.check_probability("dropout_p", dropout_p, op)
    impl = _backend.choose(q, op)
    if impl == "triton" and not kernels_run(q, v, None, dropout_p, q, k, v, varlen=True):
        impl = "torch"       # no kernel in this device's column of the tile table
    if impl == "torch":
        return _per_sequence(q, k, v, cu_q, cu_k, causal, scale, dropout_p, return_lse, impl)
    out, lse, _ = varlen_attention_fwd(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, causal, dropout_p)
    return (out, lse) if return_lse else out


def _per_sequence(q, k, v, cu_q, cu_k, causal, scale, dropout_p, return_lse, impl):
    """One dense call per sequence on (1, H, L_b, D) views of the packed tensors (no copies, no padding)."""
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        qb = q[starts_q[b]:starts_q[b + 1]].transpose(0, 1)[None]
        kb = k[starts_k[b]:starts_k[b + 1]].transpose(0, 1)[None]
        vb = v[starts_k[b]:starts_k[b + 1]].transpose(0, 1)[None]
        if impl == "torch":
            res = torch_path.attention(qb, kb, vb, causal, None, None, scale, dropout_p, True)
        else:
            res = attention(qb, kb, vb, causal=causal, scale=scale, dropout_p=dropout_p, return_lse=True)
        outs.append(res[0][0].transpose(0, 1))
        lses.append(res[1][0])
    if not outs:
        out = q.new_empty((0, q.shape[1], v.shape[2]))
        lse = q.new_empty((q.shape[1], 0), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    else:
        out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- packed kernels


def _meta(q: torch.Tensor, d: int, dv: int, arch) -> dict:
    upcast = upcast_16bit(q.dtype, arch)
    return dict(MASK_KIND=MASK_NONE, HAS_SEQLENS=False, ALIGN_SEQLENS=False, BLOCK_D=max(16, next_pow2(d)),
                BLOCK_DV=max(16, next_pow2(dv)), UPCAST=upcast, PRECISION=dot_precision(q.dtype, upcast),
                ACC=acc_dtype(q.dtype))


_NO_MASK_STRIDES = (0, 0, 0, 0)     # the packed path takes no attn_mask (MASK_KIND none)


def _packed_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a packed (total, heads, dim) tensor seen as (1, heads, total, dim)."""
    return 0, t.stride(1), t.stride(0)


@torch.library.custom_op("fused_kernels::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, is_causal: bool, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed attention (module docstring): ``(out (total_q, H, Dv), lse (H, total_q), seed)``; ``seed`` is
    the dropout seed as an int64 CPU tensor of one element."""
    seed = _checks.dropout_seed() if dropout_p > 0 else 0
    out, lse = varlen_fwd_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                  is_causal, dropout_p, seed, device_arch(q.device))
    return out, lse, torch.tensor([seed], dtype=torch.int64)


def varlen_fwd_launch(q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal, dropout_p, seed, arch):
    """Allocate and launch the packed forward for compute capability ``arch`` (None: interpreter); also what
    ``fused_kernels.aot`` records (meta tensors, kernel replaced by a recorder)."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    total_q, h, d = q.shape
    total_k, hkv, dv = v.shape
    batch = cu_q.shape[0] - 1
    out = torch.empty((total_q, h, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((h, total_q), dtype=torch_acc_dtype(q.dtype), device=q.device)
    if total_q == 0 or h == 0:
        return out, lse
    if total_k == 0 or batch == 0 or max_q == 0:   # no keys anywhere: every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    meta = _meta(q, d, dv, arch)
    cfg = varlen_config("fwd", d, dv, q.dtype, arch, dropout_p > 0)
    flags = dict(IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0, **_fold_flags(scale, d, dv, meta), **meta)
    launch(_attn_fwd_kernel, (triton.cdiv(max_q, cfg["BLOCK_M"]), batch * h),
           q, k, v, None, None, q, None, out, lse, cu_q, cu_k, h, total_q, total_k, d, dv, h // hkv,
           _packed_strides(q), _packed_strides(k), _packed_strides(v), _packed_strides(out), _NO_MASK_STRIDES,
           scale * LOG2E, 0, dropout_p, seed, TMA=False, VARLEN=True,
           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
           **flags)
    return out, lse


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal, dropout_p):
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[2])),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch_acc_dtype(q.dtype)), torch.empty(1, dtype=torch.int64))


@torch.library.custom_op("fused_kernels::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, seed: torch.Tensor, scale: float, is_causal: bool, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``varlen_attention_fwd``; ``dlse`` (optional, (H, total_q)) is the gradient of
    its lse. dk / dv are summed over each GQA group's query heads. No atomics: deterministic."""
    return varlen_bwd_launch(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              int(seed[0]), scale, is_causal, dropout_p, device_arch(q.device))


def varlen_bwd_launch(do, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, seed, scale, is_causal, dropout_p,
                       arch):
    """Allocate and launch the packed backward for compute capability ``arch`` (None: interpreter). The
    preprocess (delta, lse in log2 units) is the dense kernel over the packed rows as one (1, H, total_q)
    batch: it has no per-sequence work. dq / dk / dv are written as (H, total, D) and returned as
    (total, H, D) views."""
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, do))
    total_q, h, d = q.shape
    total_k, hkv, dv = v.shape
    batch = cu_q.shape[0] - 1
    dq = torch.empty((h, total_q, d), dtype=q.dtype, device=q.device).transpose(0, 1)
    dk = torch.empty((hkv, total_k, d), dtype=k.dtype, device=k.device).transpose(0, 1)
    dvv = torch.empty((hkv, total_k, dv), dtype=v.dtype, device=v.device).transpose(0, 1)
    if total_q == 0 or total_k == 0 or h == 0 or batch == 0:
        return dq.zero_(), dk.zero_(), dvv.zero_()
    meta = _meta(q, d, dv, arch)
    acc = torch_acc_dtype(q.dtype)
    delta = torch.empty((h, total_q), dtype=acc, device=q.device)
    lse2 = torch.empty((h, total_q), dtype=acc, device=q.device)
    dlse_c = dlse.contiguous() if dlse is not None else delta
    row_bytes = meta["BLOCK_DV"] * q.element_size()
    pre_block = preprocess_rows(row_bytes, arch)
    launch(_attn_bwd_preprocess_kernel, (triton.cdiv(total_q, pre_block), h),
           out, do, dlse_c, lse.contiguous(), delta, lse2, h, total_q, dv, _packed_strides(out), _packed_strides(do),
           HAS_DLSE=dlse is not None, BLOCK_M=pre_block, BLOCK_DV=meta["BLOCK_DV"], ACC=meta["ACC"], num_warps=4)
    strides = (_packed_strides(q), _packed_strides(k), _packed_strides(v), _packed_strides(do), _NO_MASK_STRIDES)
    args = (scale, scale * LOG2E, 0, dropout_p, seed)
    flags = dict(IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0, **_fold_flags(scale, d, dv, meta), **meta)
    cfg = varlen_config("bwd_dkdv", d, dv, q.dtype, arch, dropout_p > 0)
    launch(_attn_bwd_dkdv_kernel, (triton.cdiv(max_k, cfg["BLOCK_N"]), batch * hkv),
           q, k, v, None, None, q, None, do, lse2, delta, dk, dvv, cu_q, cu_k, h, hkv, total_q, total_k, d, dv,
           h // hkv, *strides, *args, TMA=False, SPLIT_BLOCKS=q.dtype in (torch.float16, torch.bfloat16), VARLEN=True,
           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
           **flags)
    cfg = varlen_config("bwd_dq", d, dv, q.dtype, arch, dropout_p > 0)
    launch(_attn_bwd_dq_kernel, (triton.cdiv(max_q, cfg["BLOCK_M"]), batch * h),
           q, k, v, None, None, q, None, do, lse2, delta, dq, cu_q, cu_k, h, total_q, total_k, d, dv, h // hkv,
           *strides, *args, TMA=False, VARLEN=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags)
    return dq, dk, dvv


@varlen_attention_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale, is_causal,
      dropout_p):
    def packed(t):
        return t.new_empty((t.shape[1], t.shape[0], t.shape[2])).transpose(0, 1)
    return packed(q), packed(k), packed(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal, dropout_p = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
    ctx.max_q, ctx.max_k, ctx.scale, ctx.is_causal, ctx.dropout_p = max_q, max_k, scale, is_causal, dropout_p


def _backward(ctx, dout, dlse, _dseed):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    rest = (None,) * 7
    if (dout is None and dlse is None) or not any(ctx.needs_input_grad[:3]):
        return (None,) * 3 + rest
    if create_graph():
        raise NotImplementedError("varlen_attention: no double backward through the packed kernels")
    dq, dk, dv = varlen_attention_bwd(dout if dout is not None else torch.zeros_like(out), dlse, q, k, v, out, lse,
                                      cu_q, cu_k, ctx.max_q, ctx.max_k, seed, ctx.scale, ctx.is_causal,
                                      ctx.dropout_p)
    return dq, dk, dv, *rest


varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)

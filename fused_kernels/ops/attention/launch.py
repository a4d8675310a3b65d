"""Launchers: the ``torch.library`` custom ops ``fused_kernels::attention_fwd`` / ``fused_kernels::attention_bwd`` with
their registered autograd, TMA descriptors and the flags every kernel shares. ``fwd_launch`` and
``bwd_launch`` are also what ``fused_kernels.aot`` records (meta tensors, kernels replaced by recorders)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import triton

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer path only
    TensorDescriptor = None

from ..._core import checks as _checks
from ..._core.grad import create_graph
from ..._core.launch import (
    acc_dtype,
    device_arch,
    dot_precision,
    grid_fits,
    launch,
    next_pow2,
    scratch_launch,
    torch_acc_dtype,
    upcast_16bit,
)
from . import grad as _grad
from . import sparse
from .config import (
    _TRITON_VERSION,
    LOG2E,
    MASK_BOOL,
    MASK_FLOAT,
    MASK_NONE,
    attention_config,
    has_kernels,
    preprocess_rows,
    split_blocks,
)
from .kernels.backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .kernels.backward_ws import _attn_bwd_dkdv_ws_kernel
from .kernels.decode import _attn_combine_kernel, _attn_fwd_split_kernel
from .kernels.forward import _attn_fwd_kernel
from .variants import Variants, row_offsets


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def tma_desc(t: torch.Tensor, block_rows: int, block_cols: int) -> TensorDescriptor | None:
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


def _in_kernel_tma(*tensors: torch.Tensor) -> bool:
    """Whether a kernel can make TMA descriptors of each (B, H, rows, cols) tensor's (rows, cols) planes (the
    warp-specialized kernels): what ``tma_desc`` checks, and the row stride aligned even for a single row (which
    ``tma_desc`` passes)."""
    return all(tma_desc(t, 1, 1) is not None and t.stride(2) * t.element_size() % 16 == 0 for t in tensors)


def _kv_descs(k: torch.Tensor, v: torch.Tensor, cfg: dict, meta: dict) -> tuple:
    """(k, v) TMA descriptors with a BLOCK_N-key box where the configuration asks for TMA and both tensors
    allow it, else (None, None): the kernel then takes the pointer path."""
    if not cfg.get("TMA"):
        return None, None
    k_desc = tma_desc(k, cfg["BLOCK_N"], meta["BLOCK_D"])
    v_desc = tma_desc(v, cfg["BLOCK_N"], meta["BLOCK_DV"])
    return (k_desc, v_desc) if k_desc is not None and v_desc is not None else (None, None)


def _fold_flags(scale: float, d: int, dv: int, meta: dict) -> dict:
    """FOLD_SCALE: the scale can go into the exponent (positive, no float mask added after scaling);
    EVEN_D / EVEN_DV: the head dims fill their blocks, so no head-dim masks."""
    return dict(FOLD_SCALE=scale > 0 and meta["MASK_KIND"] != MASK_FLOAT, EVEN_D=d == meta["BLOCK_D"],
                EVEN_DV=dv == meta["BLOCK_DV"])


# Triton releases before 3.9 fail to compile the float64 kernels that read a bool mask (forward, split, dK/dV,
# dQ at every head dim, sm_80 and sm_90a: "Currently fp64 don't support largeK MMA" in the MMA lowering, reached
# through the uint8 mask loads; checked with python -m fused_kernels.aot on triton 3.6 and 3.8). With them a float64
# bool mask reaches the kernels as the float mask 0 / -inf it is equivalent to (8 bytes per mask element, not 1).
FP64_BOOL_MASK_AS_FLOAT = _TRITON_VERSION < (3, 9)


def _mask_args(mask: torch.Tensor | None, shape: tuple[int, int, int, int], like: torch.Tensor):
    """(tensor, kind, strides) of a mask broadcast to (B, H, L, S) as a view (stride 0 where broadcast)."""
    if mask is None:
        return like, MASK_NONE, (0, 0, 0, 0)
    if mask.dtype == torch.bool and like.dtype == torch.float64 and FP64_BOOL_MASK_AS_FLOAT:
        # converted where it is stored: broadcast (stride-0) dims stay broadcast
        compact = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
        mask = torch.zeros(compact.shape, dtype=torch.float64, device=mask.device).masked_fill_(
            ~compact, float("-inf")).expand(mask.shape)
    m = mask.expand(shape)
    kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
    if kind == MASK_BOOL:
        m = m.view(torch.uint8)
    return m, kind, tuple(m.stride())


def _common(q, k, v, mask, seqlens_k, arch, align_seqlens):
    b, h, l, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    m, kind, mstrides = _mask_args(mask, (b, h, l, s), q)
    upcast = upcast_16bit(q.dtype, arch)
    meta = dict(MASK_KIND=kind, HAS_SEQLENS=seqlens_k is not None,
                ALIGN_SEQLENS=bool(align_seqlens) and seqlens_k is not None,
                BLOCK_D=max(16, next_pow2(d)), BLOCK_DV=max(16, next_pow2(dv)),
                UPCAST=upcast, PRECISION=dot_precision(q.dtype, upcast), ACC=acc_dtype(q.dtype))
    return (b, h, l, d, hkv, s, dv), m, mstrides, meta


def _rows(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, rows, cols) tensor."""
    return tuple(t.stride()[:3])


@torch.library.custom_op("fused_kernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, seqlens_k: torch.Tensor | None,
    scale: float, is_causal: bool, causal_offset: int, dropout_p: float, num_splits: int,
    window: Sequence[int] | None = None, alibi_slopes: torch.Tensor | None = None, softcap: float | None = None,
    q_ids: torch.Tensor | None = None, k_ids: torch.Tensor | None = None, prefix_lengths: torch.Tensor | None = None,
    align_seqlens: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of (B, H, L, D) ``q`` over (B, Hkv, S, D) ``k`` / (B, Hkv, S, Dv) ``v``.

    ``mask`` broadcastable to (B, H, L, S), bool (True = attend) or float (added to the scaled scores);
    causal: key j <= i + ``causal_offset`` (``align_seqlens``: + seqlens_k[b] - S, each row's diagonal and
    variant positions at the end of its valid keys, as ``attention`` has them; without it seqlens_k only masks
    keys, as ring attention needs); ``num_splits`` > 0 runs the flash-decoding path. The built-in
    variants (validated, as ``Variants`` holds them; none with ``num_splits``) are plain arguments, so that
    calls with them trace under torch.compile; the user mods (Triton functions) take ``variant_attention``.
    Returns ``(out (B, H, L, Dv), lse (B, H, L) in the accumulation dtype, seed)``; ``seed`` is the dropout seed
    as an int64 CPU tensor of one element."""
    var = _builtin_variants(window, alibi_slopes, softcap, q_ids, k_ids, prefix_lengths, is_causal, causal_offset,
                            _aligned_to(align_seqlens, seqlens_k, k))
    seed = _checks.dropout_seed() if dropout_p > 0 else 0
    out, lse = fwd_launch(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, num_splits, seed,
                          device_arch(q.device), var=var, align_seqlens=align_seqlens)
    return out, lse, torch.tensor([seed], dtype=torch.int64)


def _aligned_to(align_seqlens: bool, seqlens_k: torch.Tensor | None, k: torch.Tensor):
    """(seqlens_k, S) where the call aligns its offsets per row (``_builtin_variants``), else None."""
    return (seqlens_k, k.shape[2]) if align_seqlens and seqlens_k is not None else None


def _builtin_variants(window, alibi_slopes, softcap, q_ids, k_ids, prefix_lengths, is_causal: bool,
                      causal_offset: int, aligned_to=None) -> Variants | None:
    """The ``Variants`` of the custom ops' variant arguments (None when every one is off); ``aligned_to``
    (seqlens_k, S): the offsets per row (``row_offsets``), for the block lists and the PyTorch gradients."""
    if window is None and alibi_slopes is None and softcap is None and q_ids is None and prefix_lengths is None:
        return None
    off = causal_offset if aligned_to is None else row_offsets(causal_offset, *aligned_to)
    return Variants(window=None if window is None else (int(window[0]), int(window[1])), alibi_slopes=alibi_slopes,
                    softcap=softcap, q_ids=q_ids, k_ids=k_ids, prefix_lengths=prefix_lengths, causal=is_causal,
                    off=off)


def builtin_arguments(var: Variants | None) -> tuple:
    """The custom ops' variant arguments of ``var`` (its built-in variants; no user mods)."""
    if var is None:
        return ()
    return (None if var.window is None else list(var.window), var.alibi_slopes, var.softcap, var.q_ids, var.k_ids,
            var.prefix_lengths)


def _variant_flags(var, q, s, seqlens_k, is_causal, causal_offset, scale, flags) -> dict:
    """``flags`` with the variants' kernel arguments (``sparse.kernel_args``): the band's upper side replaces
    IS_CAUSAL, and a score modification turns FOLD_SCALE off (the mods need the scaled scores)."""
    if var is None:
        return flags
    kw, upper = sparse.kernel_args(var, q, s, seqlens_k, is_causal, causal_offset, scale)
    flags = dict(flags, IS_CAUSAL=upper, **kw)
    if kw["VARIANT"].mods_scores:
        flags["FOLD_SCALE"] = False
    return flags


def _heavy(var, dropout_p: float) -> bool:
    """Whether the call takes the register-lean tile column (``attention_config``'s dropout column): dropout, or
    score modifications that do not fit the plain tiles' registers / shared memory on sm_90a (``python -m
    fused_kernels.aot --family variants --sass``: ALiBi, a mod reading ``mod_args``, softcap together with a score_mod
    spill or overflow there; softcap alone or a score_mod alone fit)."""
    if dropout_p > 0:
        return True
    return var is not None and (var.alibi_slopes is not None or bool(var.mod_args)
                                or (var.softcap is not None and var.score_mod is not None))


def _row_state(var, meta: dict) -> bool:
    """Whether the call's query loops carry per-row state (softcap, document ids, causal offsets aligned per row
    to seqlens_k): ``attention_config``'s ``row_state``."""
    return meta["ALIGN_SEQLENS"] or (var is not None and (var.softcap is not None or var.q_ids is not None))


def kernels_run(q: torch.Tensor, v: torch.Tensor, var, dropout_p: float, *grad_inputs: torch.Tensor | None,
                varlen: bool = False) -> bool:
    """Whether the tile table's column of ``q``'s device has Triton kernels for this call (``config.has_kernels``):
    the forward, and the backward when autograd will want gradients of ``grad_inputs``. Where it has not, the
    caller runs the PyTorch path for the whole call."""
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    return has_kernels(q.shape[-1], v.shape[-1], q.dtype, device_arch(q.device), _heavy(var, dropout_p), backward,
                       varlen)


def _lists(var, flags, q, k, seqlens_k, is_causal, causal_offset, block_m, block_n, by_query) -> dict:
    """The sparse lists of the call at one kernel's tiles (nothing when the call takes the analytic loops)."""
    if not flags.get("SPARSE"):
        return {}
    b, h, l = q.shape[:3]
    cls = sparse.classes(var, b, h, l, k.shape[2], seqlens_k, is_causal, causal_offset, block_m, block_n, q.device)
    return sparse.lists(cls, by_query)


def fwd_launch(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, num_splits, seed, arch,
                var=None, align_seqlens=False):
    """Allocate and launch the forward for compute capability ``arch`` (None: interpreter); also what
    ``fused_kernels.aot`` runs (on meta tensors, kernels replaced by recorders) to see the launches. ``var``: the
    call's variants (``fused_kernels.attention.variants.Variants``; never with ``num_splits``);
    ``align_seqlens`` as in ``attention_fwd``."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    (b, h, l, d, hkv, s, dv), m, ms, meta = _common(q, k, v, mask, seqlens_k, arch, align_seqlens)
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
    flags = dict(IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0, **_fold_flags(scale, d, dv, meta), **meta)
    flags = _variant_flags(var, q, s, seqlens_k, is_causal, causal_offset, scale, flags)
    if num_splits > 0:
        cfg = attention_config("decode", d, dv, q.dtype, arch, dropout_p > 0)
        block_n = cfg["BLOCK_N"]
        chunk = triton.cdiv(triton.cdiv(s, num_splits), block_n) * block_n
        splits = triton.cdiv(s, chunk)
        rows = group * l
        opart = torch.empty((b * hkv, splits, rows, dv), dtype=acc, device=q.device)
        lsepart = torch.empty((b * hkv, splits, rows), dtype=acc, device=q.device)
        launch(_attn_fwd_split_kernel, (splits, b * hkv),
               q, k, v, m, seqlens_k, opart, lsepart, h, hkv, l, s, d, dv, group, splits, chunk, _rows(q), _rows(k),
               _rows(v), ms, *args, BLOCK_M=max(16, next_pow2(rows)), BLOCK_N=block_n,
               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags)
        launch(_attn_combine_kernel, (rows, b * hkv),
               opart, lsepart, out, lse, h, hkv, l, dv, group, splits, _rows(out),
               BLOCK_S=next_pow2(splits), BLOCK_DV=meta["BLOCK_DV"], ACC=meta["ACC"], num_warps=4)
    else:
        # every key block full and mask-free: the warp-specialized loop, where this triton compiles it
        specialize = (var is None and dropout_p == 0 and meta["MASK_KIND"] == MASK_NONE and not is_causal
                      and seqlens_k is None)
        cfg = attention_config("fwd", d, dv, q.dtype, arch, _heavy(var, dropout_p), specialize=specialize,
                               variant=var is not None)
        k_desc, v_desc = _kv_descs(k, v, cfg, meta)
        grid = (triton.cdiv(l, cfg["BLOCK_M"]), b * h)
        # q's descriptor is made in the kernel from q's own row stride (tma_desc checks the others; it passes any
        # stride of a size-1 dim); a split grid's program-id offset (tl.assume) breaks triton's pass
        ws = (cfg.get("WARP_SPECIALIZE") and s % cfg["BLOCK_N"] == 0 and k_desc is not None and _in_kernel_tma(q)
              and grid_fits(grid))
        if cfg.get("WARP_SPECIALIZE") and not ws:
            cfg = attention_config("fwd", d, dv, q.dtype, arch, _heavy(var, dropout_p))
            k_desc, v_desc = _kv_descs(k, v, cfg, meta)
            grid = (triton.cdiv(l, cfg["BLOCK_M"]), b * h)
        lists = _lists(var, flags, q, k, seqlens_k, is_causal, causal_offset, cfg["BLOCK_M"], cfg["BLOCK_N"], True)
        fwd_args = (q, k, v, k_desc, v_desc, m, seqlens_k, out, lse, None, None, h, l, s, d, dv, group,
                    _rows(q), _rows(k), _rows(v), _rows(out), ms, *args)
        fwd_kw = dict(TMA=k_desc is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags, **lists)
        if ws:
            scratch_launch(q.device, _attn_fwd_kernel, grid, *fwd_args, WARP_SPECIALIZE=True, **fwd_kw)
        else:
            launch(_attn_fwd_kernel, grid, *fwd_args, **fwd_kw)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, num_splits, *variants):
    b, h, l, _ = q.shape
    return (q.new_empty((b, h, l, v.shape[3])), q.new_empty((b, h, l), dtype=torch_acc_dtype(q.dtype)),
            torch.empty(1, dtype=torch.int64))


@torch.library.custom_op("fused_kernels::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None, seqlens_k: torch.Tensor | None,
    seed: torch.Tensor, scale: float, is_causal: bool, causal_offset: int, dropout_p: float,
    window: Sequence[int] | None = None, alibi_slopes: torch.Tensor | None = None, softcap: float | None = None,
    q_ids: torch.Tensor | None = None, k_ids: torch.Tensor | None = None, prefix_lengths: torch.Tensor | None = None,
    align_seqlens: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``attention_fwd``; for GQA dk/dv are summed over each group's query
    heads. ``dlse`` (optional) is the gradient of the returned lse. No atomics: deterministic."""
    var = _builtin_variants(window, alibi_slopes, softcap, q_ids, k_ids, prefix_lengths, is_causal, causal_offset,
                            _aligned_to(align_seqlens, seqlens_k, k))
    return bwd_launch(do, dlse, q, k, v, out, lse, mask, seqlens_k, int(seed[0]), scale, is_causal, causal_offset,
                      dropout_p, device_arch(q.device), var=var, align_seqlens=align_seqlens)


def bwd_launch(do, dlse, q, k, v, out, lse, mask, seqlens_k, seed, scale, is_causal, causal_offset, dropout_p,
                arch, var=None, align_seqlens=False):
    """Allocate and launch the backward for compute capability ``arch`` (None: interpreter); ``var`` and
    ``align_seqlens`` as in ``fwd_launch``."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    do = _last_dim_contiguous(do)
    (b, h, l, d, hkv, s, dv), m, ms, meta = _common(q, k, v, mask, seqlens_k, arch, align_seqlens)
    dq = torch.empty((b, h, l, d), dtype=q.dtype, device=q.device)     # every element is written
    dk = torch.empty((b, hkv, s, d), dtype=k.dtype, device=k.device)
    dvv = torch.empty((b, hkv, s, dv), dtype=v.dtype, device=v.device)
    if b * h * l == 0 or s == 0:
        return dq.zero_(), dk.zero_(), dvv.zero_()
    acc = torch_acc_dtype(q.dtype)
    group = h // hkv
    delta = torch.empty((b, h, l), dtype=acc, device=q.device)
    lse2 = torch.empty((b, h, l), dtype=acc, device=q.device)
    dlse_c = dlse.contiguous() if dlse is not None else None
    row_bytes = meta["BLOCK_DV"] * q.element_size()
    pre_block = preprocess_rows(row_bytes, arch)
    launch(_attn_bwd_preprocess_kernel, (triton.cdiv(l, pre_block), b * h),
           out, do, dlse_c, lse.contiguous(), delta, lse2, h, l, dv, _rows(out), _rows(do),
           HAS_DLSE=dlse is not None, BLOCK_M=pre_block, BLOCK_DV=meta["BLOCK_DV"], ACC=meta["ACC"], num_warps=4)
    args = (scale, scale * LOG2E, causal_offset, dropout_p, seed)
    flags = dict(IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0, **_fold_flags(scale, d, dv, meta), **meta)
    flags = _variant_flags(var, q, s, seqlens_k, is_causal, causal_offset, scale, flags)
    # every query block full and mask-free, MHA: the warp-specialized dK/dV kernel, where this triton compiles it
    specialize = (var is None and dropout_p == 0 and meta["MASK_KIND"] == MASK_NONE and not is_causal
                  and seqlens_k is None and group == 1 and flags["FOLD_SCALE"])
    cfg = attention_config("bwd_dkdv", d, dv, q.dtype, arch, _heavy(var, dropout_p), specialize=specialize)
    grid = (triton.cdiv(s, cfg["BLOCK_N"]), b * hkv)
    if cfg.get("WARP_SPECIALIZE") and _in_kernel_tma(q, k, v, do) and grid_fits(grid):
        scratch_launch(q.device, _attn_bwd_dkdv_ws_kernel, grid,
                       q, k, v, do, lse2, delta, dk, dvv, h, l, s, d, dv, _rows(q), _rows(k), _rows(v), _rows(do),
                       scale, scale * LOG2E, UPCAST=meta["UPCAST"], PRECISION=meta["PRECISION"], ACC=meta["ACC"],
                       BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=meta["BLOCK_D"],
                       BLOCK_DV=meta["BLOCK_DV"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        cfg = attention_config("bwd_dkdv", d, dv, q.dtype, arch, _heavy(var, dropout_p),
                               row_state=_row_state(var, meta), variant=var is not None)
        bm = cfg["BLOCK_M"]
        q_desc = tma_desc(q, bm, meta["BLOCK_D"]) if cfg.get("TMA") else None
        do_desc = tma_desc(do, bm, meta["BLOCK_DV"]) if q_desc is not None else None
        tma = do_desc is not None
        # SPLIT_BLOCKS (diagonal, full and tail query blocks in three loops) only with one offset for every row:
        # per-row offsets (ALIGN_SEQLENS) keep one more value live and the three loops spill (bf16 d=128 on sm_90a
        # and, with dropout, on sm_80; python -m fused_kernels.aot, "causal-seqlens" / "heavy"), one loop does not.
        launch(_attn_bwd_dkdv_kernel, (triton.cdiv(s, cfg["BLOCK_N"]), b * hkv),
               q, k, v, q_desc if tma else None, do_desc if tma else None, m, seqlens_k, do, lse2, delta, dk, dvv,
               None, None, h, hkv, l, s, d, dv, group, _rows(q), _rows(k), _rows(v), _rows(do), ms, *args, TMA=tma,
               SPLIT_BLOCKS=(q.dtype in (torch.float16, torch.bfloat16) and not meta["ALIGN_SEQLENS"]
                             and split_blocks(arch)),
               BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"],
               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags,
               **_lists(var, flags, q, k, seqlens_k, is_causal, causal_offset, bm, cfg["BLOCK_N"], False))
    cfg = attention_config("bwd_dq", d, dv, q.dtype, arch, _heavy(var, dropout_p), row_state=_row_state(var, meta),
                           variant=var is not None)
    k_desc, v_desc = _kv_descs(k, v, cfg, meta)
    launch(_attn_bwd_dq_kernel, (triton.cdiv(l, cfg["BLOCK_M"]), b * h),
           q, k, v, k_desc, v_desc, m, seqlens_k, do, lse2, delta, dq, None, None, h, l, s, d, dv, group,
           _rows(q), _rows(k), _rows(v), _rows(do), ms, *args,
           TMA=k_desc is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
           num_stages=cfg["num_stages"], **flags,
           **_lists(var, flags, q, k, seqlens_k, is_causal, causal_offset, cfg["BLOCK_M"], cfg["BLOCK_N"], True))
    return dq, dk, dvv


@attention_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, mask, seqlens_k, seed, scale, is_causal, causal_offset, dropout_p, *variants):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, _, *rest = inputs
    out, lse, seed = output
    rest += [None] * (7 - len(rest))     # arguments left at their defaults may be absent
    *variant_args, align_seqlens = rest
    align_seqlens = bool(align_seqlens) and seqlens_k is not None
    var = _builtin_variants(*variant_args, is_causal, causal_offset, _aligned_to(align_seqlens, seqlens_k, k))
    _save(ctx, q, k, v, out, lse, mask, seqlens_k, seed, scale, is_causal, causal_offset, dropout_p, var,
          align_seqlens)


def _save(ctx, q, k, v, out, lse, mask, seqlens_k, seed, scale, is_causal, causal_offset, dropout_p, var,
          align_seqlens) -> None:
    """What the backward needs, the same for both autograd mechanisms (tensors of ``var`` saved as tensors)."""
    tensors = () if var is None else (var.alibi_slopes, var.q_ids, var.k_ids, var.prefix_lengths)
    ctx.save_for_backward(q, k, v, out, lse, mask, seqlens_k, seed, *tensors)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
    ctx.scale, ctx.is_causal, ctx.causal_offset, ctx.dropout_p = scale, is_causal, causal_offset, dropout_p
    ctx.align_seqlens = align_seqlens
    ctx.var = None if var is None else dataclasses.replace(var, alibi_slopes=None, q_ids=None, k_ids=None,
                                                           prefix_lengths=None)


def _backward(ctx, dout, dlse, *_):
    """(dq, dk, dv, dmask) of attention, for the custom op (plain calls, built-in variants) and for
    ``_UserModAttention`` (user mods) alike: the kernel backward for q/k/v; a float mask that requires grad gets
    ``dS`` summed to its shape (``grad.attention_mask_grad``, or the PyTorch variant math with variants); when a
    graph of the backward is built (double backward) every gradient comes from differentiable PyTorch ops
    (``grad.attention_backward``)."""
    q, k, v, out, lse, mask, seqlens_k, seed, *tensors = ctx.saved_tensors
    var = ctx.var
    if var is not None and tensors:
        slopes, q_ids, k_ids, prefix = tensors
        var = dataclasses.replace(var, alibi_slopes=slopes, q_ids=q_ids, k_ids=k_ids, prefix_lengths=prefix)
    rest = (None,) * (len(ctx.needs_input_grad) - 4)
    if dout is None and dlse is None:
        return (None,) * 4 + rest
    needs = tuple(ctx.needs_input_grad[:4])
    args = (ctx.scale, ctx.is_causal, ctx.causal_offset)
    # The PyTorch gradients take per-row offsets as a (B, 1, 1, 1) tensor; the kernels shift them themselves.
    offset = ctx.causal_offset
    if ctx.align_seqlens:
        offset = row_offsets(offset, seqlens_k, k.shape[2])
    math_args = (ctx.scale, ctx.is_causal, offset)
    if create_graph():
        return (*_grad.attention_backward(q, k, v, mask, seqlens_k, dout, dlse, *math_args, ctx.dropout_p, needs,
                                          variants=var), *rest)
    dq = dk = dv = dmask = None
    if any(needs[:3]):
        dout_ = dout if dout is not None else torch.zeros_like(out)
        if var is None or var.is_builtin:
            dq, dk, dv = attention_bwd(dout_, dlse, q, k, v, out, lse, mask, seqlens_k, seed, *args, ctx.dropout_p,
                                       *builtin_arguments(var), align_seqlens=ctx.align_seqlens)
        else:
            dq, dk, dv = bwd_launch(dout_, dlse, q, k, v, out, lse, mask, seqlens_k, int(seed[0]), *args,
                                    ctx.dropout_p, device_arch(q.device), var=var, align_seqlens=ctx.align_seqlens)
    if needs[3]:
        if ctx.dropout_p > 0:   # the public functions send this case to the PyTorch path
            raise NotImplementedError("attention: the kernels give no attn_mask gradient with dropout_p > 0")
        if var is None:
            dmask = _grad.attention_mask_grad(q, k, v, out, lse, dout, dlse, mask, *math_args, seqlens_k)
        else:
            with torch.enable_grad():   # dS at the mask's point of the pipeline, from the PyTorch variant math
                dmask = _grad.attention_backward(q.detach(), k.detach(), v.detach(), mask.detach().requires_grad_(),
                                                 seqlens_k, dout, dlse, *math_args, 0.0, (False, False, False, True),
                                                 variants=var)[3].detach()
    return dq, dk, dv, dmask, *rest


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _UserModAttention(torch.autograd.Function):
    """Attention with user mods (``score_mod`` / ``mask_mod`` Triton functions, ``mod_args``, a ``block_mask``),
    which are no ``torch.library`` argument types: the same kernels and the same backward (``_backward``) as the
    custom op, through a plain autograd Function."""

    @staticmethod
    def forward(ctx, q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, var, align_seqlens):
        seed = _checks.dropout_seed() if dropout_p > 0 else 0
        out, lse = fwd_launch(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, 0, seed,
                              device_arch(q.device), var=var, align_seqlens=align_seqlens)
        seed_t = torch.tensor([seed], dtype=torch.int64)
        _save(ctx, q, k, v, out, lse, mask, seqlens_k, seed_t, scale, is_causal, causal_offset, dropout_p, var,
              align_seqlens and seqlens_k is not None)
        return out, lse

    backward = staticmethod(_backward)


def variant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      seqlens_k: torch.Tensor | None, scale: float, is_causal: bool, causal_offset: int,
                      dropout_p: float, var: Variants,
                      align_seqlens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, L, Dv), lse (B, H, L)) of attention with the validated variants ``var`` on the kernels: the
    custom op for the built-in variants, ``_UserModAttention`` with user mods. ``align_seqlens`` as in
    ``attention_fwd`` (``var.off`` then holds the per-row offsets, ``row_offsets``)."""
    if var.is_builtin:
        out, lse, _ = attention_fwd(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, 0,
                                    *builtin_arguments(var), align_seqlens=align_seqlens)
        return out, lse
    return _UserModAttention.apply(q, k, v, mask, seqlens_k, scale, is_causal, causal_offset, dropout_p, var,
                                   align_seqlens)

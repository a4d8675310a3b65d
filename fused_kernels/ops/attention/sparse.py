"""The variants of one attention call as kernel arguments: flags, small tensors, and the block table's sparse
lists at a kernel's tile sizes.

The mask variants (window, prefix, document ids, mask_mod) make the kernels iterate lists of key blocks (or, in
the dK/dV kernel, query blocks) instead of the analytic causal range: each list holds a tile class of the
combined table, ``combine`` (elementwise min) of the band (causal / window, with the prefix OR-ed in), the
document classes, the ``mask_mod`` table and the bounds. A tile is full only where every element is in range
(rows < L, keys < the batch's key length), so full tiles load and score without a single predicate.
"""

from __future__ import annotations

import dataclasses

import torch

from .blockmask import EMPTY, FULL, PARTIAL, band_classes, block_mask, combine, document_classes, kv_lists, q_lists
from .kernels.mods import DOC_PAD, VariantFlags
from .variants import Variants, row_offsets


def is_sparse(var) -> bool:
    """Whether the call's mask variants need block lists (plain and causal calls take the analytic loops)."""
    return var is not None and (var.window is not None or var.prefix_lengths is not None or var.q_ids is not None
                                or var.mask_mod is not None)


def band(var, causal: bool) -> tuple[int, int]:
    """(left, right) of the band, -1 for an unbounded side; causal bounds the right side at 0."""
    left, right = var.window if var.window is not None else (-1, -1)
    return left, 0 if causal else right


def _ramp(n: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(0, n, block, device=device, dtype=torch.int64)
    return start, start + block


def classes(var, b: int, h: int, l: int, s: int, seqlens_k: torch.Tensor | None, causal: bool, c_off: int,
            block_m: int, block_n: int, device) -> torch.Tensor:
    """int8 (Bm, Hm, nm, nn) tile classes (0 empty, 1 partial, 2 full) of the call at tiles (block_m, block_n).
    ``var.off`` per row (a tensor: offsets aligned to each row's seqlens_k) gives each row its own band."""
    left, right = band(var, causal)
    if isinstance(var.off, torch.Tensor):
        bands = {o: band_classes(l, s, block_m, block_n, o, left, right, device=device)
                 for o in set(var.off.view(-1).tolist())}
        tables = [torch.stack([bands[o] for o in var.off.view(-1).tolist()])[:, None]]
    else:
        tables = [band_classes(l, s, block_m, block_n, c_off, left, right, device=device)[None, None]]
    k0, k1 = _ramp(s, block_n, device)
    if var.prefix_lengths is not None:   # keys j < prefix are kept by every query: OR (max) with the band
        p = var.prefix_lengths.to(device=device, dtype=torch.int64)[:, None, None, None]
        pre = torch.where(torch.clamp(k1, max=s) <= p, FULL, torch.where(k0 < p, PARTIAL, EMPTY)).to(torch.int8)
        tables[0] = torch.maximum(tables[0], pre)
    if var.q_ids is not None:
        tables.append(document_classes(var.q_ids, var.k_ids, block_m, block_n))
    if var.mask_mod is not None:
        bm = var.block_mask
        if bm is None:
            bm = block_mask(var.mask_mod, b, h, l, s, block=(block_m, block_n), mod_args=var.mod_args, device=device)
        tables.append(bm.at(block_m, block_n).to(device))
    kv_len = torch.full((1,), s, device=device) if seqlens_k is None else seqlens_k.to(device).clamp(0, s)
    kv_len = kv_len.to(torch.int64)[:, None, None, None]
    tables.append(torch.where(k1 <= kv_len, FULL, torch.where(k0 < kv_len, PARTIAL, EMPTY)).to(torch.int8))
    _, q1 = _ramp(l, block_m, device)
    tables.append(torch.where(q1 <= l, FULL, PARTIAL).to(torch.int8)[None, None, :, None])
    return combine(*tables)


def lists(cls: torch.Tensor, by_query: bool) -> dict:
    """Kernel arguments of the sparse lists of ``cls``: per query block (``by_query``: forward and dQ) or per key
    block (dK/dV), the full then the partial blocks, with broadcast strides over Bm / Hm of size 1."""
    full_n, full_i, part_n, part_i = kv_lists(cls) if by_query else q_lists(cls)
    cnt = torch.stack((full_n, part_n)).contiguous()           # (2, Bm, Hm, rows)
    idx = torch.stack((full_i, part_i)).contiguous()           # (2, Bm, Hm, rows, NN)
    _, bm, hm, rows = cnt.shape
    return dict(LIST_CNT=cnt, LIST_IDX=idx,
                stride_list=(bm * hm * rows, hm * rows if bm > 1 else 0, rows if hm > 1 else 0), NN=idx.shape[-1])


def kernel_args(var, q: torch.Tensor, s: int, seqlens_k: torch.Tensor | None, causal: bool, c_off: int,
                scale: float) -> tuple[dict, bool]:
    """(keyword arguments every kernel of the call takes, IS_CAUSAL) of the variants: ``VARIANT`` (the
    compile-time ``VariantFlags``), ``var_args`` (sm_scale, softcap, window left, window right) and the variant
    tensors; the lists come from ``lists(classes(...))`` per kernel, because each kernel has its own tiles."""
    if var is None:
        return {}, causal
    flags = dict(softcap=var.softcap is not None, alibi=var.alibi_slopes is not None, mask_mod=var.mask_mod,
                 score_mod=var.score_mod, score_mod_grad=var.score_mod_grad, mod_has_args=bool(var.mod_args))
    kw = {}
    if var.alibi_slopes is not None:
        kw["SLOPES"] = var.alibi_slopes.to(torch.float32).expand(q.shape[0], q.shape[1]).contiguous()
    if var.mod_args:
        kw["MOD_ARGS"] = tuple(var.mod_args)
    softcap = float(var.softcap or 1.0)
    if not is_sparse(var):
        return dict(kw, VARIANT=VariantFlags(**flags), var_args=(scale, softcap, 0, 0)), causal
    left, right = band(var, causal)
    flags.update(band_lo=left >= 0, prefix=var.prefix_lengths is not None, docs=var.q_ids is not None)
    kw.update(SPARSE=True, VARIANT=VariantFlags(**flags), var_args=(scale, softcap, max(left, 0), max(right, 0)))
    if var.prefix_lengths is not None:
        kw["PREFIX_LEN"] = var.prefix_lengths.to(torch.int32).contiguous()
    if var.q_ids is not None:
        kw["DOC_Q"], kw["DOC_K"] = pad_doc_ids(var.q_ids), pad_doc_ids(var.k_ids)
    return kw, right >= 0


def pad_doc_ids(ids: torch.Tensor) -> torch.Tensor:
    """(B, n) integer document ids as the kernels read them (``kernels.mods.doc_ids``): int32, (B, n + DOC_PAD),
    -1 in the padding."""
    out = torch.full((ids.shape[0], ids.shape[1] + DOC_PAD.value), -1, dtype=torch.int32, device=ids.device)
    out[:, :ids.shape[1]] = ids
    return out


def tile_counts(var, q: torch.Tensor, k: torch.Tensor, seqlens_k: torch.Tensor | None, causal: bool,
                block_m: int, block_n: int) -> dict:
    """Tiles of (block_m, block_n) one kernel visits over the call's (B, H): ``visited`` = ``full`` + ``partial``
    (the non-empty tiles: the lists of the sparse path; the plain / causal loops visit the same tiles), out of
    ``total``."""
    b, h, l = q.shape[:3]
    var = var if var is not None else Variants()     # no variants: the causal band and the bounds alone
    if seqlens_k is not None and not isinstance(var.off, torch.Tensor):   # bottom-right per row, as the kernels
        var = dataclasses.replace(var, off=row_offsets(k.shape[2] - l, seqlens_k.to(q.device), k.shape[2]))
    cls = classes(var, b, h, l, k.shape[2], seqlens_k, causal, k.shape[2] - l, block_m, block_n, q.device)
    cls = cls.expand(b, h, *cls.shape[2:])
    full, partial = int((cls == FULL).sum()), int((cls == PARTIAL).sum())
    return {"visited": full + partial, "full": full, "partial": partial, "total": cls.numel(),
            "block": (block_m, block_n)}


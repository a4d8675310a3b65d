"""Block masks: which (query block, key block) tiles of a ``mask_mod`` are empty, partial or full.

The attention kernels skip empty tiles, run full tiles without evaluating the mask and evaluate
``mask_mod`` elementwise only on partial tiles. ``block_mask`` computes the class table once per mask
(``_block_mask_kernel``: one program per tile and (b, h), on CUDA or under the interpreter; on CPU
otherwise, the mod's Python body on torch tensors). ``kv_lists`` / ``q_lists`` turn a table into the
sparse per-row / per-column index lists the forward / dK-dV kernels iterate. ``band_classes`` and
``document_classes`` are exact tables of the built-in window/causal band and of document masks,
computed without a dense (L, S) mask.

Classes (int8): 0 = empty (no kept element), 1 = partial, 2 = full (every element kept). Elements past
L or S never count: a tile in the last row/column is full when all of its in-range elements are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from ..._core import backend as _backend
from ..._core.launch import launch
from .kernels.blockmask import _block_mask_kernel
from .variants import torch_path_mod_error

try:  # under TRITON_INTERPRET=1 ``@triton.jit`` returns an InterpretedFunction, not a JITFunction
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover
    _Interpreted = triton.runtime.JITFunction
_JIT_TYPES = (triton.runtime.JITFunction, _Interpreted)

EMPTY, PARTIAL, FULL = 0, 1, 2
_CHUNK = 1 << 22   # elements of a (.., rows, cols) keep tensor evaluated at once on the torch side


def combine(*tables: torch.Tensor) -> torch.Tensor:
    """Class table of the intersection of masks (broadcasting): elementwise min, i.e. empty if any is empty,
    full if all are full, else partial (conservative: two partial tiles may intersect to nothing)."""
    if not tables:
        raise ValueError("combine: needs at least one class table, got none")
    out = tables[0]
    for t in tables[1:]:
        out = torch.minimum(out, t)
    return out.to(torch.int8)


def _tile_reduce(keep_fn, X: int, Y: int, L: int, S: int, bm: int, bn: int, device) -> torch.Tensor:
    """(X, Y, nm, nn) classes from ``keep_fn(q_idx (1,1,r,1), kv_idx (1,1,1,c))`` -> bool broadcastable to
    (X, Y, r, c), evaluated over chunks of whole tiles so memory stays bounded."""
    nm, nn = triton.cdiv(L, bm), triton.cdiv(S, bn)
    out = torch.empty((X, Y, nm, nn), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out
    cols_blocks = max(1, min(nn, _CHUNK // max(1, X * Y * bm * bn)))
    rows_blocks = max(1, min(nm, _CHUNK // max(1, X * Y * bm * bn * cols_blocks)))
    for m0 in range(0, nm, rows_blocks):
        m1 = min(nm, m0 + rows_blocks)
        q = torch.arange(m0 * bm, m1 * bm, device=device)
        for n0 in range(0, nn, cols_blocks):
            n1 = min(nn, n0 + cols_blocks)
            k = torch.arange(n0 * bn, n1 * bn, device=device)
            valid = (q[:, None] < L) & (k[None, :] < S)
            # clamped indices, as in the kernel: out-of-range elements do not count, lookups stay in bounds
            qc, kc = q.clamp(max=L - 1).view(1, 1, -1, 1), k.clamp(max=S - 1).view(1, 1, 1, -1)
            keep = torch.as_tensor(keep_fn(qc, kc), device=device)
            keep = torch.broadcast_to(keep != 0, (X, Y, q.numel(), k.numel())) & valid
            shape = (X, Y, m1 - m0, bm, n1 - n0, bn)
            n_kept = keep.reshape(shape).sum(dim=(3, 5))
            n_valid = valid.reshape(1, 1, *shape[2:]).sum(dim=(3, 5))
            cls = torch.where(n_kept == n_valid, FULL, torch.where(n_kept > 0, PARTIAL, EMPTY))
            out[:, :, m0:m1, n0:n1] = cls.to(torch.int8)
    return out


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Tile classes of ``mask_mod`` over (B, H, L, S) at tile size ``block`` = (block_m, block_n).

    ``classes``: int8 (Bm, Hm, ceil(L / block_m), ceil(S / block_n)), Bm = 1 when B is None (the mask does
    not depend on b), else B; Hm likewise. ``shape`` = (B or None, H or None, L, S)."""

    classes: torch.Tensor
    block: tuple[int, int]
    shape: tuple[int | None, int | None, int, int]
    mask_mod: Any
    mod_args: tuple = ()

    def tile_counts(self) -> dict[str, int]:
        """Numbers of empty, partial and full tiles over the stored (Bm, Hm) tables."""
        c = self.classes
        return {"empty": int((c == EMPTY).sum()), "partial": int((c == PARTIAL).sum()),
                "full": int((c == FULL).sum())}

    def at(self, block_m: int, block_n: int) -> torch.Tensor:
        """The class table at tile size (block_m, block_n), each dividing or a multiple of the stored one.

        Coarser tiles combine their children exactly (a coarse tile's in-range elements are the union of its
        children's): empty if all are empty, full if all are full, else partial. Finer tiles inside an empty or
        full parent inherit its class exactly (their in-range elements are a subset of the parent's, also in
        the last row/column where they reach past L or S); children of partial parents are recomputed with
        ``mask_mod`` (one launch of the whole finer table, used only where the parent is partial)."""
        _, _, L, S = self.shape
        bm0, bn0 = self.block
        for name, new, old in (("block_m", block_m, bm0), ("block_n", block_n, bn0)):
            _check_pow2(name, new)
            if new % old and old % new:   # unreachable for powers of two, kept for clarity
                raise ValueError(f"at: {name}={new} must divide or be a multiple of the stored {old}")
        c = self.classes
        # rows
        c = _coarsen(c, block_m // bm0, dim=2) if block_m >= bm0 else \
            c.repeat_interleave(bm0 // block_m, dim=2)[:, :, :triton.cdiv(L, block_m)]
        c = _coarsen(c, block_n // bn0, dim=3) if block_n >= bn0 else \
            c.repeat_interleave(bn0 // block_n, dim=3)[:, :, :, :triton.cdiv(S, block_n)]
        if (block_m < bm0 or block_n < bn0) and bool((c == PARTIAL).any()):
            # a finer tile of a coarsened-then-partial or partial parent: exact classes from the mod
            fine = block_mask(self.mask_mod, self.shape[0], self.shape[1], L, S, block=(block_m, block_n),
                              mod_args=self.mod_args, device=self.classes.device).classes
            c = torch.where(c == PARTIAL, fine, c)
        return c.to(torch.int8).contiguous()


def _coarsen(c: torch.Tensor, f: int, dim: int) -> torch.Tensor:
    if f == 1:
        return c
    n = c.shape[dim]
    pad = (-n) % f
    lo = torch.nn.functional.pad(c.movedim(dim, -1), (0, pad), value=FULL)   # neutral for the min
    hi = torch.nn.functional.pad(c.movedim(dim, -1), (0, pad), value=EMPTY)  # neutral for the max
    mn = lo.reshape(*lo.shape[:-1], -1, f).amin(-1)
    mx = hi.reshape(*hi.shape[:-1], -1, f).amax(-1)
    out = torch.where(mn == FULL, FULL, torch.where(mx == EMPTY, EMPTY, PARTIAL))
    return out.to(torch.int8).movedim(-1, dim)


def _check_pow2(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
        raise ValueError(f"block_mask: {name} must be a power of two >= 16, got {v!r}")
    return v


def _check_dim(name: str, v: Any, optional: bool) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"block_mask: {name} must be an int{' or None' if optional else ''}, got {type(v).__name__}")
    if v < (1 if optional else 0):
        raise ValueError(f"block_mask: {name} must be >= {1 if optional else 0}, got {v}")


def classes_launch(classes: torch.Tensor, mask_mod: Any, mod_args: tuple, L: int, S: int, block_m: int,
                   block_n: int) -> None:
    """Fill ``classes`` (B, H, L / block_m, S / block_n) int8 with the tile classes of ``mask_mod``: one
    ``_block_mask_kernel`` program per tile and (b, h)."""
    bh, hm, nm, nn = classes.shape[0] * classes.shape[1], classes.shape[1], classes.shape[2], classes.shape[3]
    launch(_block_mask_kernel, (nm * nn, bh), classes, mod_args, L, S, hm, nn, MASK_MOD=mask_mod,
           HAS_ARGS=bool(mod_args), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=block_mask_warps(block_m, block_n))


def block_mask_warps(block_m: int, block_n: int) -> int:
    """Warps of a ``_block_mask_kernel`` program: about 64 mask elements per thread (a 128 x 128 tile on 4 warps
    spills on sm_80: ``python -m fused_kernels.aot --family variants --filter stripes``)."""
    return min(16, max(4, block_m * block_n // 2048))


def block_mask(mask_mod, B: int | None, H: int | None, L: int, S: int, *, block: int | tuple[int, int] = 128,
               mod_args: tuple = (), device: str | torch.device | None = None) -> BlockMask:
    """Classify every (query block, key block) tile of ``mask_mod(b, h, q_idx, kv_idx[, args]) -> bool``.

    ``B`` / ``H`` None: the mask does not depend on b / h (the table has 1 there and b / h = 0 is passed).
    ``block``: int or (block_m, block_n), powers of two >= 16. ``mod_args``: tuple of tensors handed to the
    mod as one extra argument ``args``. On CUDA or under the interpreter ``_block_mask_kernel`` evaluates the
    ``@triton.jit`` mod; on CPU otherwise (or backend "torch") its Python body ``mask_mod.fn`` runs on int64
    torch tensors b (B,1,1,1), h (1,H,1,1), q_idx (1,1,L,1), kv_idx (1,1,1,S), chunked."""
    _check_dim("B", B, True)
    _check_dim("H", H, True)
    _check_dim("L", L, False)
    _check_dim("S", S, False)
    if isinstance(block, (tuple, list)):
        if len(block) != 2:
            raise ValueError(f"block_mask: block must be an int or a (block_m, block_n) pair, got {block!r}")
        bm, bn = _check_pow2("block_m", block[0]), _check_pow2("block_n", block[1])
    else:
        bm = bn = _check_pow2("block", block)
    if not isinstance(mod_args, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in mod_args):
        raise TypeError(f"block_mask: mod_args must be a tuple of tensors, got {mod_args!r}")
    mod_args = tuple(mod_args)
    is_jit = isinstance(mask_mod, _JIT_TYPES)
    if not is_jit and not callable(mask_mod):
        raise TypeError(f"block_mask: mask_mod must be a @triton.jit function, got {type(mask_mod).__name__}")
    want = 5 if mod_args else 4
    arg_names = list(getattr(mask_mod, "arg_names", None) or mask_mod.fn.__code__.co_varnames[
        :mask_mod.fn.__code__.co_argcount]) if is_jit else None
    if is_jit and len(arg_names) != want:
        raise TypeError(
            f"block_mask: mask_mod must take {want} arguments (b, h, q_idx, kv_idx{', args' if mod_args else ''})"
            f"{' since mod_args is non-empty' if mod_args else ''}, got {len(arg_names)}: {arg_names}")
    if device is None:
        device = mod_args[0].device if mod_args else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    for i, t in enumerate(mod_args):
        if t.device != device:
            raise ValueError(f"block_mask: mod_args[{i}] is on {t.device}, the mask is built on {device}")
    Bm, Hm = B or 1, H or 1
    nm, nn = triton.cdiv(L, bm), triton.cdiv(S, bn)
    use_kernel = _backend.choose(torch.empty(0, device=device), "block_mask") == "triton"
    if use_kernel:
        if not is_jit:
            raise TypeError("block_mask: mask_mod must be a @triton.jit function to run in the Triton kernel, got "
                            f"a plain {type(mask_mod).__name__}")
        classes = torch.empty((Bm, Hm, nm, nn), dtype=torch.int8, device=device)
        if classes.numel():
            classes_launch(classes, mask_mod, mod_args, L, S, bm, bn)
    else:
        fn = mask_mod.fn if is_jit else mask_mod
        b = torch.arange(Bm, device=device).view(-1, 1, 1, 1)
        h = torch.arange(Hm, device=device).view(1, -1, 1, 1)

        def keep_fn(q, k):
            try:
                return fn(b, h, q, k, mod_args) if mod_args else fn(b, h, q, k)
            except Exception as err:
                raise TypeError(torch_path_mod_error("block_mask", "mask_mod", fn, err)) from err

        classes = _tile_reduce(keep_fn, Bm, Hm, L, S, bm, bn, device)
    return BlockMask(classes, (bm, bn), (B, H, L, S), mask_mod, mod_args)


def document_classes(q_ids: torch.Tensor, k_ids: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Exact int8 (B, 1, nm, nn) classes of the document mask keep(i, j) = q_ids[b, i] == k_ids[b, j], in
    torch, one batch row and a bounded chunk of tiles at a time (never a whole (L, S) mask)."""
    for name, t in (("q_ids", q_ids), ("k_ids", k_ids)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"document_classes: {name} must be a 2-d integer tensor (B, len), got "
                             f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}")
    if q_ids.shape[0] != k_ids.shape[0] or q_ids.device != k_ids.device:
        raise ValueError(f"document_classes: q_ids {tuple(q_ids.shape)} on {q_ids.device} and k_ids "
                         f"{tuple(k_ids.shape)} on {k_ids.device} need the same batch and device")
    _check_pow2("block_m", block_m)
    _check_pow2("block_n", block_n)
    B, L = q_ids.shape
    S = k_ids.shape[1]
    rows = []
    for b in range(B):
        qb, kb = q_ids[b], k_ids[b]
        keep = lambda q, k, qb=qb, kb=kb: qb[q] == kb[k]   # q, k come clamped into range
        rows.append(_tile_reduce(keep, 1, 1, L, S, block_m, block_n, q_ids.device))
    if not rows:
        return torch.empty((0, 1, triton.cdiv(L, block_m), triton.cdiv(S, block_n)), dtype=torch.int8,
                           device=q_ids.device)
    return torch.cat(rows, 0)


def band_classes(L: int, S: int, block_m: int, block_n: int, offset: int, left: int, right: int,
                 kv_len: int | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Exact int8 (nm, nn) classes of keep(i, j) = (left == -1 or j >= i + offset - left)
    & (right == -1 or j <= i + offset + right) & j < kv_len (default S), analytically per tile.

    Row i keeps the key interval [lo(i), hi(i)], lo(i) = i + offset - left, hi(i) = min(i + offset + right,
    kv_len - 1), both nondecreasing in i. Tile rows [r0, r1], cols [c0, c1] (clipped to L, S):
    full iff lo(r1) <= c0 and hi(r0) >= c1; non-empty iff some row i in [r0, r1] has lo(i) <= c1,
    hi(i) >= c0 and lo(i) <= hi(i), i.e. the interval of such rows (each condition bounds i from one side)
    is not empty."""
    kv_len = S if kv_len is None else min(kv_len, S)
    _check_pow2("block_m", block_m)
    _check_pow2("block_n", block_n)
    big = 1 << 62
    r0 = torch.arange(0, L, block_m, device=device, dtype=torch.int64)[:, None]
    r1 = torch.clamp(r0 + block_m, max=L) - 1
    c0 = torch.arange(0, S, block_n, device=device, dtype=torch.int64)[None, :]
    c1 = torch.clamp(c0 + block_n, max=S) - 1

    def lo(i):
        return i + offset - left if left != -1 else torch.full_like(i, -big)

    def hi(i):
        h = i + offset + right if right != -1 else torch.full_like(i, big)
        return torch.clamp(h, max=kv_len - 1)

    full = (lo(r1) <= c0) & (hi(r0) >= c1)
    first = torch.maximum(r0, c0 - offset - right) if right != -1 else r0.expand_as(c0 + r0)
    last = r1.expand_as(c0 + r1)
    if left != -1:
        last = torch.minimum(last, torch.minimum(c1 - offset + left, torch.full_like(c1, kv_len - 1 - offset + left)))
    any_ = (first <= last) & (c0 < kv_len)
    if left != -1 and right != -1 and left + right < 0:
        any_ = torch.zeros_like(any_)
    cls = torch.where(full & any_, FULL, torch.where(any_, PARTIAL, EMPTY))
    return cls.to(torch.int8)


def kv_lists(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (b, h, query block) the ascending key-block indices of its full and of its partial tiles:
    ``(full_count (Bm, Hm, nm), full_idx (Bm, Hm, nm, nn), part_count, part_idx)``, int32. Entries past a
    count are 0 (a valid block index, so a prefetching load stays in bounds). Stable sorts: deterministic."""
    if not isinstance(classes, torch.Tensor) or classes.dim() != 4:
        raise ValueError(f"kv_lists: classes must be a 4-d (Bm, Hm, nm, nn) tensor, got "
                         f"{getattr(classes, 'shape', type(classes).__name__)}")
    out = []
    for cls in (FULL, PARTIAL):
        hit = classes == cls
        count = hit.sum(-1, dtype=torch.int32)
        idx = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        pos = torch.arange(classes.shape[-1], device=classes.device)
        idx = torch.where(pos < count[..., None], idx, 0).to(torch.int32)
        out += [count.contiguous(), idx.contiguous()]
    return tuple(out)


def q_lists(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kv_lists`` transposed, for the dK/dV kernel: per (b, h, key block) the ascending query-block indices
    of its full and partial tiles, ``(full_count (Bm, Hm, nn), full_idx (Bm, Hm, nn, nm), part_count,
    part_idx)``."""
    if not isinstance(classes, torch.Tensor) or classes.dim() != 4:
        raise ValueError(f"q_lists: classes must be a 4-d (Bm, Hm, nm, nn) tensor, got "
                         f"{getattr(classes, 'shape', type(classes).__name__)}")
    return kv_lists(classes.transpose(-1, -2))

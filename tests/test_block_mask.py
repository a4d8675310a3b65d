"""fused_kernels.block_mask and the block-mask helpers: tile classes (0 empty, 1 partial, 2 full) against brute
force (a dense mask reduced per tile), on the Triton kernel (the interpreter on a CPU) and on the PyTorch
fallback (``op_backend``), plus the analytic tables, the sparse lists and the argument errors."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import fused_kernels
from fused_kernels.ops.attention.blockmask import band_classes, combine, document_classes, kv_lists, q_lists


@triton.jit
def causal_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@triton.jit
def window_mod(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx <= 40)


@triton.jit
def checker_mod(b, h, q_idx, kv_idx):
    return ((q_idx // 32 + kv_idx // 32) % 2) == 0


@triton.jit
def bh_mod(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx + h * 16) | (b == 1)


@triton.jit
def doc_lookup_mod(b, h, q_idx, kv_idx, args):
    return tl.load(args[0] + q_idx) == tl.load(args[1] + kv_idx)


@triton.jit
def raising_mod(b, h, q_idx, kv_idx):
    return tl.full(q_idx.shape, 1, tl.int1)


def dense(fn, B, H, L, S, args=()):
    b = torch.arange(B).view(-1, 1, 1, 1)
    h = torch.arange(H).view(1, -1, 1, 1)
    q = torch.arange(L).view(1, 1, -1, 1)
    k = torch.arange(S).view(1, 1, 1, -1)
    keep = fn(b, h, q, k, *args) if args else fn(b, h, q, k)
    return torch.broadcast_to(torch.as_tensor(keep) != 0, (B, H, L, S))


def brute(keep: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Classes of a dense (X, Y, L, S) bool mask; elements past L, S do not count."""
    X, Y, L, S = keep.shape
    nm, nn = triton.cdiv(L, bm), triton.cdiv(S, bn)
    out = torch.empty((X, Y, nm, nn), dtype=torch.int8)
    for m in range(nm):
        for n in range(nn):
            t = keep[:, :, m * bm:(m + 1) * bm, n * bn:(n + 1) * bn].flatten(2)
            out[:, :, m, n] = torch.where(t.all(-1), 2, torch.where(t.any(-1), 1, 0)).to(torch.int8)
    return out


MODS = [causal_mod, window_mod, checker_mod]


@pytest.mark.parametrize("mod", MODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("L,S,block", [(64, 64, 32), (97, 75, 32), (50, 130, (16, 64))])
def test_classes_brute_force(op_backend, mod, L, S, block):
    bm = block if isinstance(block, tuple) else (block, block)
    got = fused_kernels.block_mask(mod, None, None, L, S, block=block, device="cpu")
    assert got.classes.dtype == torch.int8 and got.classes.shape == (1, 1, triton.cdiv(L, bm[0]),
                                                                      triton.cdiv(S, bm[1]))
    assert got.block == bm and got.shape == (None, None, L, S)
    assert torch.equal(got.classes, brute(dense(mod.fn, 1, 1, L, S), *bm))


def test_b_h_dependence(op_backend):
    got = fused_kernels.block_mask(bh_mod, 2, 3, 70, 70, block=32, device="cpu")
    assert got.classes.shape == (2, 3, 3, 3)
    assert torch.equal(got.classes, brute(dense(bh_mod.fn, 2, 3, 70, 70), 32, 32))
    assert (got.classes[1] == 2).all()
    # B given, H None: the mod must not read h (it would see 0)
    only_b = fused_kernels.block_mask(bh_mod, 2, None, 70, 70, block=32, device="cpu")
    assert torch.equal(only_b.classes, got.classes[:, :1])


def test_mod_args_kernel(device):
    L, S = 75, 60
    q_ids = torch.repeat_interleave(torch.arange(4), torch.tensor([20, 30, 5, 20]))
    k_ids = torch.repeat_interleave(torch.arange(4), torch.tensor([10, 25, 15, 10]))
    with fused_kernels.use_backend("triton"):
        got = fused_kernels.block_mask(doc_lookup_mod, None, None, L, S, block=16, mod_args=(q_ids.to(device),
                                 k_ids.to(device)))
    keep = (q_ids[:, None] == k_ids[None, :]).view(1, 1, L, S)
    assert torch.equal(got.classes.cpu(), brute(keep, 16, 16))
    assert torch.equal(document_classes(q_ids[None], k_ids[None], 16, 16), brute(keep, 16, 16))


def test_mod_args_torch_path():
    L, S = 75, 60
    ids = torch.arange(L) // 13
    with fused_kernels.use_backend("torch"):
        got = fused_kernels.block_mask(lambda b, h, q, k, args: args[0][q] == args[0][k], None, None, L, S, block=16,
                                 mod_args=(ids,), device="cpu")
    assert torch.equal(got.classes, brute((ids[:, None] == ids[None, :S]).view(1, 1, L, S), 16, 16))


@pytest.mark.parametrize("fine", [(16, 16), (16, 64), (128, 32), (64, 128)])
def test_at(op_backend, fine):
    L, S = 97, 130
    bm = fused_kernels.block_mask(window_mod, None, None, L, S, block=32, device="cpu")
    assert torch.equal(bm.at(*fine), brute(dense(window_mod.fn, 1, 1, L, S), *fine))
    assert torch.equal(bm.at(32, 32), bm.classes)
    with pytest.raises(ValueError, match="block_m"):
        bm.at(24, 32)


def test_tile_counts_analytic(op_backend):
    n, b = 4, 32
    c = fused_kernels.block_mask(causal_mod, None, None, n * b, n * b, block=b, device="cpu").tile_counts()
    assert c["partial"] + c["full"] == n * (n + 1) // 2 and c["partial"] == n
    assert c["empty"] == n * n - n * (n + 1) // 2
    # window (40, 0), block 32: diagonal tiles are partial; the tile one below the diagonal keeps keys
    # i - 40 <= j <= i: rows 32..63 vs cols 0..31 -> row 32 keeps j >= -8 (all), row 63 keeps j >= 23: partial;
    # two below (rows 64.., cols 0..31): row 64 keeps j >= 24, row 95 j >= 55: partial for row 64 only
    # (cols 24..31 kept by rows 64..71) -> partial; three below: rows 96.., j >= 56 > 31: empty.
    c = fused_kernels.block_mask(window_mod, None, None, n * b, n * b, block=b, device="cpu").tile_counts()
    assert c == {"partial": n + (n - 1) + (n - 2), "full": 0, "empty": n * n - (3 * n - 3)}


def test_document_counts():
    # documents of lengths 32, 64, 32 at block 32: the diagonal blocks of each document are full
    # (1 + 4 + 1 tiles), nothing is partial since every boundary is block aligned
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([32, 64, 32]))[None]
    cls = document_classes(ids, ids, 32, 32)
    assert int((cls == 2).sum()) == 6 and int((cls == 1).sum()) == 0 and int((cls == 0).sum()) == 10
    # lengths 40, 88 at block 32: tiles (0,0) full; (0,1),(1,0),(1,1) partial (rows/cols 32..39 vs 40..63);
    # rows 64..127 x cols 64..127 full (4); rows 32..63 x cols 64..127 full for document 1 rows 40..63 only:
    # partial (2) and symmetric (2); rows 0..31 x cols 64..127 empty (2) and symmetric (2)
    ids = torch.repeat_interleave(torch.arange(2), torch.tensor([40, 88]))[None]
    cls = document_classes(ids, ids, 32, 32)
    assert int((cls == 2).sum()) == 5 and int((cls == 1).sum()) == 7 and int((cls == 0).sum()) == 4


@pytest.mark.parametrize("L,S", [(64, 64), (97, 75), (50, 130), (1, 33)])
def test_document_classes_brute(L, S):
    g = torch.Generator().manual_seed(L * S)
    q_ids = torch.sort(torch.randint(0, 4, (2, L), generator=g)).values
    k_ids = torch.randint(0, 3, (2, S), generator=g)   # unsorted keys: the exact path anyway
    keep = (q_ids[:, :, None] == k_ids[:, None, :])[:, None]
    assert torch.equal(document_classes(q_ids, k_ids, 16, 32), brute(keep, 16, 32))


@pytest.mark.parametrize("L,S", [(64, 64), (97, 75), (50, 130)])
@pytest.mark.parametrize("left,right", [(-1, 0), (40, 0), (-1, -1), (17, 5), (0, -1), (3, -3), (-2 + 1, 20)])
@pytest.mark.parametrize("kv_len", [None, 61])
def test_band_classes_brute(L, S, left, right, kv_len):
    for offset in (0, S - L, -7, 9):
        i = torch.arange(L)[:, None]
        j = torch.arange(S)[None, :]
        keep = torch.ones(L, S, dtype=torch.bool)
        if left != -1:
            keep &= j >= i + offset - left
        if right != -1:
            keep &= j <= i + offset + right
        keep &= j < (S if kv_len is None else kv_len)
        got = band_classes(L, S, 16, 32, offset, left, right, kv_len)
        assert torch.equal(got, brute(keep.view(1, 1, L, S), 16, 32)[0, 0]), (offset,)


def test_lists_round_trip():
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 3, (2, 3, 5, 7), generator=g).to(torch.int8)
    for lists, table in ((kv_lists(cls), cls), (q_lists(cls), cls.transpose(-1, -2))):
        fc, fi, pc, pi = lists
        assert fc.dtype == fi.dtype == torch.int32 and fi.shape == table.shape and fc.shape == table.shape[:3]
        rebuilt = torch.zeros_like(table)
        for idx in torch.cartesian_prod(*(torch.arange(s) for s in table.shape[:3])).tolist():
            full, part = fi[tuple(idx)][:fc[tuple(idx)]], pi[tuple(idx)][:pc[tuple(idx)]]
            assert torch.all(full[1:] > full[:-1]) and torch.all(part[1:] > part[:-1])
            rebuilt[tuple(idx)][full.long()] = 2
            rebuilt[tuple(idx)][part.long()] = 1
        assert torch.equal(rebuilt, table)


def test_combine():
    a = torch.tensor([0, 1, 2, 2, 1], dtype=torch.int8)
    b = torch.tensor([2, 2, 2, 1, 0], dtype=torch.int8)
    assert combine(a, b).tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(ValueError):
        combine()


def test_errors():
    bm = fused_kernels.block_mask
    with pytest.raises(ValueError, match="block"):
        bm(causal_mod, None, None, 64, 64, block=24)
    with pytest.raises(ValueError, match="block_n"):
        bm(causal_mod, None, None, 64, 64, block=(32, 8))
    with pytest.raises(TypeError, match="B"):
        bm(causal_mod, True, None, 64, 64)
    with pytest.raises(ValueError, match="L"):
        bm(causal_mod, None, None, -1, 64)
    with pytest.raises(TypeError, match="mask_mod"):
        bm(3, None, None, 64, 64)
    with pytest.raises(TypeError, match="mask_mod must take 5"):
        bm(causal_mod, None, None, 64, 64, mod_args=(torch.zeros(1),))
    with pytest.raises(TypeError, match="mod_args"):
        bm(causal_mod, None, None, 64, 64, mod_args=(1,))
    with fused_kernels.use_backend("torch"), pytest.raises(TypeError, match="raising_mod.*PyTorch path"):
        bm(raising_mod, None, None, 64, 64, device="cpu")

"""Paged KV cache (``fused_kernels.ops.attention.paged``): append and attention through a block table, against the
dense path.

Every case lays the logical sequences out in a pool whose physical blocks are in shuffled order
(``torch.randperm``) and whose unwritten slots are NaN: the kernels must never read them (the output stays
finite and equal to the dense result), and the append must write exactly its slots (every other element
of the pool stays NaN, bit for bit). The float64 reference is ``fused_kernels.reference.attention_ref`` on each
sequence's keys gathered densely, causal bottom-right (query i of Lq sees keys j <= i + len - Lq).
Lengths of thousands run with one small head in the interpreter, and widely on the PyTorch path."""

import math

import pytest
import torch
from helpers import assert_close, bounds_checked

import fused_kernels
from fused_kernels import PagedKVCache, paged_append, paged_attention
from fused_kernels.ops.attention import paged
from fused_kernels.reference import attention_ref

KERNELS = ("_paged_append_kernel", "_paged_attn_fwd_kernel", "_attn_combine_kernel")


def _layout(lens, block_size, extra_blocks=3, seed=0):
    """A block table (B, max_blocks) int32 over a pool with ``extra_blocks`` spare blocks, its rows drawn
    from a random permutation of the physical blocks (each sequence gets the blocks its length needs, the
    unused table entries point at arbitrary valid blocks)."""
    g = torch.Generator().manual_seed(seed)
    need = [max(1, -(-n // block_size)) for n in lens]
    width = max(need)
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    rows, at = [], 0
    for n in need:
        row = perm[at:at + n]
        at += n
        rows.append(row + [perm[-1]] * (width - n))
    return torch.tensor(rows, dtype=torch.int32), num_blocks


def _filled(lens, block_size, hkv, d, dtype, seed=0, dv=None):
    """NaN pools holding random keys/values of sequences of ``lens`` (written by the PyTorch path), the dense
    keys/values (B, Hkv, max len, D) and the block table."""
    dv = d if dv is None else dv
    table, num_blocks = _layout(lens, block_size, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b, s = len(lens), max(lens)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, s, dv, generator=g, dtype=torch.float64).to(dtype)
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full((num_blocks, block_size, hkv, dv), float("nan"), dtype=dtype)
    with fused_kernels.use_backend("torch"):
        for i, n in enumerate(lens):
            paged_append(k_cache, v_cache, table[i:i + 1], torch.zeros(1, dtype=torch.int32), k[i:i + 1, :, :n],
                         v[i:i + 1, :, :n])
    return k_cache, v_cache, table, k, v


def _reference(q, k, v, lens, causal=True):
    """Per sequence: float64 attention of its queries over its first len keys."""
    outs, lses = [], []
    for i, n in enumerate(lens):
        o, lse = attention_ref(q[i:i + 1].double(), k[i:i + 1, :, :n].double(), v[i:i + 1, :, :n].double(),
                               causal=causal, return_lse=True)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("block_size", [16, 24, 64, 256])
@pytest.mark.parametrize("lq", [1, 5])
def test_attention_matches_dense_over_shuffled_blocks(op_backend, block_size, lq):
    lens = [1, 37, 300, 5]                   # a query longer than its sequence: rows that see no key give 0
    h, hkv, d = 4, 2, 32
    k_cache, v_cache, table, k, v = _filled(lens, block_size, hkv, d, torch.float32, seed=block_size + lq)
    q = torch.randn(len(lens), h, lq, d, generator=torch.Generator().manual_seed(7))
    seqlens = torch.tensor(lens, dtype=torch.int64)
    with bounds_checked(*KERNELS) as launches:
        out, lse = paged_attention(q, k_cache, v_cache, table, seqlens, return_lse=True, num_splits=3)
    assert launches.get("_paged_attn_fwd_kernel", 0) == (op_backend == "triton")
    ref, ref_lse = _reference(q, k, v, lens)
    assert torch.isfinite(out).all()
    assert_close(out, ref)
    assert_close(lse, ref_lse, name="lse")


def test_attention_equals_the_dense_attention_kernel(op_backend):
    """Same results as ``fused_kernels.attention`` on each sequence's dense keys (the path the KV cache used)."""
    lens, h, hkv, d, lq = [70, 9], 4, 1, 40, 3
    k_cache, v_cache, table, k, v = _filled(lens, 32, hkv, d, torch.float32, seed=3)
    q = torch.randn(len(lens), h, lq, d, generator=torch.Generator().manual_seed(8))
    out = paged_attention(q, k_cache, v_cache, table.long(), torch.tensor(lens, dtype=torch.int64))   # int64 indices
    for i, n in enumerate(lens):
        dense = fused_kernels.attention(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], causal=True)
        torch.testing.assert_close(out[i:i + 1], dense, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_long_prefill_tiles_the_rows_float64(op_backend, causal):
    """Lq * G above one tile (the row-tiled path) and a long sequence, in float64 (tight tolerance)."""
    lens, h, hkv, d, lq = [90, 41], 2, 1, 16, 40
    k_cache, v_cache, table, k, v = _filled(lens, 16, hkv, d, torch.float64, seed=11)
    q = torch.randn(len(lens), h, lq, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = paged_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), causal=causal)
    ref, _ = _reference(q, k, v, lens, causal=causal)
    assert_close(out, ref)


def test_thousands_of_keys_one_small_head(op_backend):
    lens, d = [3000, 1, 777], 16
    k_cache, v_cache, table, k, v = _filled(lens, 256, 1, d, torch.float32, seed=5)
    q = torch.randn(len(lens), 1, 1, d, generator=torch.Generator().manual_seed(10))
    out = paged_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32))
    assert_close(out, _reference(q, k, v, lens)[0])


def test_thousands_of_keys_gqa_on_the_torch_path():
    lens, h, hkv, d = [4000, 2, 1500, 333], 8, 2, 64
    k_cache, v_cache, table, k, v = _filled(lens, 128, hkv, d, torch.float32, seed=6)
    q = torch.randn(len(lens), h, 4, d, generator=torch.Generator().manual_seed(11))
    with fused_kernels.use_backend("torch"):
        out = paged_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32))
    assert_close(out, _reference(q, k, v, lens)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_two_x_rule(op_backend, dtype):
    """16-bit pools (bf16 upcast in the interpreter): the 2x rule, PyTorch's error being float32 attention
    rounded to the dtype; the append copies the 16-bit values exactly."""
    lens, h, hkv, d, lq = [50, 130], 4, 2, 64, 2
    k_cache, v_cache, table, k, v = _filled(lens, 32, hkv, d, dtype, seed=12)
    nan_k, nan_v = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
    n = min(lens)
    paged_append(nan_k, nan_v, table, torch.zeros(2, dtype=torch.int32), k[:, :, :n], v[:, :, :n])
    for pool, want in ((nan_k, k), (nan_v, v)):
        assert torch.equal(paged.gather_pages(pool, table, torch.tensor([n, n]), n), want[:, :, :n])
    q = torch.randn(len(lens), h, lq, d, generator=torch.Generator().manual_seed(12)).to(dtype)
    out = paged_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32))
    ref, _ = _reference(q, k, v, lens)
    torch_out = torch.cat([attention_ref(q[i:i + 1].float(), k[i:i + 1, :, :n].float(), v[i:i + 1, :, :n].float(),
                                         causal=True).to(dtype) for i, n in enumerate(lens)])
    assert_close(out, ref, torch_out)


@pytest.mark.parametrize("block_size", [16, 24, 256])
def test_append_writes_exactly_its_slots(op_backend, block_size):
    """Appends of a prefix, then of several tokens, then of one: each writes only positions len..len+Lnew-1 of
    each sequence (every other element of the NaN pool stays NaN), and the pool then holds the sequences."""
    lens_before, hkv, d, dv = [0, 17, 250], 2, 24, 8
    steps = [5, 1]
    total = [n + sum(steps) for n in lens_before]
    table, num_blocks = _layout(total, block_size, seed=block_size)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(3, hkv, max(total), d, generator=g)
    v = torch.randn(3, hkv, max(total), dv, generator=g)
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    v_cache = torch.full((num_blocks, block_size, hkv, dv), float("nan"))
    with fused_kernels.use_backend("torch"):   # the prefixes, sequence by sequence
        for i, n in enumerate(lens_before):
            paged_append(k_cache, v_cache, table[i:i + 1], torch.zeros(1, dtype=torch.int32), k[i:i + 1, :, :n],
                         v[i:i + 1, :, :n])
    lens = torch.tensor(lens_before, dtype=torch.int32)
    for n in steps:
        before_k, before_v = k_cache.clone(), v_cache.clone()
        idx = lens.long()[:, None] + torch.arange(n)                                   # (B, n)
        # a strided (B, Hkv, n, D) view, as a model's head split makes
        k_new = k.gather(2, idx[:, None, :, None].expand(-1, hkv, -1, d)).transpose(1, 2).contiguous().transpose(1, 2)
        v_new = v.gather(2, idx[:, None, :, None].expand(-1, hkv, -1, dv))
        with bounds_checked(*KERNELS) as launches:
            paged_append(k_cache, v_cache, table, lens, k_new, v_new)
        assert launches.get("_paged_append_kernel", 0) == (op_backend == "triton")
        written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        blocks = table.long().gather(1, idx // block_size)
        written[blocks, idx % block_size] = True
        for pool, before in ((k_cache, before_k), (v_cache, before_v)):   # the rest unchanged, bit for bit
            assert torch.equal(pool.view(torch.int32)[~written], before.view(torch.int32)[~written])
        assert torch.equal(k_cache[blocks, idx % block_size], k_new.transpose(1, 2))
        assert torch.equal(v_cache[blocks, idx % block_size], v_new.transpose(1, 2))
        lens = lens + n
    dense_k = paged.gather_pages(k_cache, table, lens, max(total))
    dense_v = paged.gather_pages(v_cache, table, lens, max(total))
    for i, n in enumerate(total):
        assert torch.equal(dense_k[i, :, :n], k[i, :, :n]) and torch.equal(dense_v[i, :, :n], v[i, :, :n])


def test_requires_grad_runs_the_differentiable_path(triton_backend):
    lens, d = [20, 3], 16
    k_cache, v_cache, table, k, v = _filled(lens, 16, 1, d, torch.float64, seed=2)
    q = torch.randn(2, 2, 1, d, dtype=torch.float64, requires_grad=True)
    with bounds_checked(*KERNELS) as launches:
        out = paged_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32))
    assert not launches
    out.sum().backward()
    qr = q.detach().clone().requires_grad_()
    _reference(qr, k, v, lens)[0].sum().backward()
    assert_close(q.grad, qr.grad, grad=True)


def test_paged_kv_cache_allocates_frees_and_reuses_blocks(op_backend):
    cache = PagedKVCache(num_blocks=6, block_size=16, num_kv_heads=1, head_dim=16, num_layers=2,
                         dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    cache.allocate("a", 20)                                    # 2 blocks
    cache.allocate("b")
    assert cache.num_free_blocks == 4
    ka, va = torch.randn(1, 1, 30, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 30, 16, generator=g,
                                                                                        dtype=torch.float64)
    kb, vb = torch.randn(1, 1, 30, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 30, 16, generator=g,
                                                                                        dtype=torch.float64)
    for layer in range(2):                                     # layer 1 stores the negated keys
        sign = 1 - 2 * layer
        cache.append(["a"], sign * ka[:, :, :25], va[:, :, :25], layer)
        cache.append(["b"], sign * kb[:, :, :3], vb[:, :, :3], layer)
    assert cache.length("a", 1) == 25 and cache.length("b") == 3 and cache.num_free_blocks == 3
    q = torch.randn(2, 2, 1, 16, generator=g, dtype=torch.float64)
    for layer in range(2):
        sign = 1 - 2 * layer
        k_new = sign * torch.cat([ka[:, :, 25:26], kb[:, :, 3:4]])
        cache.append(["a", "b"], k_new, torch.cat([va[:, :, 25:26], vb[:, :, 3:4]]), layer)
        out = cache.attention(["a", "b"], q, layer)
        ref, _ = _reference(q, torch.cat([sign * ka, sign * kb]), torch.cat([va, vb]), [26, 4])
        assert_close(out, ref)
    with pytest.raises(RuntimeError, match="more blocks needed"):
        cache.allocate("c", 16 * 4)
    assert "c" not in cache and cache.num_free_blocks == 3
    cache.free("a")
    assert cache.num_free_blocks == 5
    cache.allocate("c", 16 * 5)                                # a's blocks serve the next sequence
    assert cache.num_free_blocks == 0
    with pytest.raises(KeyError):
        cache.free("a")
    with pytest.raises(ValueError, match="already allocated"):
        cache.allocate("b")


# ----------------------------------------------------------------------------- bad input


def _small():
    k_cache = torch.full((4, 16, 2, 8), float("nan"))
    v_cache = torch.full((4, 16, 2, 8), float("nan"))
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    return k_cache, v_cache, table, torch.tensor([3, 10], dtype=torch.int32)


def _append_cases():
    k_cache, v_cache, table, lens = _small()
    k_new = torch.randn(2, 2, 1, 8)
    yield dict(block_table=table.float()), TypeError, "block_table must be int32 or int64"
    yield dict(block_table=table.to(torch.int16)), TypeError, "block_table must be int32 or int64"
    yield dict(cache_seqlens=lens.float()), TypeError, "cache_seqlens must be int32 or int64"
    yield dict(block_table=[[0, 1], [2, 3]]), TypeError, "block_table must be a torch.Tensor"
    yield dict(block_table=table[0]), ValueError, "block_table must be 2-D"
    yield dict(block_table=table[:1]), ValueError, "block_table has 1 rows but the batch is 2"
    yield dict(cache_seqlens=lens[:1]), ValueError, r"cache_seqlens must have shape \(2,\)"
    yield dict(cache_seqlens=lens.to("meta")), ValueError, "cache_seqlens is on meta"
    yield dict(block_table=table.to("meta")), ValueError, "block_table is on meta"
    yield dict(block_table=torch.tensor([[0, 1], [4, 3]], dtype=torch.int32)), ValueError, r"in \[0, 4\)"
    yield dict(block_table=torch.tensor([[-1, 1], [2, 3]], dtype=torch.int32)), ValueError, r"in \[0, 4\)"
    yield dict(cache_seqlens=torch.tensor([3, 32], dtype=torch.int32)), ValueError, "does not fit"
    yield dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, "must be >= 0"
    yield dict(k_new=k_new.double()), TypeError, "k_new has dtype torch.float64"
    yield dict(k_new=k_new.long()), TypeError, "k_new must be float16"
    yield dict(k_new=torch.randn(2, 1, 1, 8)), ValueError, "kv heads"
    yield dict(v_new=torch.randn(2, 2, 1, 4)), ValueError, "kv heads and head dim"
    yield dict(v_new=torch.randn(2, 2, 2, 8)), ValueError, "must agree"
    yield dict(k_new=torch.randn(2, 1, 8)), ValueError, "k_new must be 4-D"
    yield dict(v_cache=v_cache.double()), TypeError, "v_cache has dtype"
    yield dict(v_cache=v_cache[:3]), ValueError, "must agree in"
    yield dict(k_cache=k_cache[0]), ValueError, "k_cache must be 4-D"
    yield dict(k_cache=k_cache.transpose(-1, -2)), ValueError, "contiguous last dim"
    yield dict(k_cache=torch.full((4, 16, 2, 300), 0.0), v_cache=torch.full((4, 16, 2, 300), 0.0),
               k_new=torch.randn(2, 2, 1, 300), v_new=torch.randn(2, 2, 1, 300)), ValueError, "head dim of k_cache"


@pytest.mark.parametrize("case", range(len(list(_append_cases()))))
def test_append_bad_input_raises_and_writes_nothing(op_backend, case):
    change, error, match = list(_append_cases())[case]
    k_cache, v_cache, table, lens = _small()
    args = dict(k_cache=k_cache, v_cache=v_cache, block_table=table, cache_seqlens=lens,
                k_new=torch.randn(2, 2, 1, 8), v_new=torch.randn(2, 2, 1, 8))
    args.update(change)
    with pytest.raises(error, match=match):
        paged_append(**args)
    assert k_cache.isnan().all() and v_cache.isnan().all()


def _attention_cases():
    k_cache, v_cache, table, lens = _small()
    q = torch.randn(2, 4, 1, 8)
    yield dict(q=q.double()), TypeError, "q has dtype"
    yield dict(q=q.to("meta")), ValueError, "q is on meta"
    yield dict(q=q[0]), ValueError, "q must be 4-D"
    yield dict(q=torch.randn(2, 3, 1, 8)), ValueError, "must divide q's heads"
    yield dict(q=torch.randn(2, 4, 1, 16)), ValueError, "head dim 16 differs"
    yield dict(q=torch.randn(3, 4, 1, 8)), ValueError, "block_table has 2 rows but the batch is 3"
    yield dict(cache_seqlens=torch.tensor([3, 33], dtype=torch.int32)), ValueError, "does not fit"
    yield dict(cache_seqlens=torch.tensor([-2, 3], dtype=torch.int32)), ValueError, "must be >= 0"
    yield dict(cache_seqlens=lens.to(torch.uint8)), TypeError, "cache_seqlens must be int32 or int64"
    yield dict(block_table=torch.tensor([[0, 1], [9, 3]], dtype=torch.int32)), ValueError, r"in \[0, 4\)"
    yield dict(causal=1), TypeError, "causal must be a bool"
    yield dict(scale="x"), TypeError, "scale must be a float"
    yield dict(num_splits=0), ValueError, "num_splits must be"


@pytest.mark.parametrize("case", range(len(list(_attention_cases()))))
def test_attention_bad_input_raises(op_backend, case):
    change, error, match = list(_attention_cases())[case]
    k_cache, v_cache, table, lens = _small()
    args = dict(q=torch.randn(2, 4, 1, 8), k_cache=k_cache, v_cache=v_cache, block_table=table, cache_seqlens=lens)
    args.update(change)
    with pytest.raises(error, match=match):
        paged_attention(**args)


def test_unused_block_table_entries_are_not_checked_nor_read(op_backend):
    """Entries past a sequence's length may hold anything (here -1)."""
    lens, d = [10, 20], 8
    k_cache, v_cache, table, k, v = _filled(lens, 16, 2, d, torch.float32, seed=4)
    table = table.clone()
    table[0, 1] = -1
    q = torch.randn(2, 2, 1, d, generator=torch.Generator().manual_seed(3))
    with bounds_checked(*KERNELS):
        out = paged_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32))
    assert_close(out, _reference(q, k, v, lens)[0])
    assert math.isfinite(out.abs().sum().item())


# ----------------------------------------------------------------------------- GPU (compiled kernels, bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size, lq", [(16, 1), (256, 1), (24, 1), (16, 64)])
def test_gpu_realistic(dtype, block_size, lq):
    """Llama-3-8B heads (32 over 8, D 128), lengths up to 8k, decode and a 64-token prefill: the 2x rule
    against float64, PyTorch's error being SDPA in ``dtype`` on the gathered sequences."""
    lens = [8000, 1, 3000, 777, 64, 5000]
    k_cache, v_cache, table, k, v = _filled(lens, block_size, 8, 128, dtype, seed=block_size)
    q = torch.randn(len(lens), 32, lq, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    k_cache, v_cache, table, q = k_cache.cuda(), v_cache.cuda(), table.cuda(), q.cuda()
    with fused_kernels.use_backend("triton"):
        out = paged_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32, device="cuda"))
    ref, _ = _reference(q.cpu(), k, v, lens)
    base = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[i:i + 1], k[i:i + 1, :, :n].cuda(), v[i:i + 1, :, :n].cuda(), enable_gqa=True,
        attn_mask=torch.ones(lq, n, dtype=torch.bool, device="cuda").tril(n - lq)) for i, n in enumerate(lens)])
    assert torch.isfinite(out).all()
    assert_close(out, ref, base)


@pytest.mark.gpu
def test_gpu_append_then_attend_is_deterministic():
    lens = [4000, 17, 900]
    k_cache, v_cache, table, k, v = _filled(lens, 16, 8, 128, torch.bfloat16, seed=1)
    k_cache, v_cache, table = k_cache.cuda(), v_cache.cuda(), table.cuda()
    q = torch.randn(3, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor(lens, dtype=torch.int32, device="cuda")
    with fused_kernels.use_backend("triton"):
        first = paged_attention(q, k_cache, v_cache, table, lengths)
        for _ in range(5):
            assert torch.equal(paged_attention(q, k_cache, v_cache, table, lengths), first)


def test_empty_sequences_and_batches_give_zeros(op_backend):
    k_cache, v_cache, table, k, v = _filled([5, 5], 16, 1, 8, torch.float32, seed=7)
    q = torch.randn(2, 2, 3, 8, generator=torch.Generator().manual_seed(5))
    with bounds_checked(*KERNELS):
        out, lse = paged_attention(q, k_cache, v_cache, table, torch.tensor([0, 5], dtype=torch.int32),
                                   return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool((lse[0] == float("-inf")).all())
    assert_close(out[1:], _reference(q[1:], k[1:], v[1:], [5])[0])
    empty = paged_attention(q[:0], k_cache, v_cache, table[:0], torch.zeros(0, dtype=torch.int32))
    assert empty.shape == (0, 2, 3, 8)
    paged_append(k_cache, v_cache, table[:0], torch.zeros(0, dtype=torch.int32), k[:0, :, :1], v[:0, :, :1])

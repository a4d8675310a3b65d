"""Launch grids within the limits of every NVIDIA GPU (2^31 - 1 programs on axis 0, 65,535 on axes 1 and 2).

The interpreter has no grid limit, so nothing else in the suite would notice a launch the driver rejects.
``_core.launch.launch`` splits a grid whose axis 1 or 2 is too long into launches of at most 65,535 programs
there (``GRID_SPLIT=True``), each told its first program (``PID1_BASE`` / ``PID2_BASE``). Here:

- every launcher's launches are recorded (``intercept``, nothing runs; meta tensors) at the shapes the docs and
  the issue promise (ViT-B at batch 5,462, BERT at batch 8,192, varlen with 2,048 sequences x 32 heads, paged with
  8,192 sequences x 8 KV heads) and at B*H = 70,000, for the interpreter's, sm_80's and sm_90's configurations:
  axes 1 and 2 within the limit, and the sub-launches of each kernel cover every program exactly once;
- with the limit lowered (``max_grid``) real splits happen at interpreter-sized shapes, and every launcher still
  matches the float64 reference, forward and backward.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_close
from test_attention import FP32_TOL, _qkv, check_attention
from test_paged import _filled, _reference
from test_varlen import FP32_TOL as VARLEN_TOL
from test_varlen import _packed, check_varlen

import fused_kernels
from fused_kernels._core.launch import MAX_GRID, PID_BASE, force_arch, intercept, max_grid, split_grid
from fused_kernels.ops import softmax
from fused_kernels.ops.attention import launch as at
from fused_kernels.ops.attention import paged as pg
from fused_kernels.ops.attention import varlen as vl
from fused_kernels.ops.attention.examples import stripes

pytestmark = pytest.mark.usefixtures("triton_backend")


# ----------------------------------------------------------------------------- the split itself


@pytest.mark.parametrize("grid, limit", [
    ((3, 70_000), 65_535), ((1, 65_535), 65_535), ((1, 65_536), 65_535), ((2, 131_071, 1), 65_535),
    ((4, 7, 10), 3), ((5, 10, 7), 4), ((1, 1, 1), 1), ((2, 0), 3),
])
def test_split_grid_covers_every_program_once(grid, limit):
    kernel = SimpleNamespace(arg_names=("X", *PID_BASE.values(), "GRID_SPLIT"), __name__="both_axes")
    with max_grid(limit):
        parts = split_grid(kernel, grid)
    cover = np.zeros(grid, dtype=np.int64)
    for sub, bases in parts:
        assert sub[0] == grid[0] and len(sub) == len(grid)
        assert all(n <= limit for n in sub[1:]), sub
        lo = [bases.get(PID_BASE[axis], 0) for axis in range(1, len(grid))]
        index = (slice(None),) + tuple(slice(b, b + n) for b, n in zip(lo, sub[1:]))
        cover[index] += 1
    assert (cover == 1).all()
    fits = all(n <= limit for n in grid[1:])
    assert (len(parts) == 1 and parts[0] == (grid, {})) == fits


def _launched_kernels(run) -> dict:
    """{kernel name: kernel} of the launches ``run()`` makes, seen through the launch choke point (not run)."""
    found = {}
    with intercept(lambda call, go: found.setdefault(call.name, call.kernel)):
        run()
    return found


def test_split_grid_errors_name_the_kernel_and_limit():
    q, k, v = _qkv(1, 2, 2, 5, 5, 16)
    k_cache, v_cache, table, _, _ = _filled([5], 4, 2, 16, torch.float32)
    kernels = {**_launched_kernels(lambda: fused_kernels.attention(q, k, v)),
               **_launched_kernels(lambda: fused_kernels.paged_attention(q[:, :, -1:], k_cache, v_cache, table,
                                                                         torch.tensor([5])))}
    paged_fwd, dense_fwd = kernels["_paged_attn_fwd_kernel"], kernels["_attn_fwd_kernel"]
    with pytest.raises(RuntimeError, match=r"_paged_attn_fwd_kernel.*PID1_BASE"):   # bases on axis 2 only
        split_grid(paged_fwd, (1, 70_000, 1))
    assert len(split_grid(paged_fwd, (1, 1, 70_000))) == 2
    assert len(split_grid(dense_fwd, (1, 70_000))) == 2
    with pytest.raises(RuntimeError, match=r"_softmax_fwd_kernel.*65535.*PID1_BASE"):
        split_grid(softmax._softmax_fwd_kernel, (1, 70_000))
    with pytest.raises(RuntimeError, match=r"_softmax_fwd_kernel.*axis 0.*2147483647"):
        split_grid(softmax._softmax_fwd_kernel, (2**31,))
    assert split_grid(softmax._softmax_fwd_kernel, (2**31 - 1,)) == [((2**31 - 1,), {})]


# ----------------------------------------------------------------------------- every launcher at large shapes


def _meta(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _dense(b, h, hkv, l, s, d, *, mask=False, causal=False, splits=0):
    def run(arch):
        q, k, v = _meta(b, h, l, d), _meta(b, hkv, s, d), _meta(b, hkv, s, d)
        m = _meta(b, 1, 1, s, dtype=torch.bool) if mask else None
        at.fwd_launch(q, k, v, m, None, 0.125, causal, s - l if splits else 0, 0.0, splits, 0, arch)
        if not splits:
            out, lse = _meta(b, h, l, d), _meta(b, h, l, dtype=torch.float32)
            at.bwd_launch(out, None, q, k, v, out, lse, m, None, 0, 0.125, causal, 0, 0.0, arch)
    return run


def _varlen(batch, h, hkv, longest, d):
    def run(arch):
        total = batch * longest
        q, k, v = _meta(total, h, d), _meta(total, hkv, d), _meta(total, hkv, d)
        cu = _meta(batch + 1, dtype=torch.int32)
        out, lse = vl.varlen_fwd_launch(q, k, v, cu, cu, longest, longest, 0.125, True, 0.0, 0, arch)
        vl.varlen_bwd_launch(out, None, q, k, v, out, lse, cu, cu, longest, longest, 0, 0.125, True, 0.0, arch)
    return run


def _paged(b, h, hkv, lq, d, page=16, capacity=1024):
    def run(arch):
        blocks = capacity // page
        cache = _meta(b * blocks, page, hkv, d)
        table, lens = _meta(b, blocks, dtype=torch.int32), _meta(b, dtype=torch.int32)
        new = _meta(b, lq, hkv, d).transpose(1, 2)
        pg.append_launch(cache, cache, table, lens, new, new)
        pg.paged_launch(_meta(b, h, lq, d), cache, cache, table, lens, 0.125, True, None, arch)
    return run


def _block_mask(b, h):
    def run(arch):
        fused_kernels.block_mask(stripes, b, h, 256, 256, device="cpu")
    return run


def _rows(rows, n):
    def run(arch):
        x = _meta(rows, n)
        softmax.launch_rows(softmax._softmax_fwd_kernel, [x, x, x], n, (1.0, 1), x.dtype,
                            MASK_KIND=softmax.MASK_NONE, IS_CAUSAL=False)
        softmax.launch_rows(softmax._softmax_bwd_kernel, [x, x, x], n, (1.0,), x.dtype)
    return run


def _layer_norm(rows, n):
    def run(arch):
        x = torch.zeros(rows, n)
        w = torch.ones(n, requires_grad=True)
        out = fused_kernels.layer_norm(x.requires_grad_(), (n,), w)
        out.backward(torch.zeros_like(out))
    return run


FWD, PRE, DKDV, DQ = "_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"


def _dense_sizes(bh: int, bhkv: int) -> dict[str, int]:
    return {FWD: bh, PRE: bh, DKDV: bhkv, DQ: bh}


# name: (launcher, {kernel: programs on its B*H axis (axis 1; axis 2 for the paged kernel)}); the row kernels
# (softmax, LayerNorm) use axis 0 only.
LARGE = {
    "vit_b_batch_5462": (_dense(5462, 12, 12, 197, 197, 64), _dense_sizes(5462 * 12, 5462 * 12)),
    "bert_batch_8192_mask": (_dense(8192, 12, 12, 512, 512, 64, mask=True), _dense_sizes(8192 * 12, 8192 * 12)),
    "bh_70000_causal": (_dense(7000, 10, 10, 128, 128, 64, causal=True), _dense_sizes(70_000, 70_000)),
    "bh_70000_gqa": (_dense(17_500, 4, 1, 64, 64, 128), _dense_sizes(70_000, 17_500)),
    "decode_bhkv_70000": (_dense(70_000, 4, 1, 1, 4096, 64, splits=4),
                          {"_attn_fwd_split_kernel": 70_000, "_attn_combine_kernel": 70_000}),
    "varlen_2048_x_32": (_varlen(2048, 32, 32, 64, 128), {FWD: 65_536, PRE: 32, DKDV: 65_536, DQ: 65_536}),
    "varlen_bh_70000": (_varlen(7000, 10, 2, 32, 64), {FWD: 70_000, PRE: 10, DKDV: 14_000, DQ: 70_000}),
    "paged_decode_8192_x_8": (_paged(8192, 32, 8, 1, 128), dict.fromkeys(
        ("_paged_append_kernel", "_paged_attn_fwd_kernel", "_attn_combine_kernel"), 65_536)),
    "paged_prefill_8192_x_8": (_paged(8192, 32, 8, 128, 128), dict.fromkeys(
        ("_paged_append_kernel", "_paged_attn_fwd_kernel", "_attn_combine_kernel"), 65_536)),
    "paged_bhkv_70000": (_paged(70_000, 2, 1, 1, 64, capacity=256), dict.fromkeys(
        ("_paged_append_kernel", "_paged_attn_fwd_kernel", "_attn_combine_kernel"), 70_000)),
    "block_mask_bh_70000": (_block_mask(7000, 10), {"_block_mask_kernel": 70_000}),
    "softmax_bert_rows": (_rows(8192 * 12 * 512, 512), {"_softmax_fwd_kernel": 0, "_softmax_bwd_kernel": 0}),
    "layer_norm_70000_rows": (_layer_norm(70_000, 8), {"_layer_norm_fwd_kernel": 0, "_layer_norm_bwd_kernel": 0}),
}


def _record(run, arch):
    seen: list[tuple[str, tuple[int, ...], dict]] = []

    def hook(call, _run):        # record, never run: the tensors are meta (or garbage)
        seen.append((call.name, call.grid, {k: call.kwargs[k] for k in (*PID_BASE.values(), "GRID_SPLIT")
                                            if k in call.kwargs}))

    with force_arch(arch), intercept(hook):
        run(arch)
    return seen


@pytest.mark.parametrize("arch", [None, 80, 90])
@pytest.mark.parametrize("case", list(LARGE))
def test_every_launch_within_the_grid_limits(case, arch):
    run, sizes = LARGE[case]
    by_kernel: dict[str, list] = {}
    for name, grid, bases in _record(run, arch):
        assert grid[0] <= MAX_GRID[0] and all(n <= MAX_GRID[axis] for axis, n in enumerate(grid) if axis), \
            (name, grid)
        by_kernel.setdefault(name, []).append((grid, bases))
    assert set(by_kernel) == set(sizes)
    for name, launches in by_kernel.items():
        dims = len(launches[0][0])
        if sizes[name] == 0:                 # a row kernel: one launch over axis 0 (the LayerNorm backward's
            # second axis, its column chunks, is 1 for rows of one block)
            assert len(launches) == 1 and all(n == 1 for n in launches[0][0][1:]), (name, launches)
            continue
        # The kernel runs once per launcher call here: its sub-launches must tile its whole grid, once.
        def first(bases, axis):
            return bases.get(PID_BASE[axis], 0)
        ends = [max(first(bases, axis) + grid[axis] for grid, bases in launches) for axis in range(1, dims)]
        cover = np.zeros(ends, dtype=np.int8)
        for grid, bases in launches:
            assert len(grid) == dims and grid[0] == launches[0][0][0], name
            cover[tuple(slice(first(bases, axis), first(bases, axis) + grid[axis]) for axis in range(1, dims))] += 1
        assert (cover == 1).all(), f"{name}: programs launched {cover.min()} to {cover.max()} times"
        bh_axis = 2 if name == "_paged_attn_fwd_kernel" else 1
        assert ends[bh_axis - 1] == sizes[name], (name, ends)
        assert (len(launches) > 1) == (sizes[name] > MAX_GRID[bh_axis]), (name, len(launches))
        assert all(bases.get("GRID_SPLIT", False) == (len(launches) > 1) for _, bases in launches), name


# ----------------------------------------------------------------------------- real splits, real results


@pytest.fixture
def splits():
    """Launch grids limited to 3 programs on axes 1 and 2 (real splits at small shapes); yields the kernels
    that were split."""
    names: set[str] = set()

    def hook(call, run):
        if any(k in call.kwargs for k in PID_BASE.values()):
            names.add(call.name)
        run(call)

    with max_grid(3), intercept(hook):
        yield names


@pytest.mark.parametrize("causal", [False, True])
def test_dense_split_forward_backward(splits, causal, device):
    q, k, v = _qkv(2, 4, 2, 37, 45, 16, device=device)          # B*H = 8, B*Hkv = 4
    mask = torch.rand(2, 1, 37, 45, generator=torch.Generator().manual_seed(2)) > 0.2
    check_attention(q, k, v, causal=causal, attn_mask=mask.to(device), **FP32_TOL)
    assert {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
            "_attn_bwd_dq_kernel"} <= splits


def test_decode_split(splits, device):
    q, k, v = _qkv(5, 4, 1, 1, 300, 16, device=device)          # flash-decoding: B*Hkv = 5
    check_attention(q, k, v, causal=True, seqlens_k=torch.tensor([300, 1, 77, 256, 129], device=device),
                    **FP32_TOL)
    assert {"_attn_fwd_split_kernel", "_attn_combine_kernel"} <= splits


def test_varlen_split(splits, device):
    lq, lk = [5, 33, 0, 17], [9, 33, 4, 1]                     # batch * H = 8
    q, k, v = _packed(lq, lk, 2, 1, 16, device=device)
    check_varlen(q, k, v, lq, lk, causal=True, **VARLEN_TOL)
    assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} <= splits


@pytest.mark.parametrize("lq", [1, 20])
def test_paged_split(splits, lq):
    lens, h, hkv, d = [40, 70, 21, 33], 4, 2, 16               # B*Hkv = 8 on axis 2
    k_cache, v_cache, table, k, v = _filled(lens, 16, hkv, d, torch.float32, seed=lq)
    q = torch.randn(len(lens), h, lq, d, generator=torch.Generator().manual_seed(3))
    out, lse = fused_kernels.paged_attention(q, k_cache, v_cache, table, torch.tensor(lens), return_lse=True,
                                             num_splits=2)
    ref, ref_lse = _reference(q, k, v, lens)
    assert_close(out, ref)
    assert_close(lse, ref_lse, name="lse")
    # the append, split over its B*Hkv axis: writes exactly what the PyTorch path writes
    k_new = torch.randn(len(lens), hkv, 3, d, generator=torch.Generator().manual_seed(4))
    pools = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    before = torch.tensor([n - 3 for n in lens])
    fused_kernels.paged_append(*pools[0], table, before, k_new, 2 * k_new)
    with fused_kernels.use_backend("torch"):
        fused_kernels.paged_append(*pools[1], table, before, k_new, 2 * k_new)
    for got, want in zip(pools[0], pools[1]):
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    assert {"_paged_attn_fwd_kernel", "_attn_combine_kernel", "_paged_append_kernel"} <= splits


def test_block_mask_split(splits):
    got = fused_kernels.block_mask(stripes, 2, 5, 100, 70, block=(32, 16), device="cpu")   # Bm*Hm = 10
    with fused_kernels.use_backend("torch"):
        want = fused_kernels.block_mask(stripes, 2, 5, 100, 70, block=(32, 16), device="cpu")
    assert torch.equal(got.classes, want.classes)
    assert "_block_mask_kernel" in splits


def test_variants_split(splits, device):
    from test_attention_mods import check
    check(dict(window=(5, 3), softcap=20.0), b=2, h=4, hkv=2, l=37, s=53, device=device, causal=False)
    assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} <= splits

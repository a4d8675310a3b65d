"""Every GPU architecture of the tile table: the device -> column mapping (CUDA capabilities and AMD gfx names,
with ``torch.cuda`` / ``torch.version.hip`` mocked), the tables' completeness, and each column's configuration run
through the interpreter (``force_arch``) against the float64 reference: several tiles crossed, masks, GQA, every
gradient. What the compiler says about each column is ``python -m fused_kernels.aot --arch all`` (tests/test_aot.py
compiles a subset; docs/architectures.md the full table)."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import assert_close
from test_attention import FP32_TOL, _qkv, check_attention
from test_paged import _filled, _reference
from test_varlen import _packed, check_varlen

import fused_kernels
from fused_kernels._core import launch as core
from fused_kernels._core.launch import (
    ARCH_FAMILIES,
    GENERIC,
    arch_family,
    device_arch,
    dtype_family,
    force_arch,
    intercept,
)
from fused_kernels.ops.attention import config as cfg
from fused_kernels.reference import attention_ref

# (what the device reports, the column its configurations come from)
CUDA_CAPABILITIES = [((7, 0), "sm_70"), ((7, 5), "sm_75"), ((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 9), "sm_86"),
                     ((9, 0), "sm_90"), ((10, 0), "sm_100"), ((12, 0), "sm_120"),
                     # not listed: the generic column (sm_87 Orin, sm_103 B300, sm_121 DGX Spark, a future sm_130)
                     ((8, 7), "generic"), ((10, 3), "generic"), ((12, 1), "generic"), ((13, 0), "generic")]
GFX_NAMES = [("gfx90a:sramecc+:xnack-", "gfx90a"), ("gfx942:sramecc+:xnack-", "gfx942"), ("gfx942", "gfx942"),
             ("gfx1100", "gfx1100"), ("gfx950:sramecc+:xnack-", "generic"), ("gfx1201", "generic")]


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(capability=(8, 6))`` or ``fake_gpu(gfx="gfx942:sramecc+:xnack-")``: ``torch.cuda`` answers as
    that device would (and ``torch.version.hip`` says ROCm for a gfx name)."""
    def install(capability=(8, 0), gfx=None):
        monkeypatch.setattr(torch.version, "hip", "6.4.0" if gfx else None, raising=False)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4) if gfx else capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: types.SimpleNamespace(gcnArchName=gfx or "", multi_processor_count=8))
    return install


@pytest.mark.parametrize("capability, column", CUDA_CAPABILITIES, ids=[f"sm{a}{b}" for (a, b), _ in CUDA_CAPABILITIES])
def test_cuda_device_to_column(fake_gpu, capability, column):
    fake_gpu(capability=capability)
    arch = device_arch(torch.device("cuda", 0))
    assert arch == capability[0] * 10 + capability[1]
    assert arch_family(arch).name == column
    assert cfg.attention_config("fwd", 64, 64, torch.float16, arch)["BLOCK_M"] >= 16


@pytest.mark.parametrize("gfx, column", GFX_NAMES, ids=[g.split(":")[0] for g, _ in GFX_NAMES])
def test_rocm_device_to_column(fake_gpu, gfx, column):
    fake_gpu(gfx=gfx)
    arch = device_arch(torch.device("cuda", 0))
    assert arch == gfx.split(":")[0]          # the gfx name, not the capability ROCm reports (9, 4)
    family = arch_family(arch)
    assert family.name == column
    assert family is GENERIC or family.vendor == "hip"


def test_cpu_and_forced(fake_gpu):
    fake_gpu(capability=(9, 0))
    assert device_arch(torch.device("cpu")) is None and arch_family(None) is None
    with force_arch("gfx942"):
        assert device_arch(torch.device("cuda", 0)) == "gfx942"
        with force_arch(75):
            assert device_arch(torch.device("cpu")) == 75
    assert device_arch(torch.device("cuda", 0)) == 90
    with pytest.raises(TypeError, match="force_arch: arch must be"):
        with force_arch(8.0):
            pass


def test_families_and_limits():
    """Each family's limits as the vendors publish them, and every target a column of every table."""
    by_name = {f.name: f for f in ARCH_FAMILIES}
    assert set(by_name) == {"sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "gfx90a", "gfx942",
                            "gfx1100"}
    kb = 1024
    assert {n: f.shared_memory // kb for n, f in by_name.items()} == {
        "sm_70": 96, "sm_75": 64, "sm_80": 163, "sm_86": 99, "sm_90": 227, "sm_100": 227, "sm_120": 99,
        "gfx90a": 64, "gfx942": 64, "gfx1100": 64}
    assert by_name["sm_86"].targets == (86, 89)
    assert [f.name for f in ARCH_FAMILIES if f.warp_size == 64] == ["gfx90a", "gfx942"]
    assert not by_name["sm_75"].mma_dtypes and not by_name["sm_70"].mma_dtypes   # triton: FMA below sm_80
    assert "bf16" not in by_name["sm_75"].mma_dtypes and "fp64" not in by_name["sm_86"].mma_dtypes
    # the generic column has the least shared memory of any listed family
    assert GENERIC.shared_memory == min(f.shared_memory for f in ARCH_FAMILIES)
    assert set(cfg.COLUMNS) == {*by_name, "generic"}


@pytest.mark.parametrize("column", [*[f.name for f in ARCH_FAMILIES], "generic"])
def test_every_column_has_every_tile(column):
    """Every (dtype family, kind, head dim, dropout) resolves in every column, within the column's shared memory
    by a first-order count (the compiler's count is ``python -m fused_kernels.aot``), and TMA only where the family
    has it."""
    family = next((f for f in ARCH_FAMILIES if f.name == column), GENERIC)
    arch = family.targets[0] if family.targets else "gfx000"
    for dtype in (torch.float16, torch.float32, torch.float64):
        for d in (64, 128, 256):
            for kind in ("fwd", "decode", "bwd_dkdv", "bwd_dq"):
                for dropout in (False, True):
                    if cfg.column_tile(family.name, (dtype_family(dtype), kind, d, dropout)) == cfg.NO_KERNEL:
                        # no kernel there: the call is routed to the PyTorch path, the launchers refuse the tile
                        assert not cfg.has_kernels(d, d, dtype, arch, dropout, backward=True)
                        with pytest.raises(RuntimeError, match="no Triton kernel"):
                            cfg.attention_config(kind, d, d, dtype, arch, dropout)
                        continue
                    c = cfg.attention_config(kind, d, d, dtype, arch, dropout)
                    assert c["BLOCK_N"] >= 16 and (kind == "decode" or c["BLOCK_M"] >= 16), (kind, d, c)
                    assert not c["TMA"] or family.tma, (column, kind, c)
                    if kind != "decode":
                        v = cfg.varlen_config(kind, d, d, dtype, arch, dropout)
                        assert not v["TMA"] and v["BLOCK_M"] >= 16
            if cfg.has_kernels(d, d, dtype, arch, False, backward=False):     # else paged runs the PyTorch path
                assert cfg.paged_config(4, 16, d, d, dtype, arch)["BLOCK_N"] <= 16


# ----------------------------------------------------------------------------- each column in the interpreter

def _recorder(kernel: str, *kwargs: str) -> tuple[list, object]:
    """(seen, hook): an ``intercept`` hook that appends the ``kwargs`` (one value, or a tuple of several) of every
    launch of ``kernel`` to ``seen`` and runs it."""
    seen: list = []

    def record(call, run):
        if call.name == kernel:
            values = tuple(call.kwargs[k] for k in kwargs)
            seen.append(values[0] if len(values) == 1 else values)
        run(call)

    return seen, record



def _resolved(arch) -> str:
    """Every configuration the attention launchers can pick on ``arch`` (dense, varlen, paged), as text
    ("torch" where the column has no kernel)."""
    def config(fn, *args):
        try:
            return fn(*args)
        except RuntimeError:
            return "torch"
    out = []
    for dtype in (torch.float16, torch.float32, torch.float64):
        for d in (64, 128, 256):
            for dropout in (False, True):
                out += [config(cfg.attention_config, kind, d, d, dtype, arch, dropout)
                        for kind in ("fwd", "decode", "bwd_dkdv", "bwd_dq")]
                out += [config(cfg.varlen_config, kind, d, d, dtype, arch, dropout)
                        for kind in ("fwd", "bwd_dkdv", "bwd_dq")]
            out += [config(cfg.paged_config, rows, page, d, d, dtype, arch) for rows in (4, 128) for page in (16, 24)]
    return repr(out)


# One architecture per distinct resolved column ("gfx000": a GPU the table does not know), but for sm_80's and
# sm_90's, which tests/test_attention_gpu_configs.py and tests/test_attention_shipped.py run: the interpreter
# is slow, and a column that resolves to the same tiles as another runs the same kernels.
_BY_COLUMN: dict[str, int | str] = {}
for _arch in [*(f.targets[0] for f in ARCH_FAMILIES), "gfx000"]:
    _BY_COLUMN.setdefault(_resolved(_arch), _arch)
COLUMN_ARCHS = [a for key, a in _BY_COLUMN.items() if key not in (_resolved(80), _resolved(90))]


@pytest.fixture(params=COLUMN_ARCHS, ids=str)
def column_arch(request):
    """The launchers see ``request.param``; yields (arch, [(kernel name, its BLOCK_M, BLOCK_N, TMA, UPCAST), ...])."""
    launches = []

    def record(call, run):
        if "BLOCK_N" in call.kwargs:
            launches.append((call.name, call.kwargs.get("BLOCK_M"), call.kwargs["BLOCK_N"], call.kwargs.get("TMA"),
                             call.kwargs.get("UPCAST")))
        run(call)

    with fused_kernels.use_backend("triton"), force_arch(request.param), intercept(record):
        yield request.param, launches


def test_column_gqa_causal_padding(column_arch, device):
    """fp16 at d = 64, GQA 4:1, causal with a key padding mask and seqlens_k, over more than one tile of each
    kernel at the column's tiles (lengths past its largest tile): output and every gradient against float64."""
    arch, launches = column_arch
    b, h, hkv, l, s = 2, 4, 1, 160, 150
    q, k, v = _qkv(b, h, hkv, l, s, 64, dtype=torch.float16, device=device)
    mask = (torch.rand(b, 1, 1, s, generator=torch.Generator().manual_seed(2)) > 0.2).to(device)
    check_attention(q, k, v, causal=True, attn_mask=mask, seqlens_k=torch.tensor([150, 97], device=device))
    tiles = {name: (bm, bn, tma) for name, bm, bn, tma, _ in launches}
    # fp16 runs in fp32 where triton has no tensor-core instruction for it (sm_70 / sm_75 / an unknown GPU)
    assert {up for *_, up in launches if up is not None} == {core.upcast_16bit(torch.float16, arch)}
    assert core.upcast_16bit(torch.float16, arch) == (arch in (70, 75) or core.arch_family(arch) is GENERIC)
    # causal with seqlens_k aligns each row's offset: the backward's row-state tiles
    want = {kind: cfg.attention_config(kind, 64, 64, torch.float16, arch, row_state=kind != "fwd")
            for kind in ("fwd", "bwd_dkdv", "bwd_dq")}
    for kind, name in (("fwd", "_attn_fwd_kernel"), ("bwd_dkdv", "_attn_bwd_dkdv_kernel"),
                       ("bwd_dq", "_attn_bwd_dq_kernel")):
        assert tiles[name][:2] == (want[kind]["BLOCK_M"], want[kind]["BLOCK_N"]), (name, tiles[name], want[kind])
        assert tiles[name][2] == want[kind]["TMA"]
    # the lengths cross at least two tiles of each kernel's loop
    assert max(l, s) > max(want["fwd"]["BLOCK_N"], want["bwd_dq"]["BLOCK_N"], want["bwd_dkdv"]["BLOCK_M"])


def test_column_causal_mha_query_loops(column_arch, device):
    """fp16 MHA causal at d = 64 without seqlens_k (the dK/dV kernel's three query loops, ``SPLIT_BLOCKS``, where
    the column keeps them; gfx1100 walks one loop: with three its d=64 form spilled) against float64."""
    arch, _ = column_arch
    seen, record = _recorder("_attn_bwd_dkdv_kernel", "SPLIT_BLOCKS")
    q, k, v = _qkv(1, 2, 2, 70, 70, 64, dtype=torch.float16, device=device)
    with intercept(record):
        check_attention(q, k, v, causal=True)
    assert seen and set(seen) == {cfg.split_blocks(arch)}
    assert cfg.split_blocks(arch) == (arch != "gfx1100")


def test_column_dtypes_head_dims(column_arch, device):
    """fp32 at d = 128 (non-causal, float mask) and fp64 at d = 96 (causal): the columns' fp32 / fp64 tiles."""
    arch, _ = column_arch
    q, k, v = _qkv(1, 2, 2, 70, 90, 128, dtype=torch.float32, device=device)
    mask = torch.randn(1, 2, 70, 90, generator=torch.Generator().manual_seed(4)).to(device)
    check_attention(q, k, v, attn_mask=mask, **FP32_TOL)
    q, k, v = _qkv(1, 2, 1, 40, 50, 96, dtype=torch.float64, device=device)
    check_attention(q, k, v, causal=True, atol=1e-10, rtol=1e-10)


def test_column_decode_varlen_paged(column_arch, device):
    """The flash-decoding split kernel (one query over 300 keys, fp16, GQA 2:1), the packed varlen kernels (fp16,
    causal, GQA 2:1, every gradient) and the paged kernel (fp32, shuffled 16-key blocks, two queries) at the
    column's tiles."""
    arch, launches = column_arch
    q, k, v = _qkv(2, 4, 2, 1, 300, 64, dtype=torch.float16, device=device)
    check_attention(q, k, v, causal=True)
    assert any(name == "_attn_fwd_split_kernel" for name, *_ in launches)
    lq = [37, 150]
    q, k, v = _packed(lq, lq, 4, 2, 64, dtype=torch.float16, device=device, seed=3)
    check_varlen(q, k, v, lq, lq, causal=True)
    lens = [90, 41]
    k_cache, v_cache, table, k, v = _filled(lens, 16, 2, 64, torch.float32, seed=4)
    q = torch.randn(2, 4, 2, 64, generator=torch.Generator().manual_seed(5))
    out = fused_kernels.paged_attention(q.to(device), k_cache.to(device), v_cache.to(device), table.to(device),
                                        torch.tensor(lens, dtype=torch.int32, device=device))
    assert_close(out, _reference(q, k, v, lens)[0].to(device))
    assert any(name == "_paged_attn_fwd_kernel" for name, *_ in launches)


def test_generic_column_is_conservative():
    """An unknown GPU gets tiles no larger than the smallest-shared-memory listed family's, and no TMA."""
    assert core.arch_family(123) is GENERIC and core.arch_family("gfx9999") is GENERIC
    for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
        for d in (64, 128, 256):
            key = ("16bit", kind, d, False)
            assert cfg.column_tile("generic", key) == cfg.column_tile("sm_75", key)
            if cfg.column_tile("generic", key) == cfg.NO_KERNEL:    # T4's d=256 dK/dV: the PyTorch path
                continue
            generic = cfg.attention_config(kind, d, d, torch.bfloat16, 123)
            assert not generic["TMA"]
            assert generic == cfg.attention_config(kind, d, d, torch.bfloat16, 75)


@pytest.mark.parametrize("version", [(3, 6), (3, 9)])
def test_row_state_tiles(monkeypatch, device, version):
    """A call whose dQ loop carries per-row state (softcap, document ids, causal offsets aligned per row to
    seqlens_k) takes ``config._ROW_STATE_OVERRIDES`` where its triton release has an entry (3.6 on sm_90: 128 x 64
    at d=128, its 128 x 128 spills with them), every other call the column's tile (128 x 128)."""
    monkeypatch.setattr(cfg, "_TRITON_VERSION", version)
    lean = version == (3, 6)
    for row_state in (False, True):
        tile = cfg.attention_config("bwd_dq", 128, 128, torch.bfloat16, 90, row_state=row_state)
        assert (tile["BLOCK_M"], tile["BLOCK_N"]) == ((128, 64) if row_state and lean else (128, 128))
    q, k, v = (torch.randn(1, 2, 5, 128, dtype=torch.float16, device=device, requires_grad=True) for _ in range(3))
    ids = torch.zeros(1, 5, dtype=torch.long, device=device)
    calls = {"plain": dict(), "softcap": dict(softcap=5.0), "documents": dict(document_ids=ids),
             "causal-seqlens": dict(causal=True, seqlens_k=torch.tensor([4], device=device))}
    for name, kw in calls.items():
        seen, record = _recorder("_attn_bwd_dq_kernel", "BLOCK_N")
        with force_arch(90), intercept(record):
            fused_kernels.attention(q, k, v, **kw).sum().backward()
        assert seen == [64 if lean and name != "plain" else 128], name


def test_row_state_tiles_dkdv_sm75(monkeypatch, device):
    """triton 3.9, sm_75 (and sm_70, which inherits it): the 16-bit d=128 dK/dV takes 4 warps for calls with row
    state (causal offsets aligned to seqlens_k, document ids, softcap: 8 spilled there), 8 for the others; causal
    with and without seqlens_k match float64 (output and every gradient)."""
    monkeypatch.setattr(cfg, "_TRITON_VERSION", (3, 9))
    for arch in (75, 70):
        for row_state, warps in ((False, 8), (True, 4)):
            tile = cfg.attention_config("bwd_dkdv", 128, 128, torch.float16, arch, row_state=row_state)
            assert (tile["BLOCK_M"], tile["BLOCK_N"], tile["num_warps"]) == (16, 32, warps)
    q, k, v = _qkv(1, 2, 2, 40, 40, 128, dtype=torch.float16, device=device)
    calls = {"causal": (dict(causal=True), 8),
             "causal-seqlens": (dict(causal=True, seqlens_k=torch.tensor([33], device=device)), 4)}
    for name, (kw, warps) in calls.items():
        seen, record = _recorder("_attn_bwd_dkdv_kernel", "num_warps")
        with force_arch(75), intercept(record):
            check_attention(q, k, v, **kw)
        assert seen == [warps], name
    seen, record = _recorder("_attn_bwd_dkdv_kernel", "num_warps")     # document ids: row state too
    ids = torch.tensor([[0] * 15 + [1] * 25], device=device)
    with force_arch(75), intercept(record):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        fused_kernels.attention(*leaves, document_ids=ids).sum().backward()
    assert seen == [4]


@pytest.mark.parametrize("arch", [80, 86, 70])
def test_layer_norm_limits_per_family(arch, device):
    """The LayerNorm single-block limits per family (``norms._FAMILY_LIMITS``): an fp32 backward of 8,192 columns
    is one block on sm_80 and column chunks of 4,096 on sm_86 (one block needs 131,156 B of its 101,376 B of
    shared memory) and sm_70 (128 registers at 16 warps spilled); every gradient against float64."""
    from fused_kernels.ops import norms
    n, chunked = 8192, arch != 80
    assert norms.bwd_block(n, torch.float32, arch) == ((4096, False) if chunked else (8192, True))
    assert norms.fused_limit(torch.float16, False, 70) == norms.MAX_FUSED_FWD // 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, n, generator=g).to(device).requires_grad_()
    w, b = (torch.randn(n, generator=g).to(device).requires_grad_() for _ in range(2))
    seen, record = _recorder("_layer_norm_bwd_kernel", "BLOCK_N", "ROW_SUMS")
    with fused_kernels.use_backend("triton"), force_arch(arch), intercept(record):
        out = fused_kernels.layer_norm(x, (n,), w, b)
        grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    assert seen == [(4096, False) if chunked else (8192, True)]
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.nn.functional.layer_norm(x64, (n,), w64, b64)
    want = torch.autograd.grad(ref, (x64, w64, b64), torch.ones_like(ref))
    assert_close(out, ref.float(), atol=1e-4, rtol=1e-4)
    for got, exp in zip(grads, want):
        assert_close(got, exp.float(), atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- no kernel: the PyTorch path

@pytest.mark.parametrize("arch", ["gfx90a", "gfx942", "gfx1100", 90])
def test_layer_norm_multipass_fp64_dropout_on_cdna_takes_pytorch(arch, device):
    """triton 3.9 segfaults compiling the float64 multi-pass LayerNorm forward with dropout for CDNA (gfx90a,
    gfx942): ``add_layer_norm`` sends those calls to the PyTorch path (no kernel launch, so no compile); other
    architectures, and shorter rows, keep the kernel."""
    from fused_kernels.ops import norms
    n = norms.fused_limit(torch.float64, backward=False) + 8       # past one block: the multi-pass path
    cdna = arch in ("gfx90a", "gfx942")
    assert norms.fwd_kernel_compiles(n, torch.float64, True, arch) == (not cdna)
    assert norms.fwd_kernel_compiles(n, torch.float64, False, arch)
    assert norms.fwd_kernel_compiles(n - 16, torch.float64, True, arch)
    assert norms.fwd_kernel_compiles(n, torch.float32, True, arch)
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(2, n, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    with fused_kernels.use_backend("triton"), force_arch(arch):
        names = _launched(lambda: fused_kernels.add_layer_norm(x, r, dropout_p=0.25))
        out, res = fused_kernels.add_layer_norm(x, r, dropout_p=0.25)
    assert ("_layer_norm_fwd_kernel" in names) == (not cdna)
    kept = (res - r) != 0                        # the dropout mask: x / 0.75 where kept, 0 elsewhere
    assert_close(res, r + torch.where(kept, x / 0.75, 0.0), atol=1e-12, rtol=1e-12)
    assert_close(out, torch.nn.functional.layer_norm(res, (n,)), atol=1e-10, rtol=1e-10)

def _launched(run) -> list[str]:
    """The Triton kernels ``run()`` launches."""
    names: list[str] = []

    def record(call, go):
        names.append(call.name)
        go(call)

    with intercept(record):
        run()
    return names


def test_preprocess_rows(device):
    """The backward's preprocess kernel takes 8 rows a program above 512 B of dO a row (16 rows of fp32 at d=256
    spilled on sm_70), 64 / 32 below, 32 under the interpreter; fp64 at d=96 (1,024 B rows) on a forced sm_70
    launches 8-row programs and every gradient matches float64."""
    assert [cfg.preprocess_rows(n, 80) for n in (128, 256, 512, 1024, 2048)] == [64, 64, 32, 8, 8]
    assert cfg.preprocess_rows(1024, None) == 32
    rows, record = _recorder("_attn_bwd_preprocess_kernel", "BLOCK_M")
    q, k, v = _qkv(1, 2, 1, 21, 30, 96, dtype=torch.float64, device=device)
    with force_arch(70), intercept(record):
        check_attention(q, k, v, causal=True, atol=1e-10, rtol=1e-10)
    assert rows and set(rows) == {8}


def test_no_kernel_entry_routes_to_the_pytorch_path(device):
    """A ``NO_KERNEL`` entry (T4: the d=256 dK/dV with dropout needs more than its 64 KB of shared memory even at
    16 x 16): ``attention``, ``scaled_dot_product_attention`` and ``varlen_attention`` run the PyTorch path for
    the whole call, with exactly the output and gradients of ``use_backend("torch")`` (same dropout draw), and no
    kernel is launched; without gradients the forward, which has a kernel there, runs it."""
    assert cfg.column_tile("sm_75", ("fp32", "bwd_dkdv", 256, True)) == cfg.NO_KERNEL
    # fp64 d=64 dK/dV with dropout: T4 spills it at every warp count, V100 at 4 warps is clean
    assert not cfg.has_kernels(64, 64, torch.float64, 75, True, backward=True)
    assert cfg.has_kernels(64, 64, torch.float64, 70, True, backward=True)
    # fp64 d=128 dK/dV needs 67,584 B with or without dropout: no kernel on T4, V100's 96 KB hold it
    assert not cfg.has_kernels(128, 128, torch.float64, 75, False, backward=True)
    assert cfg.has_kernels(128, 128, torch.float64, 75, False, backward=False)
    assert cfg.has_kernels(128, 128, torch.float64, 70, False, backward=True)
    # without dropout too: 66,560 B at 16 x 16 in fp32 math (python -m fused_kernels.aot --arch 75)
    for dtypes in ("16bit", "fp32"):
        assert cfg.column_tile("sm_75", (dtypes, "bwd_dkdv", 256, False)) == cfg.NO_KERNEL
        assert not cfg.has_kernels(256, 256, torch.float16 if dtypes == "16bit" else torch.float32, 75, False, True)
    q, k, v = _qkv(1, 2, 2, 40, 50, 256, dtype=torch.float32, device=device)
    dout = torch.randn(1, 2, 40, 256, generator=torch.Generator().manual_seed(3)).to(device)

    def run(backend, fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with fused_kernels.use_backend(backend), force_arch(75):
            torch.manual_seed(11)
            got = []
            names = _launched(lambda: got.append(fn(*leaves)))
            grads = torch.autograd.grad(got[0], leaves, dout)
        return names, [got[0], *grads]

    calls = {"attention": lambda q, k, v: fused_kernels.attention(q, k, v, causal=True, dropout_p=0.2),
             "sdpa": lambda q, k, v: fused_kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.2)}
    for name, fn in calls.items():
        names, got = run("triton", fn)
        _, want = run("torch", fn)
        assert names == [], (name, names)
        for g, w in zip(got, want):
            assert torch.equal(g, w), name
    lens = [17, 23]
    qp, kp, vp = _packed(lens, lens, 2, 2, 256, dtype=torch.float32, device=device, seed=5)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32, device=device)
    with fused_kernels.use_backend("triton"), force_arch(75):
        leaves = [t.detach().clone().requires_grad_() for t in (qp, kp, vp)]
        names = _launched(lambda: fused_kernels.varlen_attention(*leaves, cu, cu, 23, 23, dropout_p=0.2))
        assert names == []
        with torch.no_grad():            # no gradient wanted: the forward kernel (dropout tiles) runs
            names = _launched(lambda: fused_kernels.attention(q, k, v, causal=True, dropout_p=0.2))
        assert "_attn_fwd_kernel" in names


def test_no_kernel_gfx1100_matches_the_reference(device):
    """RDNA3 (gfx1100) has no kernel for the fp32 backward at d = 128 (scratch at every tile the compiler was
    given): output and every gradient still match the float64 reference, from the PyTorch path, no kernel run."""
    assert not cfg.has_kernels(128, 128, torch.float32, "gfx1100", False, backward=True)
    # fp64 at d=64: its backward spilled 748-2,136 B of scratch with or without dropout; fp32's is clean at 16 x 16
    assert not cfg.has_kernels(64, 64, torch.float64, "gfx1100", False, backward=True)
    assert cfg.has_kernels(64, 64, torch.float32, "gfx1100", False, backward=True)
    q, k, v = _qkv(1, 2, 1, 70, 90, 128, dtype=torch.float32, device=device)
    with fused_kernels.use_backend("triton"), force_arch("gfx1100"):
        names = _launched(lambda: check_attention(q, k, v, causal=True, **FP32_TOL))
    assert names == []
    # the plain self-attention call (its short path past the argument checks) routes the same way
    q, k, v = (t.detach().requires_grad_() for t in _qkv(1, 2, 2, 40, 40, 128, dtype=torch.float32, device=device))
    for fn in (lambda: fused_kernels.attention(q, k, v, causal=True),
               lambda: fused_kernels.scaled_dot_product_attention(q, k, v, is_causal=True)):
        with fused_kernels.use_backend("triton"), force_arch("gfx1100"):
            got = []
            names = _launched(lambda got=got, fn=fn: got.append(fn()))
            grads = torch.autograd.grad(got[0].sum(), (q, k, v))
        with fused_kernels.use_backend("torch"):
            out = fn()
            want = torch.autograd.grad(out.sum(), (q, k, v))
        assert names == []
        assert torch.equal(got[0], out) and all(torch.equal(g, w) for g, w in zip(grads, want))


def _variant_check(q, k, v, **kw) -> None:
    """fp16 output and every gradient within the 2x rule of the float64 reference (PyTorch's own fp16 error:
    the reference run in fp16)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fused_kernels.attention(*leaves, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = [out, *torch.autograd.grad(out, leaves, dout.to(out))]
    wants, torch_outs = [], []
    for dtype, sink in ((torch.float64, wants), (torch.float16, torch_outs)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        with fused_kernels.use_backend("torch"):
            ref = attention_ref(*inputs, **kw)
        sink.extend([ref, *torch.autograd.grad(ref, inputs, dout.to(dtype))])
    for name, g, want, tout in zip(("out", "dq", "dk", "dv"), got, wants, torch_outs):
        assert_close(g, want, tout, grad=name != "out", name=name)


def test_variant_tiles(monkeypatch, device):
    """triton 3.9: a call with an attention variant takes ``config._VARIANT_OVERRIDES`` where its column (or one
    it starts from) has an entry, after the row-state entries; every other call keeps the column's tile. Run in
    the interpreter at those tiles (window, several tiles crossed), output and every gradient match float64."""
    monkeypatch.setattr(cfg, "_TRITON_VERSION", (3, 9))

    def tile(kind, d, arch, dropout=False, **kw):
        c = cfg.attention_config(kind, d, d, torch.float16, arch, dropout, **kw)
        return c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]

    assert tile("fwd", 128, 100) == (128, 128, 8, 2) and tile("fwd", 128, 100, variant=True) == (128, 64, 8, 2)
    assert tile("bwd_dq", 128, 120, True) == (64, 32, 8, 2)               # dropout alone: the column's tile
    assert tile("bwd_dq", 128, 120, True, variant=True) == (64, 32, 8, 1)  # ALiBi (heavy)
    for arch in (75, 70):                                                  # sm_70 starts from sm_75
        assert tile("bwd_dkdv", 64, arch) == (16, 32, 4, 1)
        assert tile("bwd_dkdv", 64, arch, variant=True) == (16, 64, 4, 1)
    assert tile("bwd_dkdv", 128, 75, variant=True) == tile("bwd_dkdv", 128, 75, row_state=True) == (16, 32, 4, 1)
    assert tile("bwd_dq", 128, 90, variant=True) == tile("bwd_dq", 128, 90)       # no entry on sm_90
    # sm_100a's d=64 dQ: the row-state entry (causal-seqlens, softcap, document ids) before any variant entry
    assert tile("bwd_dq", 64, 100) == tile("bwd_dq", 64, 100, variant=True) == (128, 64, 8, 2)
    assert tile("bwd_dq", 64, 100, row_state=True, variant=True) == (64, 64, 8, 2)
    q, k, v = _qkv(1, 2, 1, 150, 150, 128, dtype=torch.float16, device=device)
    for kw, fwd_n in ((dict(causal=True), 128), (dict(causal=True, window=(100, 0)), 64)):
        seen, record = _recorder("_attn_fwd_kernel", "BLOCK_M", "BLOCK_N")
        with force_arch(100), intercept(record):
            _variant_check(q, k, v, **kw)
        assert seen == [(128, fwd_n)], kw
    q, k, v = _qkv(1, 2, 2, 70, 70, 64, dtype=torch.float16, device=device)
    seen, record = _recorder("_attn_bwd_dkdv_kernel", "BLOCK_M", "BLOCK_N", "num_warps")
    with force_arch(75), intercept(record):
        _variant_check(q, k, v, causal=True, window=(40, 0))
    assert seen == [(16, 64, 4)]


@pytest.mark.parametrize("arch", [80, 86, 90, 75, 70, "gfx942"])
def test_fp64_head_dim_256(arch, device, monkeypatch):
    """fp64 at d=256: no backward kernel on any column (16 x 16 needs 131,072-133,120 B of shared memory or spills:
    ``python -m fused_kernels.aot --family attention --filter 'fp64 d=256'``), so a call with gradients runs the
    PyTorch path whole, no kernel launched, and matches float64's reference (it is the reference dtype); without
    gradients the forward kernel runs where it compiles clean (sm_80, sm_86, V100, CDNA) and not where it spills
    (sm_90a) or needs 98,304 B (T4); triton 3.9's table (3.6 spills sm_80's forward too: the PyTorch path)."""
    monkeypatch.setattr(cfg, "_TRITON_VERSION", (3, 9))
    assert not cfg.has_kernels(256, 256, torch.float64, arch, False, backward=True)
    forward = arch not in (90, 75)
    assert cfg.has_kernels(256, 256, torch.float64, arch, False, backward=False) == forward
    q, k, v = _qkv(1, 2, 1, 20, 24, 256, dtype=torch.float64, device=device)
    with fused_kernels.use_backend("triton"), force_arch(arch):
        names = _launched(lambda: check_attention(q, k, v, causal=True))
        assert names == []
        with torch.no_grad():
            names = _launched(lambda: fused_kernels.attention(q, k, v, causal=True))
    assert ("_attn_fwd_kernel" in names) == forward
    monkeypatch.setattr(cfg, "_TRITON_VERSION", (3, 6))
    assert cfg.has_kernels(256, 256, torch.float64, arch, False, backward=False) == (forward and arch in (70, "gfx942"))

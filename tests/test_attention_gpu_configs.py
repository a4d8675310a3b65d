"""Every attention kernel at the configuration a GPU runs, in fp16 and bf16, forward and every gradient.

The architecture the launchers see is forced (``force_arch``) to sm_90 (Hopper: 128-row tiles, TMA tensor
descriptors, the register-lean dropout / heavy-variant column) and to sm_80 (Ampere: no TMA, its own tiles), and
bf16 runs bf16-exact in the interpreter (``bf16_exact``: real bf16 dot operands and round-to-nearest-even casts,
``UPCAST`` off), so the bf16 arithmetic of the kernels is what executes, not an fp32 stand-in. Covered: dense
attention (GQA, causal, bool / float masks, ``seqlens_k``, fused-QKV views), every variant (window, ALiBi, softcap,
documents, prefix-LM, ``score_mod``, ``mask_mod``, ``mod_args``), packed varlen, the paged cache (decode and
prefill), flash-decoding with 33 to 128 key splits, and dropout. Shapes cross several 128-tiles but stay small
(the interpreter costs about 4 ms per program iteration).

Judged as every kernel test (``helpers``): float64 reference; the kernel's error at most 2x that of plain PyTorch
in the same dtype (3x for gradients) plus a couple of ulps. Plain PyTorch is the reference code itself computing
in the 16-bit dtype (``_in_dtype``). On a GPU the same tests run compiled at both architectures' configurations
(``bf16_exact`` is then a no-op).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl
from bf16_exact import bf16_exact
from helpers import assert_close
from test_paged import _filled

import fused_kernels
from fused_kernels import reference as ref
from fused_kernels._core.launch import force_arch, intercept, launch
from fused_kernels.ops.attention import examples as ex
from fused_kernels.ops.attention.config import attention_config
from fused_kernels.ops.attention.launch import attention_fwd

pytestmark = pytest.mark.usefixtures("triton_backend")

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(params=[(90, "bf16"), (90, "fp16"), (80, "bf16"), (80, "fp16")], ids=lambda p: f"sm{p[0]}-{p[1]}")
def gpu(request, device):
    """The launchers see compute capability ``arch``; bf16 runs bf16-exact. Yields (arch, dtype, device, the
    launches as (kernel name, grid, keyword arguments))."""
    arch, name = request.param
    launches: list[tuple[str, tuple[int, ...], dict]] = []

    def record(call, run):
        launches.append((call.name, call.grid, call.kwargs))
        run(call)

    with contextlib.ExitStack() as stack:
        if name == "bf16":
            stack.enter_context(bf16_exact())
        stack.enter_context(force_arch(arch))
        stack.enter_context(intercept(record))         # inside bf16_exact: sees the launches it changed
        yield SimpleNamespace(arch=arch, dtype=HALF[name], device=device, launches=launches)
    assert launches, "no kernel launched"
    assert not any(kw.get("UPCAST") for _, _, kw in launches), "a kernel ran with bf16 upcast to fp32"


@contextlib.contextmanager
def _in_dtype():
    """The reference code computing in its inputs' dtype: plain PyTorch's rounding, the 2x rule's yardstick."""
    saved = ref._compute_dtype
    ref._compute_dtype = lambda x: x.dtype
    try:
        yield
    finally:
        ref._compute_dtype = saved


def check(gpu, kernel_fn, ref_fn, inputs, *, grads=True, names=("q", "k", "v")):
    """``kernel_fn(*inputs)`` (the kernels at the forced configuration) against ``ref_fn`` in float64, forward
    and the gradients of ``inputs`` for a random output gradient, by the 2x / 3x rule against ``ref_fn`` in the
    inputs' dtype (plain PyTorch)."""
    dout = None

    def run(fn, xs, backend):
        nonlocal dout
        with fused_kernels.use_backend(backend):
            leaves = [x.detach().clone().requires_grad_(grads) for x in xs]
            out = fn(*leaves)
            if dout is None:
                gen = torch.Generator().manual_seed(1)
                dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
            return [out, *(torch.autograd.grad(out, leaves, dout.to(out.dtype)) if grads else ())]

    got = run(kernel_fn, inputs, "triton")
    want = run(ref_fn, [x.double() for x in inputs], "torch")
    with _in_dtype():
        base = run(ref_fn, inputs, "torch")
    for name, g, w, b in zip(("out", *("d" + n for n in names)), got, want, base):
        assert g.dtype == gpu.dtype and g.shape == w.shape, name
        assert_close(g, w, b, grad=name != "out", name=name)


def _rand(gpu, *shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(gpu.device, gpu.dtype)


def _qkv(gpu, b, h, hkv, l, s, d, seed=0):
    return _rand(gpu, b, h, l, d, seed=seed), _rand(gpu, b, hkv, s, d, seed=seed + 1), \
        _rand(gpu, b, hkv, s, d, seed=seed + 2)


def _used(gpu, name: str, flag: str) -> bool:
    return any(kw.get(flag) for n, _, kw in gpu.launches if n == name)


def _grids(gpu, name: str) -> list[tuple[int, ...]]:
    return [grid for n, grid, _ in gpu.launches if n == name]


# ----------------------------------------------------------------------------- the bf16-exact mode itself


@triton.jit
def _cast_dot_kernel(X, Y, A, B, C, N: tl.constexpr, M: tl.constexpr):
    """Y = bf16(X) (N values); C = A @ B for (M, M) bf16 A, B, accumulated in fp32."""
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))
    r = tl.arange(0, M)
    a = tl.load(A + r[:, None] * M + r[None, :])
    b = tl.load(B + r[:, None] * M + r[None, :])
    tl.store(C + r[:, None] * M + r[None, :], tl.dot(a, b, out_dtype=tl.float32))


def test_bf16_exact_casts_round_to_nearest_even_and_dots_are_exact(device):
    """Under ``bf16_exact`` an fp32 -> bf16 cast gives torch's (round to nearest even) bits, ties, the largest
    finite values, subnormals and infinities included (NaN stays NaN), and a bf16 dot equals the fp32 product of
    the same values (on a GPU: what the hardware does)."""
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.3895314e38, 3.3961776e38, -3.4e38, 1e-40,
                            -1e-39, float("inf"), float("-inf"), float("nan")])
    x = torch.cat([special, torch.randn(1024 - len(special), generator=gen) * 1e3]).to(device)
    y = torch.empty(1024, dtype=torch.bfloat16, device=device)
    a, b = (torch.randn(16, 16, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    c = torch.empty(16, 16, device=device)
    with bf16_exact():
        launch(_cast_dot_kernel, (1,), x, y, a, b, c, N=1024, M=16)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), want.isnan())                      # NaN stays NaN (payload bits vary by device)
    assert torch.equal(y.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()])
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- dense


DENSE = {
    "gqa_causal": dict(b=1, h=2, hkv=1, l=300, s=300, d=64, causal=True),
    "bool_mask_seqlens_d128": dict(b=2, h=1, hkv=1, l=140, s=330, d=128, mask="bool", seqlens=(330, 141)),
    "float_mask_causal_d80": dict(b=1, h=2, hkv=1, l=150, s=260, d=80, mask="float", causal=True),
}


@pytest.mark.parametrize("case", list(DENSE))
def test_dense(gpu, case):
    c = DENSE[case]
    b, h, l, s = c["b"], c["h"], c["l"], c["s"]
    q, k, v = _qkv(gpu, b, h, c["hkv"], l, s, c["d"])
    kw = dict(causal=c.get("causal", False))
    if c.get("mask") == "bool":
        kw["attn_mask"] = (torch.rand(b, 1, 1, s, generator=torch.Generator().manual_seed(3)) > 0.2).to(gpu.device)
    elif c.get("mask") == "float":
        kw["attn_mask"] = _rand(gpu, 1, h, l, s, seed=4)
    if "seqlens" in c:
        kw["seqlens_k"] = torch.tensor(c["seqlens"], device=gpu.device)

    def fn(q, k, v):
        mask = kw.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        return ref.attention_ref(q, k, v, **{**kw, "attn_mask": mask})

    check(gpu, lambda q, k, v: fused_kernels.attention(q, k, v, **kw), fn, (q, k, v))
    assert _used(gpu, "_attn_fwd_kernel", "TMA") == (gpu.arch == 90)


def test_sdpa_fused_qkv_views(gpu):
    """q, k, v as views of one (B, L, 3, H, D) projection (a model's fused QKV): strided heads, TMA on sm_90."""
    b, l, h, d = 2, 257, 2, 64
    qkv = _rand(gpu, b, l, 3, h, d)

    def split(t):
        return [t[:, :, i].transpose(1, 2) for i in range(3)]

    check(gpu, lambda t: fused_kernels.scaled_dot_product_attention(*split(t), is_causal=True),
          lambda t: ref.scaled_dot_product_attention_ref(*split(t), is_causal=True), (qkv,), names=("qkv",))
    assert _used(gpu, "_attn_fwd_kernel", "TMA") == (gpu.arch == 90)


# Warp-specialized kernels (sm_90a): the forward's key loop when every key block is full and mask-free; the dK/dV
# kernel (kernels/backward_ws.py) for MHA calls without causal, mask, seqlens_k, dropout or variants, where partial
# query and key blocks are fine (zero-filled rows add nothing, keys past S are not stored). "plain": the case
# keeps the plain kernels.
WARP_SPECIALIZED = {
    "fwd-gqa_odd_l_d128": dict(kind="fwd", b=1, h=2, hkv=1, l=200, s=256, d=128),
    "fwd-d96_two_batches": dict(kind="fwd", b=2, h=1, hkv=1, l=130, s=384, d=96),   # zero-filled past D in the box
    "fwd-mha_d64": dict(kind="fwd", b=1, h=2, hkv=2, l=129, s=128, d=64),
    "fwd-key_tail": dict(kind="fwd", b=1, h=2, hkv=1, l=140, s=200, d=128, plain=True),   # S % 128: a bounds block
    "fwd-causal": dict(kind="fwd", b=1, h=2, hkv=1, l=256, s=256, d=128, causal=True, plain=True),
    "dkdv-odd_l_odd_s_d128": dict(kind="bwd_dkdv", b=1, h=2, hkv=2, l=200, s=150, d=128),
    "dkdv-d96_two_batches": dict(kind="bwd_dkdv", b=2, h=1, hkv=1, l=70, s=130, d=96),
    "dkdv-d64_short": dict(kind="bwd_dkdv", b=1, h=2, hkv=2, l=5, s=129, d=64),       # one partial query block
    "dkdv-gqa": dict(kind="bwd_dkdv", b=1, h=2, hkv=1, l=130, s=130, d=64, plain=True),   # the group's loop
    "dkdv-causal": dict(kind="bwd_dkdv", b=1, h=2, hkv=2, l=130, s=130, d=64, causal=True, plain=True),
}


@pytest.mark.parametrize("case", list(WARP_SPECIALIZED))
def test_warp_specialized(gpu, case):
    """Calls that meet a warp-specialized kernel's contract take it on sm_90 where this triton compiles it
    (``config._WARP_SPECIALIZED``: tiles through descriptors made in the kernel, zero-filled past the tensors);
    the others (a key tail or the causal diagonal in the forward, GQA or causal in dK/dV) keep the plain kernels.
    Forward and every gradient against float64."""
    c = WARP_SPECIALIZED[case]
    q, k, v = _qkv(gpu, c["b"], c["h"], c["hkv"], c["l"], c["s"], c["d"])
    causal = c.get("causal", False)
    check(gpu, lambda q, k, v: fused_kernels.attention(q, k, v, causal=causal),
          lambda q, k, v: ref.attention_ref(q, k, v, causal=causal), (q, k, v))
    compiled = attention_config(c["kind"], c["d"], c["d"], gpu.dtype, gpu.arch, specialize=True)["WARP_SPECIALIZE"]
    ws = compiled and not c.get("plain", False)
    assert not compiled or gpu.arch == 90
    if c["kind"] == "fwd":
        assert _used(gpu, "_attn_fwd_kernel", "WARP_SPECIALIZE") == ws
        assert _used(gpu, "_attn_fwd_kernel", "TMA") == (gpu.arch == 90)
    else:
        assert bool(_grids(gpu, "_attn_bwd_dkdv_ws_kernel")) == ws
        assert bool(_grids(gpu, "_attn_bwd_dkdv_kernel")) == (not ws)


def test_warp_specialized_forward_needs_an_aligned_row_stride(gpu):
    """One query row whose row stride (37 elements) no TMA descriptor takes: a host descriptor ignores the stride of
    a size-1 dim, the in-kernel one of the specialized loop would not, so the forward keeps the plain loops."""
    def rows(buf):
        return buf.as_strided((1, 2, 1, 64), (512, 128, 37, 1))

    buf = _rand(gpu, 192)
    k, v = _rand(gpu, 1, 1, 128, 64, seed=1), _rand(gpu, 1, 1, 128, 64, seed=2)
    check(gpu, lambda buf, k, v: fused_kernels.attention(rows(buf), k, v),
          lambda buf, k, v: ref.attention_ref(rows(buf), k, v), (buf, k, v), names=("buf", "k", "v"))
    assert not _used(gpu, "_attn_fwd_kernel", "WARP_SPECIALIZE")


def test_warp_specialized_forward_keeps_the_users_allocator(device):
    """The specialized forward's scratch allocator (q's in-kernel descriptor) is set for its launch only: an
    allocator the caller set with ``triton.set_allocator`` is still the one triton sees afterwards."""
    import contextvars

    from triton.runtime import _allocation

    def users(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    def run():
        triton.set_allocator(users)
        q = torch.randn(1, 1, 16, 64, generator=torch.Generator().manual_seed(0)).to(device, torch.float16)
        k = torch.randn(1, 1, 128, 64, generator=torch.Generator().manual_seed(1)).to(device, torch.float16)
        seen = []
        with force_arch(90), intercept(lambda call, go: (seen.append(call.kwargs.get("WARP_SPECIALIZE")), go(call))):
            fused_kernels.attention(q, k, k)
        assert seen == [attention_config("fwd", 64, 64, torch.float16, 90, specialize=True)["WARP_SPECIALIZE"]]
        assert _allocation._allocator.get() is users

    contextvars.copy_context().run(run)


# ----------------------------------------------------------------------------- variants


def _variant(name: str, gpu, b: int, h: int, l: int, s: int) -> tuple[dict, dict, bool]:
    """(kernel kwargs, reference kwargs, causal) of one variant case."""
    dev = gpu.device
    if name == "window":
        return dict(window=(100, 0)), {}, True
    if name == "softcap":
        return dict(softcap=5.0), {}, False
    if name == "alibi":
        return dict(alibi_slopes=torch.tensor([0.25, 0.0625], device=dev)), {}, True
    if name == "documents_prefix_stripes":
        ids = torch.tensor([[0] * 100 + [1] * 60 + [2] * (l - 160)] * b, device=dev)
        return dict(document_ids=ids, prefix_lengths=torch.tensor([40] * b, device=dev), mask_mod=ex.stripes), {}, \
            True
    if name == "documents_cross":    # separate query / key ids, interleaved, -1 among them (the kernels' padding)
        qi = ((torch.arange(l, device=dev) // 37) % 3 - 1).expand(b, l)
        ki = ((torch.arange(s, device=dev) // 53) % 3 - 1).expand(b, s)
        return dict(document_ids=(qi, ki)), {}, False
    if name == "score_mod":
        return dict(score_mod=ex.distance_penalty, score_mod_grad=ex.distance_penalty_grad), {}, False
    if name == "mod_args":
        table = torch.randn(h, 2 * ex.REL_R.value + 1, generator=torch.Generator().manual_seed(5)).to(dev)

        def relative_bias(score, b_, h_, q_idx, kv_idx, args):
            rel = (q_idx - kv_idx).clamp(-ex.REL_R.value, ex.REL_R.value) + ex.REL_R.value
            return score + args[0][h_, rel].to(score.dtype)

        kw = dict(score_mod=ex.relative_bias, score_mod_grad=ex.relative_bias_grad, mod_args=(table,))
        return kw, dict(score_mod=relative_bias, score_mod_grad=None), False
    if name == "all":
        ids = torch.tensor([[0] * 130 + [1] * (l - 130)] * b, device=dev)
        return dict(window=(150, 0), alibi_slopes=torch.tensor([0.125, 0.0625], device=dev), softcap=8.0,
                    document_ids=ids, score_mod=ex.distance_penalty, score_mod_grad=ex.distance_penalty_grad,
                    mask_mod=ex.stripes), {}, True
    raise ValueError(name)


@pytest.mark.parametrize("name", ["window", "softcap", "alibi", "documents_prefix_stripes", "documents_cross",
                                  "score_mod", "mod_args", "all"])
def test_variants(gpu, name):
    b, h, l, s, d = 1, 2, 260, 260, 64
    q, k, v = _qkv(gpu, b, h, 1, l, s, d)
    kw, ref_kw, causal = _variant(name, gpu, b, h, l, s)
    mod = ref_kw.get("score_mod", kw.get("score_mod"))
    if mod is not None:    # the mod's Python body on the reference's scores, kept in their dtype (it promotes)
        body = getattr(mod, "fn", mod)
        ref_kw = dict(ref_kw, score_mod=lambda score, *idx: body(score, *idx).to(score.dtype))
    check(gpu, lambda q, k, v: fused_kernels.attention(q, k, v, causal=causal, **kw),
          lambda q, k, v: ref.attention_ref(q, k, v, causal=causal, **{**kw, **ref_kw}), (q, k, v))


# ----------------------------------------------------------------------------- varlen, paged, decoding


def test_varlen(gpu):
    lq = lk = [130, 1, 260, 37]
    cu = torch.tensor([0, 130, 131, 391, 428], dtype=torch.int32, device=gpu.device)
    total, h, hkv, d = 428, 2, 1, 64
    q, k, v = _rand(gpu, total, h, d), _rand(gpu, total, hkv, d, seed=1), _rand(gpu, total, hkv, d, seed=2)
    check(gpu, lambda q, k, v: fused_kernels.varlen_attention(q, k, v, cu, cu, max(lq), max(lk), causal=True),
          lambda q, k, v: ref.varlen_attention_ref(q, k, v, cu, cu, max(lq), max(lk), causal=True), (q, k, v))


@pytest.mark.parametrize("lens, lq, page, splits", [([600, 17, 2500], 1, 64, 40), ([600, 17, 300], 1, 24, None),
                                                    ([200, 17, 260], 130, 256, None)],
                         ids=["decode-40-splits", "decode-page24", "prefill"])
def test_paged(gpu, lens, lq, page, splits):
    """Forward only (paged attention is for inference): decode over 40 key splits, a page size that is not a
    multiple of the key tile (per-row page lookups), and a prefill tiled over its query rows."""
    h, hkv, d = 4, 1, 64
    k_cache, v_cache, table, k, v = _filled(lens, page, hkv, d, gpu.dtype, seed=page)
    k_cache, v_cache, table = k_cache.to(gpu.device), v_cache.to(gpu.device), table.to(gpu.device)
    k, v = k.to(gpu.device), v.to(gpu.device)
    q = _rand(gpu, len(lens), h, lq, d, seed=9)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=gpu.device)

    def dense(q, k, v):   # each sequence's keys gathered densely, causal bottom-right
        return torch.cat([ref.attention_ref(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], causal=True)
                          for i, n in enumerate(lens)])

    check(gpu, lambda q, k, v: fused_kernels.paged_attention(q, k_cache, v_cache, table, seqlens, num_splits=splits),
          dense, (q, k, v), grads=False)
    if splits:   # axis 1 of the paged kernel: the key splits
        assert all(grid[1] == splits for grid in _grids(gpu, "_paged_attn_fwd_kernel"))


@pytest.mark.parametrize("splits", [33, 128])
def test_decode_many_splits(gpu, splits):
    """Flash-decoding (one query per head, the GQA group's rows in one tile) over ``splits`` key splits of one key
    tile each, forward only (its backward is the dense backward, tested above)."""
    b, h, hkv, d = 1, 4, 1, 64
    s = 64 * splits                           # the decode configurations' key tile is 64 at head dim 64
    q, k, v = _qkv(gpu, b, h, hkv, 1, s, d)
    seqlens = torch.tensor([s - 700], device=gpu.device)

    def kernel(q, k, v):
        return attention_fwd(q, k, v, None, seqlens, d ** -0.5, True, s - 1, 0.0, splits)[0]

    check(gpu, kernel, lambda q, k, v: ref.attention_ref(q, k, v, causal=True, seqlens_k=seqlens), (q, k, v),
          grads=False)
    assert _grids(gpu, "_attn_fwd_split_kernel") == [(splits, b * hkv)]


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("d", [64, 256])
def test_dropout(gpu, d):
    """16-bit dropout at the dropout tiles (d=256: dK/dV loops over 64-row query tiles on both archs): the kernel's
    mask (read back through v = identity, same seed) applied to the float64 reference gives the kernel's output and
    gradients within the 2x / 3x rule."""
    b, h, l, s, p = 1, 2, 140, 250, 0.2
    q, k, v = _qkv(gpu, b, h, 1, l, s, d)
    eye = torch.eye(s, dtype=gpu.dtype, device=gpu.device).expand(b, 1, s, s)
    torch.manual_seed(7)
    keep = fused_kernels.attention(q, k, eye, dropout_p=p, causal=True) != 0
    causal = ref.causal_mask(l, s, gpu.device, bottom_right=True)
    assert abs((1 - keep[..., causal].double().mean().item()) - p) < 0.05

    def kernel(q, k, v):
        torch.manual_seed(7)
        return fused_kernels.attention(q, k, v, dropout_p=p, causal=True)

    def reference(q, k, v):
        kk, vv = k.repeat_interleave(h, 1), v.repeat_interleave(h, 1)
        scores = (q @ kk.transpose(-1, -2)) * d ** -0.5
        scores = scores.masked_fill(~ref.causal_mask(l, s, q.device, bottom_right=True), float("-inf"))
        return (torch.softmax(scores, -1) * keep / (1 - p)) @ vv

    check(gpu, kernel, reference, (q, k, v))
    assert not _used(gpu, "_attn_fwd_kernel", "TMA")        # the dropout column streams through pointers

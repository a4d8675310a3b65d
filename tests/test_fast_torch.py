"""What the PyTorch path (each op's PyTorch path) promises beyond the results that the op tests check on it
(test_attention / test_softmax / test_layer_norm / test_mha / test_compile run every case on both paths):

- attention runs torch's flash kernel, never materializes an (L, S) matrix, and passes masks at their
  broadcast size (not expanded); bottom-right causal with L > S cuts the rows that see no key;
- softmax allocates no more full-size tensors than torch's own masked softmax;
- on a torch that gives NaN for fully masked rows (``_TORCH_ZEROES_DEAD_ROWS`` False) the rows are
  found from the mask and still give 0, zero gradients and lse -inf;
- torch.compile(fullgraph=True) of the dead-row fix matches eager.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_kernels
from fused_kernels import reference as ref
from fused_kernels.ops.attention import torch_path

pytestmark = pytest.mark.skipif(torch_path._FLASH is None, reason="this torch has no CPU flash-attention op")


@pytest.fixture(autouse=True)
def _torch_backend():
    with fused_kernels.use_backend("torch"):
        yield


def _rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _storages(values) -> set[int]:
    found = set()
    for a in values:
        if isinstance(a, torch.Tensor):
            found.add(a.untyped_storage().data_ptr())
        elif isinstance(a, (tuple, list)):
            found |= _storages(a)
    return found


class _Allocations(TorchDispatchMode):
    """Records (op name, shapes of the tensors it allocated) for every aten op run inside the block: an
    output counts when it shares no storage with the op's inputs (views and in-place results do not)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _storages(list(args) + list(kwargs.values()))
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        new = [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor) and o.numel()
               and o.untyped_storage().data_ptr() not in inputs]
        self.ops.append((str(func), new))
        return out

    def largest(self) -> int:
        return max((torch.Size(s).numel() for _, shapes in self.ops for s in shapes), default=0)

    def count(self, numel: int) -> int:
        return sum(torch.Size(s).numel() >= numel for _, shapes in self.ops for s in shapes)


class _FlashCalls(TorchDispatchMode):
    """Arguments of every call into torch's CPU flash kernel, whichever way it is reached (our direct
    call or ``F.scaled_dot_product_attention``): shapes of q, k and the mask, is_causal."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            mask = kwargs.get("attn_mask")
            causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
            self.calls.append(dict(q=tuple(args[0].shape), k=tuple(args[1].shape), is_causal=causal,
                                   mask=None if mask is None else tuple(mask.shape)))
        return func(*args, **kwargs)


@pytest.fixture
def flash_calls():
    with _FlashCalls() as mode:
        yield mode.calls


# ----------------------------------------------------------------------------- attention: what runs


@pytest.mark.parametrize("case", ["plain", "causal", "padding", "seqlens", "mask-LS", "gqa", "causal-L>S", "sdpa-3d"])
def test_attention_runs_flash_without_an_LS_matrix(case, flash_calls):
    b, h, l, s, d = 2, 4, 64, 64, 16
    q, k, v = (_rand(b, h, n, d, dtype=torch.float32, seed=i).requires_grad_() for i, n in enumerate((l, s, s)))
    kw: dict = {}
    if case == "causal":
        kw["causal"] = True
    elif case == "padding":
        kw["attn_mask"] = torch.arange(s) < torch.tensor([40, 64])[:, None, None, None]        # (B, 1, 1, S)
    elif case == "seqlens":
        kw["seqlens_k"] = torch.tensor([40, 64])
    elif case == "mask-LS":
        kw["attn_mask"] = _rand(l, s, dtype=torch.float32)
    elif case == "gqa":
        k, v = (t[:, :1].detach().requires_grad_() for t in (k, v))
    elif case == "causal-L>S":
        k, v = (t[:, :, :40].detach().requires_grad_() for t in (k, v))
        kw["causal"] = True
    with _Allocations() as allocs:
        if case == "sdpa-3d":
            out = fused_kernels.scaled_dot_product_attention(q[0], k[0], v[0], is_causal=True)     # (H, L, D)
        else:
            out = fused_kernels.attention(q, k, v, **kw)
        out.backward(torch.ones_like(out))
    assert allocs.largest() < b * h * l * s, allocs.ops             # no score matrix, forward or backward
    assert len(flash_calls) == 1, flash_calls
    call = flash_calls[0]
    if case == "causal":
        assert call["is_causal"] and call["mask"] is None
    elif case in ("padding", "seqlens"):
        assert call["mask"] == (b, 1, 1, s) and not call["is_causal"]
    elif case == "mask-LS":
        assert call["mask"] == (1, 1, l, s)
    elif case == "gqa":
        assert call["k"] == (b, 1, s, d)                               # key/value heads not repeated
    elif case == "causal-L>S":
        assert call["q"] == (b, h, 40, d) and call["is_causal"]       # the first L - S rows see no key
        assert torch.equal(out[:, :, :24], torch.zeros_like(out[:, :, :24]))
        assert torch.equal(q.grad[:, :, :24], torch.zeros_like(q.grad[:, :, :24]))
    elif case == "sdpa-3d":
        assert call["q"] == (1, h, l, d) and call["is_causal"]  # a 4-D view: flash, not the math path


def test_expanded_mask_is_passed_at_its_broadcast_size(flash_calls):
    """A mask the caller expanded (stride 0) reaches the kernel compacted back to size-1 dims."""
    q = _rand(2, 3, 8, 16, dtype=torch.float32)
    keep = torch.rand(2, 1, 1, 8, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[..., 0] = True
    out = fused_kernels.attention(q, q, q, attn_mask=keep.expand(2, 3, 8, 8))
    assert flash_calls[0]["mask"] == (2, 1, 1, 8)
    torch.testing.assert_close(out, fused_kernels.attention(q, q, q, attn_mask=keep))


def test_finite_garbage_past_seqlens_k_takes_no_part():
    q, k, v = (_rand(2, 2, 8, 16, seed=i) for i in range(3))
    lens = torch.tensor([5, 8])
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 5:], v2[0, :, 5:] = 1e30, -1e30
    torch.testing.assert_close(fused_kernels.attention(q, k2, v2, seqlens_k=lens),
                               fused_kernels.attention(q, k, v, seqlens_k=lens))


# ----------------------------------------------------------------------------- softmax: temporaries


@pytest.mark.parametrize("case", ["plain", "bool-mask", "float-mask", "scale-causal"])
def test_softmax_allocates_no_more_than_torch(case):
    """At most as many full-size tensors as torch's own ``softmax(x.masked_fill(~mask, -inf))``: one
    temporary for the masked scores (none without a mask or scale), the output, and in the backward
    the input gradient."""
    x = _rand(4, 2, 16, 32, dtype=torch.float32).requires_grad_()
    keep = torch.rand(4, 1, 1, 32, generator=torch.Generator().manual_seed(1)) > 0.2
    kw = {"bool-mask": dict(mask=keep), "float-mask": dict(mask=_rand(16, 32, dtype=torch.float32)),
          "scale-causal": dict(scale=0.3, is_causal=True), "plain": {}}[case]
    with _Allocations() as fwd:
        y = fused_kernels.softmax(x, **kw)
    with _Allocations() as bwd:
        y.backward(torch.ones_like(y))
    full = x.numel()
    assert fwd.count(full) == (1 if case == "plain" else 2), fwd.ops
    assert bwd.count(full) <= 2, bwd.ops                # the input gradient (+ the incoming ones_like)


# ----------------------------------------------------------------------------- a torch with NaN for dead rows


@pytest.fixture
def nan_torch(monkeypatch):
    """Pretend this torch gives NaN for fully masked rows: the path that finds them from the mask runs."""
    monkeypatch.setattr(torch_path, "_TORCH_ZEROES_DEAD_ROWS", False)


DEAD_CASES = ["bool", "float", "seqlens-0", "causal-L>S+mask", "causal+mask", "dropout"]


@pytest.mark.parametrize("case", DEAD_CASES)
@pytest.mark.parametrize("probe", [True, False], ids=["this-torch", "nan-torch"])
def test_fully_masked_rows(case, probe, monkeypatch):
    monkeypatch.setattr(torch_path, "_TORCH_ZEROES_DEAD_ROWS", probe and torch_path._TORCH_ZEROES_DEAD_ROWS)
    b, h, l, s, d = 2, 2, 12, 10, 8
    q, k, v = (_rand(b, h, n, d, seed=i) for i, n in enumerate((l, s, s)))
    keep = torch.rand(b, 1, l, s, generator=torch.Generator().manual_seed(2)) > 0.3
    keep[:, :, 4] = False                                  # dead rows
    kw: dict = {}
    if case == "bool":
        kw["attn_mask"] = keep
    elif case == "float":
        kw["attn_mask"] = torch.zeros(b, 1, l, s, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    elif case == "seqlens-0":
        kw["seqlens_k"] = torch.tensor([0, 7])
    elif case == "causal-L>S+mask":
        kw.update(causal=True, attn_mask=keep)
    elif case == "causal+mask":
        q = q[:, :, :s]
        kw.update(causal=True, attn_mask=keep[:, :, :s])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if case == "dropout":     # the math path (torch's function), its own masks; same seed on both sides
        torch.manual_seed(0)
        out = fused_kernels.scaled_dot_product_attention(*leaves, attn_mask=keep, dropout_p=0.3)
        lse = None
    else:
        out, lse = fused_kernels.attention(*leaves, return_lse=True, **kw)
    dout = _rand(*out.shape, seed=9)
    loss = (out * dout).sum() + (0 if lse is None else lse.masked_fill(lse.isinf(), 0).sum())
    got = [out, *torch.autograd.grad(loss, leaves)]
    r_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if case == "dropout":
        torch.manual_seed(0)
        want_out = ref.scaled_dot_product_attention_ref(*r_leaves, attn_mask=keep, dropout_p=0.3)
        want_lse = None
    else:
        want_out, want_lse = ref.attention_ref(*r_leaves, return_lse=True, **kw)
    loss = (want_out * dout).sum() + (0 if want_lse is None else want_lse.masked_fill(want_lse.isinf(), 0).sum())
    want = [want_out, *torch.autograd.grad(loss, r_leaves)]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert not g.isnan().any(), name
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=name)
    if lse is not None:
        assert torch.equal(lse.isinf(), want_lse.isinf()) and bool(lse.isinf().any())
    if case != "dropout":
        dead = ~ref.attention_ref(q, k, v, return_lse=True, **kw)[1].isfinite()
        assert torch.equal(out[dead], torch.zeros_like(out[dead]))


def test_nan_torch_path_for_sdpa_rows(nan_torch):
    q = _rand(1, 2, 6, 8).requires_grad_()
    keep = torch.ones(6, 6, dtype=torch.bool)
    keep[2] = False
    out = fused_kernels.scaled_dot_product_attention(q, q, q, attn_mask=keep)
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])) and not dq.isnan().any()


def test_probe_finds_this_torch_zeroes_dead_rows():
    """torch 2.13 (the CI pin) gives 0 there already: the fast path then adds nothing for dead rows."""
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 13):
        assert torch_path._TORCH_ZEROES_DEAD_ROWS


# ----------------------------------------------------------------------------- softmax dead rows, compiled


def test_softmax_dead_rows_compiled_match_eager():
    x = _rand(3, 4, 9, dtype=torch.float32)
    keep = torch.rand(3, 4, 9, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[1, 2] = False
    x[2, 1] = float("-inf")

    def fn(t):
        return fused_kernels.softmax(t, mask=keep, scale=0.7)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        leaf = x.clone().requires_grad_()
        y = f(leaf)
        (dx,) = torch.autograd.grad(y, [leaf], _rand(3, 4, 9, dtype=torch.float32, seed=5))
        results.append((y, dx))
    torch._dynamo.reset()
    for a, b in zip(*results):
        assert torch.equal(a, b)
    y, dx = results[0]
    for t in (y, dx):
        assert not t.isnan().any()
        assert torch.equal(t[1, 2], torch.zeros(9)) and torch.equal(t[2, 1], torch.zeros(9))


def test_no_warnings_from_the_pytorch_path():
    """Nothing of ours warns on a training step's calls (inputs that require grad, masks, lse)."""
    import warnings

    q = _rand(1, 2, 6, 8, dtype=torch.float32).requires_grad_()
    keep = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    x = _rand(3, 8, dtype=torch.float32).requires_grad_()
    w = torch.ones(8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = [fused_kernels.softmax(x), fused_kernels.softmax(x, scale=0.5),
                fused_kernels.attention(q, q, q, causal=True),
                fused_kernels.attention(q, q, q, attn_mask=keep, return_lse=True)[1],
                fused_kernels.scaled_dot_product_attention(q, q, q, attn_mask=keep),
                fused_kernels.layer_norm(x, (8,), w),
                fused_kernels.rms_norm(x, (8,), w), *fused_kernels.add_layer_norm(x, x, w, dropout_p=0.1)]
        torch.autograd.grad(sum(o.sum() for o in outs), [q, x, w])


@pytest.mark.parametrize("causal", [False, True])
def test_the_plain_call_skips_checks_but_not_their_outcome(causal):
    """``attention(q, k, v)`` on plain tensors takes a short path past the argument checks (their cost showed at
    L = 16): the same bits as the fully checked call (an explicit default scale), and any argument the short
    path does not cover still reaches the checks."""
    q, k, v = (torch.randn(1, 4, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = fused_kernels.attention(q, k, v, causal=causal, scale=64 ** -0.5)
    assert torch.equal(fused_kernels.attention(q, k, v, causal=causal), want)
    with pytest.raises(TypeError, match="causal must be a bool"):
        fused_kernels.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="dropout_p"):
        fused_kernels.attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="v has dtype torch.float64 but q has torch.float32"):
        fused_kernels.attention(q, k, v.double())


class _AtenOps(TorchDispatchMode):
    """Names of the aten ops run inside the block, in order."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **kwargs or {})


@pytest.mark.parametrize("api", ["attention", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_the_plain_call_runs_no_op_but_the_kernel_and_the_nan_check(api, causal):
    """At short sequences a call's own work shows next to torch's kernel (issue 30, item 12): the plain
    self-attention call, through ``attention`` and through the ``F.scaled_dot_product_attention`` drop-in, runs
    torch's flash kernel and the NaN-query check (one sum, read back) and nothing else: no view, expand, constant
    or copy per call. A NaN query still gives a NaN row (the check's outcome) on both."""
    q, k, v = (torch.randn(1, 4, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    call = (lambda q: fused_kernels.attention(q, k, v, causal=causal)) if api == "attention" else \
        (lambda q: fused_kernels.scaled_dot_product_attention(q, k, v, is_causal=causal))
    with _AtenOps() as mode:
        out = call(q)
    assert mode.names == ["sum", "_local_scalar_dense", "_scaled_dot_product_flash_attention_for_cpu"]
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
    q = q.clone()
    q[0, 2, 5, 7] = float("nan")
    out = call(q)
    assert out[0, 2, 5].isnan().all() and not out[0, 2, :5].isnan().any()


@pytest.mark.parametrize("wrt", ["q", "k", "v", "kv"])
def test_second_derivatives_with_respect_to_some_inputs(wrt):
    """A gradient penalty on some inputs only (``autograd.grad(out, (q,), create_graph=True)`` while k and v
    require grad too): torch's flash node leaves the other gradients None, and the double-backward hook must
    too (it raised "can't replace a None gradient with a non-None value"). Values against the float64
    reference, differentiated twice."""
    g = torch.Generator().manual_seed(3)
    q, k, v, w = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    pick = {"q": [0], "k": [1], "v": [2], "kv": [1, 2]}[wrt]
    grads = []
    for (a, b, c), fn in ((leaves, fused_kernels.attention), (ref_leaves, ref.attention_ref)):
        out = fn(a, b, c, causal=True)
        first = torch.autograd.grad((out * w.to(out.dtype)).sum(), [(a, b, c)[i] for i in pick], create_graph=True)
        penalty = sum((f ** 2).sum() for f in first)
        grads.append(torch.autograd.grad(penalty, (a, b, c), allow_unused=True))
    for name, got, want in zip("qkv", *grads):
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want.float(), atol=2e-4, rtol=2e-4, msg=name)

"""``fused_kernels.linear_cross_entropy`` and ``fused_kernels.cross_entropy`` against the float64 reference
(``fused_kernels.reference``) and against plain PyTorch (``F.cross_entropy(F.linear(...))``), on the Triton kernels
(the interpreter on a CPU) and on the PyTorch path: every reduction with its gradients (``reduction="none"`` with a
random upstream gradient), ignore_index everywhere, label smoothing + z-loss + soft-cap together, V not a
multiple of the block, several chunks, N = 1 and 0, strided inputs, bf16 / fp16 by the 2x rule, the GPU tiles
(``force_arch``), guard bytes, the errors torch raises, and the memory claim (never more than a chunk of logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import as_layout, assert_close, bounds_checked

import fused_kernels
from fused_kernels._core.launch import force_arch, intercept
from fused_kernels.ops import cross_entropy as ce
from fused_kernels.reference import cross_entropy_ref, linear_cross_entropy_ref

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("_lce_logits_kernel", "_ce_softmax_kernel", "_lce_dx_kernel", "_lce_dw_kernel", "_ce_stats_kernel")
OPTIONS = {
    "plain": {},
    "smooth": dict(label_smoothing=0.1),
    "zloss": dict(z_loss=1e-2),
    "softcap": dict(softcap=2.5),
    "all": dict(label_smoothing=0.2, z_loss=1e-2, softcap=2.5),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(n: int, h: int, v: int, dtype=torch.float32, seed: int = 0, ignore_every: int = 4, bias: bool = True):
    g = _gen(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * h ** -0.5 * 2
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[1::ignore_every] = -100
    return x.to(dtype), w.to(dtype), (None if b is None else b.to(dtype)), t


def plain_lce(x, w, t, b=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              softcap=None):
    """The unfused PyTorch form in the inputs' dtype: what the 2x rule measures PyTorch's own error with."""
    logits = F.linear(x, w, b)
    return plain_ce(logits, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                    z_loss=z_loss, softcap=softcap)


def plain_ce(logits, t, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        valid = t != ignore_index
        zl = (z_loss * torch.logsumexp(logits, -1) ** 2).masked_fill(~valid, 0.0)
        loss = loss + (zl if reduction == "none" else zl.sum() / valid.sum() if reduction == "mean" else zl.sum())
    return loss


def _run(fn, tensors, cotangent_seed=7):
    """fn(*tensors) and the gradients of every float tensor that requires grad, for a random upstream gradient."""
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=_gen(cotangent_seed), dtype=torch.float64).to(out.dtype)
    wanted = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wanted, g)
    return out.detach(), list(grads)


def _leaves(*tensors, dtype=None):
    return [None if t is None else (t.detach().to(dtype or t.dtype).clone().requires_grad_()
                                    if t.is_floating_point() else t) for t in tensors]


def check_lce(x, w, b, t, dtype, factor_outputs=True, **kw):
    """Our op in ``dtype`` against the float64 reference, with plain PyTorch's error in ``dtype`` as the yardstick
    (the 2x rule) in half precision, tolerances in float32 / float64."""
    ours = _run(lambda x_, w_, b_: fused_kernels.linear_cross_entropy(x_, w_, t, b_, **kw),
                _leaves(x, w, b, dtype=dtype))
    ref = _run(lambda x_, w_, b_: linear_cross_entropy_ref(x_, w_, t, b_, **kw), _leaves(x, w, b, dtype=torch.float64))
    plain = _run(lambda x_, w_, b_: plain_lce(x_, w_, t, b_, **kw), _leaves(x, w, b, dtype=dtype))
    tol = {} if dtype in (torch.float16, torch.bfloat16) else (
        dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5))
    torch_out = plain[0] if dtype in (torch.float16, torch.bfloat16) else None
    assert ours[0].dtype == dtype and ours[0].shape == ref[0].shape
    assert_close(ours[0], ref[0], torch_out, name="loss", **tol)
    for name, got, want, pt in zip(("dx", "dw", "db"), ours[1], ref[1], plain[1]):
        assert got.dtype == dtype
        assert_close(got, want, pt if torch_out is not None else None, grad=True, name=name, **tol)
    return ours


# ----------------------------------------------------------------------------- linear_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_linear_matches_reference(op_backend, dtype, reduction, options):
    # 37 rows: chunks of 16, 16 and 5; V = 97 is no multiple of any tile; H = 40 of no BLOCK_K; a row in 4 ignored
    x, w, b, t = _inputs(37, 40, 97, seed=hash((reduction, options)) % 1000)
    check_lce(x, w, b if options in ("plain", "all") else None, t, dtype, reduction=reduction, **OPTIONS[options])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_linear_low_precision_2x_rule(op_backend, dtype, reduction, options):
    x, w, b, t = _inputs(33, 64, 150, seed=3)
    check_lce(x, w, b, t, dtype, reduction=reduction, **OPTIONS[options])


def test_linear_equals_torch_drop_in(op_backend):
    """fp32, no z-loss / cap: the value torch's F.cross_entropy(F.linear(...)) gives, gradients included."""
    x, w, b, t = _inputs(29, 24, 61, seed=5)
    for reduction in ("mean", "sum", "none"):
        for ls in (0.0, 0.3):
            kw = dict(ignore_index=-100, reduction=reduction, label_smoothing=ls)
            ours = _run(lambda x_, w_, b_, kw=kw: fused_kernels.linear_cross_entropy(x_, w_, t, b_, **kw),
                        _leaves(x, w, b))
            theirs = _run(lambda x_, w_, b_, kw=kw: F.cross_entropy(F.linear(x_, w_, b_), t, **kw), _leaves(x, w, b))
            for got, want in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
                torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("n", [1, 2, 16, 17])
def test_linear_row_counts(op_backend, n):
    x, w, b, t = _inputs(n, 16, 33, seed=n, ignore_every=0)
    for reduction in ("mean", "none"):
        check_lce(x, w, b, t, torch.float64, reduction=reduction, **OPTIONS["all"])


def test_linear_single_class_and_odd_sizes(op_backend):
    x, w, b, t = _inputs(5, 7, 1, seed=2, ignore_every=0)
    check_lce(x, w, b, t, torch.float64, reduction="sum")
    x, w, b, t = _inputs(9, 3, 130, seed=4)                  # H smaller than BLOCK_K
    check_lce(x, w, b, t, torch.float64, reduction="none", label_smoothing=0.5)


def test_linear_no_rows(op_backend):
    x, w, b, _ = _inputs(1, 8, 11)
    x, t = x[:0].requires_grad_(), torch.empty(0, dtype=torch.long)
    w.requires_grad_()
    assert torch.isnan(fused_kernels.linear_cross_entropy(x, w, t))            # torch: mean of nothing
    loss = fused_kernels.linear_cross_entropy(x, w, t, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and torch.equal(w.grad, torch.zeros_like(w))
    assert fused_kernels.linear_cross_entropy(x, w, t, reduction="none").shape == (0,)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_all_ignored_gives_what_torch_gives(op_backend, reduction):
    x, w, b, t = _inputs(6, 8, 13)
    t = torch.full_like(t, 3)
    ours = _run(lambda x_, w_, b_: fused_kernels.linear_cross_entropy(x_, w_, t, b_, ignore_index=3,
                                                                      reduction=reduction, label_smoothing=0.1),
                _leaves(x, w, b))
    theirs = _run(lambda x_, w_, b_: F.cross_entropy(F.linear(x_, w_, b_), t, ignore_index=3, reduction=reduction,
                                                     label_smoothing=0.1), _leaves(x, w, b))
    torch.testing.assert_close(ours[0], theirs[0], equal_nan=True)
    for got in ours[1]:
        assert torch.equal(got, torch.zeros_like(got))


def test_linear_batched_and_unbatched_shapes(op_backend):
    x, w, b, t = _inputs(12, 8, 21, seed=9)
    x3, t3 = x.view(3, 4, 8), t.view(3, 4)
    none = fused_kernels.linear_cross_entropy(x3, w, t3, b, reduction="none")
    assert none.shape == (3, 4)
    torch.testing.assert_close(none, linear_cross_entropy_ref(x3, w, t3, b, reduction="none"))
    one = fused_kernels.linear_cross_entropy(x[0], w, t[0], b, reduction="none")
    assert one.shape == ()
    torch.testing.assert_close(one, none[0, 0])


@pytest.mark.parametrize("layout", ["transposed", "padded", "strided"])
def test_linear_strides(op_backend, layout):
    x, w, b, t = _inputs(19, 24, 45, seed=11)
    xs, ws = as_layout(x, layout), as_layout(w, layout)
    check_lce(xs, ws, b, t[::1], torch.float32, reduction="none", **OPTIONS["all"])
    t2 = torch.stack([t, t], 1)[:, 0]                           # a strided target
    check_lce(xs, ws, None, t2, torch.float32, reduction="mean")


def test_linear_tied_embedding(op_backend):
    """The weight is an embedding matrix used at the input too: both gradients add up in its .grad."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(31, 16, dtype=torch.float64)
    ids = torch.randint(0, 31, (2, 9))
    grads = []
    for loss_fn in (fused_kernels.linear_cross_entropy, linear_cross_entropy_ref):
        emb.zero_grad()
        h = torch.tanh(emb(ids[:, :-1]))                       # (2, 8, 16)
        loss_fn(h, emb.weight, ids[:, 1:], z_loss=1e-3).backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-12)


def test_linear_frozen_weight_and_input(op_backend):
    x, w, b, t = _inputs(10, 8, 17, dtype=torch.float64)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(fused_kernels.linear_cross_entropy(x, w, t, b, reduction="sum"), [x])
    x2 = x.detach().clone().requires_grad_()
    (rx,) = torch.autograd.grad(linear_cross_entropy_ref(x2, w, t, b, reduction="sum"), [x2])
    torch.testing.assert_close(gx, rx)
    w.requires_grad_()
    (gw,) = torch.autograd.grad(fused_kernels.linear_cross_entropy(x.detach(), w, t, reduction="none").sum(), [w])
    w2 = w.detach().clone().requires_grad_()
    (rw,) = torch.autograd.grad(linear_cross_entropy_ref(x.detach(), w2, t, reduction="none").sum(), [w2])
    torch.testing.assert_close(gw, rw)


def test_linear_no_grad_and_double_backward(op_backend):
    x, w, b, t = _inputs(6, 5, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused_kernels.linear_cross_entropy(x, w, t, b, softcap=3.0),
                                   linear_cross_entropy_ref(x, w, t, b, softcap=3.0))
    leaves = _leaves(x, w, b)
    assert torch.autograd.gradgradcheck(
        lambda x_, w_, b_: fused_kernels.linear_cross_entropy(x_, w_, t, b_, reduction="none", label_smoothing=0.1,
                                                              softcap=3.0), leaves, fast_mode=True)


@pytest.mark.triton_only
@pytest.mark.parametrize("arch, dtype, dx_depth, dw_depth", [
    (90, torch.bfloat16, 128, 128), (80, torch.float16, 128, 128), (90, torch.float32, 32, 32),
    (120, torch.bfloat16, 64, 128), ("gfx1100", torch.float16, 128, 64), ("gfx1100", torch.float64, 32, 16)])
def test_linear_gpu_tiles(device, triton_backend, arch, dtype, dx_depth, dw_depth):
    """The GPU configuration (128 x 128 tiles on Hopper) in the interpreter: masked edges at the real tiles, with
    the backward matmuls' own reduction depths where a family shortens them (dX on sm_120, dW on gfx1100)."""
    x, w, b, t = _inputs(133, 72, 261, seed=13)
    depths = set()

    def record(call, run):
        if call.name == "_lce_dx_kernel":
            depths.add(("dx", call.kwargs["BLOCK_N"]))
        if call.name == "_lce_dw_kernel":
            depths.add(("dw", call.kwargs["BLOCK_M"]))
        run(call)

    with force_arch(arch), intercept(record):
        check_lce(x, w, b, t, dtype, reduction="none", **OPTIONS["all"])
    assert depths == {("dx", dx_depth), ("dw", dw_depth)}


@pytest.mark.triton_only
def test_linear_bounds(device, triton_backend):
    x, w, b, t = _inputs(21, 24, 70, seed=17)
    with bounds_checked(*KERNELS) as launches:
        check_lce(x, w, b, t, torch.float32, reduction="none", **OPTIONS["all"])     # forward + recompute
        check_lce(x, w, b, t, torch.float32, reduction="mean", label_smoothing=0.1)
    # two chunks of rows (16 + 5): "none" runs them in the forward (loss only) and again in the backward
    assert launches["_lce_logits_kernel"] == 2 + 2 + 2 and launches["_lce_dw_kernel"] == 2 + 2


@pytest.mark.triton_only
def test_linear_holds_one_chunk_of_logits(device, triton_backend, monkeypatch):
    """Every logits buffer a kernel sees has at most ``chunk_rows`` rows, never N."""
    monkeypatch.setattr(ce, "CHUNK_BYTES", 40 * 53 * 4)          # 40 rows of 53 logits per chunk
    x, w, b, t = _inputs(300, 8, 53, seed=1, ignore_every=0)
    rows = []

    def spy(call, run):
        if call.name == "_ce_softmax_kernel":
            rows.append(call.args[0].shape[0])
        run(call)

    with intercept(spy):
        check_lce(x, w, b, t, torch.float32, reduction="sum")
    assert rows and max(rows) == 38 == ce.chunk_rows(300, 53) and len(rows) == 8


def test_memory_of_the_pytorch_path():
    """Peak extra memory (a fresh process's resident high-water mark above its size before the call) of forward +
    backward at N = 2048, V = 16384, H = 64 in fp32: ours at most a quarter of the unfused
    ``F.cross_entropy(F.linear(...))``'s. The mark is reset right before the call (``/proc/self/clear_refs``), as
    the CPU bench does: a plain ``ru_maxrss`` keeps the peak of importing torch and transformers, which can hide
    the call's."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the resident high-water mark")
    peaks = {}
    for impl in ("fused", "unfused"):
        code = textwrap.dedent(f"""
            import json, torch, torch.nn.functional as F
            import fused_kernels

            def status_kb(key):
                with open("/proc/self/status") as f:
                    return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

            def run(n, v):
                x = torch.randn(n, 64, requires_grad=True)
                w = torch.randn(v, 64, requires_grad=True)
                t = torch.randint(0, v, (n,))
                w.grad = torch.zeros_like(w); x.grad = torch.zeros_like(x)        # the gradients' own memory
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                before = status_kb("VmRSS")
                with fused_kernels.use_backend("torch"):
                    if {impl!r} == "fused":
                        loss = fused_kernels.linear_cross_entropy(x, w, t)
                    else:
                        loss = F.cross_entropy(F.linear(x, w), t)
                    loss.backward()
                return status_kb("VmHWM") - before

            torch.manual_seed(0)
            torch.set_num_threads(1)
            run(64, 300)                     # pages in the code the call runs, so that only its tensors count
            print(json.dumps(run(2048, 16384)))
        """)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[impl] = json.loads(proc.stdout.strip().splitlines()[-1]) * 1024
    logits = 2048 * 16384 * 4
    assert peaks["unfused"] >= 2 * logits, peaks            # the probe sees the unfused form's logits
    assert peaks["fused"] <= 0.25 * peaks["unfused"], peaks


# ----------------------------------------------------------------------------- cross_entropy


def check_ce(z, t, dtype, **kw):
    ours = _run(lambda z_: fused_kernels.cross_entropy(z_, t, **kw), _leaves(z, dtype=dtype))
    ref = _run(lambda z_: cross_entropy_ref(z_, t, **kw), _leaves(z, dtype=torch.float64))
    plain = _run(lambda z_: plain_ce(z_, t, **kw), _leaves(z, dtype=dtype))
    low = dtype in (torch.float16, torch.bfloat16)
    tol = {} if low else (dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5))
    assert_close(ours[0], ref[0], plain[0] if low else None, name="loss", **tol)
    assert_close(ours[1][0], ref[1][0], plain[1][0] if low else None, grad=True, name="dlogits", **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_cross_entropy_matches_reference(op_backend, dtype, reduction, options):
    z = torch.randn(23, 301, generator=_gen(2), dtype=torch.float64) * 3
    t = torch.randint(0, 301, (23,), generator=_gen(3))
    t[::3] = -100
    check_ce(z, t, dtype, reduction=reduction, **OPTIONS[options])


def test_cross_entropy_is_torch_drop_in(op_backend):
    z = torch.randn(17, 40, generator=_gen(4))
    t = torch.randint(0, 40, (17,), generator=_gen(5))
    t[2] = 7
    for args, kw in [((), {}), ((None, None, 7), {}), ((), dict(reduction="none", label_smoothing=0.2)),
                     ((None, False), {}), ((), dict(reduction="sum"))]:
        ours = _run(lambda z_, a=args, k=kw: fused_kernels.cross_entropy(z_, t, *a, **k), _leaves(z))
        theirs = _run(lambda z_, a=args, k=kw: F.cross_entropy(z_, t, *a, **k), _leaves(z))
        torch.testing.assert_close(ours[0], theirs[0])
        torch.testing.assert_close(ours[1][0], theirs[1][0])
    one = fused_kernels.cross_entropy(z[0], t[0])           # unbatched (C,) logits
    torch.testing.assert_close(one, F.cross_entropy(z[0], t[0]))
    w = torch.rand(40, generator=_gen(6))                    # class weights: torch's own op
    torch.testing.assert_close(fused_kernels.cross_entropy(z, t, w), F.cross_entropy(z, t, w))
    probs = torch.softmax(torch.randn(17, 40, generator=_gen(7)), -1)
    torch.testing.assert_close(fused_kernels.cross_entropy(z, probs), F.cross_entropy(z, probs))


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_cross_entropy_strides(op_backend, layout):
    z = torch.randn(13, 70, generator=_gen(8), dtype=torch.float64)
    t = torch.randint(0, 70, (13,), generator=_gen(9))
    check_ce(as_layout(z, layout), t, torch.float32, reduction="none", **OPTIONS["all"])


def test_cross_entropy_inplace_backward(op_backend):
    """The gradient is written over the logits: same gradient, the logits' memory reused, and autograd refuses a
    backward that needs the overwritten logits."""
    z0 = torch.randn(9, 33, generator=_gen(10), dtype=torch.float64)
    t = torch.randint(0, 33, (9,), generator=_gen(11))
    for reduction in ("mean", "none"):
        leaf = z0.clone().requires_grad_()
        logits = leaf * 1.0                                          # an intermediate, as a model's logits are
        loss = fused_kernels.cross_entropy(logits, t, reduction=reduction, inplace_backward=True, z_loss=0.01)
        g = torch.ones_like(loss) * 0.5
        loss.backward(g)
        ref_leaf = z0.clone().requires_grad_()
        ref = cross_entropy_ref(ref_leaf, t, reduction=reduction, z_loss=0.01)
        ref.backward(g)
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(leaf.grad, ref_leaf.grad)
        torch.testing.assert_close(logits.detach(), ref_leaf.grad)    # the logits now hold their gradient
    leaf = z0.clone().requires_grad_()
    logits = leaf * 1.0
    other = logits.exp()                                             # exp saves its output... and sin its input
    side = logits.sin()
    loss = fused_kernels.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + side.sum() + other.sum()).backward()


@pytest.mark.triton_only
def test_cross_entropy_bounds_and_gpu_tiles(device, triton_backend):
    z = torch.randn(11, 2100, generator=_gen(12), dtype=torch.float64)
    t = torch.randint(0, 2100, (11,), generator=_gen(13))
    t[4] = -100
    with bounds_checked(*KERNELS) as launches:
        check_ce(z, t, torch.float32, reduction="none", **OPTIONS["all"])
    assert launches["_ce_stats_kernel"] == 1 and launches["_ce_softmax_kernel"] == 1
    with force_arch(90):
        check_ce(z, t, torch.bfloat16, reduction="mean", **OPTIONS["all"])


# ----------------------------------------------------------------------------- errors


def test_errors(op_backend):
    x, w, b, t = _inputs(4, 8, 10)
    lce = fused_kernels.linear_cross_entropy
    with pytest.raises(IndexError, match="out of bounds"):
        lce(x, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(RuntimeError, match="Long"):
        lce(x, w, t.int())
    with pytest.raises(RuntimeError, match="label_smoothing"):
        lce(x, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        lce(x, w, t, reduction="avg")
    with pytest.raises(RuntimeError, match="dtype"):
        lce(x, w.double(), t)
    with pytest.raises(RuntimeError, match="in_features"):
        lce(x, w[:, :7], t)
    with pytest.raises(RuntimeError, match="shape"):
        lce(x, w, t[:3])
    with pytest.raises(RuntimeError, match="bias"):
        lce(x, w, t, b[:9])
    with pytest.raises(RuntimeError, match="softcap"):
        lce(x, w, t, softcap=0.0)
    with pytest.raises(RuntimeError, match="z_loss"):
        lce(x, w, t, z_loss=-1.0)
    with pytest.raises(NotImplementedError):
        lce(x.long(), w, t)
    with pytest.raises(TypeError):
        lce(x, w, [0, 1, 2, 3])
    z = torch.randn(4, 10)
    with pytest.raises(IndexError):
        fused_kernels.cross_entropy(z, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="batch_size"):
        fused_kernels.cross_entropy(z, t[:3])
    with pytest.raises(RuntimeError, match="z_loss and softcap"):
        fused_kernels.cross_entropy(z, t, torch.ones(10), z_loss=0.1)
    # torch raises the same types for the same inputs
    with pytest.raises(IndexError):
        F.cross_entropy(z, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(RuntimeError):
        F.cross_entropy(z, t.int())


def test_loss_modules(op_backend):
    z = torch.randn(9, 12, generator=_gen(20))
    t = torch.randint(0, 12, (9,), generator=_gen(21))
    theirs = torch.nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.1, reduction="sum")
    ours = fused_kernels.nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.1, reduction="sum")
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    torch.testing.assert_close(ours(z, t), theirs(z, t))
    x, w, b, t = _inputs(7, 8, 12, seed=22)
    module = fused_kernels.nn.LinearCrossEntropyLoss(reduction="none", z_loss=1e-3, softcap=4.0)
    torch.testing.assert_close(module(x, w, t, b), linear_cross_entropy_ref(x, w, t, b, reduction="none",
                                                                           z_loss=1e-3, softcap=4.0))


def test_linear_backward_twice_with_retained_graph(op_backend):
    """The forward's gradients handed to autograd without a copy (upstream gradient 1): a retained graph's second
    backward still adds the same gradients (autograd copies them while the graph holds them)."""
    x, w, b, t = _inputs(12, 8, 19, dtype=torch.float64, seed=23)
    leaves = _leaves(x, w, b)
    loss = fused_kernels.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], z_loss=1e-3)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in leaves]
    loss.backward(retain_graph=True)
    (loss * 3).backward()
    for p, g in zip(leaves, first):
        torch.testing.assert_close(p.grad, 5 * g)
    ref = _leaves(x, w, b)
    linear_cross_entropy_ref(ref[0], ref[1], t, ref[2], z_loss=1e-3).backward()
    for got, want in zip(first, ref):
        torch.testing.assert_close(got, want.grad)

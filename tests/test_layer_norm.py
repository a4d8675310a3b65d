"""layer_norm, rms_norm and add_layer_norm through the Triton kernels (the interpreter on a CPU).

Every case runs the op's forward and backward on guarded copies (``helpers.bounds_checked``: no
out-of-bounds write, out-of-bounds reads turn into NaN) and judges the output and every gradient
against a float64 PyTorch reference with the 2x rule (``helpers.assert_close``). Inputs are drawn in
float64, rounded to the tested dtype, and the reference runs on exactly those rounded values.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, as_layout, assert_close, assert_fresh_contiguous, bounds_checked, grads, leaf

import fused_kernels
from fused_kernels.ops.norms import MAX_FUSED_BWD, MAX_FUSED_FWD, fused_limit

pytestmark = pytest.mark.usefixtures("op_backend")   # each test on the kernels and on the PyTorch path

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OPS = ["layer_norm", "rms_norm", "add_layer_norm"]
KERNELS = ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel")
EPS = 1e-5


def _kernel_op(op: str, t: dict, shape: tuple[int, ...], eps: float = EPS, dropout_p: float = 0.0):
    if op == "layer_norm":
        return (fused_kernels.layer_norm(t["x"], shape, t.get("weight"), t.get("bias"), eps),)
    if op == "rms_norm":
        return (fused_kernels.rms_norm(t["x"], shape, t.get("weight"), eps),)
    return fused_kernels.add_layer_norm(t["x"], t.get("residual"), t.get("weight"), t.get("bias"), eps, dropout_p)


def _torch_op(op: str, t: dict, shape: tuple[int, ...], eps: float = EPS):
    """Plain PyTorch, in whatever dtype its inputs have (float64 for the reference)."""
    if op == "layer_norm":
        return (F.layer_norm(t["x"], shape, t.get("weight"), t.get("bias"), eps),)
    if op == "rms_norm":
        return (F.rms_norm(t["x"], shape, t.get("weight"), eps),)
    residual_out = t["x"] if t.get("residual") is None else t["residual"] + t["x"]
    return F.layer_norm(residual_out, shape, t.get("weight"), t.get("bias"), eps), residual_out


def _values(op: str, shape, normalized: int, *, residual: bool, weight: bool, bias: bool, seed: int = 0,
            x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """float64 CPU inputs of an op: x (..., *norm_shape), residual, weight, bias (norm_shape)."""
    gen = torch.Generator().manual_seed(seed)
    norm_shape = tuple(shape[len(shape) - normalized:])
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    values = {"x": rand(*shape) if x is None else x.double()}
    if residual and op == "add_layer_norm":
        values["residual"] = rand(*shape)
    if weight:
        values["weight"] = 1 + 0.5 * rand(*norm_shape)
    if bias and op != "rms_norm":
        values["bias"] = rand(*norm_shape)
    return values


def check_op(op: str, dtype: torch.dtype, device: str, shape, *, normalized: int = 1, residual: bool = True,
             weight: bool = True, bias: bool = True, layout: str = "contiguous", grad_layout: str = "contiguous",
             grad_outputs: tuple[int, ...] = (0, 1), x: torch.Tensor | None = None, eps: float = EPS,
             seed: int = 0) -> list[torch.Tensor]:
    """Run ``op`` through the kernels and check output(s) and every gradient; returns the kernel outputs.

    ``layout`` lays out x and residual in memory (``helpers.LAYOUTS``), ``grad_layout`` the incoming
    gradients; ``grad_outputs`` picks which outputs of add_layer_norm receive a gradient."""
    if op == "add_layer_norm":
        normalized = 1
    values = _values(op, shape, normalized, residual=residual, weight=weight, bias=bias, seed=seed, x=x)
    norm_shape = tuple(shape[len(shape) - normalized:])
    rounded = {k: v.to(dtype) for k, v in values.items()}
    names = list(rounded)
    k_in = {k: leaf(v.to(device), layout=layout if k in ("x", "residual") else "contiguous")
            for k, v in rounded.items()}
    t_in = {k: leaf(v.to(device)) for k, v in rounded.items()}
    r_in = {k: leaf(v.double()) for k, v in rounded.items()}

    with bounds_checked(*KERNELS) as launches:
        k_out = _kernel_op(op, k_in, norm_shape, eps)
        t_out = _torch_op(op, t_in, norm_shape, eps)
        r_out = _torch_op(op, r_in, norm_shape, eps)
        for i, (ko, ro, to) in enumerate(zip(k_out, r_out, t_out)):
            assert ko.dtype == dtype and ko.device.type == torch.device(device).type
            assert_close(ko, ro, to, name=f"{op} output {i}")
        assert_fresh_contiguous(k_out[0], *k_in.values(), name=f"{op} output")

        picked = [i for i in grad_outputs if i < len(k_out)]
        gen = torch.Generator().manual_seed(seed + 1)
        cot = [torch.randn(r_out[i].shape, generator=gen, dtype=torch.float64).to(dtype) for i in picked]
        k_grads = grads([k_out[i] for i in picked], [k_in[k] for k in names],
                        [as_layout(c.to(device), grad_layout) for c in cot])
        t_grads = grads([t_out[i] for i in picked], [t_in[k] for k in names], [c.to(device) for c in cot])
        r_grads = grads([r_out[i] for i in picked], [r_in[k] for k in names], [c.double() for c in cot])
    for name, kg, rg, tg in zip(names, k_grads, r_grads, t_grads):
        if rg is None:  # no path from the picked outputs (weight/bias when only residual_out has a gradient)
            assert kg is None or not kg.any(), f"{op}: d{name} should be absent or zero"
            continue
        assert kg is not None, f"{op}: no gradient for {name}"
        assert kg.dtype == rounded[name].dtype
        assert_close(kg, rg, tg, grad=True, name=f"{op} d{name}")
    if fused_kernels.get_backend() == "torch":
        assert not launches, launches                 # the PyTorch path never touches a kernel
    elif values["x"].numel():
        assert launches.get(KERNELS[0], 0) >= 1 and launches.get(KERNELS[1], 0) >= 1, launches
    return list(k_out)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 128, 1023])
@pytest.mark.parametrize("op", OPS)
def test_forward_backward(op, n, dtype, device):
    check_op(op, dtype, device, (5, n))


@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_without_weight_or_bias(op, dtype, affine, device):
    check_op(op, dtype, device, (4, 33), weight=affine == "weight", bias=affine == "bias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_add_layer_norm_without_residual(dtype, device):
    out, residual_out = check_op("add_layer_norm", dtype, device, (4, 65), residual=False)
    assert out.shape == residual_out.shape == (4, 65)


@pytest.mark.parametrize("grad_outputs", [(0,), (1,), (0, 1)], ids=["out", "residual_out", "both"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_add_layer_norm_gradient_into_either_output(grad_outputs, dtype, device):
    check_op("add_layer_norm", dtype, device, (6, 40), grad_outputs=grad_outputs)


# Row lengths around the single-block limits: the forward and backward switch to their multi-pass
# paths at different lengths, and float64 rows switch at half of them.
LONG_ROWS = [
    *[pytest.param(op, dtype, n, id=f"{op}-{name}") for op in OPS for dtype, n, name in [
        (torch.float32, MAX_FUSED_BWD + 1, "fp32-bwd-multipass"),
        (torch.float32, MAX_FUSED_FWD + 1, "fp32-fwd-multipass"),
        (torch.float16, 70_000, "fp16-70000"),
        (torch.float64, fused_limit(torch.float64, backward=True) + 1, "fp64-bwd-multipass"),
        (torch.bfloat16, 70_000, "bf16-70000"),
    ]],
    pytest.param("layer_norm", torch.float32, 70_000, id="layer_norm-fp32-70000"),
    pytest.param("layer_norm", torch.float64, fused_limit(torch.float64, backward=False) + 1,
                 id="layer_norm-fp64-fwd-multipass"),
]


@pytest.mark.parametrize(("op", "dtype", "n"), LONG_ROWS)
def test_long_rows(op, dtype, n, device):
    check_op(op, dtype, device, (2, n))


@pytest.mark.parametrize(("dtype", "n"), [(torch.float16, 1023), (torch.float32, 1023), (torch.float32, 70_000)],
                         ids=str)
def test_statistics_with_large_mean(dtype, n, device):
    """|mean| >> std: one-pass E[x^2] - E[x]^2 (or statistics in half precision) would fail this."""
    gen = torch.Generator().manual_seed(3)
    x = 300 + torch.randn(2, n, generator=gen, dtype=torch.float64)
    check_op("layer_norm", dtype, device, (2, n), x=x)
    if n < 70_000:
        check_op("add_layer_norm", dtype, device, (2, n), x=x)


@pytest.mark.parametrize("shape", [(2, 3, 40), (2, 2, 3, 24), (1, 1, 1, 5)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_leading_shapes(op, shape, device):
    check_op(op, torch.float32, device, shape)


@pytest.mark.parametrize(("shape", "normalized"), [((3, 4, 8), 2), ((2, 3, 4, 5), 3), ((4, 6), 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_multi_dim_normalized_shape(op, dtype, shape, normalized, device):
    check_op(op, dtype, device, shape, normalized=normalized)


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "contiguous"])
@pytest.mark.parametrize("op", OPS)
def test_strided_inputs(op, layout, device):
    """Transposed / permuted / NaN-padded / last-dim-strided inputs (NaN padding catches over-reads)."""
    check_op(op, torch.float32, device, (3, 6, 37), layout=layout)
    check_op(op, torch.float16, device, (10, 37), layout=layout)  # 2-D: the kernel reads the strides


@pytest.mark.parametrize("grad_layout", ["transposed", "permuted", "padded", "strided"])
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_incoming_gradients(op, grad_layout, device):
    check_op(op, torch.float32, device, (3, 4, 19), grad_layout=grad_layout)


@pytest.mark.parametrize("op", OPS)
def test_strided_inputs_multipass(op, device):
    check_op(op, torch.float32, device, (2, MAX_FUSED_FWD + 3), layout="padded", grad_layout="padded")


@pytest.mark.parametrize("kind", ["rows", "columns"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_broadcast_input(op, kind, device):
    """Stride-0 inputs (``expand``): every row the same, or every element of a row the same."""
    gen = torch.Generator().manual_seed(4)
    # Constant rows: values with few mantissa bits, so that their float32 mean is exact (otherwise
    # rstd = 1/sqrt(eps) amplifies its rounding, an ill-conditioned case of no interest here).
    base = torch.randn(1, 24, generator=gen) if kind == "rows" else torch.tensor([[0.75], [-1.5], [2.0], [0.5], [3.0]])
    x = base.to(device).expand(5, 24).requires_grad_()
    x_ref = base.double().expand(5, 24).requires_grad_()
    w = torch.rand(24, generator=gen) + 0.5
    b = torch.randn(24, generator=gen)
    k_in = {"x": x, "weight": w.to(device).requires_grad_(), "bias": b.to(device).requires_grad_()}
    t_in = {"x": base.to(device).expand(5, 24).requires_grad_(), "weight": leaf(w.to(device)),
            "bias": leaf(b.to(device))}
    r_in = {"x": x_ref, "weight": w.double().requires_grad_(), "bias": b.double().requires_grad_()}
    if op == "rms_norm":
        del k_in["bias"], t_in["bias"], r_in["bias"]
    (out,) = _kernel_op(op, k_in, (24,))
    (ref,) = _torch_op(op, r_in, (24,))
    (t_out,) = _torch_op(op, t_in, (24,))
    assert_close(out, ref, t_out, name=f"{op} of an expanded input")
    dy = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    for name, got, want, t_got in zip(k_in, grads(out, list(k_in.values()), dy.float().to(device)),
                                      grads(ref, list(r_in.values()), dy),
                                      grads(t_out, list(t_in.values()), dy.float().to(device))):
        assert_close(got, want, t_got, grad=True, name=f"d{name}")


def test_broadcast_weight_and_bias(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 16, generator=gen)
    w, b = torch.tensor(1.5).expand(16), torch.tensor(-0.5).expand(16)  # stride 0
    out = fused_kernels.layer_norm(x.to(device), (16,), w.to(device), b.to(device))
    assert_close(out, F.layer_norm(x.double(), (16,), w.double(), b.double()))


@pytest.mark.parametrize("op", OPS)
def test_output_is_fresh_and_contiguous_for_permuted_input(op, device):
    """The output is allocated contiguous and written with its own strides, not the input's."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 7, 16, generator=gen).to(device).permute(1, 0, 2)  # (7, 5, 16), non-contiguous rows
    t_in = {"x": x, "residual": torch.randn(7, 5, 16, generator=gen).to(device).transpose(0, 1).contiguous()
            .transpose(0, 1)}
    outs = _kernel_op(op, t_in, (16,))
    refs = _torch_op(op, {k: v.double() for k, v in t_in.items()}, (16,))
    for out, ref in zip(outs, refs):
        assert out.shape == (7, 5, 16)
        assert_fresh_contiguous(out, *t_in.values())
        assert_close(out, ref)


@pytest.mark.parametrize("mixed", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_float32_weights_with_half_input(op, mixed, device):
    """Mixed precision: float32 weight/bias with a half-precision input; grads keep each one's dtype."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 48, generator=gen, dtype=torch.float64).to(mixed)
    r = torch.randn(4, 48, generator=gen, dtype=torch.float64).to(mixed)
    w = (1 + 0.5 * torch.randn(48, generator=gen)).requires_grad_()
    b = torch.randn(48, generator=gen).requires_grad_()
    k_in = {"x": leaf(x.to(device)), "residual": leaf(r.to(device)), "weight": leaf(w.to(device)),
            "bias": leaf(b.to(device))}
    if op != "add_layer_norm":
        del k_in["residual"]
    if op == "rms_norm":
        del k_in["bias"]
    # Plain PyTorch's mixed-precision equivalent: compute in float32, round the result to the input dtype.
    t_in = {k: leaf(v.detach().float()) for k, v in k_in.items()}
    r_in = {k: leaf(v.detach().double()) for k, v in k_in.items()}
    k_out = _kernel_op(op, k_in, (48,))
    t_out = [o.to(mixed) for o in _torch_op(op, t_in, (48,))]
    r_out = _torch_op(op, r_in, (48,))
    assert_close(k_out[0], r_out[0], t_out[0], name="output")
    dy = torch.randn(4, 48, generator=gen, dtype=torch.float64)
    for name, kg, rg, tg in zip(k_in, grads(k_out[0], list(k_in.values()), dy.to(mixed).to(device)),
                                grads(r_out[0], list(r_in.values()), dy),
                                grads(t_out[0], list(t_in.values()), dy.to(mixed))):
        assert kg.dtype == k_in[name].dtype, f"d{name} dtype {kg.dtype}"
        assert_close(kg, rg, tg.to(kg.dtype), grad=True, name=f"d{name}")


# ----------------------------------------------------------------------------- empty, NaN, inf


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 8), (3, 0)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_empty(op, shape, device):
    outs = check_op(op, torch.float32, device, shape)
    assert all(o.shape == shape for o in outs)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_empty_batch_gives_zero_weight_gradient(op, device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    (out,) = _kernel_op(op, {"x": x, "weight": w}, (8,))
    (dw,) = torch.autograd.grad(out.sum(), [w])
    assert torch.equal(dw, torch.zeros_like(w))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on inf - inf
@pytest.mark.parametrize("n", [31, MAX_FUSED_FWD + 1])
@pytest.mark.parametrize("op", OPS)
def test_nan_and_inf_propagate_as_in_torch(op, n, device):
    """A NaN or inf in a row poisons that row (and the weight gradient) exactly as in torch, no more."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, n, generator=gen, dtype=torch.float64)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3, n - 1] = float("-inf")
    check_op(op, torch.float32, device, (5, n), x=x)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("shape", "normalized"), [((3, 5), 1), ((2, 3, 4), 2), ((1, 1), 1)], ids=str)
def test_gradcheck(op, shape, normalized, device):
    if op == "add_layer_norm" and normalized > 1:
        pytest.skip("add_layer_norm normalizes the last dim only")
    values = _values(op, shape, normalized, residual=True, weight=True, bias=True, seed=9)
    names = list(values)
    norm_shape = tuple(shape[len(shape) - normalized:])
    fn = lambda *ts: _kernel_op(op, dict(zip(names, ts)), norm_shape)
    inputs = [v.to(device).requires_grad_() for v in values.values()]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_multipass(op, device):
    """float64 rows switch to the multi-pass forward and backward at half the float32 limits."""
    n = MAX_FUSED_FWD // 2 + 1
    values = _values(op, (2, n), 1, residual=True, weight=True, bias=True, seed=10)
    names = list(values)
    fn = lambda *ts: _kernel_op(op, dict(zip(names, ts)), (n,))
    inputs = [v.to(device).requires_grad_() for v in values.values()]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# ----------------------------------------------------------------------------- rms_norm eps default


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_default_eps_matches_torch(dtype, backend, device):
    """``eps=None`` is torch's default: the machine epsilon of the computation dtype (float32 for
    half inputs, float64 for float64). Tiny inputs make eps dominate mean(x^2), so a wrong default shows."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(4, 64, generator=gen, dtype=torch.float64) * 1e-4).to(dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    with fused_kernels.use_backend(backend):
        out = fused_kernels.rms_norm(x.to(device), (64,))
        explicit = fused_kernels.rms_norm(x.to(device), (64,), eps=torch.finfo(compute).eps)
    want = F.rms_norm(x.double(), (64,), eps=torch.finfo(compute).eps)
    assert_close(out, want, F.rms_norm(x, (64,)), name="rms_norm(eps=None)")
    assert torch.equal(out, explicit)
    assert not torch.allclose(out.double().cpu(), F.rms_norm(x.double(), (64,), eps=1e-2), rtol=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_torch_backend_reference_matches_torch(op, dtype, device):
    """The "torch" backend runs ``fused_kernels.reference``: it must have the ops' semantics too."""
    values = _values(op, (3, 4, 40), 1, residual=True, weight=True, bias=True, seed=17)
    t = {k: v.to(dtype).to(device) for k, v in values.items()}
    with fused_kernels.use_backend("torch"), bounds_checked(*KERNELS) as launches:
        outs = _kernel_op(op, t, (40,))
    assert not launches
    refs = _torch_op(op, {k: v.double().cpu() for k, v in t.items()}, (40,))
    for out, ref, t_out in zip(outs, refs, _torch_op(op, t, (40,))):
        assert out.dtype == dtype
        assert_close(out, ref, t_out)


def test_eps_is_used(device):
    x = torch.randn(3, 32, dtype=torch.float64) * 0.1
    for eps in (1e-5, 0.5):
        assert_close(fused_kernels.layer_norm(x.to(device), (32,), eps=eps), F.layer_norm(x, (32,), eps=eps))
        assert_close(fused_kernels.rms_norm(x.to(device), (32,), eps=eps), F.rms_norm(x, (32,), eps=eps))
        out, _ = fused_kernels.add_layer_norm(x.to(device), None, eps=eps)
        assert_close(out, F.layer_norm(x, (32,), eps=eps))


# ----------------------------------------------------------------------------- dropout


def _dropout_run(x, residual, p, device, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return fused_kernels.add_layer_norm(x.to(device), None if residual is None else residual.to(device), dropout_p=p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_fraction_and_scale(p, device):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(16, 1024, generator=gen)
    out, residual_out = _dropout_run(x, None, p, device, seed=0)
    dropped = residual_out.cpu() == 0
    n = dropped.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 6 * sigma, dropped.float().mean().item()
    # Every row draws its own mask.
    assert len({tuple(row.tolist()) for row in dropped[:, :64]}) == dropped.shape[0]
    kept = ~dropped
    torch.testing.assert_close(residual_out.cpu()[kept], x[kept] / (1 - p), rtol=4e-7, atol=0)
    # out is the LayerNorm of residual_out as it came out.
    assert_close(out, F.layer_norm(residual_out.cpu().double(), (1024,)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dropout_with_residual(dtype, device):
    p = 0.25
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(8, 256, generator=gen, dtype=torch.float64).to(dtype)
    r = torch.randn(8, 256, generator=gen, dtype=torch.float64).to(dtype)
    out, residual_out = _dropout_run(x, r, p, device, seed=1)
    # Recover the mask: dropped entries leave exactly the residual.
    ro = residual_out.cpu()
    keep = ro != r
    assert abs(1 - keep.float().mean().item() - p) < 6 * math.sqrt(p * (1 - p) / keep.numel())
    want = torch.where(keep, r.double() + x.double() / (1 - p), r.double())
    assert_close(ro, want, (r + x / (1 - p)).where(keep, r), name="residual_out")
    assert_close(out, F.layer_norm(ro.double(), (256,)), F.layer_norm(ro, (256,)), name="out")


def test_dropout_reproducible_with_manual_seed(device):
    x = torch.randn(8, 300)
    a = _dropout_run(x, None, 0.3, device, seed=123)
    b = _dropout_run(x, None, 0.3, device, seed=123)
    c = _dropout_run(x, None, 0.3, device, seed=124)
    d = _dropout_run(x, None, 0.3, device)  # the generator moved on: a new mask
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1] == 0, c[1] == 0)
    assert not torch.equal(b[1] == 0, d[1] == 0)


@pytest.mark.parametrize("n", [256, MAX_FUSED_BWD + 1, MAX_FUSED_FWD + 1])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_dropout_backward_uses_the_forward_mask(with_residual, n, device):
    """dx = (gradient reaching residual_out) * mask / (1 - p), with the mask the forward drew; the
    residual gets that gradient unmasked. Long rows check the single-block forward against the
    multi-pass backward and the multi-pass forward."""
    p = 0.4
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(3, n, generator=gen).to(device).requires_grad_()
    r = torch.randn(3, n, generator=gen).to(device).requires_grad_() if with_residual else None
    w = (1 + 0.5 * torch.randn(n, generator=gen)).to(device).requires_grad_()
    b = torch.randn(n, generator=gen).to(device).requires_grad_()
    torch.manual_seed(2)
    with bounds_checked(*KERNELS):
        out, residual_out = fused_kernels.add_layer_norm(x, r, w, b, dropout_p=p)
        dy = torch.randn(3, n, generator=gen)
        dres = torch.randn(3, n, generator=gen)
        inputs = [x, w, b] + ([r] if with_residual else [])
        got = grads([out, residual_out], inputs, [dy.to(device), dres.to(device)])
    ro = residual_out.detach().cpu()
    keep = ro != (r.detach().cpu() if with_residual else 0)
    assert 0.5 < keep.float().mean().item() < 0.7
    # Reference: differentiate LayerNorm at the residual_out the forward produced, in float64.
    ro64 = ro.double().requires_grad_()
    w64, b64 = w.detach().cpu().double().requires_grad_(), b.detach().cpu().double().requires_grad_()
    d_ro, dw, db = torch.autograd.grad(F.layer_norm(ro64, (n,), w64, b64), [ro64, w64, b64], dy.double())
    d_ro = d_ro + dres.double()
    assert_close(got[0], d_ro * keep / (1 - p), grad=True, name="dx")
    assert_close(got[1], dw, grad=True, name="dweight")
    assert_close(got[2], db, grad=True, name="dbias")
    if with_residual:
        assert_close(got[3], d_ro, grad=True, name="dresidual")
    assert bool((got[0].cpu()[~keep] == 0).all())


def test_no_dropout_gives_exact_sum(device):
    x, r = torch.randn(4, 50), torch.randn(4, 50)
    _, residual_out = fused_kernels.add_layer_norm(x.to(device), r.to(device))
    assert torch.equal(residual_out.cpu(), r + x)
    _, residual_out = fused_kernels.add_layer_norm(x.to(device), None)
    assert torch.equal(residual_out.cpu(), x)


def test_dropout_gradcheck(device):
    """With the RNG re-seeded before each call the op is a deterministic function: gradcheck it."""
    gen = torch.Generator().manual_seed(15)
    x, r = torch.randn(3, 20, generator=gen, dtype=torch.float64), torch.randn(3, 20, generator=gen,
                                                                               dtype=torch.float64)
    w, b = torch.randn(20, generator=gen, dtype=torch.float64), torch.randn(20, generator=gen, dtype=torch.float64)

    def fn(*ts):
        torch.manual_seed(0)
        return fused_kernels.add_layer_norm(*ts, dropout_p=0.3)

    inputs = [t.to(device).requires_grad_() for t in (x, r, w, b)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# ----------------------------------------------------------------------------- bad inputs


def _bad_cases():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    return [
        ("input not a tensor", lambda: fused_kernels.layer_norm([1.0, 2.0], (2,)), TypeError, "input"),
        ("int input", lambda: fused_kernels.layer_norm(torch.ones(4, 8, dtype=torch.int32), (8,)), TypeError, "input"),
        ("weight shape", lambda: fused_kernels.layer_norm(x, (8,), torch.randn(7)), ValueError, "weight"),
        ("bias shape", lambda: fused_kernels.layer_norm(x, (8,), w, torch.randn(4, 8)), ValueError, "bias"),
        ("int weight", lambda: fused_kernels.layer_norm(x, (8,), torch.ones(8, dtype=torch.int64)), TypeError,
         "weight"),
        ("fp16 weight, fp32 input", lambda: fused_kernels.layer_norm(x, (8,), w.half()), TypeError, "weight"),
        ("fp64 bias, fp32 input", lambda: fused_kernels.layer_norm(x, (8,), w, w.double()), TypeError, "bias"),
        ("normalized_shape mismatch", lambda: fused_kernels.layer_norm(x, (4,)), ValueError, "normalized_shape"),
        ("normalized_shape too long", lambda: fused_kernels.layer_norm(x, (2, 4, 8)), ValueError, "normalized_shape"),
        ("normalized_shape empty", lambda: fused_kernels.layer_norm(x, ()), ValueError, "normalized_shape"),
        ("normalized_shape negative", lambda: fused_kernels.layer_norm(x, (-8,)), ValueError, "normalized_shape"),
        ("rms weight shape", lambda: fused_kernels.rms_norm(x, (8,), torch.randn(4)), ValueError, "weight"),
        ("rms int input", lambda: fused_kernels.rms_norm(x.long(), (8,)), TypeError, "input"),
        ("rms normalized_shape", lambda: fused_kernels.rms_norm(x, (3,)), ValueError, "normalized_shape"),
        ("add int x", lambda: fused_kernels.add_layer_norm(x.int(), None), TypeError, "x"),
        ("add residual shape", lambda: fused_kernels.add_layer_norm(x, torch.randn(4, 7)), ValueError, "residual"),
        ("add residual dtype", lambda: fused_kernels.add_layer_norm(x, x.double()), TypeError, "residual"),
        ("add weight shape", lambda: fused_kernels.add_layer_norm(x, x, torch.randn(4)), ValueError, "weight"),
        ("add bias dtype", lambda: fused_kernels.add_layer_norm(x, x, w, w.half()), TypeError, "bias"),
        ("dropout_p = 1", lambda: fused_kernels.add_layer_norm(x, x, dropout_p=1.0), ValueError, "dropout_p"),
        ("dropout_p < 0", lambda: fused_kernels.add_layer_norm(x, x, dropout_p=-0.1), ValueError, "dropout_p"),
        ("dropout_p bool", lambda: fused_kernels.add_layer_norm(x, x, dropout_p=True), ValueError, "dropout_p"),
        ("add scalar x", lambda: fused_kernels.add_layer_norm(torch.tensor(1.0), None), ValueError, "x"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_naming_the_argument(case, backend):
    _, call, exc, argument = case
    with fused_kernels.use_backend(backend), pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert argument in message, message
    assert message.split(":")[0] in ("layer_norm", "rms_norm", "add_layer_norm"), message


@pytest.mark.gpu
def test_mismatched_devices_raise():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="weight"):
        fused_kernels.layer_norm(x, (8,), torch.randn(8))
    with pytest.raises(ValueError, match="residual"):
        fused_kernels.add_layer_norm(x, torch.randn(4, 8))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [768, 4096, 70_000, 262_144])
@pytest.mark.parametrize("op", OPS)
def test_gpu_large(op, n, dtype):
    check_op(op, dtype, "cuda", (max(8, 2**21 // n), n))


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [1024, MAX_FUSED_FWD + 1])
def test_gpu_weight_gradients_deterministic(op, n):
    """dW/dB are reduced without atomics: bit-identical over repeated backward passes."""
    values = _values(op, (4096, n), 1, residual=True, weight=True, bias=True, seed=16)
    t = {k: v.to("cuda", torch.bfloat16).requires_grad_() for k, v in values.items()}
    outs = _kernel_op(op, t, (n,))
    dy = [torch.randn_like(o) for o in outs]
    first = grads(outs, list(t.values()), dy)
    for _ in range(10):
        outs = _kernel_op(op, t, (n,))
        again = grads(outs, list(t.values()), dy)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
def test_gpu_dropout_statistics():
    p = 0.1
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    _, residual_out = fused_kernels.add_layer_norm(x, None, dropout_p=p)
    frac = (residual_out == 0).float().mean().item()
    assert abs(frac - p) < 6 * math.sqrt(p * (1 - p) / x.numel())

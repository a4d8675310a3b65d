"""Masked softmax through the Triton kernels (the interpreter on a CPU).

Every case runs forward and backward on guarded copies (``helpers.bounds_checked``) and judges the
output and the input gradient against an independent float64 reference built from ``torch.softmax``
(with our convention for rows that have nothing left: output 0 and gradient 0), with the 2x rule.
"""

from __future__ import annotations

import pytest
import torch
from helpers import LAYOUTS, as_layout, assert_close, assert_fresh_contiguous, bounds_checked, grads, leaf

import fused_kernels
from fused_kernels.ops import softmax as sm_mod
from fused_kernels.ops.softmax import MAX_FUSED
from fused_kernels.reference import causal_mask

pytestmark = pytest.mark.usefixtures("op_backend")   # each test on the kernels and on the PyTorch path

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
KERNELS = ("_softmax_fwd_kernel", "_softmax_bwd_kernel")
NEG_INF = float("-inf")


def softmax_reference(x: torch.Tensor, dim: int = -1, mask: torch.Tensor | None = None, scale: float = 1.0,
                      is_causal: bool = False) -> torch.Tensor:
    """Plain PyTorch in x's dtype (float64 for the reference): ``torch.softmax`` of the masked scaled
    input, with the convention that a row with nothing left gives 0 (and, through ``where``, gradient 0)."""
    z = x * scale
    keep = None
    if is_causal:
        keep = causal_mask(x.shape[-2], x.shape[-1], x.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            z = z + mask.to(z.dtype)
    if keep is not None:
        z = z.masked_fill(~keep, NEG_INF)
    dead = (z == NEG_INF).all(dim, keepdim=True)
    y = torch.softmax(torch.where(dead, torch.zeros_like(z), z), dim)
    return torch.where(dead, torch.zeros_like(y), y)


def check_softmax(dtype: torch.dtype, device: str, x: torch.Tensor, *, dim: int = -1,
                  mask: torch.Tensor | None = None, scale: float = 1.0, is_causal: bool = False,
                  layout: str = "contiguous", grad_layout: str = "contiguous", mask_layout: str = "contiguous",
                  seed: int = 0) -> torch.Tensor:
    """Run ``fused_kernels.softmax`` on ``x`` (float64 values, rounded to ``dtype``) and check the output and
    the input gradient; returns the kernel output."""
    rounded = x.to(dtype)
    k_x = leaf(rounded.to(device), layout=layout)
    t_x = leaf(rounded.to(device))
    r_x = leaf(rounded.double())
    k_mask = t_mask = r_mask = None
    if mask is not None:
        t_mask = mask.to(dtype) if mask.is_floating_point() else mask
        r_mask = t_mask.double() if mask.is_floating_point() else mask
        k_mask = as_layout(t_mask.to(device), mask_layout)
        t_mask = t_mask.to(device)
    with bounds_checked(*KERNELS) as launches:
        y = fused_kernels.softmax(k_x, dim, mask=k_mask, scale=scale, is_causal=is_causal)
        assert y.dtype == dtype and y.shape == x.shape
        assert_fresh_contiguous(y, k_x, name="softmax output")
        t_y = softmax_reference(t_x, dim, t_mask, scale, is_causal)
        r_y = softmax_reference(r_x, dim, r_mask, scale, is_causal)
        assert_close(y, r_y, t_y, name="softmax output")
        gen = torch.Generator().manual_seed(seed)
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
        (dx,) = grads(y, [k_x], as_layout(dy.to(device), grad_layout))
        (t_dx,) = grads(t_y, [t_x], dy.to(device))
        (r_dx,) = grads(r_y, [r_x], dy.double())
    assert dx.dtype == dtype
    assert_close(dx, r_dx, t_dx, grad=True, name="softmax dx")
    if fused_kernels.get_backend() == "torch":
        assert not launches, launches                 # the PyTorch path never touches a kernel
    elif x.numel():
        assert launches.get(KERNELS[0], 0) >= 1 and launches.get(KERNELS[1], 0) >= 1, launches
    return y


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _keep(*shape: int, p: float = 0.7, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 200, 1023])
def test_forward_backward(n, dtype, device):
    check_softmax(dtype, device, 2 * _randn(4, n))


LONG_ROWS = [
    pytest.param(torch.float32, MAX_FUSED + 1, id="fp32-multipass"),
    pytest.param(torch.float16, 70_000, id="fp16-70000"),
    pytest.param(torch.bfloat16, 70_000, id="bf16-70000"),
    pytest.param(torch.float32, 70_000, id="fp32-70000"),
    pytest.param(torch.float64, MAX_FUSED // 2 + 1, id="fp64-multipass"),
]


@pytest.mark.parametrize(("dtype", "n"), LONG_ROWS)
def test_long_rows(dtype, n, device):
    check_softmax(dtype, device, 3 * _randn(2, n))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_long_rows_masked(kind, device):
    """The online-softmax path with a mask, a fully masked row and a row whose first blocks are masked."""
    n = MAX_FUSED + 100
    keep = _keep(3, n)
    keep[1] = False
    keep[2, : n - 5] = False
    mask = keep if kind == "bool" else torch.where(keep, _randn(3, n, seed=2), NEG_INF)
    y = check_softmax(torch.float32, device, _randn(3, n), mask=mask, scale=0.5)
    assert torch.equal(y[1].cpu(), torch.zeros(n))


@pytest.mark.parametrize("scale", [0.125, 2.0, -1.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_scale(scale, dtype, device):
    check_softmax(dtype, device, _randn(3, 5, 33), scale=scale, mask=_keep(5, 33))


# ----------------------------------------------------------------------------- masks

B, H, L, S = 2, 2, 3, 37
MASK_SHAPES = [(L, S), (B, 1, 1, S), (1, H, L, S), (S,), (B, H, L, S), (B, 1, L, 1), (1, 1, 1, 1)]
# (a (B, 1, L, 1) bool mask masks whole rows, fully masked rows included)


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_masks_broadcast(kind, shape, dtype, device):
    keep = _keep(*shape)
    mask = keep if kind == "bool" else torch.where(keep, _randn(*shape, seed=3), NEG_INF)
    check_softmax(dtype, device, _randn(B, H, L, S), mask=mask)


@pytest.mark.parametrize("mask_layout", ["transposed", "padded", "strided"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_strides(kind, mask_layout, device):
    """A strided mask is read in place with its strides (a NaN-padded float mask catches over-reads)."""
    keep = _keep(1, H, L, S)
    mask = keep if kind == "bool" else _randn(1, H, L, S, seed=4)
    check_softmax(torch.float32, device, _randn(B, H, L, S), mask=mask, mask_layout=mask_layout)


@pytest.mark.triton_only   # the PyTorch path's counterpart is in test_fast_torch.py (the PyTorch paths)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_is_not_materialized(kind, device):
    """A broadcast mask reaches the kernel with stride 0 where it broadcasts, not expanded in memory."""
    seen = []
    original = sm_mod.launch_rows

    def spy(kernel, tensors, *args, **kwargs):
        seen.append(tensors[1])
        return original(kernel, tensors, *args, **kwargs)

    mask = _keep(S) if kind == "bool" else _randn(S)
    sm_mod.launch_rows = spy
    try:
        fused_kernels.softmax(torch.randn(B, H, L, S, device=device), mask=mask.to(device))
    finally:
        sm_mod.launch_rows = original
    assert seen and seen[0].stride()[:-1] == (0, 0, 0), seen[0].stride()
    assert seen[0].untyped_storage().nbytes() == mask.untyped_storage().nbytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fully_masked_rows_give_zero_and_zero_gradient(dtype, device):
    x = _randn(B, H, L, S)
    keep = _keep(B, H, L, S)
    keep[0, 1, 2] = False
    keep[1, :, 1] = False
    float_mask = torch.where(keep, 0.0, NEG_INF).double()
    for mask in (keep, float_mask):
        k_x = x.to(dtype).to(device).requires_grad_()
        y = fused_kernels.softmax(k_x, mask=mask.to(device) if mask.dtype == torch.bool else mask.to(dtype).to(device))
        (dx,) = torch.autograd.grad(y, [k_x], torch.randn_like(y))
        for out in (y, dx):
            out = out.cpu()
            assert not out.isnan().any()
            assert torch.equal(out[0, 1, 2], torch.zeros(S, dtype=dtype))
            assert torch.equal(out[1, :, 1], torch.zeros(H, S, dtype=dtype))
            assert not out[~keep].any()  # masked entries: probability 0, gradient 0
        check_softmax(dtype, device, x, mask=mask)


@pytest.mark.parametrize("n", [9, MAX_FUSED + 1])
def test_rows_of_minus_inf(n, device):
    """-inf entries get 0; a row of nothing but -inf gives 0 and gradient 0 (torch would give NaN)."""
    x = _randn(3, n)
    x[0] = NEG_INF
    x[1, ::2] = NEG_INF
    y = check_softmax(torch.float32, device, x)
    assert not y[0].any() and not y[1, ::2].any()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on inf - inf
@pytest.mark.parametrize("n", [9, MAX_FUSED + 1])
def test_nan_and_inf_propagate_as_in_torch(n, device):
    x = _randn(5, n)
    x[0, 3] = float("nan")   # a NaN poisons its row
    x[1, 1] = float("inf")   # so does +inf (inf - inf), as in torch
    x[2, 0] = float("nan")   # ...unless it is masked out
    keep = torch.ones(5, n, dtype=torch.bool)
    keep[2, 0] = False
    y = fused_kernels.softmax(x.float().to(device), mask=keep.to(device)).cpu()
    want = torch.softmax(x.float().masked_fill(~keep, NEG_INF), -1)
    assert torch.equal(y.isnan(), want.isnan())
    assert y[0].isnan().all() and y[1].isnan().all() and not y[2:].isnan().any()
    check_softmax(torch.float32, device, x, mask=keep)


# ----------------------------------------------------------------------------- is_causal


@pytest.mark.parametrize(("l", "s"), [(7, 7), (4, 9), (9, 4), (1, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_is_causal(l, s, dtype, device):
    """Top-left aligned: query i sees keys j <= i (as ``scaled_dot_product_attention``)."""
    x = _randn(1, 2, l, s)
    y = check_softmax(dtype, device, x, is_causal=True).cpu()
    visible = causal_mask(l, s)
    assert torch.equal(visible, torch.ones(l, s, dtype=torch.bool).tril())
    assert not y[..., ~visible].any()
    assert (y[..., visible] > 0).all()
    # Same as an explicit bool mask.
    explicit = fused_kernels.softmax(x.to(dtype).to(device), mask=visible.to(device)).cpu()
    assert torch.equal(y, explicit)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_is_causal_with_mask(kind, device):
    keep = _keep(B, 1, L, L)
    keep[0, 0, 0, 0] = False  # with causal masking, query 0 of batch 0 has nothing left
    mask = keep if kind == "bool" else torch.where(keep, _randn(B, 1, L, L, seed=5), NEG_INF)
    y = check_softmax(torch.float32, device, _randn(B, H, L, L), mask=mask, is_causal=True).cpu()
    assert not y[0, :, 0].any()


def test_is_causal_long_rows(device):
    check_softmax(torch.float32, device, _randn(1, 3, MAX_FUSED + 1), is_causal=True)


def test_is_causal_when_dims_do_not_collapse(device):
    """Five leading dims laid out so they cannot merge: the launcher falls back to contiguous copies,
    and the query index must still be the input's dim -2."""
    x = _randn(2, 2, 2, 3, 6)
    check_softmax(torch.float32, device, x, is_causal=True, layout="permuted", mask=_keep(2, 1, 2, 1, 6))


# ----------------------------------------------------------------------------- dims, shapes, layouts


@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1, -2])
def test_dims_of_4d(dim, device):
    x = _randn(3, 2, 2, 4)
    mask = _keep(1, 2, 1, 4)
    check_softmax(torch.float32, device, x, dim=dim)
    check_softmax(torch.float16, device, x, dim=dim, mask=mask)


@pytest.mark.parametrize("shape", [(37,), (3, 37), (2, 3, 37), (2, 1, 3, 1, 37)], ids=str)
def test_leading_shapes(shape, device):
    check_softmax(torch.float32, device, _randn(*shape))


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "contiguous"])
@pytest.mark.parametrize("dim", [-1, 1])
def test_strided_inputs(layout, dim, device):
    check_softmax(torch.float32, device, _randn(2, 3, 21), dim=dim, layout=layout, mask=_keep(3, 21))


@pytest.mark.parametrize("grad_layout", ["transposed", "permuted", "padded", "strided"])
def test_non_contiguous_incoming_gradient(grad_layout, device):
    check_softmax(torch.float32, device, _randn(3, 4, 21), grad_layout=grad_layout)


def test_strided_long_rows(device):
    check_softmax(torch.float32, device, _randn(2, MAX_FUSED + 5), layout="strided", grad_layout="padded")


@pytest.mark.parametrize("kind", ["rows", "columns"])
def test_broadcast_input(kind, device):
    """Stride-0 inputs (``expand``)."""
    base = _randn(1, 29) if kind == "rows" else _randn(4, 1)
    x = base.float().to(device).expand(4, 29).requires_grad_()
    x_ref = base.expand(4, 29).requires_grad_()
    y = fused_kernels.softmax(x)
    want = torch.softmax(x_ref, -1)
    assert_close(y, want)
    dy = _randn(4, 29, seed=6)
    assert_close(grads(y, [x], dy.float().to(device))[0], grads(want, [x_ref], dy)[0], grad=True)


def test_output_is_fresh_and_contiguous_for_permuted_input(device):
    x = torch.randn(3, 4, 8, device=device).permute(2, 0, 1)  # (8, 3, 4)
    for dim in (-1, 0):
        y = fused_kernels.softmax(x, dim)
        assert_fresh_contiguous(y, x)
        assert_close(y, torch.softmax(x.double(), dim))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)], ids=str)
@pytest.mark.parametrize("dim", [0, -1])
def test_empty(shape, dim, device):
    y = check_softmax(torch.float32, device, _randn(*shape), dim=dim)
    assert y.shape == shape


def test_scalar_input(device):
    x = torch.tensor(3.0, device=device, requires_grad=True)
    y = fused_kernels.softmax(x, 0)
    assert y.shape == () and y.item() == 1.0
    (dx,) = torch.autograd.grad(y, [x])
    assert dx.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_torch_backend_reference_matches(dtype, device):
    """The "torch" backend runs ``fused_kernels.reference.softmax_ref``: same semantics (masks, causal,
    fully masked rows) as the independent reference here."""
    x = _randn(B, H, L, S)
    keep = _keep(B, 1, L, S)
    keep[0, 0, 1] = False
    cases = [{}, {"mask": keep}, {"mask": torch.where(keep, _randn(B, 1, L, S, seed=8), NEG_INF)},
             {"mask": keep[0, 0], "is_causal": True, "scale": 0.3}, {"dim": 1}]
    for kwargs in cases:
        mask = kwargs.get("mask")
        kwargs_d = {**kwargs, "mask": None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dtype))}
        with fused_kernels.use_backend("torch"), bounds_checked(*KERNELS) as launches:
            y = fused_kernels.softmax(x.to(dtype).to(device), **{k: (v.to(device) if torch.is_tensor(v) else v)
                                                           for k, v in kwargs_d.items()})
        assert not launches
        want = softmax_reference(x.to(dtype).double(), **{k: (v.double() if torch.is_tensor(v) and
                                                              v.is_floating_point() else v)
                                                          for k, v in kwargs_d.items()})
        assert_close(y, want, softmax_reference(x.to(dtype), **kwargs_d), name=str(list(kwargs)))


# ----------------------------------------------------------------------------- gradcheck


GRADCHECK_CASES = [
    pytest.param((3, 7), {}, id="plain"),
    pytest.param((2, 3, 4, 5), {"dim": 1, "scale": 0.7}, id="dim1-scale"),
    pytest.param((2, 3, 4, 5), {"mask": "bool"}, id="bool-mask"),
    pytest.param((2, 3, 4, 5), {"mask": "float"}, id="float-mask"),
    pytest.param((2, 4, 4), {"is_causal": True}, id="causal"),
    pytest.param((2, MAX_FUSED // 2 + 1), {"mask": "float"}, id="multipass"),
]


@pytest.mark.parametrize(("shape", "kwargs"), GRADCHECK_CASES)
def test_gradcheck(shape, kwargs, device):
    kwargs = dict(kwargs)
    if kwargs.get("mask") == "bool":
        keep = _keep(*shape[-2:])
        keep[0] = False  # a fully masked row: gradient 0
        kwargs["mask"] = keep.to(device)
    elif kwargs.get("mask") == "float":
        kwargs["mask"] = _randn(shape[-1], seed=7).to(device)
    x = _randn(*shape).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fused_kernels.softmax(t, **kwargs), [x], fast_mode=True)


# ----------------------------------------------------------------------------- bad inputs


def _bad_cases():
    x = torch.randn(2, 3, 4)
    return [
        ("input not a tensor", lambda: fused_kernels.softmax([1.0, 2.0]), TypeError, "input"),
        ("int input", lambda: fused_kernels.softmax(torch.ones(3, 4, dtype=torch.int64)), TypeError, "input"),
        ("dim out of range", lambda: fused_kernels.softmax(x, 3), ValueError, "dim"),
        ("dim not an int", lambda: fused_kernels.softmax(x, 1.0), TypeError, "dim"),
        ("mask not broadcastable", lambda: fused_kernels.softmax(x, mask=torch.ones(5, dtype=torch.bool)), ValueError,
         "mask"),
        ("mask broadcasts beyond input",
         lambda: fused_kernels.softmax(x, mask=torch.ones(2, 2, 3, 4, dtype=torch.bool)), ValueError, "mask"),
        ("int mask", lambda: fused_kernels.softmax(x, mask=torch.ones(4, dtype=torch.int32)), TypeError, "mask"),
        ("mask not a tensor", lambda: fused_kernels.softmax(x, mask=[True] * 4), TypeError, "mask"),
        ("is_causal along dim 1", lambda: fused_kernels.softmax(x, 1, is_causal=True), ValueError, "is_causal"),
        ("is_causal on 1-D", lambda: fused_kernels.softmax(torch.randn(4), is_causal=True), ValueError, "is_causal"),
        ("scale not a number", lambda: fused_kernels.softmax(x, scale="2"), TypeError, "scale"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_naming_the_argument(case, backend):
    _, call, exc, argument = case
    with fused_kernels.use_backend(backend), pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert message.startswith("softmax:") and argument in message, message


@pytest.mark.gpu
def test_mismatched_devices_raise():
    with pytest.raises(ValueError, match="mask"):
        fused_kernels.softmax(torch.randn(4, 8, device="cuda"), mask=torch.ones(8, dtype=torch.bool))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1024, 4096, 70_000, 262_144])
def test_gpu_large(n, dtype):
    rows = max(4, 2**22 // n)
    keep = _keep(rows, n)
    keep[0] = False
    check_softmax(dtype, "cuda", 3 * _randn(rows, n), mask=keep)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_attention_shaped(dtype):
    x = _randn(4, 16, 512, 512)
    mask = _keep(4, 1, 1, 512)
    check_softmax(dtype, "cuda", x, mask=mask, scale=0.125, is_causal=True)

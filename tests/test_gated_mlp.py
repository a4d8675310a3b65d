"""``fused_kernels.swiglu`` / ``geglu`` against the float64 reference and plain PyTorch (``F.silu(gate) * up``), on
the Triton kernels (the interpreter on a CPU) and the PyTorch path: every activation, two tensors and the
concatenated ``gate_up`` form, gradients, bf16 / fp16 by the 2x rule, odd sizes, strides, guard bytes, errors,
and the drop-in modules of ``fused_kernels.nn``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import as_layout, assert_close, bounds_checked

import fused_kernels
from fused_kernels.reference import gated_activation_ref

ACTS = {"silu": (lambda g, u: fused_kernels.swiglu(g, u), lambda g: F.silu(g)),
        "gelu": (lambda g, u: fused_kernels.geglu(g, u), lambda g: F.gelu(g)),
        "gelu_tanh": (lambda g, u: fused_kernels.geglu(g, u, approximate="tanh"),
                      lambda g: F.gelu(g, approximate="tanh"))}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def check_glu(gate, up, dtype, act, layout="contiguous"):
    """Output and gradients (of gate and up, or of the concatenated tensor) against float64, plain torch's error in
    ``dtype`` as the yardstick for half precision."""
    ours_fn, act_fn = ACTS[act]
    results = {}
    for name, dt in (("ours", dtype), ("ref", torch.float64), ("plain", dtype)):
        g = as_layout(gate.to(dt), layout).requires_grad_()
        u = None if up is None else as_layout(up.to(dt), layout).requires_grad_()
        if name == "ours":
            out = ours_fn(g, u)
        elif name == "ref":
            out = gated_activation_ref(g, u, act)
        else:
            gg, uu = (g.chunk(2, -1) if u is None else (g, u))
            out = act_fn(gg) * uu
        cot = torch.randn(out.shape, generator=_gen(5), dtype=torch.float64).to(out.dtype)
        wanted = [g] if u is None else [g, u]
        results[name] = [out.detach(), *torch.autograd.grad(out, wanted, cot)]
    low = dtype in (torch.float16, torch.bfloat16)
    tol = {} if low else (dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-6))
    for i, (got, want, plain) in enumerate(zip(results["ours"], results["ref"], results["plain"])):
        assert got.dtype == plain.dtype and got.shape == plain.shape
        assert_close(got, want, plain if low else None, grad=i > 0, name=["out", "dgate", "dup"][i], **tol)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", [False, True])
def test_matches_reference(op_backend, act, dtype, split):
    g = torch.randn(3, 7, 96, generator=_gen(1), dtype=torch.float64) * 2
    u = torch.randn(3, 7, 96, generator=_gen(2), dtype=torch.float64)
    if split:
        check_glu(torch.cat([g, u], -1), None, dtype, act)
    else:
        check_glu(g, u, dtype, act)


@pytest.mark.parametrize("shape", [(1, 1), (5, 1023), (2, 3, 1500), (0, 8), (13,)])
def test_shapes(op_backend, shape):
    g = torch.randn(*shape, generator=_gen(3), dtype=torch.float64)
    u = torch.randn(*shape, generator=_gen(4), dtype=torch.float64)
    check_glu(g, u, torch.float32, "silu")


@pytest.mark.parametrize("layout", ["transposed", "padded", "strided", "permuted"])
def test_strides(op_backend, layout):
    g = torch.randn(6, 9, 40, generator=_gen(5), dtype=torch.float64)
    u = torch.randn(6, 9, 40, generator=_gen(6), dtype=torch.float64)
    check_glu(g, u, torch.float32, "gelu_tanh", layout)
    check_glu(torch.cat([g, u], -1), None, torch.float32, "silu", layout)


def test_mixed_dtypes_promote_as_torch(op_backend):
    g = torch.randn(4, 8, generator=_gen(7)).bfloat16()
    u = torch.randn(4, 8, generator=_gen(8))
    out = fused_kernels.swiglu(g, u)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.silu(g) * u)


def test_double_backward(op_backend):
    g = torch.randn(3, 6, generator=_gen(9), dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 6, generator=_gen(10), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: fused_kernels.geglu(a, b, "tanh"), (g, u), fast_mode=True)
    gu = torch.randn(3, 12, generator=_gen(11), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(fused_kernels.swiglu, (gu,), fast_mode=True)


@pytest.mark.triton_only
def test_bounds(device, triton_backend):
    g = torch.randn(5, 1100, generator=_gen(12), dtype=torch.float64)
    u = torch.randn(5, 1100, generator=_gen(13), dtype=torch.float64)
    with bounds_checked("_glu_fwd_kernel", "_glu_bwd_kernel") as launches:
        check_glu(g, u, torch.float32, "gelu", "padded")
        check_glu(torch.cat([g, u], -1), None, torch.float16, "silu")
    assert launches == {"_glu_fwd_kernel": 2, "_glu_bwd_kernel": 2}


def test_errors(op_backend):
    g = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="shape"):
        fused_kernels.swiglu(g, g[:, :7])
    with pytest.raises(RuntimeError, match="even"):
        fused_kernels.swiglu(g[:, :7])
    with pytest.raises(RuntimeError, match="approximate"):
        fused_kernels.geglu(g, g, approximate="fast")
    with pytest.raises(NotImplementedError):
        fused_kernels.swiglu(g.long(), g)
    with pytest.raises(TypeError):
        fused_kernels.swiglu(g, [1.0])


# ----------------------------------------------------------------------------- modules


def test_gated_mlp_module_is_llamas(op_backend):
    """``fused_kernels.nn.GatedMLP`` has LlamaMLP's parameter names and result."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu")
    torch.manual_seed(0)
    theirs = LlamaMLP(config)
    ours = fused_kernels.nn.GatedMLP(32, 48)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch.testing.assert_close(ours(x), theirs(x))
    gated = fused_kernels.nn.GatedMLP(32, 48, activation="gelu_tanh", bias=True)
    assert set(gated.state_dict()) == {f"{p}.{k}" for p in ("gate_proj", "up_proj", "down_proj")
                                       for k in ("weight", "bias")}
    h = gated.up_proj(x)
    torch.testing.assert_close(gated(x), gated.down_proj(F.gelu(gated.gate_proj(x), approximate="tanh") * h))


def test_activation_modules(op_backend):
    x = torch.randn(3, 10)
    torch.testing.assert_close(fused_kernels.nn.SwiGLU()(x), F.silu(x[:, :5]) * x[:, 5:])
    torch.testing.assert_close(fused_kernels.nn.GEGLU("tanh")(x[:, :5], x[:, 5:]),
                               F.gelu(x[:, :5], approximate="tanh") * x[:, 5:])

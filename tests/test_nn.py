"""Drop-in modules: ``kernels.nn.LayerNorm`` / ``RMSNorm`` / ``Softmax`` against their ``torch.nn``
counterparts (constructor, attributes, state_dict, outputs, gradients), and ``replace_modules``."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from helpers import assert_close, bounds_checked

import kernels
import kernels.nn as knn

pytestmark = pytest.mark.usefixtures("triton_backend")

ln_mod = importlib.import_module("kernels.layer_norm")
sm_mod = importlib.import_module("kernels.softmax")

NORM_CASES = [
    pytest.param("LayerNorm", (16,), {}, id="ln"),
    pytest.param("LayerNorm", ((4, 8),), {"eps": 1e-3}, id="ln-2d-eps"),
    pytest.param("LayerNorm", (16,), {"elementwise_affine": False}, id="ln-no-affine"),
    pytest.param("LayerNorm", (16,), {"bias": False}, id="ln-no-bias"),
    pytest.param("LayerNorm", (16,), {"dtype": torch.float64, "device": "cpu"}, id="ln-fp64"),
    pytest.param("LayerNorm", (16,), {"dtype": torch.float16}, id="ln-fp16"),
    pytest.param("RMSNorm", (16,), {}, id="rms"),
    pytest.param("RMSNorm", ((4, 8),), {"eps": 1e-6}, id="rms-2d-eps"),
    pytest.param("RMSNorm", (16,), {"elementwise_affine": False}, id="rms-no-affine"),
    pytest.param("RMSNorm", (16,), {"dtype": torch.bfloat16}, id="rms-bf16"),
    pytest.param("RMSNorm", [16], {"dtype": torch.float64, "device": "cpu"}, id="rms-fp64"),
]


def _pair(name: str, args, kwargs, seed: int = 0):
    """(ours, torch's) built with the same arguments, with the same random affine parameters."""
    ours, theirs = getattr(knn, name)(*args, **kwargs), getattr(torch.nn, name)(*args, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
    return ours, theirs


def _input(module: torch.nn.Module, *lead: int, seed: int = 1) -> torch.Tensor:
    shape = (*lead, *module.normalized_shape)
    dtype = next(module.parameters()).dtype if list(module.parameters()) else torch.float32
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize(("name", "args", "kwargs"), NORM_CASES)
def test_constructor_and_attributes_match_torch(name, args, kwargs):
    ours, theirs = getattr(knn, name)(*args, **kwargs), getattr(torch.nn, name)(*args, **kwargs)
    assert isinstance(ours, getattr(torch.nn, name))
    for attr in ("normalized_shape", "eps", "elementwise_affine"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        mine = ours.state_dict()[key]
        assert (mine.shape, mine.dtype, mine.device) == (value.shape, value.dtype, value.device)
        assert torch.equal(mine, value)  # the same initialisation (ones / zeros)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for attr in ("weight", "bias"):
        assert (getattr(ours, attr, None) is None) == (getattr(theirs, attr, None) is None), attr
    assert ours.extra_repr() == theirs.extra_repr()


@pytest.mark.parametrize(("name", "args", "kwargs"), NORM_CASES)
def test_state_dict_loads_both_ways_and_outputs_match(name, args, kwargs, device):
    ours, theirs = _pair(name, args, kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = getattr(torch.nn, name)(*args, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    for a, b in zip(back.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    ours, theirs = ours.to(device), theirs.to(device)
    x = _input(theirs, 3, 5).to(device)
    reference = getattr(torch.nn, name)(*args, **{**kwargs, "dtype": torch.float64, "device": "cpu"})
    reference.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    with bounds_checked(ln_mod, "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel") as launches:
        x_ours, x_theirs, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_(), \
            x.cpu().double().requires_grad_()
        out, t_out, r_out = ours(x_ours), theirs(x_theirs), reference(x_ref)
        assert out.dtype == t_out.dtype and out.shape == t_out.shape
        assert_close(out, r_out, t_out, name=f"{name} output")
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        out.backward(dy.to(out.dtype).to(device))
        t_out.backward(dy.to(out.dtype).to(device))
        r_out.backward(dy)
    assert launches == {"_layer_norm_fwd_kernel": 1, "_layer_norm_bwd_kernel": 1}
    assert_close(x_ours.grad, x_ref.grad, x_theirs.grad, grad=True, name="dx")
    for (pname, p), t, r in zip(ours.named_parameters(), theirs.parameters(), reference.parameters()):
        assert_close(p.grad, r.grad, t.grad, grad=True, name=f"d{pname}")


def test_default_eps_none_matches_torch_rmsnorm():
    ours, theirs = _pair("RMSNorm", (32,), {"dtype": torch.float16})
    ours.load_state_dict(theirs.state_dict())
    assert ours.eps is None
    x = (torch.randn(4, 32) * 1e-4).half()  # tiny: eps dominates mean(x^2)
    ref = torch.nn.functional.rms_norm(x.double(), (32,), theirs.weight.double(), torch.finfo(torch.float32).eps)
    assert_close(ours(x), ref, theirs(x))


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_softmax_module_matches_torch(dim, ndim):
    if dim is not None and dim >= ndim:
        pytest.skip("dim out of range")
    ours, theirs = knn.Softmax(dim), torch.nn.Softmax(dim)
    assert isinstance(ours, torch.nn.Softmax) and ours.dim == theirs.dim
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(*[2, 3, 4, 5][:ndim], dtype=torch.float64).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's deprecated implicit dim choice
        want = theirs(x)
    with bounds_checked(sm_mod, "_softmax_fwd_kernel") as launches:
        got = ours(x)
    assert launches == {"_softmax_fwd_kernel": 1}
    assert_close(got, want)
    dy = torch.randn_like(x)
    assert_close(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0], grad=True)


# ----------------------------------------------------------------------------- replace_modules


def _encoder(norm_first: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0,
                                            batch_first=True, norm_first=norm_first)


class _OwnLayerNorm(torch.nn.LayerNorm):
    """A user's subclass with its own forward: replace_modules must leave it alone."""

    def forward(self, input):
        return super().forward(input) * 2


def _mixed_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 12),
        torch.nn.RMSNorm(12),
        torch.nn.Sequential(torch.nn.LayerNorm(12, bias=False), torch.nn.Softmax(dim=-1)),
        _OwnLayerNorm(12),
        torch.nn.LayerNorm(12, elementwise_affine=False),
    )


def _outputs_and_grads(model: torch.nn.Module, x: torch.Tensor):
    model.zero_grad()
    out = model(x)
    # A random cotangent: with ones, the gradient through a final LayerNorm is 0 up to rounding noise.
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device))
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_replace_modules_in_transformer_encoder_layer(norm_first, device):
    model = _encoder(norm_first).to(device)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(device)
    params = list(model.parameters())
    want, want_grads = _outputs_and_grads(model, x)
    assert knn.replace_modules(model) == 3  # self_attn, norm1, norm2
    assert type(model.norm1) is knn.LayerNorm and type(model.norm2) is knn.LayerNorm
    assert type(model.self_attn) is knn.MultiheadAttention
    assert all(a is b for a, b in zip(model.parameters(), params))  # the very same tensors
    with bounds_checked(ln_mod, "_layer_norm_fwd_kernel") as launches:
        got, got_grads = _outputs_and_grads(model, x)
    assert launches["_layer_norm_fwd_kernel"] == 2  # the swapped modules really run our kernel
    assert_close(got, want.double(), atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w.double(), grad=True, atol=1e-4, rtol=1e-4)
    assert knn.replace_modules(model) == 0  # already ours


def test_replace_modules_counts_only_exact_torch_classes(device):
    model = _mixed_model().to(device)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2)).to(device)
    params = list(model.parameters())
    with torch.no_grad():
        want = model(x)
    assert knn.replace_modules(model) == 4  # RMSNorm, LayerNorm(bias=False), Softmax, LayerNorm(no affine)
    assert [type(m) for m in model] == [torch.nn.Linear, knn.RMSNorm, torch.nn.Sequential, _OwnLayerNorm,
                                        knn.LayerNorm]
    assert [type(m) for m in model[2]] == [knn.LayerNorm, knn.Softmax]
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model[2][0].bias is None and model[4].weight is None
    with torch.no_grad(), bounds_checked(ln_mod, "_layer_norm_fwd_kernel") as ln, \
            bounds_checked(sm_mod, "_softmax_fwd_kernel") as sm:
        got = model(x)
    assert ln == {"_layer_norm_fwd_kernel": 3} and sm == {"_softmax_fwd_kernel": 1}
    assert_close(got, want.double(), atol=1e-5, rtol=1e-5)


def test_replace_modules_keeps_dtype_and_state_dict(device):
    model = _encoder(False).to(device=device, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert knn.replace_modules(model) == 3
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == torch.float64 for k in before)


def test_replace_modules_on_a_bare_norm_and_bad_argument():
    norm = torch.nn.LayerNorm(8)
    assert knn.replace_modules(norm) == 1 and type(norm) is knn.LayerNorm
    with pytest.raises(TypeError, match="model"):
        knn.replace_modules(torch.randn(3))


@pytest.mark.gpu
def test_modules_on_cuda():
    ours = knn.LayerNorm(64, device="cuda", dtype=torch.bfloat16)
    theirs = torch.nn.LayerNorm(64, device="cuda", dtype=torch.bfloat16)
    assert ours.weight.device.type == "cuda"
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.layer_norm(x.double(), (64,))
    assert_close(ours(x), ref, theirs(x))
    model = _encoder(True).cuda()
    assert kernels.nn.replace_modules(model) == 3
    assert model(torch.randn(2, 5, 16, device="cuda")).isfinite().all()

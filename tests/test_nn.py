"""Drop-in modules: ``fused_kernels.nn.LayerNorm`` / ``RMSNorm`` / ``Softmax`` against their ``torch.nn``
counterparts (constructor, attributes, state_dict, outputs, gradients), and ``replace_modules``."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close, bounds_checked

import fused_kernels
import fused_kernels.nn as knn

pytestmark = pytest.mark.usefixtures("triton_backend")


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
    with bounds_checked("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel") as launches:
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
    with bounds_checked("_softmax_fwd_kernel") as launches:
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
    assert knn.replace_modules(model) == 4  # the layer, self_attn, norm1, norm2
    assert type(model) is knn.TransformerEncoderLayer
    assert type(model.norm1) is knn.LayerNorm and type(model.norm2) is knn.LayerNorm
    assert type(model.self_attn) is knn.MultiheadAttention
    assert all(a is b for a, b in zip(model.parameters(), params))  # the very same tensors
    with bounds_checked("_layer_norm_fwd_kernel") as launches:
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
    with torch.no_grad(), bounds_checked("_layer_norm_fwd_kernel") as ln, \
            bounds_checked("_softmax_fwd_kernel") as sm:
        got = model(x)
    assert ln == {"_layer_norm_fwd_kernel": 3} and sm == {"_softmax_fwd_kernel": 1}
    assert_close(got, want.double(), atol=1e-5, rtol=1e-5)


def test_replace_modules_keeps_dtype_and_state_dict(device):
    model = _encoder(False).to(device=device, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert knn.replace_modules(model) == 4
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == torch.float64 for k in before)


def test_replace_modules_on_a_bare_norm_and_bad_argument():
    norm = torch.nn.LayerNorm(8)
    assert knn.replace_modules(norm) == 1 and type(norm) is knn.LayerNorm
    with pytest.raises(TypeError, match="model"):
        knn.replace_modules(torch.randn(3))


# ------------------------------------------- when our kernels run: torch's inference fast path


class _Spy:
    """Counts the calls into our ops from ``fused_kernels.nn`` (the names its modules call at run time), and into
    torch's fused inference ops that would bypass them."""

    OURS = ("layer_norm", "scaled_dot_product_attention", "softmax")
    TORCH = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention")

    def __init__(self, monkeypatch):
        self.calls = dict.fromkeys(self.OURS + self.TORCH, 0)
        for owner, names in ((knn, self.OURS), (torch, self.TORCH)):
            for name in names:
                monkeypatch.setattr(owner, name, self._counting(name, getattr(owner, name)))

    def _counting(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    def reset(self):
        self.calls = dict.fromkeys(self.calls, 0)


MODES = {  # name -> (training, autograd context)
    "train": (True, torch.enable_grad),
    "eval": (False, torch.enable_grad),
    "eval-no_grad": (False, torch.no_grad),
    "eval-inference_mode": (False, torch.inference_mode),
}


def _run(model, mode, *args, **kwargs):
    training, context = MODES[mode]
    model.train(training)
    with context():
        return model(*args, **kwargs)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_swapped_encoder_layer_runs_our_kernels_in_every_mode(mode, norm_first, device, monkeypatch):
    """torch's layer in eval mode under no_grad runs one fused op on its weights; the swapped layer calls
    our LayerNorm twice and our attention once in every mode, and its result equals torch's."""
    import copy
    theirs = _encoder(norm_first).to(device)
    ours = copy.deepcopy(theirs)
    assert knn.replace_modules(ours) == 4
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(device)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2], device=device)   # the second row's last 2 keys
    spy = _Spy(monkeypatch)
    want = _run(theirs, mode, x, src_key_padding_mask=pad)
    fast = mode.startswith("eval-")
    assert spy.calls["_transformer_encoder_layer_fwd"] == int(fast)   # the spy sees torch's fast path
    assert spy.calls["layer_norm"] == 0
    spy.reset()
    with bounds_checked("_layer_norm_fwd_kernel") as launches:
        got = _run(ours, mode, x, src_key_padding_mask=pad)
    assert spy.calls == {"layer_norm": 2, "scaled_dot_product_attention": 1, "softmax": 0,
                         "_transformer_encoder_layer_fwd": 0, "_native_multi_head_attention": 0}
    assert launches["_layer_norm_fwd_kernel"] == 2   # and they really launch the kernel (triton backend)
    assert_close(got, want.double(), atol=1e-5, rtol=1e-5)


def test_direct_construction_is_ours_throughout(device):
    layer = knn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True, device=device)
    assert isinstance(layer, torch.nn.TransformerEncoderLayer)
    assert (type(layer.self_attn), type(layer.norm1), type(layer.norm2)) == \
        (knn.MultiheadAttention, knn.LayerNorm, knn.LayerNorm)
    assert list(layer.state_dict()) == list(_encoder(False).state_dict())
    assert knn.replace_modules(layer) == 0


@pytest.mark.parametrize("mode", ["train", "eval-no_grad"])
def test_swapped_encoder_stack_and_transformer_run_our_kernels(mode, device, monkeypatch):
    """torch.nn.TransformerEncoder in eval mode under no_grad with a padding mask turns its input into a
    nested tensor for the fast path; after replace_modules it does not, and nn.Transformer's decoder runs
    our modules too."""
    import copy
    torch.manual_seed(0)
    theirs = torch.nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1,
                                  dim_feedforward=32, dropout=0.0, batch_first=True).to(device)
    ours = copy.deepcopy(theirs)
    # per encoder layer: itself, self_attn, norm1, norm2; the encoder's norm; the decoder layer's self_attn,
    # multihead_attn, norm1-3; the decoder's norm
    assert knn.replace_modules(ours) == 2 * 4 + 1 + 5 + 1
    assert ours.encoder.use_nested_tensor is False
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randn(2, 6, 16, generator=g).to(device), torch.randn(2, 3, 16, generator=g).to(device)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2], device=device)
    kwargs = dict(src_key_padding_mask=pad, memory_key_padding_mask=pad)
    spy = _Spy(monkeypatch)
    want = _run(theirs, mode, src, tgt, **kwargs)
    assert spy.calls["_transformer_encoder_layer_fwd"] == (2 if mode == "eval-no_grad" else 0)
    spy.reset()
    got = _run(ours, mode, src, tgt, **kwargs)
    assert spy.calls["layer_norm"] == 2 * 2 + 1 + 3 + 1
    assert spy.calls["scaled_dot_product_attention"] == 2 + 2
    assert spy.calls["_transformer_encoder_layer_fwd"] == spy.calls["_native_multi_head_attention"] == 0
    assert_close(got, want.double(), atol=1e-5, rtol=1e-5)


def test_encoder_built_from_a_swapped_layer_refuses_nested_input(device):
    layer = knn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True, device=device)
    encoder = torch.nn.TransformerEncoder(layer, 2).to(device).eval()     # enable_nested_tensor=True
    x = torch.randn(2, 5, 16, device=device)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2], device=device)
    with torch.no_grad(), pytest.raises(ValueError, match="enable_nested_tensor=False"):
        encoder(x, src_key_padding_mask=pad)
    assert knn.replace_modules(encoder) == 0 and encoder.use_nested_tensor is False
    with torch.no_grad():
        assert encoder(x, src_key_padding_mask=pad).isfinite().all()


class _OwnEncoderLayer(torch.nn.TransformerEncoderLayer):
    """A user's subclass: replace_modules leaves the layer itself alone."""


def test_unswapped_layer_subclass_bypasses_our_kernels_in_inference(device, monkeypatch):
    """The documented limit: a subclass of TransformerEncoderLayer keeps torch's fast path, so in eval mode
    under no_grad its swapped submodules do not run (and in training they do)."""
    torch.manual_seed(0)
    layer = _OwnEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).to(device)
    assert knn.replace_modules(layer) == 3 and type(layer) is _OwnEncoderLayer
    x = torch.randn(2, 5, 16, device=device)
    spy = _Spy(monkeypatch)
    _run(layer, "eval-no_grad", x)
    assert spy.calls["layer_norm"] == 0 and spy.calls["_transformer_encoder_layer_fwd"] == 1
    spy.reset()
    _run(layer, "train", x)
    assert spy.calls["layer_norm"] == 2 and spy.calls["_transformer_encoder_layer_fwd"] == 0


@pytest.mark.gpu
def test_modules_on_cuda():
    ours = knn.LayerNorm(64, device="cuda", dtype=torch.bfloat16)
    theirs = torch.nn.LayerNorm(64, device="cuda", dtype=torch.bfloat16)
    assert ours.weight.device.type == "cuda"
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.layer_norm(x.double(), (64,))
    assert_close(ours(x), ref, theirs(x))
    model = _encoder(True).cuda()
    assert fused_kernels.nn.replace_modules(model) == 4
    assert model(torch.randn(2, 5, 16, device="cuda")).isfinite().all()

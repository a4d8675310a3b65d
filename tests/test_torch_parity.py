"""Drop-in down to the details (issue 17): every test makes the same call on torch (``torch.nn.functional`` /
``torch.nn``) and on ours, and checks the same result or the same exception type, on the Triton kernels
(the interpreter on a CPU) and on the PyTorch path (``op_backend``):

1. exception types: ours are also instances of torch's type (RuntimeError, NotImplementedError, IndexError,
   AssertionError for MultiheadAttention), with our messages;
2. ``attn_mask`` together with ``is_causal=True``: both apply, as on torch's CPU flash path;
3. ``torch.nn.attention.bias.CausalBias`` as ``attn_mask``: the two causal alignments, not materialized;
   unknown tensor subclasses refused;
4. gradients of a float ``attn_mask`` (and of softmax's float mask);
5. ``softmax(..., dtype=...)`` and torch's positional signature;
6. second derivatives (``gradgradcheck`` in float64) of every op;
7. MultiheadAttention's checks and its ``is_causal`` hint; ``replace_modules`` on ``nn.Transformer``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left
from torch.utils._python_dispatch import TorchDispatchMode

import fused_kernels
from fused_kernels._core import checks as _checks
from fused_kernels.nn import MultiheadAttention
from fused_kernels.ops.attention import grad as _grad

pytestmark = pytest.mark.usefixtures("op_backend")
F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"   # the ``device`` fixture's choice: the kernels run there


def _rand(*shape, dtype=F64, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEV)
    return t.requires_grad_() if grad else t


def _keep(*shape):
    return torch.ones(*shape, dtype=torch.bool, device=DEV)


def _error(call):
    try:
        call()
    except Exception as err:   # noqa: BLE001 - the point is to see which
        return err
    return None


def _same_error(torch_call, our_call, op: str | None = None):
    """torch's call raises; ours raises an instance of torch's exception type (with our message)."""
    want = _error(torch_call)
    assert want is not None, "torch accepted the call"
    got = _error(our_call)
    assert got is not None, f"ours accepted what torch refuses with {type(want).__name__}: {want}"
    assert isinstance(got, type(want)), f"torch raises {type(want).__name__} ({want}); ours {type(got).__mro__}: {got}"
    if op is not None:
        assert str(got).startswith(op), got
    return got


def _close(a, b, **kw):
    kw.setdefault("rtol", 1e-9)
    kw.setdefault("atol", 1e-10)
    torch.testing.assert_close(a, b, **kw)


def _grads(out, inputs, seed=99):
    g = _rand(*out.shape, dtype=out.dtype, seed=seed)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


# ----------------------------------------------------------------------------- 1. exception types


def test_exception_classes_are_both_types():
    assert issubclass(_checks.ArgumentValueError, ValueError) and issubclass(_checks.ArgumentValueError, RuntimeError)
    assert issubclass(_checks.ArgumentTypeError, TypeError) and issubclass(_checks.ArgumentTypeError, RuntimeError)
    assert issubclass(_checks.DtypeNotImplementedError, NotImplementedError)
    assert issubclass(_checks.DimIndexError, IndexError) and issubclass(_checks.DimIndexError, ValueError)
    assert issubclass(_checks.ShapeAssertionError, AssertionError)


def _sdpa_cases():
    q, k, v = _rand(2, 4, 8, 16, dtype=torch.float32), _rand(2, 4, 10, 16, dtype=torch.float32, seed=1), \
        _rand(2, 4, 10, 16, dtype=torch.float32, seed=2)
    kg, vg = k[:, :2], v[:, :2]
    bool_ = dict(dtype=torch.bool)
    return {
        "1-D": ((q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}),
        "key dtype": ((q, k.double(), v), {}),
        "value dtype": ((q, k, v.half()), {}),
        "int inputs": ((q.int(), k.int(), v.int()), {}),
        "query not a tensor": (("q", k, v), {}),
        "mask does not broadcast": ((q, k, v), dict(attn_mask=torch.ones(8, 9, **bool_, device=DEV))),
        "5-D mask": ((q, k, v), dict(attn_mask=torch.ones(1, 2, 3, 8, 10, device=DEV))),
        "int mask": ((q, k, v), dict(attn_mask=torch.ones(8, 10, dtype=torch.int32, device=DEV))),
        "heads differ": ((q, kg, vg), {}),
        "gqa heads do not divide": ((q[:, :3], kg, vg), dict(enable_gqa=True)),
        "dims differ and do not broadcast": ((q, kg[0], vg[0]), {}),
        "dropout_p 2": ((q, k, v), dict(dropout_p=2.0)),
        "head dims differ": ((q, k[..., :8], v), {}),
        "is_causal int": ((q, k, v), dict(is_causal=1)),
        "scale str": ((q, k, v), dict(scale="x")),
        "CausalBias and is_causal": ((q, k, v), dict(attn_mask=causal_lower_right(8, 10), is_causal=True)),
    }


@pytest.mark.parametrize("case", list(_sdpa_cases()))
def test_sdpa_raises_torchs_exception_type(case):
    args, kwargs = _sdpa_cases()[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _same_error(lambda: F.scaled_dot_product_attention(*args, **kwargs),
                    lambda: fused_kernels.scaled_dot_product_attention(*args, **kwargs), "scaled_dot_product_attention")


def test_causal_bias_with_is_causal_carries_torchs_message():
    q, k = _rand(1, 2, 4, 8), _rand(1, 2, 6, 8, seed=1)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        F.scaled_dot_product_attention(q, k, k, attn_mask=causal_upper_left(4, 6), is_causal=True)
    with pytest.raises(RuntimeError, match="CausalBias should not be used with causal=True"):
        fused_kernels.scaled_dot_product_attention(q, k, k, attn_mask=causal_upper_left(4, 6), is_causal=True)


def _softmax_cases():
    x = _rand(2, 3, 4, dtype=torch.float32)
    return {
        "input not a tensor": (lambda: torch.softmax([1.0, 2.0], -1), lambda: fused_kernels.softmax([1.0, 2.0])),
        "int input": (lambda: F.softmax(torch.ones(3, 4, dtype=torch.int64, device=DEV), -1),
                      lambda: fused_kernels.softmax(torch.ones(3, 4, dtype=torch.int64, device=DEV), -1)),
        "dim out of range": (lambda: F.softmax(x, 3), lambda: fused_kernels.softmax(x, 3)),
        "dim not an int": (lambda: F.softmax(x, 1.0), lambda: fused_kernels.softmax(x, 1.0)),
        "int dtype": (lambda: F.softmax(x, -1, dtype=torch.int64),
                      lambda: fused_kernels.softmax(x, -1, dtype=torch.int64)),
        "mask does not broadcast": (lambda: torch.softmax(x.masked_fill(~_keep(5), 0), -1),
                                    lambda: fused_kernels.softmax(x, mask=_keep(5))),
        "float mask does not broadcast": (lambda: torch.softmax(x + torch.zeros(3, 5, device=DEV), -1),
                                          lambda: fused_kernels.softmax(x, mask=torch.zeros(3, 5, device=DEV))),
    }


@pytest.mark.parametrize("case", list(_softmax_cases()))
def test_softmax_raises_torchs_exception_type(case):
    torch_call, our_call = _softmax_cases()[case]
    _same_error(torch_call, our_call, None if case == "input not a tensor" else "softmax")


def _norm_cases():
    x, w = _rand(4, 8, dtype=torch.float32), _rand(8, dtype=torch.float32, seed=1)
    return {
        "input not a tensor": ((F.layer_norm, fused_kernels.layer_norm), ([1.0, 2.0], (2,))),
        "int input": ((F.layer_norm, fused_kernels.layer_norm),
                      (torch.ones(4, 8, dtype=torch.int32, device=DEV), (8,))),
        "weight shape": ((F.layer_norm, fused_kernels.layer_norm), (x, (8,), _rand(7, dtype=torch.float32))),
        "bias shape": ((F.layer_norm, fused_kernels.layer_norm), (x, (8,), w, _rand(4, 8, dtype=torch.float32))),
        "int weight": ((F.layer_norm, fused_kernels.layer_norm),
                       (x, (8,), torch.ones(8, dtype=torch.int64, device=DEV))),
        "fp16 weight, fp32 input": ((F.layer_norm, fused_kernels.layer_norm), (x, (8,), w.half())),
        "fp64 bias, fp32 input": ((F.layer_norm, fused_kernels.layer_norm), (x, (8,), w, w.double())),
        "normalized_shape mismatch": ((F.layer_norm, fused_kernels.layer_norm), (x, (4,))),
        "normalized_shape too long": ((F.layer_norm, fused_kernels.layer_norm), (x, (2, 4, 8))),
        "normalized_shape empty": ((F.layer_norm, fused_kernels.layer_norm), (x, ())),
        "normalized_shape negative": ((F.layer_norm, fused_kernels.layer_norm), (x, (-8,))),
        "rms normalized_shape empty": ((F.rms_norm, fused_kernels.rms_norm), (x, ())),
        "rms weight shape": ((F.rms_norm, fused_kernels.rms_norm), (x, (8,), _rand(4, dtype=torch.float32))),
        "rms int input": ((F.rms_norm, fused_kernels.rms_norm), (x.long(), (8,))),
        "rms normalized_shape": ((F.rms_norm, fused_kernels.rms_norm), (x, (3,))),
    }


@pytest.mark.parametrize("case", list(_norm_cases()))
def test_norms_raise_torchs_exception_type(case):
    (theirs, ours), args = _norm_cases()[case]
    _same_error(lambda: theirs(*args), lambda: ours(*args), None if case == "input not a tensor" else ours.__name__)


def test_add_layer_norm_errors_are_runtime_errors_too():
    """No torch function to compare with: the errors torch's add + layer_norm would give for these inputs."""
    x = _rand(4, 8, dtype=torch.float32)
    _same_error(lambda: F.layer_norm(x + _rand(4, 7, dtype=torch.float32), (8,)),
                lambda: fused_kernels.add_layer_norm(x, _rand(4, 7, dtype=torch.float32)), "add_layer_norm")
    _same_error(lambda: F.layer_norm(x.int(), (8,)), lambda: fused_kernels.add_layer_norm(x.int(), None),
                "add_layer_norm")
    _same_error(lambda: F.layer_norm(x, (8,), _rand(4, dtype=torch.float32)),
                lambda: fused_kernels.add_layer_norm(x, x, _rand(4, dtype=torch.float32)), "add_layer_norm")


def test_sdpa_broadcasts_leading_dims_as_torch():
    """Leading dims broadcast between query, key and value, also of different numbers of dims."""
    q, k, v = _rand(2, 4, 8, 16), _rand(4, 10, 16, seed=1), _rand(1, 4, 10, 16, seed=2)
    for args in ((q, k, v), (q[0], k[None], v), (q, k, v[0]), (q[:, :1], k[None].expand(3, 1, 4, 10, 16), v)):
        _close(fused_kernels.scaled_dot_product_attention(*args), F.scaled_dot_product_attention(*args))
    _close(fused_kernels.scaled_dot_product_attention(q, k[:2], v[:, :2], enable_gqa=True),
           F.scaled_dot_product_attention(q, k[:2], v[:, :2], enable_gqa=True))


def test_attention_errors_are_runtime_errors_too():
    """``fused_kernels.attention`` has no torch twin: its shape errors are the RuntimeErrors torch's SDPA raises."""
    q, k = _rand(2, 4, 8, 16), _rand(2, 2, 10, 16, seed=1)
    for call in (lambda: fused_kernels.attention(q[0], k[0], k[0]), lambda: fused_kernels.attention(q, k, k[:, :, :9]),
                 lambda: fused_kernels.attention(q[:, :3], k, k), lambda: fused_kernels.attention(q, k.float(), k),
                 lambda: fused_kernels.attention(q, k, k, attn_mask=torch.ones(8, 9, dtype=torch.bool, device=DEV))):
        assert isinstance(_error(call), RuntimeError)


# ----------------------------------------------------------------------------- 2. attn_mask with is_causal


@pytest.mark.parametrize("mask_kind", ["bool", "float", "padding"])
def test_mask_and_is_causal_both_apply_as_torch_cpu(mask_kind):
    """torch's CPU flash path (4-D) applies the mask and the top-left causal mask; ours does too, everywhere."""
    q, k, v = _rand(2, 3, 6, 8, grad=True), _rand(2, 3, 9, 8, seed=1, grad=True), _rand(2, 3, 9, 8, seed=2, grad=True)
    if mask_kind == "bool":
        mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(3)).to(DEV) > 0.3
        mask[:, 0] = True
    elif mask_kind == "float":
        mask = _rand(6, 9, seed=3)
    else:
        mask = torch.arange(9, device=DEV) < torch.tensor([9, 5], device=DEV)[:, None, None, None]
    tq, tk, tv = (t.detach().cpu().requires_grad_() for t in (q, k, v))   # torch's CPU behaviour
    want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask.cpu(), is_causal=True)
    got = fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    _close(got.cpu(), want)
    for a, b in zip(_grads(got, (q, k, v)), _grads(want, (tq, tk, tv))):
        _close(a.cpu(), b)


def test_mask_and_is_causal_where_torchs_math_path_refuses():
    """3-D inputs and Ev != E take torch's math path, which refuses the pair; ours applies both (a documented
    difference): the same as torch with the combined mask."""
    q, k, v = _rand(3, 5, 8), _rand(3, 7, 8, seed=1), _rand(3, 7, 6, seed=2)
    mask = _rand(5, 7, seed=3)
    with pytest.raises(RuntimeError, match="Explicit attn_mask should not be set when is_causal=True"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    combined = mask.masked_fill(~torch.ones(5, 7, dtype=torch.bool, device=DEV).tril(), float("-inf"))
    _close(fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True),
           F.scaled_dot_product_attention(q, k, v, attn_mask=combined))


# ----------------------------------------------------------------------------- 3. CausalBias


class _AttentionOps(TorchDispatchMode):
    """The masks and causal flags our custom op and torch's CPU flash kernel are called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith("fused_kernels.attention_fwd"):
            self.calls.append(("kernel", args[3], args[6], args[7]))
        elif func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.calls.append(("flash", kwargs.get("attn_mask"), args[4] if len(args) > 4 else False, None))
        return func(*args, **kwargs)


@pytest.mark.parametrize("variant", [causal_upper_left, causal_lower_right])
@pytest.mark.parametrize("ls", [(5, 9), (9, 5), (6, 6), (1, 7)])
@pytest.mark.parametrize("gqa", [False, True])
def test_causal_bias_matches_torch(variant, ls, gqa, op_backend):
    l, s = ls
    hk = 1 if gqa else 2
    q = _rand(2, 2, l, 8, grad=True)
    k, v = _rand(2, hk, s, 8, seed=1, grad=True), _rand(2, hk, s, 8, seed=2, grad=True)
    tq, tk, tv = (t.detach().cpu().requires_grad_() for t in (q, k, v))   # torch's CPU behaviour
    with warnings.catch_warnings():   # torch warns that lower-right with L > S gives NaN (both give 0 here)
        warnings.simplefilter("ignore")
        bias = variant(l, s)
        want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias, enable_gqa=gqa)
    with _AttentionOps() as ops:
        got = fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
    _close(got.cpu(), want)
    for a, b in zip(_grads(got, (q, k, v)), _grads(want, (tq, tk, tv))):
        _close(a.cpu(), b)
    lower = variant is causal_lower_right and l != s
    if op_backend == "triton":   # never materialized: the kernel's causal flag with the alignment's offset
        assert ops.calls == [("kernel", None, True, s - l if lower else 0)], ops.calls
    elif DEV == "cpu" and not (lower and s > l):   # torch's CPU flash with is_causal (L < S bottom-right: a mask)
        assert [c[:3] for c in ops.calls] == [("flash", None, True)], ops.calls


def test_causal_bias_of_other_sizes_and_in_attention_are_refused():
    q, k = _rand(1, 2, 4, 8), _rand(1, 2, 6, 8, seed=1)
    with pytest.raises(RuntimeError, match="CausalBias for 5 queries"):
        fused_kernels.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(5, 6))
    with pytest.raises(TypeError, match="CausalBias; pass causal=True"):
        fused_kernels.attention(q, k, k, attn_mask=causal_lower_right(4, 6))


class _Relabelled(torch.Tensor):
    """A tensor subclass that redefines torch functions (as CausalBias does): its storage means nothing to us."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_unknown_tensor_subclass_is_refused_not_read():
    q, k = _rand(1, 2, 4, 8), _rand(1, 2, 6, 8, seed=1)
    mask = torch.zeros(4, 6, dtype=F64, device=DEV).as_subclass(_Relabelled)
    for call in (lambda: fused_kernels.scaled_dot_product_attention(q, k, k, attn_mask=mask),
                 lambda: fused_kernels.attention(q, k, k, attn_mask=mask),
                 lambda: fused_kernels.softmax(q, mask=mask[0, :4].reshape(4, 1).expand(4, 8))):
        with pytest.raises(TypeError, match="_Relabelled"):
            call()
    # nn.Parameter and plain subclasses that leave torch functions alone are tensors like any other
    param = torch.nn.Parameter(_rand(4, 6, seed=2))
    _close(fused_kernels.scaled_dot_product_attention(q, k, k, attn_mask=param),
           F.scaled_dot_product_attention(q, k, k, attn_mask=param))


# ----------------------------------------------------------------------------- 4. mask gradients


@pytest.mark.parametrize("shape", [(5, 7), (2, 1, 1, 7), (1, 3, 5, 7), (2, 3, 5, 7), (3, 1, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_mask_gradient_matches_torch(shape, causal):
    q, k, v = _rand(2, 3, 5, 8, grad=True), _rand(2, 3, 7, 8, seed=1, grad=True), _rand(2, 3, 7, 8, seed=2, grad=True)
    mask = _rand(*shape, seed=3, grad=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if not causal else
                                          mask.masked_fill(~_keep(5, 7).tril(), float("-inf")))
    got = fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    _close(got, want)
    g_got, g_want = _grads(got, (q, k, v, mask)), _grads(want, (q, k, v, mask))
    for name, a, b in zip("qkvm", g_got, g_want):
        _close(a, b, msg=name)


def test_mask_gradcheck_through_every_feature():
    q = _rand(2, 4, 5, 8, grad=True)
    k, v = _rand(2, 2, 7, 8, seed=1, grad=True), _rand(2, 2, 7, 6, seed=2, grad=True)
    mask = _rand(1, 4, 5, 7, seed=3, grad=True)
    seqlens = torch.tensor([7, 5], device=DEV)   # every query sees a key: no -inf lse
    fn = lambda a, b, c, m: fused_kernels.attention(a, b, c, attn_mask=m, causal=True, seqlens_k=seqlens,
                                                    return_lse=True)
    assert torch.autograd.gradcheck(fn, (q, k, v, mask), fast_mode=True)
    fn = lambda m: fused_kernels.scaled_dot_product_attention(q[0], k[0].repeat(2, 1, 1), v[0].repeat(2, 1, 1),
                                                              attn_mask=m)
    assert torch.autograd.gradcheck(fn, (_rand(4, 1, 7, seed=4, grad=True),), fast_mode=True)


@pytest.mark.parametrize("blocks", [1, 2])
def test_mask_gradient_under_vmap(blocks, monkeypatch):
    """gradcheck's batched gradients run the backward under vmap (as PyTorch's own nn.Transformer tests do with
    a learned float mask): the mask gradient is built without in-place writes or whole-dim views, in one block
    of queries and in several."""
    monkeypatch.setattr(_grad, "MASK_GRAD_BLOCK", 2 * 2 * 7 * (5 if blocks == 1 else 2))
    q, k, v = _rand(2, 2, 5, 8, grad=True), _rand(2, 1, 7, 8, seed=1, grad=True), _rand(2, 1, 7, 8, seed=2, grad=True)
    for mask in (_rand(1, 2, 5, 7, seed=3, grad=True), _rand(5, 7, seed=4, grad=True), _rand(2, 1, 1, 7, seed=5,
                                                                                                grad=True)):
        fn = lambda a, b, c, m: fused_kernels.attention(a, b, c, attn_mask=m, causal=True)   # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, mask), fast_mode=True, check_batched_grad=True)
    fn = lambda m: fused_kernels.scaled_dot_product_attention(q[0], k[0].expand(2, 7, 8), v[0].expand(2, 7, 8),
                                                              attn_mask=m)   # noqa: E731
    assert torch.autograd.gradcheck(fn, (_rand(2, 1, 7, seed=6, grad=True),), fast_mode=True, check_batched_grad=True)


def test_mask_gradient_is_chunked_and_deterministic(monkeypatch):
    q, k, v = _rand(1, 2, 9, 8), _rand(1, 2, 11, 8, seed=1), _rand(1, 2, 11, 8, seed=2)
    mask = _rand(9, 11, seed=3, grad=True)
    whole = _grads(fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask), (mask,))[0]
    monkeypatch.setattr(_grad, "MASK_GRAD_BLOCK", 2 * 11 * 2)       # two query rows per block
    blocks = _grads(fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask), (mask,))[0]
    again = _grads(fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask), (mask,))[0]
    _close(blocks, whole, rtol=1e-12, atol=1e-13)
    assert torch.equal(blocks, again)


def test_mask_gradient_with_dropout_matches_torch_with_the_same_seed():
    """With dropout the kernels' mask lives inside them: the call runs the PyTorch path (torch's SDPA draws the
    dropout mask from the same generator), on either backend."""
    q, k, v = _rand(2, 2, 5, 8, grad=True), _rand(2, 2, 7, 8, seed=1, grad=True), _rand(2, 2, 7, 8, seed=2, grad=True)
    mask = _rand(5, 7, seed=3, grad=True)
    torch.manual_seed(5)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
    g_want = _grads(want, (q, mask))
    torch.manual_seed(5)
    got = fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
    g_got = _grads(got, (q, mask))
    _close(got, want)
    for a, b in zip(g_got, g_want):
        _close(a, b)


def test_softmax_float_mask_gradient():
    x, mask = _rand(2, 3, 5, grad=True), _rand(3, 1, seed=1, grad=True)
    want = torch.softmax(0.5 * x + mask, -1)
    got = fused_kernels.softmax(x, -1, mask=mask, scale=0.5)
    _close(got, want)
    for a, b in zip(_grads(got, (x, mask)), _grads(want, (x, mask))):
        _close(a, b)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_learned_float_mask_gets_torchs_gradient(need_weights):
    ref, ours = _mha_pair(embed_dim=16, num_heads=4)
    x = _rand(5, 2, 16, grad=True)
    mask = _rand(5, 5, seed=1, grad=True)
    want, _ = ref(x, x, x, attn_mask=mask, need_weights=need_weights)
    got, _ = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
    _close(got, want)
    for a, b in zip(_grads(got, (x, mask)), _grads(want, (x, mask))):
        _close(a, b)


# ----------------------------------------------------------------------------- 5. softmax's dtype and signature


def test_softmax_dtype_and_torchs_positional_signature():
    x = _rand(2, 3, 4, dtype=torch.float32, grad=True)
    for call_ours, call_torch in (
            (lambda: fused_kernels.softmax(x, -1, dtype=F64), lambda: F.softmax(x, -1, dtype=F64)),
            (lambda: fused_kernels.softmax(x, 1, 3, F64), lambda: F.softmax(x, 1, 3, F64)),    # F-style positional
            (lambda: fused_kernels.softmax(x, 1, F64), lambda: torch.softmax(x, 1, F64)),      # torch.softmax-style
            (lambda: fused_kernels.softmax(x, 0, dtype=torch.float16), lambda: F.softmax(x, 0, dtype=torch.float16))):
        got, want = call_ours(), call_torch()
        assert got.dtype == want.dtype
        _close(got, want, rtol=1e-3 if got.dtype == torch.float16 else 1e-6, atol=1e-3 if got.dtype == torch.float16
               else 1e-7)
        ga, gb = _grads(got, (x,))[0], _grads(want, (x,))[0]
        assert ga.dtype == gb.dtype == torch.float32
        _close(ga, gb, rtol=1e-2 if got.dtype == torch.float16 else 1e-6, atol=1e-3 if got.dtype == torch.float16
               else 1e-7)
    ints = torch.arange(12, device=DEV).reshape(3, 4)
    _close(fused_kernels.softmax(ints, -1, dtype=torch.float32), F.softmax(ints, -1, dtype=torch.float32), rtol=1e-6,
           atol=1e-7)


def test_softmax_extra_arguments_are_keyword_only():
    x = _rand(2, 3)
    with pytest.raises(TypeError, match="keyword-only"):
        fused_kernels.softmax(x, -1, torch.ones(3, dtype=torch.bool, device=DEV))
    with pytest.raises(TypeError):
        fused_kernels.softmax(x, -1, 3, None, torch.ones(3, dtype=torch.bool, device=DEV))


def test_softmax_dim_none_is_torchs_legacy_choice():
    for shape in ((4,), (2, 3), (2, 3, 4), (2, 3, 4, 5)):
        x = _rand(*shape)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            want = F.softmax(x, None)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            got = fused_kernels.softmax(x, None)
        _close(got, want)
        _close(fused_kernels.nn.Softmax()(x), torch.nn.Softmax()(x))


# ----------------------------------------------------------------------------- 6. second derivatives


def _gradgrad(fn, inputs):
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_layer_norm-dropout", "no-affine"])
def test_norm_second_derivatives(op):
    x, r = _rand(3, 8, grad=True), _rand(3, 8, seed=1, grad=True)
    w, b = _rand(8, seed=2, grad=True), _rand(8, seed=3, grad=True)
    if op == "layer_norm":
        _gradgrad(lambda a, ww, bb: fused_kernels.layer_norm(a, (8,), ww, bb), (x, w, b))
        theirs = lambda a, ww, bb: F.layer_norm(a, (8,), ww, bb)
        args = (x, w, b)
        ours = lambda a, ww, bb: fused_kernels.layer_norm(a, (8,), ww, bb)
    elif op == "rms_norm":
        _gradgrad(lambda a, ww: fused_kernels.rms_norm(a, (2, 4), ww),
                  (_rand(3, 2, 4, grad=True), _rand(2, 4, grad=True)))
        ours, theirs, args = (lambda a, ww: fused_kernels.rms_norm(a, (8,), ww, eps=1e-6),
                              lambda a, ww: F.rms_norm(a, (8,), ww, eps=1e-6), (x, w))
    elif op == "add_layer_norm":
        _gradgrad(lambda a, rr, ww, bb: fused_kernels.add_layer_norm(a, rr, ww, bb), (x, r, w, b))
        ours = lambda a, rr, ww, bb: fused_kernels.add_layer_norm(a, rr, ww, bb)[0]
        theirs = lambda a, rr, ww, bb: F.layer_norm(a + rr, (8,), ww, bb)
        args = (x, r, w, b)
    elif op == "add_layer_norm-dropout":
        def drop(a, rr, ww, bb):
            torch.manual_seed(1)         # the same dropout mask every call
            return fused_kernels.add_layer_norm(a, rr, ww, bb, dropout_p=0.3)
        _gradgrad(drop, (x, r, w, b))
        return
    else:
        _gradgrad(lambda a, rr: fused_kernels.add_layer_norm(a, rr), (x, r))
        ours, theirs, args = (lambda a: fused_kernels.layer_norm(a, (8,)), lambda a: F.layer_norm(a, (8,)), (x,))
    # the second derivative itself equals torch's (a gradient penalty)
    def penalty(fn):
        out = fn(*args)
        g = torch.autograd.grad((out * _rand(*out.shape, seed=7)).sum(), args, create_graph=True)
        return torch.autograd.grad(sum((t ** 2).sum() for t in g), args, allow_unused=True)
    for a, b in zip(penalty(ours), penalty(theirs)):   # the bias has none (its gradient is constant)
        if b is None:
            assert a is None or not a.any()
        else:
            _close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("case", ["plain", "mask-scale", "causal", "float-mask-dim0"])
def test_softmax_second_derivatives(case):
    x = _rand(2, 3, 5, grad=True)
    if case == "plain":
        ours, theirs, args = (lambda a: fused_kernels.softmax(a, -1), lambda a: F.softmax(a, -1), (x,))
    elif case == "mask-scale":
        keep = torch.tensor([True, False, True, True, True], device=DEV)
        ours = lambda a: fused_kernels.softmax(a, -1, mask=keep, scale=0.5)
        theirs = lambda a: F.softmax((0.5 * a).masked_fill(~keep, float("-inf")), -1)
        args = (x,)
    elif case == "causal":
        x = _rand(2, 5, 5, grad=True)
        ours = lambda a: fused_kernels.softmax(a, is_causal=True)
        theirs = lambda a: F.softmax(a.masked_fill(~_keep(5, 5).tril(), float("-inf")), -1)
        args = (x,)
    else:
        m = _rand(1, 3, 5, seed=1, grad=True)
        ours, theirs, args = (lambda a, mm: fused_kernels.softmax(a, 0, mask=mm),
                              lambda a, mm: F.softmax(a + mm, 0), (x, m))
    _gradgrad(ours, args)
    out_o, out_t = ours(*args), theirs(*args)
    go = torch.autograd.grad(out_o, args, _rand(*out_o.shape, seed=5), create_graph=True)
    gt = torch.autograd.grad(out_t, args, _rand(*out_t.shape, seed=5), create_graph=True)
    for a, b in zip(torch.autograd.grad(sum((g ** 2).sum() for g in go), args),
                    torch.autograd.grad(sum((g ** 2).sum() for g in gt), args)):
        _close(a, b)


@pytest.mark.parametrize("case", ["attention-self", "attention-gqa-causal", "attention-bool-mask",
                                  "attention-causal-lse", "attention-gqa-seqlens-mask", "sdpa-mask-causal",
                                  "sdpa-fixed-mask-causal", "sdpa-3d", "sdpa-causal-bias", "sdpa-ev"])
def test_attention_second_derivatives(case):
    """Every route: on the PyTorch path torch's own flash node (with our hook), ``_Flash``, torch's math path."""
    q = _rand(1, 2, 5, 8, grad=True)
    k, v = _rand(1, 2, 7, 8, seed=1, grad=True), _rand(1, 2, 7, 8, seed=2, grad=True)
    if case == "attention-self":
        x, y, z = (_rand(1, 2, 6, 8, seed=i, grad=True) for i in range(3))
        _gradgrad(lambda a, b, c: fused_kernels.attention(a, b, c, causal=True), (x, y, z))
    elif case == "attention-gqa-causal":
        _gradgrad(lambda a, b, c: fused_kernels.attention(a, b, c, causal=True), (q, k[:, :1], v[:, :1]))
    elif case == "attention-bool-mask":
        x, y, z = (_rand(2, 2, 6, 8, seed=i, grad=True) for i in range(3))
        keep = torch.arange(6, device=DEV) < torch.tensor([6, 4], device=DEV)[:, None, None, None]
        _gradgrad(lambda a, b, c: fused_kernels.attention(a, b, c, attn_mask=keep.expand(2, 2, 6, 6).contiguous()),
                  (x, y, z))
    elif case == "sdpa-fixed-mask-causal":
        mask = _rand(5, 7, seed=3)
        _gradgrad(lambda a, b, c: fused_kernels.scaled_dot_product_attention(a, b, c, attn_mask=mask, is_causal=True),
                  (q, k, v))
    elif case == "attention-causal-lse":
        _gradgrad(lambda a, b, c: fused_kernels.attention(a, b, c, causal=True, return_lse=True), (q, k, v))
    elif case == "attention-gqa-seqlens-mask":
        mask = _rand(5, 7, seed=3, grad=True)
        _gradgrad(lambda a, b, c, m: fused_kernels.attention(a, b, c, attn_mask=m,
                                                             seqlens_k=torch.tensor([6], device=DEV)),
                  (q, k[:, :1], v[:, :1], mask))
    elif case == "sdpa-mask-causal":
        mask = _rand(1, 2, 5, 7, seed=3, grad=True)
        _gradgrad(lambda a, b, c, m: fused_kernels.scaled_dot_product_attention(a, b, c, attn_mask=m, is_causal=True),
                  (q, k, v, mask))
    elif case == "sdpa-3d":
        # torch's math path (3-D inputs, Ev != E) has second derivatives: ours agree with them
        q3, k3, v3 = q[0].detach().requires_grad_(), k[0].detach().requires_grad_(), v[0, :, :, :6].detach()
        v3.requires_grad_()
        _gradgrad(lambda a, b, c: fused_kernels.scaled_dot_product_attention(a, b, c, is_causal=True), (q3, k3, v3))
        go = torch.autograd.grad(fused_kernels.scaled_dot_product_attention(q3, k3, v3, is_causal=True).pow(2).sum(),
                                 (q3, k3, v3), create_graph=True)
        gt = torch.autograd.grad(F.scaled_dot_product_attention(q3, k3, v3, is_causal=True).pow(2).sum(),
                                 (q3, k3, v3), create_graph=True)
        for a, b in zip(torch.autograd.grad(sum((g ** 2).sum() for g in go), (q3, k3, v3)),
                        torch.autograd.grad(sum((g ** 2).sum() for g in gt), (q3, k3, v3))):
            _close(a, b)
    elif case == "sdpa-causal-bias":
        _gradgrad(lambda a, b, c: fused_kernels.scaled_dot_product_attention(a, b, c,
                                                                             attn_mask=causal_lower_right(5, 7)),
                  (q, k, v))
    else:
        _gradgrad(lambda a, b, c: fused_kernels.scaled_dot_product_attention(a, b, c[..., :6]), (q, k, v))


def test_attention_double_backward_with_dropout_names_the_op():
    q = _rand(1, 2, 5, 8, grad=True)
    out = fused_kernels.attention(q, q, q, dropout_p=0.2)
    if fused_kernels.get_backend() == "torch":   # torch's math path: second derivatives with dropout exist
        torch.autograd.grad(out.sum(), q, create_graph=True)
        return
    with pytest.raises(NotImplementedError, match="attention: double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_mha_second_derivatives():
    _, ours = _mha_pair(embed_dim=8, num_heads=2)
    x = _rand(3, 1, 8, grad=True)
    _gradgrad(lambda a: ours(a, a, a, need_weights=False)[0], (x,))


# ----------------------------------------------------------------------------- 7. MultiheadAttention


def _mha_pair(**kwargs):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(**kwargs, dtype=F64)
    ours = MultiheadAttention(**kwargs, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    return ref.to(DEV).eval(), ours.to(DEV).eval()


def _mha_bad_cases():
    L, N, E, S = 5, 2, 16, 7
    q, k = _rand(L, N, E), _rand(S, N, E, seed=1)
    b = dict(dtype=torch.bool)
    return {
        "key and value differ": dict(args=(q, k, _rand(6, N, E))),
        "wrong embed dim": dict(args=(_rand(L, N, 8), _rand(S, N, 8), _rand(S, N, 8))),
        "wrong key dim": dict(args=(q, _rand(S, N, 8), _rand(S, N, 8))),
        "4-D query": dict(args=(q[None], k[None], k[None])),
        "1-D query": dict(args=(q[0, 0], k[0, 0], k[0, 0])),
        "2-D key with 3-D query": dict(args=(q, k[:, 0], k[:, 0])),
        "3-D key_padding_mask": dict(args=(q, k, k), key_padding_mask=torch.zeros(N, S, 1, **b, device=DEV)),
        "4-D attn_mask": dict(args=(q, k, k), attn_mask=torch.zeros(1, 1, L, S, **b, device=DEV)),
        "2-D attn_mask shape": dict(args=(q, k, k), attn_mask=torch.zeros(L, 6, **b, device=DEV)),
        "3-D attn_mask shape": dict(args=(q, k, k), attn_mask=torch.zeros(N, L, S, **b, device=DEV)),
        "key_padding_mask length": dict(args=(q, k, k), key_padding_mask=torch.zeros(N, 6, **b, device=DEV)),
        "key_padding_mask batch": dict(args=(q, k, k), key_padding_mask=torch.zeros(3, S, **b, device=DEV)),
        "int attn_mask": dict(args=(q, k, k), attn_mask=torch.zeros(L, S, dtype=torch.int32, device=DEV)),
        "int key_padding_mask": dict(args=(q, k, k), key_padding_mask=torch.zeros(N, S, dtype=torch.int32, device=DEV)),
        "is_causal without a mask": dict(args=(q, k, k), is_causal=True),
        "is_causal, mask needed for the weights": dict(args=(q, q, q), is_causal=True,
                                                       attn_mask=torch.zeros(3, 3, **b, device=DEV)),
        "unbatched 3-D attn_mask": dict(args=(q[:, 0], k[:, 0], k[:, 0]),
                                        attn_mask=torch.zeros(3, L, S, **b, device=DEV)),
        "kdim: key and value lengths differ": dict(args=(q, _rand(S, N, 8), _rand(6, N, 12)), kdim=8, vdim=12),
        "kdim: wrong key dim": dict(args=(q, _rand(S, N, 9), _rand(S, N, 12)), kdim=8, vdim=12),
    }


@pytest.mark.parametrize("case", list(_mha_bad_cases()))
def test_mha_makes_torchs_checks_first(case, monkeypatch):
    kw = dict(_mha_bad_cases()[case])
    args = kw.pop("args")
    module = {k: kw.pop(k) for k in ("kdim", "vdim") if k in kw}
    ref, ours = _mha_pair(embed_dim=16, num_heads=4, **module)
    want = _error(lambda: ref(*args, **kw))
    assert want is not None, "torch accepted the call"
    calls = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or real_linear(*a, **k))
    got = _error(lambda: ours(*args, **kw))
    monkeypatch.undo()
    assert isinstance(got, type(want)), f"torch raises {type(want).__name__} ({want}); ours {type(got).__mro__}: {got}"
    assert str(got).startswith("MultiheadAttention"), got
    assert not calls, f"our check came after a projection: {got}"


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_is_causal_is_a_hint_as_in_torch(batch_first):
    """With is_causal=True, no key padding mask and no weights torch ignores attn_mask (even of a wrong shape)
    and applies the top-left causal mask; with either it uses the mask."""
    ref, ours = _mha_pair(embed_dim=16, num_heads=4, batch_first=batch_first)
    x = _rand(2, 6, 16, grad=True) if batch_first else _rand(6, 2, 16, grad=True)
    wrong = torch.zeros(3, 3, dtype=torch.bool, device=DEV)
    want, _ = ref(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)
    got, _ = ours(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)
    _close(got, want)
    causal = torch.ones(6, 6, dtype=torch.bool, device=DEV).triu(1)
    kpm = torch.zeros(2, 6, dtype=torch.bool, device=DEV)
    kpm[1, 4:] = True
    for kw in (dict(need_weights=True), dict(key_padding_mask=kpm, need_weights=False)):
        want, w_want = ref(x, x, x, attn_mask=causal, is_causal=True, **kw)
        got, w_got = ours(x, x, x, attn_mask=causal, is_causal=True, **kw)
        _close(got, want)
        if w_want is not None:
            _close(w_got, w_want)


def _transformers():
    torch.manual_seed(0)
    kw = dict(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
              dtype=F64)
    return [torch.nn.Transformer(**kw, batch_first=True).to(DEV), torch.nn.Transformer(**kw, norm_first=True).to(DEV)]


@pytest.mark.parametrize("index", [0, 1])
def test_replace_modules_on_nn_transformer_gives_torchs_results(index):
    ref = _transformers()[index]
    ours = _transformers()[index]
    assert fused_kernels.nn.replace_modules(ours) > 0
    bf = ref.batch_first
    src = _rand(2, 7, 16, seed=1) if bf else _rand(7, 2, 16, seed=1)
    tgt = _rand(2, 5, 16, seed=2) if bf else _rand(5, 2, 16, seed=2)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(5, device=DEV, dtype=F64)
    src_kpm = torch.zeros(2, 7, dtype=torch.bool, device=DEV)
    src_kpm[1, 5:] = True
    learned = torch.nn.Parameter(_rand(7, 7, seed=3))
    for kw in (dict(tgt_mask=tgt_mask, tgt_is_causal=True), dict(tgt_mask=tgt_mask, src_key_padding_mask=src_kpm),
               dict(src_mask=learned, tgt_mask=tgt_mask)):
        for model in (ref, ours):
            model.train()   # no fast paths: the modules' own forward, with dropout 0
        want, got = ref(src, tgt, **kw), ours(src, tgt, **kw)
        _close(got, want)
        params_r = list(ref.parameters()) + ([learned] if "src_mask" in kw else [])
        params_o = list(ours.parameters()) + ([learned] if "src_mask" in kw else [])
        for a, b in zip(_grads(got, params_o), _grads(want, params_r)):
            _close(a, b, rtol=1e-8, atol=1e-9)
        # In eval mode under no_grad torch's layers take their fused inference path (nested tensors drop the
        # padded positions, a float src_mask gives NaN); the swapped layers compute what torch's layers
        # compute in training, in every mode (fused_kernels.nn.TransformerEncoderLayer).
        ours.eval()
        with torch.no_grad():
            _close(ours(src, tgt, **kw), want.detach())


# ----------------------------------------------------------------------------- the deliberate difference


def test_fully_masked_rows_give_zero_where_torch_may_give_nan():
    q, k = _rand(1, 2, 4, 8, grad=True), _rand(1, 2, 6, 8, seed=1, grad=True)
    keep = torch.ones(4, 6, dtype=torch.bool, device=DEV)
    keep[2] = False
    out = fused_kernels.scaled_dot_product_attention(q, k, k, attn_mask=keep)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(gq[:, :, 2], torch.zeros_like(gq[:, :, 2]))
    dead = torch.full((2, 3), float("-inf"), dtype=F64, device=DEV)
    y = fused_kernels.softmax(dead)
    assert torch.equal(y, torch.zeros_like(y)) and torch.isnan(torch.softmax(dead, -1)).all()

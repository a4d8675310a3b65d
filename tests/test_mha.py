"""fused_kernels.nn.MultiheadAttention against torch.nn.MultiheadAttention loaded with the same state dict,
and replace_modules on torch's Transformer layers."""

import pytest
import torch

import fused_kernels
from fused_kernels.nn import MultiheadAttention

pytestmark = pytest.mark.usefixtures("op_backend")   # each test on the kernels and on the PyTorch path


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(**kwargs, dtype=torch.float64)
    ours = MultiheadAttention(**kwargs, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def _inputs(batch_first, n=2, l=5, s=7, e=16, kdim=None, vdim=None, self_attn=False):
    shape = lambda t, d: (n, t, d) if batch_first else (t, n, d)
    q = torch.randn(shape(l, e), dtype=torch.float64, requires_grad=True)
    if self_attn:
        return q, q, q
    k = torch.randn(shape(s, kdim or e), dtype=torch.float64, requires_grad=True)
    v = k if vdim is None and kdim is None else torch.randn(shape(s, vdim or e), dtype=torch.float64,
                                                           requires_grad=True)
    return q, k, v


def _check(ref, ours, args, kwargs, grads=True):
    out_r, w_r = ref(*args, **kwargs)
    out_o, w_o = ours(*args, **kwargs)
    torch.testing.assert_close(out_o, out_r, rtol=1e-9, atol=1e-10)
    if w_r is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_r, rtol=1e-9, atol=1e-10)
    if grads:
        leaves = [t for t in {id(a): a for a in args}.values() if t.requires_grad] + list(ours.parameters())
        g = torch.randn_like(out_r)
        got = torch.autograd.grad(out_o, leaves, g, allow_unused=True)
        ref_leaves = [t for t in {id(a): a for a in args}.values() if t.requires_grad] + list(ref.parameters())
        want = torch.autograd.grad(out_r, ref_leaves, g, allow_unused=True)
        for a, b in zip(got, want):
            if b is None:
                assert a is None or a.abs().max() == 0
            else:
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_state_dict_keys_match_torch():
    for kw in (dict(embed_dim=16, num_heads=4), dict(embed_dim=16, num_heads=2, kdim=8, vdim=12, bias=False),
               dict(embed_dim=16, num_heads=4, add_bias_kv=True)):
        ref, ours = _pair(**kw)
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert isinstance(ours, torch.nn.MultiheadAttention)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_self_attention_matches_torch(batch_first, need_weights, average):
    ref, ours = _pair(embed_dim=16, num_heads=4, batch_first=batch_first)
    args = _inputs(batch_first, self_attn=True)
    _check(ref, ours, args, dict(need_weights=need_weights, average_attn_weights=average))


@pytest.mark.parametrize("need_weights", [False, True])
def test_cross_attention_kdim_vdim_and_bias_kv(need_weights):
    ref, ours = _pair(embed_dim=16, num_heads=2, kdim=8, vdim=12, add_bias_kv=True, add_zero_attn=True,
                      batch_first=True)
    args = _inputs(True, kdim=8, vdim=12)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 4:] = True
    _check(ref, ours, args, dict(need_weights=need_weights, key_padding_mask=kpm))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "3d", "both_bool", "mixed"])
def test_masks_match_torch(need_weights, mask_kind):
    ref, ours = _pair(embed_dim=16, num_heads=4)
    q, k, v = _inputs(False)
    l, s = 5, 7
    causal = torch.ones(l, s, dtype=torch.bool).triu(1)       # True = masked, torch's convention
    kpm = torch.zeros(2, s, dtype=torch.bool)
    kpm[1, 5:] = True
    kwargs = dict(need_weights=need_weights)
    if mask_kind == "bool":
        kwargs.update(attn_mask=causal)
    elif mask_kind == "float":
        kwargs.update(attn_mask=torch.randn(l, s, dtype=torch.float64))
    elif mask_kind == "3d":
        kwargs.update(attn_mask=torch.rand(2 * 4, l, s) > 0.8)
        kwargs["attn_mask"][:, :, 0] = False                 # no fully masked rows (torch gives NaN there)
    elif mask_kind == "both_bool":
        kwargs.update(attn_mask=causal, key_padding_mask=kpm)
    else:
        kwargs.update(attn_mask=torch.randn(l, s, dtype=torch.float64), key_padding_mask=kpm)
    _check(ref, ours, (q, k, v), kwargs)


def test_unbatched_and_is_causal_hint():
    ref, ours = _pair(embed_dim=16, num_heads=4)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    _check(ref, ours, (x, x, x), dict(attn_mask=mask, is_causal=True, need_weights=False))
    _check(ref, ours, (x, x, x), dict(need_weights=True))
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(x, x, x, is_causal=True)


def test_fully_masked_query_gives_zero_not_nan():
    _, ours = _pair(embed_dim=16, num_heads=4, bias=False)
    q, k, v = _inputs(False)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    for need_weights in (False, True):
        out, _ = ours(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
        assert torch.isfinite(out).all() and out.abs().max() == 0


def test_dropout_in_training_is_reproducible():
    _, ours = _pair(embed_dim=16, num_heads=4, dropout=0.5)
    ours.train()
    args = _inputs(True, self_attn=True)
    torch.manual_seed(3)
    a, _ = ours(*args, need_weights=False)
    torch.manual_seed(3)
    b, _ = ours(*args, need_weights=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours.eval()
    c, _ = ours(*args, need_weights=False)
    assert not torch.allclose(a, c)


def test_replace_modules_swaps_transformer_layers():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True,
                                             dtype=torch.float64).eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want = layer(x)
    params = list(layer.parameters())
    assert fused_kernels.nn.replace_modules(layer) == 4                # the layer, self_attn, norm1, norm2
    assert type(layer.self_attn) is MultiheadAttention
    assert list(layer.parameters()) == params
    torch.testing.assert_close(layer(x), want, rtol=1e-9, atol=1e-10)

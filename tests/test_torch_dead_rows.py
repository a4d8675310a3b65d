"""What torch itself gives for a fully masked row (a query that sees no key), as the README states it for
torch 2.13 on the CPU, next to ours (always 0, never NaN). If a torch release changes any of these, this
test fails and the README's sentence must change with it."""

import pytest
import torch
import torch.nn.functional as F

import fused_kernels.nn as knn

pytestmark = pytest.mark.skipif(not torch.__version__.startswith("2.13.") or torch.cuda.is_available(),
                                reason="states torch 2.13's CPU behaviour")

MODES = {"train": (True, torch.enable_grad), "eval": (False, torch.enable_grad), "eval-no_grad": (False, torch.no_grad)}


def _nan(t: torch.Tensor) -> bool:
    return bool(t.isnan().any())


def test_sdpa_gives_zero_and_zero_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g, requires_grad=True) for _ in range(3))
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[1] = False
    additive = torch.zeros(3, 3).masked_fill(~keep, float("-inf"))
    for mask in (keep, additive):
        for out in (F.scaled_dot_product_attention(q, k, v, attn_mask=mask),                 # flash kernel
                    F.scaled_dot_product_attention(q, k, v[..., :5], attn_mask=mask),        # Ev != E: math
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.5)):  # dropout: math
            assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
        dq, = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum(), q)
        assert torch.equal(dq[:, :, 1], torch.zeros_like(dq[:, :, 1]))


def test_softmax_gives_nan():
    assert _nan(torch.softmax(torch.full((2, 4), float("-inf")), -1))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention(mode, need_weights):
    """torch's: NaN with need_weights=True in every mode; with need_weights=False 0, except in eval mode under
    no_grad (its fast path), NaN. Ours: 0 (and zero weights) everywhere."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    ours = knn.MultiheadAttention(8, 2, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1] = True                                   # torch's convention: True = masked; query 1 sees nothing
    training, context = MODES[mode]
    results = {}
    for name, module in (("theirs", theirs), ("ours", ours)):
        module.train(training)
        with context():
            results[name] = module(x, x, x, attn_mask=mask, need_weights=need_weights)
    out, weights = results["theirs"]
    assert _nan(out[:, 1]) == (need_weights or mode == "eval-no_grad")
    assert weights is None or _nan(weights[:, 1])
    out, weights = results["ours"]
    assert not _nan(out) and (weights is None or torch.equal(weights[:, 1], torch.zeros_like(weights[:, 1])))


@pytest.mark.parametrize("mode", list(MODES))
def test_transformer_encoder_layer(mode):
    """torch's layer: NaN only on its eval-mode no_grad fast path; the swapped layer: never."""
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    x = torch.randn(2, 3, 8)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1] = True
    training, context = MODES[mode]
    theirs.train(training)
    with context():
        assert _nan(theirs(x, src_mask=mask)) == (mode == "eval-no_grad")
        knn.replace_modules(theirs)
        assert not _nan(theirs(x, src_mask=mask))

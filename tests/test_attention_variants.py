"""attention's variants on the PyTorch path against attention_ref in float64 (forward and gradients), and their
argument errors."""

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401

import fused_kernels
from fused_kernels.reference import attention_ref


@triton.jit
def _rel(score, b, h, q_idx, kv_idx):
    return score - 0.1 * (q_idx - kv_idx)


@triton.jit
def _rel_grad(score, b, h, q_idx, kv_idx):
    return score * 0 + 1


@triton.jit
def _mod3(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) % 3 != 1


@triton.jit
def _bias_args(score, b, h, q_idx, kv_idx, args):
    return score + args[0][h] * 1.0


@triton.jit
def _bias_args_grad(score, b, h, q_idx, kv_idx, args):
    return score * 0 + 1


def _inputs(b=2, h=4, hkv=2, l=6, s=7, d=8, grad=True):
    g = torch.Generator().manual_seed(0)
    mk = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    return mk(b, h, l, d), mk(b, hkv, s, d), mk(b, hkv, s, d)


def _compare(kw, l=6, s=7, causal=False, mask=None):
    q, k, v = _inputs(l=l, s=s)
    with fused_kernels.use_backend("torch"):
        out = fused_kernels.attention(q, k, v, causal=causal, attn_mask=mask, **kw)
    ref = attention_ref(q, k, v, causal=causal, attn_mask=mask, **kw)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    wrt = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    g1 = torch.autograd.grad(out, wrt, go)
    g2 = torch.autograd.grad(ref, wrt, go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    return out


CASES = [
    dict(window=(0, 0)), dict(window=(3, -1)), dict(window=(-1, 2)), dict(window=[50, 50]),
    dict(alibi_slopes=torch.rand(4, dtype=torch.float32)), dict(alibi_slopes=torch.rand(2, 4, dtype=torch.float32)),
    dict(softcap=2.0), dict(softcap=1),
    dict(score_mod=_rel, score_mod_grad=_rel_grad), dict(mask_mod=_mod3),
    dict(score_mod=_bias_args, score_mod_grad=_bias_args_grad, mod_args=(torch.rand(4, dtype=torch.float64),)),
    dict(softcap=3.0, alibi_slopes=torch.rand(4), window=(2, 1), mask_mod=_mod3),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("ls", [(6, 7), (7, 5), (6, 6)])
@pytest.mark.parametrize("causal", [False, True])
def test_variant_matches_reference(kw, ls, causal):
    _compare(kw, *ls, causal=causal)


@pytest.mark.parametrize("prefix", [[0, 3], [9, 2]])
def test_prefix(prefix):
    _compare(dict(prefix_lengths=torch.tensor(prefix)), causal=True)


def test_documents():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    _compare(dict(document_ids=ids), l=6, s=6)
    qi, ki = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]), torch.tensor([[0, 1, 1, 1, 2, 2, 2]] * 2)
    _compare(dict(document_ids=(qi, ki)), l=6, s=7)
    # -1 is a user's id like any other (the kernels pad each row of ids with -1: sparse.pad_doc_ids)
    _compare(dict(document_ids=(qi - 1, ki - 1)), l=6, s=7)


def test_document_padding_covers_every_tile():
    """The kernels read document ids up to a tile past each row's end, unclamped (``mods.doc_ids``): every tile
    of every column (and release override) must fit in ``DOC_PAD``."""
    from fused_kernels.ops.attention import config
    from fused_kernels.ops.attention.kernels.mods import DOC_PAD
    from fused_kernels.ops.attention.sparse import pad_doc_ids
    tables = [t for col in config.COLUMNS.values() for t in (col.tiles, col.varlen)]
    tables += [t for rel in (config._TILE_OVERRIDES, config._VARLEN_TILE_OVERRIDES, config._WARP_SPECIALIZED)
               for cols in rel.values() for t in cols.values()]
    tiles = [tile for table in tables for tile in table.values() if tile != config.NO_KERNEL]
    assert len(tiles) > 100 and max(max(bm, bn) for bm, bn, _, _ in tiles) <= DOC_PAD.value
    padded = pad_doc_ids(torch.tensor([[3, -1, 7]]))
    assert padded.dtype == torch.int32 and padded.shape == (1, 3 + DOC_PAD.value)
    assert padded[0, :3].tolist() == [3, -1, 7] and (padded[0, 3:] == -1).all()


def test_float_mask_grad_with_alibi():
    mask = torch.randn(1, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    _compare(dict(alibi_slopes=torch.rand(4), softcap=2.0), mask=mask)


def test_fully_masked_rows_zero():
    q, k, v = _inputs()
    ids = (torch.tensor([[5] * 6] * 2), torch.tensor([[0] * 7] * 2))
    with fused_kernels.use_backend("torch"):
        out = fused_kernels.attention(q, k, v, document_ids=ids)
    assert (out == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all((g == 0).all() for g in grads)


def test_gradcheck():
    q, k, v = _inputs(b=1, h=2, hkv=1, l=3, s=4, d=4)
    slopes = torch.rand(2)

    def f(q, k, v):
        with fused_kernels.use_backend("torch"):
            return fused_kernels.attention(q, k, v, softcap=1.5, alibi_slopes=slopes, window=(1, 1))
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softcap_zero_is_off(backend, device):
    """softcap=0.0 means off, as in FlashAttention (whose callers pass 0.0 for "no softcap"): the same result
    and gradients as no softcap, on both paths, with no variant machinery (the plain kernels)."""
    q, k, v = (t.to(device) for t in _inputs())
    with fused_kernels.use_backend(backend):
        out = fused_kernels.attention(q, k, v, causal=True, softcap=0.0)
        want = fused_kernels.attention(q, k, v, causal=True)
        assert torch.equal(out, want)
        for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
            assert torch.equal(a, b)


def _err(exc, word, **kw):
    q, k, v = _inputs(grad=False)
    with fused_kernels.use_backend("torch"), pytest.raises(exc, match=word):
        fused_kernels.attention(q, k, v, **kw)


def test_errors():
    _err(ValueError, "window", window=(-2, 0))
    _err(TypeError, "window", window=(1.0, 0))
    _err(TypeError, "window", window=(True, 0))
    _err(ValueError, "window", window=(1, 2, 3))
    _err(ValueError, "alibi_slopes", alibi_slopes=torch.rand(3))
    _err(TypeError, "alibi_slopes", alibi_slopes=torch.rand(4, dtype=torch.float64))
    _err(ValueError, "document_ids", document_ids=torch.zeros(2, 6, dtype=torch.long))
    _err(ValueError, "document_ids", document_ids=torch.zeros(2, 7, dtype=torch.long))
    _err(ValueError, "prefix_lengths", prefix_lengths=torch.zeros(2, dtype=torch.long))
    _err(ValueError, "prefix_lengths", prefix_lengths=torch.zeros(2, dtype=torch.long), causal=True, window=(2, 0))
    _err(ValueError, "softcap", softcap=-1.0)
    _err(ValueError, "softcap", softcap=float("nan"))
    _err(TypeError, "softcap", softcap=True)
    _err(TypeError, "score_mod", score_mod=lambda s, b, h, i, j: s)
    _err(ValueError, "mask_mod", mask_mod=_rel)
    q, k, v = _inputs()
    with fused_kernels.use_backend("torch"), pytest.raises(ValueError, match="score_mod_grad"):
        fused_kernels.attention(q, k, v, score_mod=_rel)


@triton.jit
def _table_bias(score, b, h, q_idx, kv_idx, args):
    return score + tl.load(args[0] + kv_idx)


@triton.jit
def _table_keep(b, h, q_idx, kv_idx, args):
    return tl.load(args[0] + kv_idx) > 0


@pytest.mark.parametrize("which", ["score_mod", "mask_mod", "block_mask"])
def test_tl_mod_on_the_pytorch_path_fails_in_one_line(which):
    """A mod that calls tl.* can only run inside a kernel: on the PyTorch path the call fails with one line
    naming the mod and the way out (a GPU or TRITON_INTERPRET=1), not a traceback from inside triton."""
    q, k, v = _inputs(grad=False)
    table = torch.ones(7)
    with fused_kernels.use_backend("torch"), pytest.raises(TypeError) as info:
        if which == "score_mod":
            fused_kernels.attention(q, k, v, score_mod=_table_bias, mod_args=(table,))
        elif which == "mask_mod":
            fused_kernels.attention(q, k, v, mask_mod=_table_keep, mod_args=(table,))
        else:
            fused_kernels.block_mask(_table_keep, None, None, 6, 7, mod_args=(table,), device="cpu")
    msg = str(info.value)
    name = "_table_bias" if which == "score_mod" else "_table_keep"
    assert "\n" not in msg
    assert f"'{name}' cannot run on the PyTorch path" in msg
    assert "TRITON_INTERPRET=1" in msg and "CUDA device" in msg

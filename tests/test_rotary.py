"""``fused_kernels.apply_rotary_pos_emb`` against the float64 reference and against transformers' own function, on
the Triton kernel (the interpreter on a CPU) and the PyTorch path: rotate-half and interleaved, partial rotary,
GQA, both head layouts (``unsqueeze_dim`` 1 and 2), strided q / k, broadcast and indexed tables, every gradient
(the tables' too), bf16 / fp16 by the 2x rule, in-place changes to q after the forward, guard bytes, errors; and
``rope_cos_sin`` against transformers' rotary embedding modules for every scaling type."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, bounds_checked

import fused_kernels
from fused_kernels._core.launch import force_arch, intercept
from fused_kernels.reference import apply_rotary_pos_emb_ref

transformers = pytest.importorskip("transformers")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qk(b, hq, hk, l, d, seed=0, layout="bhld"):
    """q (B, Hq, L, D), k (B, Hk, L, D) in float64; "blhd": (B, L, H, D); "proj": strided views of one fused
    (B, L, (Hq + 2 Hk) D) projection, as a model's qkv split gives them, transposed to (B, H, L, D)."""
    g = _gen(seed)
    if layout == "proj":
        fused = torch.randn(b, l, (hq + 2 * hk) * d, generator=g, dtype=torch.float64)
        q = fused[..., : hq * d].view(b, l, hq, d).transpose(1, 2)
        k = fused[..., hq * d:(hq + hk) * d].view(b, l, hk, d).transpose(1, 2)
        return q, k
    shape_q, shape_k = ((b, hq, l, d), (b, hk, l, d)) if layout != "blhd" else ((b, l, hq, d), (b, l, hk, d))
    return torch.randn(*shape_q, generator=g, dtype=torch.float64), torch.randn(*shape_k, generator=g,
                                                                              dtype=torch.float64)


def _tables(b, l, rot, seed=1, interleaved=False, theta=10000.0):
    pos = torch.arange(l).expand(b, l) + torch.randint(0, 50, (b, 1), generator=_gen(seed))
    return fused_kernels.rope_cos_sin(pos, rot, theta, interleaved=interleaved, dtype=torch.float64)


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_()


def check_rope(q, k, cos, sin, dtype, unsqueeze_dim=1, interleaved=False, table_grad=False):
    """Outputs and every gradient against the float64 reference; bf16 / fp16 by the 2x rule against the formula run
    by plain torch in that dtype (transformers' function for rotate-half)."""
    g = _gen(99)
    results = {}
    for name, fn, dt in (("ours", fused_kernels.apply_rotary_pos_emb, dtype), ("ref", None, torch.float64),
                         ("plain", "plain", dtype)):
        qs, ks = _leaf(q, dt), _leaf(k, dt)
        cs, ss = (cos.detach().to(dt).requires_grad_(table_grad), sin.detach().to(dt).requires_grad_(table_grad))
        if fn is None:
            outs = apply_rotary_pos_emb_ref(qs, ks, cs, ss, unsqueeze_dim, interleaved)
        elif fn == "plain":
            outs = _plain(qs, ks, cs, ss, unsqueeze_dim, interleaved)
        else:
            outs = fn(qs, ks, cs, ss, unsqueeze_dim=unsqueeze_dim, interleaved=interleaved)
        cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
        g = _gen(99)
        wanted = [qs, ks] + ([cs, ss] if table_grad else [])
        results[name] = [o.detach() for o in outs] + list(torch.autograd.grad(outs, wanted, cot))
    low = dtype in (torch.float16, torch.bfloat16)
    tol = {} if low else (dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-6))
    names = ["q_embed", "k_embed", "dq", "dk", "dcos", "dsin"]
    for i, (got, want, plain) in enumerate(zip(results["ours"], results["ref"], results["plain"])):
        assert got.dtype == plain.dtype, (names[i], got.dtype, plain.dtype)
        assert_close(got, want, plain if low else None, grad=i >= 2, name=names[i], **tol)


def _plain(q, k, cos, sin, unsqueeze_dim, interleaved):
    """The formula as the model code writes it, in the inputs' dtype."""
    if not interleaved and cos.shape[-1] == q.shape[-1]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def turn(x):
        xr = x[..., :rot]
        if interleaved:
            t = torch.stack([-xr[..., 1::2], xr[..., 0::2]], dim=-1).flatten(-2)
        else:
            t = torch.cat([-xr[..., rot // 2:], xr[..., :rot // 2]], dim=-1)
        return torch.cat([xr * cos + t * sin, x[..., rot:]], dim=-1)
    return turn(q), turn(k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_matches_reference(op_backend, dtype, interleaved):
    q, k = _qk(2, 4, 2, 9, 64, seed=1)
    cos, sin = _tables(2, 9, 64, interleaved=interleaved)
    check_rope(q, k, cos, sin, dtype, interleaved=interleaved)


@pytest.mark.parametrize("d, rot", [(80, 32), (64, 32), (59, 58), (40, 40), (96, 2)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_and_head_dims(op_backend, d, rot, interleaved):
    q, k = _qk(1, 3, 1, 7, d, seed=d)
    cos, sin = _tables(1, 7, rot, interleaved=interleaved)
    check_rope(q, k, cos, sin, torch.float32, interleaved=interleaved)


@pytest.mark.parametrize("d, rot, chunk", [(80, 32, 16), (59, 32, 32), (111, 64, 16), (100, 4, 32)])
@pytest.mark.parametrize("layout", ["bhld", "proj"])
def test_partial_rotary_gpu_tiles(device, triton_backend, d, rot, chunk, layout):
    """Partial rotary at the tiles a GPU launches (force_arch(90), 32 query / 8 key heads: BLOCK_H 16 as Phi-2's
    heads get it; the pass-through dims copied in chunks of ``chunk`` columns, the last one masked where it runs past
    the head dim), strided q / k of one projection, outputs and gradients against float64, guard bytes around every
    tensor."""
    q, k = _qk(1, 32, 8, 2, d, seed=d, layout=layout)
    cos, sin = _tables(1, 2, rot)
    seen = []

    def record(call, run):
        seen.append({n: call.kwargs[n] for n in ("BLOCK_H", "BLOCK_P", "PASS")})
        run(call)

    with force_arch(90), intercept(record), bounds_checked("_rope_kernel") as launches:
        check_rope(q, k, cos, sin, torch.float32)
    assert launches["_rope_kernel"] == 2                       # one forward, one backward
    assert seen == [dict(BLOCK_H=16, BLOCK_P=chunk, PASS=d - rot)] * 2


@pytest.mark.parametrize("hq, hk", [(4, 4), (8, 2), (6, 1), (2, 0)])
def test_gqa(op_backend, hq, hk):
    q, k = _qk(2, hq, hk, 5, 32, seed=hq)
    check_rope(q, k, *_tables(2, 5, 32), torch.float16)


@pytest.mark.parametrize("layout", ["blhd", "proj"])
def test_layouts_and_strides(op_backend, layout):
    q, k = _qk(2, 4, 2, 6, 32, seed=3, layout=layout)
    cos, sin = _tables(2, 6, 32)
    check_rope(q, k, cos, sin, torch.float32, unsqueeze_dim=2 if layout == "blhd" else 1)
    check_rope(q, k, cos, sin, torch.bfloat16, unsqueeze_dim=2 if layout == "blhd" else 1, interleaved=True)


def test_broadcast_and_indexed_tables(op_backend):
    q, k = _qk(3, 2, 2, 8, 16, seed=4)
    cos, sin = _tables(1, 8, 16)                          # (1, L, R): the same positions in every sequence
    check_rope(q, k, cos, sin, torch.float64)
    cos_t, sin_t = fused_kernels.rope_cos_sin(torch.arange(64), 16, dtype=torch.float64)     # (max_pos, R)
    pos = torch.randint(0, 64, (3, 8), generator=_gen(5))
    got = fused_kernels.apply_rotary_pos_emb(q, k, cos_t, sin_t, pos)
    want = apply_rotary_pos_emb_ref(q, k, cos_t[pos], sin_t[pos])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    got = fused_kernels.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_t[pos], sin_t[pos], 2)
    for a, b in zip(got, want):                        # transformers 5's positional unsqueeze_dim
        torch.testing.assert_close(a, b.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_table_gradients_and_dtypes(op_backend):
    q, k = _qk(2, 2, 1, 5, 16, seed=6)
    cos, sin = _tables(2, 5, 12)
    check_rope(q, k, cos, sin, torch.float64, table_grad=True)
    check_rope(q, k, cos, sin, torch.float64, table_grad=True, interleaved=True)
    # float32 tables with bf16 q / k: the promoted (float32) outputs, as torch's formula gives
    out = fused_kernels.apply_rotary_pos_emb(q.bfloat16(), k.bfloat16(), cos.float(), sin.float())
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32


def test_matches_transformers_function(op_backend):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k = _qk(2, 4, 2, 9, 64, seed=7)
    q, k = q.float(), k.float()
    cos, sin = (t.float() for t in _tables(2, 9, 64))
    for a, b in zip(fused_kernels.apply_rotary_pos_emb(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_backward_needs_no_q_or_k(op_backend):
    """q and k changed in place after the forward: their gradients need only cos and sin."""
    q, k = (t.float().requires_grad_() for t in _qk(1, 2, 2, 4, 16, seed=8))
    cos, sin = (t.float() for t in _tables(1, 4, 16))
    qa, ka = q.detach().clone(), k.detach().clone()
    qx, kx = q * 1.0, k * 1.0
    out = fused_kernels.apply_rotary_pos_emb(qx, kx, cos, sin)
    with torch.no_grad():
        qx.mul_(3.0)
        kx.zero_()
    (out[0].sum() + out[1].square().sum()).backward()
    ql, kl = qa.requires_grad_(), ka.requires_grad_()
    ref = apply_rotary_pos_emb_ref(ql, kl, cos, sin)
    (ref[0].sum() + ref[1].square().sum()).backward()
    torch.testing.assert_close(q.grad, ql.grad)
    torch.testing.assert_close(k.grad, kl.grad)


def test_apply_rotary_one_tensor(op_backend):
    q, _ = _qk(2, 3, 1, 5, 32, seed=9)
    cos, sin = _tables(2, 5, 32)
    torch.testing.assert_close(fused_kernels.apply_rotary(q, cos, sin), apply_rotary_pos_emb_ref(q, q, cos, sin)[0])


def test_double_backward(op_backend):
    q, k = (t.requires_grad_() for t in _qk(1, 2, 1, 3, 8, seed=10))
    cos, sin = _tables(1, 3, 8)
    assert torch.autograd.gradgradcheck(lambda q_, k_: fused_kernels.apply_rotary_pos_emb(q_, k_, cos, sin),
                                        (q, k), fast_mode=True)


@pytest.mark.triton_only
def test_bounds(device, triton_backend):
    for layout, interleaved in (("proj", False), ("bhld", True)):
        q, k = _qk(2, 5, 2, 3, 48, seed=11, layout=layout)
        cos, sin = _tables(2, 3, 40, interleaved=interleaved)
        with bounds_checked("_rope_kernel") as launches:
            check_rope(q, k, cos, sin, torch.float32, interleaved=interleaved)
        assert launches["_rope_kernel"] == 2                       # one forward, one backward


def test_errors(op_backend):
    q, k = _qk(1, 2, 2, 3, 8)
    cos, sin = _tables(1, 3, 8)
    rope = fused_kernels.apply_rotary_pos_emb
    with pytest.raises(RuntimeError, match="even"):
        rope(q, k, cos[..., :7], sin[..., :7])
    with pytest.raises(RuntimeError, match="rotary dims"):
        rope(q[..., :6], k[..., :6], cos, sin)
    with pytest.raises(RuntimeError, match="same shape"):
        rope(q, k, cos, sin[..., :6])
    with pytest.raises(RuntimeError, match="broadcast"):
        rope(q, k, cos.expand(2, 3, 8), sin.expand(2, 3, 8))
    with pytest.raises(IndexError):
        rope(q, k, cos, sin, unsqueeze_dim=5)
    with pytest.raises(NotImplementedError):
        rope(q.long(), k, cos, sin)


# ----------------------------------------------------------------------------- cos / sin tables

SCALINGS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                    "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_cos_sin_match_transformers(name):
    """The tables of transformers' Llama rotary embedding module (dynamic NTK past max_position_embeddings too)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {**SCALINGS[name], "rope_theta": 5000.0}
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=64, rope_parameters=params)
    module = LlamaRotaryEmbedding(config)
    pos = torch.tensor([[0, 5, 17, 40], [3, 63, 100, 130]])
    want_cos, want_sin = module(torch.zeros(1, dtype=torch.float32), pos)
    got_cos, got_sin = fused_kernels.rope_cos_sin(pos, 32, 5000.0, params, max_position_embeddings=64)
    torch.testing.assert_close(got_cos, want_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_sin, want_sin, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in SCALINGS if n != "default"])
def test_partial_rotary_frequencies_match_transformers(name):
    """With partial_rotary_factor, transformers' frequency functions work on head_dim * factor dims."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {**SCALINGS[name], "rope_theta": 5000.0, "partial_rotary_factor": 0.5}
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=64, rope_parameters=params)
    want, want_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len=100)
    got, got_factor = fused_kernels.rope_frequencies(16, 5000.0, params, max_position_embeddings=64, seq_len=100)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor)


def test_interleaved_tables_and_errors():
    pos = torch.arange(6)
    cos, sin = fused_kernels.rope_cos_sin(pos, 8)
    icos, isin = fused_kernels.rope_cos_sin(pos, 8, interleaved=True)
    torch.testing.assert_close(icos[:, 0::2], cos[:, :4])
    torch.testing.assert_close(isin[:, 1::2], sin[:, :4])
    with pytest.raises(RuntimeError, match="even"):
        fused_kernels.rope_frequencies(7)
    with pytest.raises(RuntimeError, match="rope_type"):
        fused_kernels.rope_frequencies(8, scaling={"rope_type": "longrope"})


def test_rotary_embedding_module():
    module = fused_kernels.nn.RotaryEmbedding(16, 500.0, {"rope_type": "linear", "factor": 2.0})
    pos = torch.arange(5)[None]
    cos, sin = module(torch.zeros(1, dtype=torch.bfloat16), pos)
    want = fused_kernels.rope_cos_sin(pos, 16, 500.0, {"rope_type": "linear", "factor": 2.0}, dtype=torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and torch.equal(cos, want[0]) and torch.equal(sin, want[1])
    assert not list(module.parameters()) and not list(module.buffers())

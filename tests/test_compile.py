"""``torch.compile(fullgraph=True)`` of code using every op, forward and backward, on the CPU through
the interpreter: the ops are ``torch.library`` custom ops (fake implementations, registered autograd),
so they trace without a graph break and the compiled code runs the same kernels as eager code.

Most cases use ``backend="aot_eager"`` (traces forward and backward, no code generation: fast); one
uses the default inductor backend. ``torch.library.opcheck`` checks the registrations themselves.
"""

from __future__ import annotations

import pytest
import torch
from helpers import grads

import fused_kernels
from fused_kernels.ops.attention.launch import attention_bwd, attention_fwd
from fused_kernels.ops.cross_entropy import (
    cross_entropy_fwd,
    linear_cross_entropy_bwd,
    linear_cross_entropy_fwd,
)
from fused_kernels.ops.gated_mlp import glu_bwd, glu_fwd
from fused_kernels.ops.norms import layer_norm_bwd, layer_norm_fwd
from fused_kernels.ops.rotary import rope_bwd, rope_fwd
from fused_kernels.ops.softmax import softmax_bwd, softmax_fwd

pytestmark = pytest.mark.usefixtures("op_backend")   # each test on the kernels and on the PyTorch path


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _keep(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.3


# Each case: (function of the tensors, the tensors; each gets a gradient).
def _cases():
    x, r, w, b = _randn(2, 3, 24), _randn(2, 3, 24, seed=1), _randn(24, seed=2), _randn(24, seed=3)
    s = _randn(2, 2, 5, 7, seed=4)
    keep, bias = _keep(2, 1, 5, 7), _randn(5, 7, seed=5)
    h, emb, cls_b = _randn(2, 9, 24, seed=6), _randn(37, 24, seed=7), _randn(37, seed=8)
    tgt = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(9))
    tgt[0, ::3] = -100
    ce_tgt = torch.where(tgt[:, :7] >= 0, tgt[:, :7] % 7, tgt[:, :7])
    rq, rk = _randn(2, 4, 5, 16, seed=10), _randn(2, 5, 2, 16, seed=11).transpose(1, 2)
    rcos, rsin = fused_kernels.rope_cos_sin(torch.arange(5).expand(2, 5), 12)
    return {
        "gated_mlp": (lambda g, u: torch.cat([fused_kernels.swiglu(g, u), fused_kernels.geglu(g * 2, u, "tanh"),
                                              fused_kernels.swiglu(torch.cat([g, u], -1)),
                                              fused_kernels.geglu(torch.cat([u, g], -1))]), [x, r]),
        "rotary": (lambda q, k: torch.cat([torch.cat(fused_kernels.apply_rotary_pos_emb(q, k, rcos, rsin), 1),
                                          torch.cat(fused_kernels.apply_rotary_pos_emb(q, k, rcos, rsin,
                                                                                       interleaved=True), 1)]),
                   [rq, rk]),
        "linear_cross_entropy": (lambda h, w, b: torch.cat([
            torch.stack([fused_kernels.linear_cross_entropy(h, w, tgt, b),
                         fused_kernels.linear_cross_entropy(h, w, tgt, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                                            reduction="sum")]),
            fused_kernels.linear_cross_entropy(h, w, tgt, b, reduction="none", z_loss=1e-2).flatten()]),
            [h, emb, cls_b]),
        "cross_entropy": (lambda z: torch.cat([
            torch.stack([fused_kernels.cross_entropy(z, ce_tgt[0]),
                         fused_kernels.cross_entropy(z * 2, ce_tgt[1], label_smoothing=0.2, softcap=3.0,
                                                     reduction="sum")]),
            fused_kernels.cross_entropy(z, ce_tgt[0], reduction="none")]), [s.reshape(-1, 7)[:7].clone()]),
        "layer_norm": (lambda x, w, b: torch.cat([fused_kernels.layer_norm(x * 2, (24,), w, b, 1e-5) + 1,
                                                  fused_kernels.layer_norm(x, (3, 24), w.expand(3, 24))]), [x, w, b]),
        "rms_norm": (lambda x, w: fused_kernels.rms_norm(x, (24,), w).relu() + fused_kernels.rms_norm(x, 24, eps=0.1),
                     [x, w]),
        "add_layer_norm": (lambda x, r, w, b: torch.cat([*fused_kernels.add_layer_norm(x, r, w, b),
                                                         *fused_kernels.add_layer_norm(x, None, w),
                                                         fused_kernels.add_layer_norm(r, x, w)[0]]), [x, r, w, b]),
        "add_layer_norm-dropout": (lambda x, r: torch.cat(fused_kernels.add_layer_norm(x, r, dropout_p=0.3)), [x, r]),
        "softmax": (lambda s: torch.cat([fused_kernels.softmax(s, -1, scale=0.5),
                                         fused_kernels.softmax(s, mask=keep, is_causal=True),
                                         fused_kernels.softmax(s.transpose(-1, -2), 2,
                                                               mask=bias.t()).transpose(-1, -2)]),
                    [s]),
    }


CASES = list(_cases())


def _run(fn, inputs, seed: int = 0):
    """Forward and backward of ``fn`` on fresh leaves; dropout re-seeded so both runs draw the same mask."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.manual_seed(seed)
    out = fn(*leaves)
    dy = _randn(*out.shape, seed=9)
    return out.detach(), grads(out, leaves, dy)


def _assert_same(got, want):
    out, g = got
    want_out, want_g = want
    assert torch.equal(out, want_out), (out - want_out).abs().max()
    for a, b in zip(g, want_g):
        assert a is not None and torch.equal(a, b), (a - b).abs().max()


def _assert_compiled_close(fn, inputs):
    """``fn`` compiled in one graph (aot_eager) gives eager's output and every input gradient (none missing)."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for run in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = run(*leaves)
        results.append([out.detach()] + grads(out, leaves, _randn(*out.shape, seed=4)))
    for got, want in zip(results[1], results[0]):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_compiled_function_matches_eager(case):
    fn, inputs = _cases()[case]
    eager = _run(fn, inputs)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_run(compiled, inputs), eager)
    _assert_same(_run(compiled, inputs), eager)  # the cached graph, second call


def test_compiled_with_dynamic_shapes():
    """The fake implementations handle symbolic sizes: one graph serves several batch sizes."""
    def fn(x, w, b):
        out, residual = fused_kernels.add_layer_norm(x, x * 0.5, w, b)
        h = fused_kernels.rms_norm(out, (16,)) + residual
        return fused_kernels.softmax(fused_kernels.layer_norm(h, h.shape[-1:]), -1)  # a normalized_shape of SymInts

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    w, b = _randn(16, seed=1), _randn(16, seed=2)
    for rows in (3, 5, 0):
        inputs = [_randn(rows, 2, 16), w, b]
        _assert_same(_run(compiled, inputs), _run(fn, inputs))


class _Block(torch.nn.Module):
    """A tiny post-LN attention block built from every op and the drop-in modules."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln = fused_kernels.nn.LayerNorm(d)
        self.rms = fused_kernels.nn.RMSNorm(d)
        self.out_softmax = fused_kernels.nn.Softmax(dim=-1)

    def forward(self, x, keep):
        b, s, d = x.shape
        q, k, v = self.qkv(self.rms(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = fused_kernels.softmax(q @ k.transpose(-1, -2), mask=keep, scale=(d // self.heads) ** -0.5, is_causal=True)
        attn = (p @ v).transpose(1, 2).reshape(b, s, d)
        h, residual = fused_kernels.add_layer_norm(self.proj(attn), x, self.ln.weight, self.ln.bias)
        return self.out_softmax(self.ln(h) + residual)


def _module_run(model, x, keep):
    model.zero_grad()
    xl = x.clone().requires_grad_()
    out = model(xl, keep)
    out.backward(_randn(*out.shape, seed=8))
    return out.detach(), [xl.grad] + [p.grad.clone() for p in model.parameters()]


def test_compiled_module_matches_eager():
    torch.manual_seed(0)
    model = _Block()
    x, keep = _randn(2, 6, 16), _keep(2, 1, 1, 6)
    eager = _module_run(model, x, keep)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(_module_run(compiled, x, keep), eager)


def test_attention_with_a_learned_mask_compiles():
    """Attention (both causal alignments, a float mask that requires grad, CausalBias) in one graph: the same
    output and gradients as eager, the mask's included."""
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(5, 7)     # built outside: dynamo cannot construct the subclass in a graph

    def fn(q, k, v, m):
        a = fused_kernels.attention(q, k, v, causal=True, attn_mask=m)
        b = fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
        c = fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return a + b + c

    inputs = [_randn(1, 2, 5, 8), _randn(1, 2, 7, 8, seed=1), _randn(1, 2, 7, 8, seed=2), _randn(5, 7, seed=3)]
    _assert_compiled_close(fn, inputs)


def test_attention_variants_compile():
    """The built-in attention variants (window, ALiBi, softcap, documents, prefix-LM) are custom-op arguments: a
    call with all of them traces in one graph and gives eager's output and gradients (the float mask's included),
    on the kernels and on the PyTorch path."""
    b, h, l, d = 2, 2, 9, 8
    slopes = torch.tensor([0.5, 0.25])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 2, 2, 2]])
    prefix = torch.tensor([3, 5])

    def fn(q, k, v, m):
        a = fused_kernels.attention(q, k, v, causal=True, attn_mask=m, window=(4, 0), alibi_slopes=slopes,
                                    softcap=5.0, document_ids=docs)
        c = fused_kernels.attention(q, k, v, causal=True, prefix_lengths=prefix, softcap=3.0)
        return a + c

    inputs = [_randn(b, h, l, d), _randn(b, h, l, d, seed=1), _randn(b, h, l, d, seed=2), _randn(l, l, seed=3)]
    _assert_compiled_close(fn, inputs)


def test_attention_seqlens_k_compiles():
    """seqlens_k (its per-row causal alignment, with and without variants) traces in one graph: the range check
    is skipped while compiling (a data-dependent branch), the rest gives eager's output and gradients."""
    lens = torch.tensor([9, 4])

    def fn(q, k, v):
        a = fused_kernels.attention(q, k, v, causal=True, seqlens_k=lens)
        c = fused_kernels.attention(q, k, v, causal=True, seqlens_k=lens, window=(3, 0), softcap=4.0)
        return a + c

    inputs = [_randn(2, 2, 3, 8), _randn(2, 1, 9, 8, seed=1), _randn(2, 1, 9, 8, seed=2)]
    _assert_compiled_close(fn, inputs)


@pytest.mark.triton_only   # inductor would generate C++ for the PyTorch path's ops (slow to compile)
def test_inductor():
    """The default backend: inductor calls the custom ops as opaque kernels (kept to custom ops only,
    so that no C++ code generation is needed and the case stays quick)."""
    def fn(x, r, w, b):
        out, residual = fused_kernels.add_layer_norm(x, r, w, b)
        return fused_kernels.softmax(out, mask=keep), fused_kernels.rms_norm(residual, (24,), w)

    keep = _keep(24)
    inputs = [_randn(2, 3, 24), _randn(2, 3, 24, seed=1), _randn(24, seed=2), _randn(24, seed=3)]
    compiled = torch.compile(fn, fullgraph=True)
    for run in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in inputs]
        outs = run(*leaves)
        result = [o.detach() for o in outs] + grads(outs, leaves, [_randn(2, 3, 24, seed=6), _randn(2, 3, 24, seed=7)])
        if run is fn:
            eager = result
    for got, want in zip(result, eager):
        assert torch.equal(got, want), (got - want).abs().max()


def test_no_graph_break_under_torch_backend_either():
    """With the "torch" backend the PyTorch ops are traced instead: still one graph, same results."""
    fn, inputs = _cases()["add_layer_norm"]
    with fused_kernels.use_backend("torch"):
        eager = _run(fn, inputs)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = _run(compiled, inputs)
    torch.testing.assert_close(got[0], eager[0])


# ----------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    x, r, w, b = _randn(3, 24), _randn(3, 24, seed=1), _randn(24, seed=2), _randn(24, seed=3)
    req = lambda t: t.clone().requires_grad_()
    s, keep = _randn(2, 5, 7, seed=4), _keep(5, 7)
    y = torch.softmax(s, -1)
    lw, lb = _randn(11, 24, seed=5), _randn(11, seed=6)
    tgt = torch.tensor([3, -100, 10])
    rc, rs = (t[:, None].expand(2, 1, 5, 6) for t in fused_kernels.rope_cos_sin(torch.arange(5)[None], 6))
    return [
        ("ln_fwd", layer_norm_fwd, (req(x), None, req(w), req(b), 1e-5, 0.0, False)),
        ("ln_fwd-residual", layer_norm_fwd, (req(x), req(r), req(w), None, 1e-5, 0.0, False)),
        ("rms_fwd", layer_norm_fwd, (req(x), None, req(w), None, 1e-6, 0.0, True)),
        ("ln_fwd-no-affine", layer_norm_fwd, (req(x), req(r), None, None, 1e-5, 0.0, False)),
        ("ln_bwd", layer_norm_bwd, (x, r, x, w, True, x.mean(-1), 1 / x.std(-1), torch.tensor([0]), 0.0, False,
                                    True, torch.float32)),
        ("softmax_fwd", softmax_fwd, (req(s), None, 2, 0.5, False)),
        ("softmax_fwd-mask", softmax_fwd, (req(s), keep, 2, 1.0, True)),
        ("softmax_fwd-dim0", softmax_fwd, (req(s), s[0, 0], 0, 1.0, False)),
        ("softmax_bwd", softmax_bwd, (y, s, 1, 0.5)),
        ("lce_fwd-mean", linear_cross_entropy_fwd, (req(x), req(lw), req(lb), tgt, -100, 1, 0.1, 1e-3, 4.0, True, True,
                                                    True, True)),
        ("lce_fwd-none", linear_cross_entropy_fwd, (req(x), req(lw), None, tgt, -100, 0, 0.0, 0.0, 0.0, True, True,
                                                    False, True)),
        ("lce_bwd", linear_cross_entropy_bwd, (x[:, 0], x, lw, lb, tgt, -100, 0.1, 1e-3, 4.0, True, True, True,
                                               True)),
        ("glu_fwd", glu_fwd, (req(x), req(r), 0)),
        ("glu_fwd-split", glu_fwd, (req(torch.cat([x, r], -1)), None, 2)),
        ("glu_bwd", glu_bwd, (x, x, r, 1)),
        ("glu_bwd-split", glu_bwd, (x, torch.cat([x, r], -1), None, 0)),
        ("rope_fwd", rope_fwd, (req(s[:, None].expand(2, 3, 5, 7)), req(s[:, None]), rc, rs, 1, False)),
        ("rope_fwd-interleaved", rope_fwd, (req(s[:, None]), req(s[:, None]), rc, rs, 1, True)),
        ("rope_bwd", rope_bwd, (s[:, None], s[:, None].expand(2, 2, 5, 7), rc, rs, 1, False, torch.float32,
                                torch.float64)),
        ("ce_fwd", cross_entropy_fwd, (req(lw[:3]), tgt.clamp(0, 23), -100, 2, 0.1, 0.0, 0.0, True, True)),
        *_attention_opcheck_cases(),
    ]


def _attention_opcheck_cases():
    req = lambda t: t.clone().requires_grad_()
    q, k, v = _randn(1, 2, 6, 8), _randn(1, 1, 9, 8, seed=1), _randn(1, 1, 9, 8, seed=2)
    mask, lens = _randn(6, 9, seed=3), torch.tensor([7])
    ids = torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    variants = ([3, 0], torch.tensor([[0.5, 0.25]]), 5.0, *ids, None)
    plain = (q, k, v, mask, lens, 0.35, True, 3, 0.0, 0)
    out, lse, seed = attention_fwd(*plain, *variants)
    aligned = attention_fwd(*plain, *variants, True)     # align_seqlens: attention(causal=True, seqlens_k=...)
    return [
        ("attention_fwd", attention_fwd, (req(q), req(k), req(v), req(mask), lens, 0.35, True, 3, 0.0, 0)),
        ("attention_fwd-aligned", attention_fwd, (req(q), req(k), req(v), req(mask), *plain[4:], *variants, True)),
        ("attention_bwd-aligned", attention_bwd, (_randn(*out.shape, seed=4), None, q, k, v, *aligned[:2], mask,
                                                  lens, aligned[2], 0.35, True, 3, 0.0, *variants, True)),
        ("attention_fwd-variants", attention_fwd, (req(q), req(k), req(v), req(mask), *plain[4:], *variants)),
        ("attention_fwd-prefix", attention_fwd, (req(q), req(k), req(v), None, None, 0.35, True, 3, 0.0, 0, None,
                                                 None, None, None, None, torch.tensor([4]))),
        ("attention_bwd-variants", attention_bwd, (_randn(*out.shape, seed=4), None, q, k, v, out, lse, mask, lens,
                                                   seed, 0.35, True, 3, 0.0, *variants)),
    ]


@pytest.mark.triton_only   # the kernels' custom ops (the PyTorch path has none)
@pytest.mark.parametrize("case", _opcheck_cases(), ids=lambda c: c[0])
def test_opcheck(case):
    """Schema, fake implementation, autograd registration and AOT dispatch of each custom op (the
    dropout case is excluded: it draws a new seed per call, which opcheck's repeated runs disallow)."""
    _, op, args = case
    torch.library.opcheck(op, args)

"""``python -m bench --device cpu``: our ops on CPU tensors (each op's PyTorch path)
against plain torch eager, in one process, one thread.

    python -m bench --device cpu [--full] [--only attention|norm|softmax|model|linear_ce|rotary|gated_mlp ...]
                                 [--no-memory] [--out DIR] [--note TEXT]

For every case both providers get the same inputs; each is called once to warm up, then the two are
timed in interleaved pairs (the order alternating, so drift and a neighbour's load hit both alike) until
each has run at least ``MIN_PAIRS`` times and ``MIN_SECONDS``; the table gives the medians and
ours / torch. Forward cases run under ``torch.no_grad``; forward + backward cases call ``backward`` with a
fixed output gradient. Peak memory: a separate process per (case, provider) builds the same inputs,
warms up on a tiny case of the same code path, then runs the forward once and the forward + backward
once, each with the kernel's resident high-water mark reset before it (``/proc/self/clear_refs``), and
reports the peak resident set size above the resident size before the call; the process runs with a
fixed malloc mmap threshold, so that freed tensors leave the resident set.

What "torch eager" is for each op (the same semantics wherever torch has them):
    attention       F.scaled_dot_product_attention (is_causal, or a (B, 1, 1, S) bool padding mask), against
                    fused_kernels.attention and, at L = 16 and 128, its drop-in (op "sdpa")
    softmax         torch.softmax(x) / torch.softmax(x.masked_fill(~mask, -inf)) / scale and causal
    layer_norm      F.layer_norm;  rms_norm  F.rms_norm;  add_layer_norm  x + residual, then F.layer_norm
    model steps     the same model on F.scaled_dot_product_attention and F.layer_norm
                    (``bench.models.torch_ops``), AdamW, one forward + backward + step
    linear_ce       F.cross_entropy(F.linear(x, w), t): the (N, V) logits (fp32), mean over the tokens
    rotary          transformers' Llama apply_rotary_pos_emb (q * cos + rotate_half(q) * sin) on q and k
                    (strided views of one fused qkv projection, GQA), gradients of both
    gated_mlp       F.silu(gate) * up (gate and up halves of one projection, as Phi-3's gate_up_proj, and as
                    two tensors)
    llama step      the Llama-style GPT (llama-small) with every op unfused: SDPA, F.rms_norm, the rotary
                    formula, F.silu * up, logits + F.cross_entropy (``bench.models.torch_ops``)
The linear_ce cases above a teraFLOP of work run ``HEAVY_PAIRS`` pairs, and their memory processes one at a
time (the unfused form's peak is several GiB).
    bert-padfree    not torch eager: the same BERT pre-training step (MLM + NSP) run padded, on our ops, as
                    the baseline of the padding-free one (``padding_free=True``); lengths long-tailed
                    (log-normal, median L/6, clipped to [1, L]), so most of the padded batch is padding

Writes ``cpu.json`` and ``cpu.md`` (the table, with the machine) into ``--out`` (default bench/results/tmp).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

MIN_PAIRS, MIN_SECONDS, MAX_PAIRS = 7, 1.0, 31
# A ratio is a result only from the normal run's sample: MIN_PAIRS pairs, or (the heavy cases) a second of timing
# per side. Fewer (--smoke: two pairs of microseconds) is within the noise and shown as such, never as a result.
RESULT_PAIRS, RESULT_SECONDS = MIN_PAIRS, MIN_SECONDS
HEAVY_PAIRS = 3                  # pairs of the cases above HEAVY_FLOP (minutes per call on one core)
HEAVY_FLOP = 1e12
FAMILIES = ("attention", "softmax", "norm", "model", "linear_ce", "rotary", "gated_mlp")
TARGET_TIME, TARGET_MEMORY = 1.05, 1.05


# ----------------------------------------------------------------------------- the grid


def smoke_grid() -> list[dict]:
    """One tiny case per family and kind: what the tests run to check the machinery, not a speed."""
    cases = [dict(family="attention", op="attention", B=1, H=2, L=16, D=16, mask=m) for m in ("none", "causal",
                                                                                             "padding")]
    cases += [dict(family="softmax", op="softmax", M=8, N=16, kind=k) for k in ("plain", "masked")]
    cases += [dict(family="softmax", op="softmax", shape=[1, 2, 8, 8], kind="scale+causal")]
    cases += [dict(family="norm", op=op, M=4, N=32) for op in ("layer_norm", "rms_norm", "add_layer_norm")]
    cases += [dict(family="model", op="gpt", preset="tiny", B=2, L=16), dict(family="model", op="bert", preset="tiny",
                                                                             B=2, L=16),
              dict(family="model", op="vit", preset="tiny", B=4),
              dict(family="model", op="bert-padfree", preset="tiny", B=4, L=16),
              dict(family="model", op="llama", preset="llama-tiny", B=2, L=16)]
    cases += [dict(family="linear_ce", op="linear_cross_entropy", N=64, H=16, V=300)]
    cases += [dict(family="rotary", op="apply_rotary_pos_emb", B=1, L=8, H=4, Hkv=2, D=16)]
    cases += [dict(family="gated_mlp", op="swiglu", M=16, F=64, layout=layout) for layout in ("concat", "pair")]
    return cases


def grid(full: bool = False, only: list[str] | None = None) -> list[dict]:
    """Every case as a JSON-able spec (a child process rebuilds it from the spec)."""
    cases: list[dict] = []
    # Short sequences, where a call's Python work (argument checks, dispatch) shows next to torch's kernel.
    for l in (16, 32, 64, 128):
        for mask in ("none", "causal"):
            cases.append(dict(family="attention", op="attention", B=1, H=4, L=l, D=64, mask=mask))
    for l in (16, 128):   # the drop-in for F.scaled_dot_product_attention: its own argument handling
        cases.append(dict(family="attention", op="sdpa", B=1, H=4, L=l, D=64, mask="causal"))
    lengths = [128, 256, 512, 1024, 2048] if full else [128, 512, 2048]
    for d in (64, 128):
        for l in lengths:
            for mask in ("none", "causal", "padding"):
                cases.append(dict(family="attention", op="attention", B=2, H=512 // d, L=l, D=d, mask=mask))
    total = 1 << 22                                             # 4 Mi elements: 16 MiB in fp32
    for n in [128, 512, 2048, 8192]:
        for kind in ("plain", "masked"):
            cases.append(dict(family="softmax", op="softmax", M=total // n, N=n, kind=kind))
    cases.append(dict(family="softmax", op="softmax", shape=[4, 8, 512, 512], kind="plain"))       # issue 12's
    cases.append(dict(family="softmax", op="softmax", shape=[4, 8, 512, 512], kind="scale+causal"))
    for op in ("layer_norm", "rms_norm", "add_layer_norm"):
        for n in ([768, 1024, 2048, 4096, 8192] if full else [768, 2048, 8192]):
            cases.append(dict(family="norm", op=op, M=total // n, N=n))
    cases.append(dict(family="model", op="gpt", preset="char-64", B=32, L=64))
    cases.append(dict(family="model", op="bert", preset="mini", B=32, L=64))
    cases.append(dict(family="model", op="vit", preset="digits", B=128))
    cases.append(dict(family="model", op="bert-padfree", preset="mini", B=32, L=128))
    cases.append(dict(family="model", op="llama", preset="llama-small", B=8, L=256))
    # the same with a BPE-sized vocabulary (32k): the output layer becomes the largest tensor of the step
    cases.append(dict(family="model", op="llama", preset="llama-small", B=8, L=256, V=32768))
    # Linear cross-entropy at the issue's sizes (N tokens, hidden H, vocabulary V). On one core the smallest takes
    # seconds per call, the target case (N 8192, H 1024, V 128k: 6.6 TFLOP forward + backward) minutes; --full
    # adds the rest of the issue's grid (hours on one core).
    lce = [(4096, 1024, 32768), (8192, 1024, 131072)]
    if full:
        lce += [(n, h, v) for n in (4096, 8192, 16384) for h in (1024, 4096) for v in (32768, 131072, 262144)
                if (n, h, v) not in lce]
    cases += [dict(family="linear_ce", op="linear_cross_entropy", N=n, H=h, V=v) for n, h, v in lce]
    # Rotary: Llama-3-8B's attention (32 query heads over 8 key / value heads, head dim 128) at 2 x 1024 tokens
    cases.append(dict(family="rotary", op="apply_rotary_pos_emb", B=2, L=1024, H=32, Hkv=8, D=128))
    cases.append(dict(family="rotary", op="apply_rotary_pos_emb", B=8, L=512, H=12, Hkv=12, D=64))
    # SwiGLU: 4096 tokens of Llama-2-7B's feed-forward (11008 features), concatenated and as two tensors
    for layout in ("concat", "pair"):
        cases.append(dict(family="gated_mlp", op="swiglu", M=4096, F=11008, layout=layout))
    return [c for c in cases if not only or c["family"] in only]


def label(case: dict) -> str:
    if case["family"] == "attention":
        return f"B{case['B']} H{case['H']} L=S={case['L']} D{case['D']} {case['mask']}"
    if case["family"] == "model":
        return (f"{case['op']} {case['preset']} B{case['B']}" + (f" L{case['L']}" if "L" in case else "")
                + (f" V{case['V']}" if "V" in case else ""))
    if case["family"] == "linear_ce":
        return f"N{case['N']} H{case['H']} V{case['V']}"
    if case["family"] == "rotary":
        return f"B{case['B']} L{case['L']} H{case['H']}/{case['Hkv']} D{case['D']}"
    if case["family"] == "gated_mlp":
        return f"{case['M']}x{case['F']} {case['layout']}"
    shape = case.get("shape") or [case["M"], case["N"]]
    extra = f" {case['kind']}" if case["family"] == "softmax" else ""
    return "x".join(map(str, shape)) + extra


# ----------------------------------------------------------------------------- building the calls


Call = Callable[[bool], None]      # call(backward): one forward, or forward + backward


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _attention(case: dict) -> dict[str, Call]:
    import fused_kernels

    b, h, l, d = case["B"], case["H"], case["L"], case["D"]
    g = _gen()
    q, k, v, do = (torch.randn(b, h, l, d, generator=g) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    causal = case["mask"] == "causal"
    keep = None
    if case["mask"] == "padding":   # key lengths in [L/2, L], the same for both
        lens = torch.randint(l // 2, l + 1, (b,), generator=g)
        keep = (torch.arange(l) < lens[:, None])[:, None, None, :]

    def ours(backward: bool) -> None:
        if case["op"] == "sdpa":
            out = fused_kernels.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal)
        else:
            out = fused_kernels.attention(q, k, v, causal=causal, attn_mask=keep)
        if backward:
            out.backward(do)

    def eager(backward: bool) -> None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal)
        if backward:
            out.backward(do)
    return dict(ours=ours, torch=eager, leaves=leaves)


def _softmax(case: dict) -> dict[str, Call]:
    import fused_kernels

    shape = case.get("shape") or [4, case["M"] // 4, case["N"]]
    g = _gen()
    x = torch.randn(shape, generator=g).requires_grad_()
    dy = torch.randn(shape, generator=g)
    kind = case["kind"]
    keep = None
    if kind == "masked":     # (4, 1, N) bool, ~10% of the keys masked, never a whole row
        keep = torch.rand(shape[0], 1, shape[-1], generator=g) > 0.1
        keep[..., 0] = True
    scale, causal = (0.125, True) if kind == "scale+causal" else (1.0, False)
    upper = torch.ones(shape[-2], shape[-1], dtype=torch.bool).triu(1) if causal else None

    def ours(backward: bool) -> None:
        y = fused_kernels.softmax(x, -1, mask=keep, scale=scale, is_causal=causal)
        if backward:
            y.backward(dy)

    def eager(backward: bool) -> None:
        if keep is not None:
            y = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
        elif causal:
            y = torch.softmax((x * scale).masked_fill(upper, float("-inf")), -1)
        else:
            y = torch.softmax(x, -1)
        if backward:
            y.backward(dy)
    return dict(ours=ours, torch=eager, leaves=[x])


def _norm(case: dict) -> dict[str, Call]:
    import fused_kernels

    m, n, op = case["M"], case["N"], case["op"]
    g = _gen()
    x, dy = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    res = torch.randn(m, n, generator=g) if op == "add_layer_norm" else None
    w, b = 1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g)
    leaves = [t.requires_grad_() for t in (x, res, w, b) if t is not None]
    eps = 1e-5

    def run(fn: Callable[[], torch.Tensor], backward: bool) -> None:
        out = fn()
        if backward:
            out.backward(dy)

    if op == "layer_norm":
        fns = (lambda: fused_kernels.layer_norm(x, (n,), w, b, eps), lambda: F.layer_norm(x, (n,), w, b, eps))
    elif op == "rms_norm":
        fns = (lambda: fused_kernels.rms_norm(x, (n,), w, eps), lambda: F.rms_norm(x, (n,), w, eps))
    else:   # the gradient reaches both outputs through their sum
        def ours_aln() -> torch.Tensor:
            out, r = fused_kernels.add_layer_norm(x, res, w, b, eps)
            return out + r

        def eager_aln() -> torch.Tensor:
            r = x + res
            return F.layer_norm(r, (n,), w, b, eps) + r
        fns = (ours_aln, eager_aln)
    return dict(ours=lambda bw: run(fns[0], bw), torch=lambda bw: run(fns[1], bw), leaves=leaves)


def _linear_ce(case: dict) -> dict[str, Call]:
    import fused_kernels

    n, h, v = case["N"], case["H"], case["V"]
    g = _gen()
    x = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) * h ** -0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)

    def ours(backward: bool) -> None:
        loss = fused_kernels.linear_cross_entropy(x, w, t)
        if backward:
            loss.backward()

    def eager(backward: bool) -> None:
        loss = F.cross_entropy(F.linear(x, w), t)
        if backward:
            loss.backward()
    return dict(ours=ours, torch=eager, leaves=[x, w], flop=(3 * 2 * n * h * v))


def _rotary(case: dict) -> dict[str, Call]:
    import fused_kernels
    from bench.models import torch_rope

    b, l, h, hkv, d = case["B"], case["L"], case["H"], case["Hkv"], case["D"]
    g = _gen()
    fused = torch.randn(b, l, (h + 2 * hkv) * d, generator=g).requires_grad_()   # a qkv projection's output
    cos, sin = fused_kernels.rope_cos_sin(torch.arange(l).expand(b, l), d)
    dq, dk = torch.randn(b, h, l, d, generator=g), torch.randn(b, hkv, l, d, generator=g)

    def heads() -> tuple[torch.Tensor, torch.Tensor]:
        q = fused[..., : h * d].view(b, l, h, d).transpose(1, 2)                  # (B, H, L, D) strided views
        k = fused[..., h * d:(h + hkv) * d].view(b, l, hkv, d).transpose(1, 2)
        return q, k

    def run(fn, backward: bool) -> None:
        qo, ko = fn(*heads(), cos, sin)
        if backward:
            torch.autograd.backward([qo, ko], [dq, dk])
    return dict(ours=lambda bw: run(fused_kernels.apply_rotary_pos_emb, bw), torch=lambda bw: run(torch_rope, bw),
                leaves=[fused])


def _gated(case: dict) -> dict[str, Call]:
    import fused_kernels

    m, f = case["M"], case["F"]
    g = _gen()
    gate_up = torch.randn(m, 2 * f, generator=g).requires_grad_()
    gate, up = torch.randn(m, f, generator=g).requires_grad_(), torch.randn(m, f, generator=g).requires_grad_()
    dy = torch.randn(m, f, generator=g)
    concat = case["layout"] == "concat"

    def ours(backward: bool) -> None:
        y = fused_kernels.swiglu(gate_up) if concat else fused_kernels.swiglu(gate, up)
        if backward:
            y.backward(dy)

    def eager(backward: bool) -> None:
        if concat:
            a, b_ = gate_up.chunk(2, dim=-1)
            y = F.silu(a) * b_
        else:
            y = F.silu(gate) * up
        if backward:
            y.backward(dy)
    return dict(ours=ours, torch=eager, leaves=[gate_up] if concat else [gate, up])


def long_tailed_lengths(b: int, l: int, g: torch.Generator) -> torch.Tensor:
    """(b,) lengths in [1, l]: log-normal with median l / 6 (sigma 0.9), as in real corpora, where a few
    long sequences set the padded width of a batch of mostly short ones."""
    lens = torch.exp(torch.randn(b, generator=g) * 0.9 + torch.log(torch.tensor(l / 6)))
    lens = lens.round().clamp(1, l).long()
    lens[0] = l                                             # one sequence as long as the batch: the width is L
    return lens


def _padfree(case: dict) -> dict[str, Call]:
    """BERT pre-training steps, padding-free ("ours") against the same model padded ("torch" column)."""
    import dataclasses

    from transformer import BERTConfig, BERTForPreTraining

    b, l = case["B"], case["L"]
    cfg = BERTConfig.from_preset(case["preset"], max_seq_len=max(l, 64), dropout=0.0, attn_dropout=0.0)
    g = _gen()
    lens = long_tailed_lengths(b, l, g)
    mask = (torch.arange(l) < lens[:, None]).long()
    ids = torch.randint(5, cfg.vocab_size, (b, l), generator=g) * mask
    picked = (torch.rand(b, l, generator=g) < 0.15) & mask.bool()
    labels = torch.where(picked, ids, -100)
    nsp = torch.randint(0, 2, (b,), generator=g)

    def provider(padding_free: bool) -> Call:
        torch.manual_seed(0)
        model = BERTForPreTraining(dataclasses.replace(cfg, padding_free=padding_free)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(backward: bool) -> None:
            if not backward:
                with torch.no_grad():
                    model(ids, attention_mask=mask, labels=labels, next_sentence_label=nsp)
                return
            opt.zero_grad(set_to_none=True)
            model(ids, attention_mask=mask, labels=labels, next_sentence_label=nsp).loss.backward()
            opt.step()
        return step

    return dict(ours=provider(True), torch=provider(False), leaves=[],
                note=f"{int(lens.sum())} of {b * l} tokens real ({lens.float().mean() / l:.0%})")


def _model(case: dict) -> dict[str, Call]:
    """One training step (forward with labels, backward, AdamW step), each provider its own model with
    the same initial weights, built once."""
    if case["op"] == "bert-padfree":
        return _padfree(case)
    from bench.models import torch_ops
    from transformer import GPT, BERTConfig, BERTForSequenceClassification, GPTConfig, ViT, ViTConfig

    def build() -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
        torch.manual_seed(0)
        g = _gen()
        if case["op"] == "gpt":
            cfg = GPTConfig.from_preset(case["preset"])
            model = GPT(cfg)
            ids = torch.randint(0, cfg.vocab_size, (case["B"], case["L"]), generator=g)
            return model, lambda: model(ids, labels=ids).loss
        if case["op"] == "llama":     # the training task's loss: linear_cross_entropy, or (torch) logits + CE
            cfg = GPTConfig.from_preset(case["preset"], max_seq_len=max(case["L"], 64),
                                        vocab_size=case.get("V", GPTConfig.presets[case["preset"]]["vocab_size"]))
            model = GPT(cfg)
            ids = torch.randint(0, cfg.vocab_size, (case["B"], case["L"] + 1), generator=g)
            return model, lambda: model(ids[:, :-1], targets=ids[:, 1:], return_logits=False).loss
        if case["op"] == "bert":
            cfg = BERTConfig.from_preset(case["preset"], num_labels=8)
            model = BERTForSequenceClassification(cfg)
            ids = torch.randint(1, cfg.vocab_size, (case["B"], case["L"]), generator=g)
            lens = torch.randint(case["L"] // 2, case["L"] + 1, (case["B"],), generator=g)
            mask = (torch.arange(case["L"]) < lens[:, None]).long()
            labels = torch.randint(0, 8, (case["B"],), generator=g)
            return model, lambda: model(ids, attention_mask=mask, labels=labels).loss
        cfg = ViTConfig.from_preset(case["preset"])
        model = ViT(cfg)
        pixels = torch.randn(case["B"], cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)
        labels = torch.randint(0, cfg.num_classes, (case["B"],), generator=g)
        return model, lambda: model(pixels, labels=labels).loss

    def provider(context) -> Call:
        with context():
            model, loss_fn = build()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(backward: bool) -> None:
            with context():
                if not backward:
                    with torch.no_grad():
                        loss_fn()
                    return
                opt.zero_grad(set_to_none=True)
                loss_fn().backward()
                opt.step()
        return step

    import contextlib
    return dict(ours=provider(contextlib.nullcontext), torch=provider(torch_ops), leaves=[])


BUILDERS = {"attention": _attention, "softmax": _softmax, "norm": _norm, "model": _model, "linear_ce": _linear_ce,
            "rotary": _rotary, "gated_mlp": _gated}


def heavy(case: dict) -> bool:
    """A case above HEAVY_FLOP of work per forward + backward (the large linear cross-entropy ones)."""
    return case["family"] == "linear_ce" and 6 * case["N"] * case["H"] * case["V"] > HEAVY_FLOP


def modes(case: dict) -> list[str]:
    return ["train"] if case["family"] == "model" else ["fwd", "fwd+bwd"]


# ----------------------------------------------------------------------------- timing


def _timed(call: Call, backward: bool, leaves: list[torch.Tensor]) -> float:
    for t in leaves:
        t.grad = None
    t0 = time.perf_counter()
    if backward:
        call(True)
    else:
        with torch.no_grad():
            call(False)
    return time.perf_counter() - t0


def time_pair(calls: dict, backward: bool, min_pairs: int | None = None) -> dict:
    """Interleaved pairs, order alternating; medians in ms and the median of the per-pair ratios."""
    ours, theirs, leaves = calls["ours"], calls["torch"], calls["leaves"]
    min_pairs = MIN_PAIRS if min_pairs is None else min_pairs
    for fn in (ours, theirs):
        _timed(fn, backward, leaves)
    t_ours: list[float] = []
    t_torch: list[float] = []
    while len(t_ours) < min_pairs or (min(sum(t_ours), sum(t_torch)) < MIN_SECONDS and len(t_ours) < MAX_PAIRS):
        first_ours = len(t_ours) % 2 == 0
        for is_ours in ((True, False) if first_ours else (False, True)):
            (t_ours if is_ours else t_torch).append(_timed(ours if is_ours else theirs, backward, leaves))
    med_o, med_t = statistics.median(t_ours), statistics.median(t_torch)
    settled = len(t_ours) >= RESULT_PAIRS or min(sum(t_ours), sum(t_torch)) >= RESULT_SECONDS
    return dict(ours_ms=1e3 * med_o, torch_ms=1e3 * med_t, ratio=med_o / med_t, pairs=len(t_ours),
                pair_ratio=statistics.median(a / b for a, b in zip(t_ours, t_torch)), noise=not settled)


# ----------------------------------------------------------------------------- peak memory (child process)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _peak_above_now(fn: Callable[[], None]) -> float:
    """MiB of resident memory ``fn`` needed at its peak above the resident size before it: Linux's
    high-water mark (VmHWM) is reset first (``/proc/self/clear_refs``), so importing torch or an earlier
    call does not hide the peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) / 1024


def shrink(spec: dict) -> dict:
    """A tiny case on the same code path: run first, it pages in the code that the case uses (resident
    too), so that the measured peak is the case's memory, not which library functions it touches."""
    small = dict(spec)
    if spec["family"] == "attention":
        small.update(B=1, H=1, L=16)
    elif spec["family"] == "model":
        small.update(B=2)
    elif spec["family"] == "linear_ce":
        small.update(N=64, V=300)
    elif spec["family"] == "rotary":
        small.update(B=1, L=8)
    elif spec["family"] == "gated_mlp":
        small.update(M=8)
    elif "shape" in spec:
        small["shape"] = [1, 1, 16, 16]
    else:
        small.update(M=8, N=16)
    return small


def child(spec: dict, provider: str) -> dict:
    """In a fresh process: the peak resident memory of the forward and of the forward + backward (or of
    the training step), each above the resident size right before it, after a warm-up on a tiny case."""
    torch.set_num_threads(1)
    warm = BUILDERS[spec["family"]](shrink(spec))[provider]
    for backward in ((True,) if spec["family"] == "model" else (False, True)):
        _timed(warm, backward, [])
    calls = BUILDERS[spec["family"]](spec)
    fn = calls[provider]
    found = {"base_mb": _status_kb("VmRSS") / 1024,
             "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if spec["family"] == "model":
        found["train_mb"] = _peak_above_now(lambda: fn(True))
        return found

    def forward() -> None:
        with torch.no_grad():
            fn(False)
    found["fwd_mb"] = _peak_above_now(forward)
    found["fwd+bwd_mb"] = _peak_above_now(lambda: fn(True))
    return found


def _run_child(spec: dict, provider: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_KERNELS_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    # glibc's malloc moves its mmap threshold as large blocks are freed, so whether a tensor's memory
    # comes back as fresh pages or reused heap (and so the resident peak) would depend on the history
    # of the process; a fixed threshold gives every tensor above it its own mapping, returned on free:
    # the peak RSS then follows the live tensors (the same for both providers).
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "bench.cpu", "--child", json.dumps(spec), provider], cwd=root,
                          env=env, capture_output=True, text=True, timeout=3600 if heavy(spec) else 900)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the machine and the report


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(cpu=model, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), date=datetime.date.today().isoformat(),
                loadavg_start=os.getloadavg())


def _fmt_ratio(r: float | None, target: float, noise: bool = False) -> str:
    if r is None:
        return "-"
    if noise:
        return f"~{r:.2f} (noise)"
    return f"**{r:.2f}**" if r > target else f"{r:.2f}"


def table(records: list[dict], info: dict) -> str:
    lines = [
        f"CPU: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, Python {info['python']}; "
        f"{info['threads']} thread; {info['date']}; load average at start {info['loadavg_start'][0]:.2f}, "
        f"at end {info.get('loadavg_end', [float('nan')])[0]:.2f}." + (f" {info['note']}" if info.get("note") else ""),
        "",
        "ours = our public functions on CPU tensors (the PyTorch path), torch = torch eager with the same "
        "semantics; times are medians of interleaved pairs (ours / torch = the ratio of the two medians; next to "
        "it the median of the per-pair ratios); memory = peak RSS above the RSS before the call, in a process of "
        f"its own. Ratios above {TARGET_TIME} (time) or {TARGET_MEMORY} (memory) in bold.",
        "",
        "| family | op | case | mode | ours ms | torch ms | ours / torch | median of pair ratios | pairs | ours MB "
        "| torch MB | mem ours / torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        mo, mt = r.get("ours_mb"), r.get("torch_mb")
        mem_ratio = None
        if mo is not None and mt is not None and mt > 0:
            mem_ratio = mo / mt
        mem = (f"{mo:.1f}" if mo is not None else "-", f"{mt:.1f}" if mt is not None else "-")
        lines.append(f"| {r['family']} | {r['op']} | {r['label']} | {r['mode']} | {r['ours_ms']:.3f} | "
                     f"{r['torch_ms']:.3f} | {_fmt_ratio(r['ratio'], TARGET_TIME, r.get('noise', False))} | "
                     f"{r['pair_ratio']:.2f} | "
                     f"{r['pairs']} | {mem[0]} | "
                     f"{mem[1]} | {_fmt_ratio(mem_ratio, TARGET_MEMORY)} |")
    notes = [f"{r['label']}: {r['note']}; its torch column is the same model padded" for r in records
             if r.get("note") and r["mode"] == "train"]
    if notes:
        lines += [""] + notes
    noise = [r for r in records if r.get("noise")]
    over = [r for r in records if r["ratio"] > TARGET_TIME and not r.get("noise")]
    mem_over = [r for r in records if r.get("ours_mb") and r.get("torch_mb") and r["ours_mb"] > TARGET_MEMORY *
                r["torch_mb"] and r["ours_mb"] - r["torch_mb"] > 1.0]
    lines += ["", f"{len(records)} measurements; {len(over)} above {TARGET_TIME}x in time"
              + (f" (worst {max(r['ratio'] for r in over):.2f}x)" if over else "")
              + f"; {len(mem_over)} above {TARGET_MEMORY}x (and 1 MB) in memory."
              + (f" {len(noise)} time ratios from fewer than {RESULT_PAIRS} pairs and {RESULT_SECONDS:g} s are noise, "
                 f"not results (--smoke)." if noise else "")]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench --device cpu", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="attention at L = 128, 256, ..., 2048 and more norm widths")
    p.add_argument("--only", action="append", choices=FAMILIES, metavar="FAMILY")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--out", default=os.path.join("bench", "results", "tmp"))
    p.add_argument("--note", default="", help="a sentence about the machine's state, added to the table")
    p.add_argument("--smoke", action="store_true", help="one tiny case per kind, few pairs: checks the machinery")
    p.add_argument("--aa", action="store_true",
                   help="time torch against itself (both sides the torch call): the noise floor of the ratios")
    p.add_argument("--match", action="append", metavar="TEXT",
                   help="only the cases whose label contains TEXT (repeatable)")
    p.add_argument("--child", nargs=2, metavar=("SPEC", "PROVIDER"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child[0]), args.child[1])))
        return 0
    import fused_kernels
    from fused_kernels._core import backend as _backend

    if _backend.INTERPRET or fused_kernels.get_backend() != "auto":
        print("run without TRITON_INTERPRET and FUSED_KERNELS_BACKEND: this measures what a CPU tensor runs by default",
              file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    info = machine()
    info["note"] = args.note + (" A/A run: both columns are the torch call (the noise floor)." if args.aa else "")
    cases = smoke_grid() if args.smoke else grid(args.full, args.only)
    if args.match:
        cases = [c for c in cases if any(m in label(c) for m in args.match)]
    if args.smoke:
        global MIN_PAIRS, MIN_SECONDS
        MIN_PAIRS, MIN_SECONDS = 2, 0.0
    os.makedirs(args.out, exist_ok=True)
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, 1 thread; {len(cases)} cases", flush=True)
    records: list[dict] = []
    start = time.monotonic()
    try:
        for case in cases:
            calls = BUILDERS[case["family"]](case)
            if args.aa:
                calls["ours"] = calls["torch"]
            for mode in modes(case):
                t = time_pair(calls, mode != "fwd", HEAVY_PAIRS if heavy(case) else None)
                rec = dict(case=case, family=case["family"], op=case["op"], label=label(case), mode=mode, **t)
                records.append(rec)
                if calls.get("note"):
                    rec["note"] = calls["note"]
                print(f"{case['family']:9s} {case['op']:14s} {label(case):34s} {mode:7s} ours {t['ours_ms']:9.3f} ms  "
                      f"torch {t['torch_ms']:9.3f} ms  {t['ratio']:.3f}{' (noise)' if t['noise'] else ''}"
                      + (f"  ({calls['note']}; torch column: padded)" if calls.get("note") else ""), flush=True)
            del calls
        if not args.no_memory and not args.aa:
            print("peak memory: one process per case and provider, two at a time (the heavy ones alone)", flush=True)
            jobs = [(case, p) for case in cases for p in ("ours", "torch")]
            with ThreadPoolExecutor(2) as pool:
                light = dict(zip([i for i, (c, _) in enumerate(jobs) if not heavy(c)],
                                 pool.map(lambda job: _run_child(*job), [j for j in jobs if not heavy(j[0])])))
            found = [light[i] if i in light else _run_child(*job) for i, job in enumerate(jobs)]
            by_case = {}
            for (case, p), res in zip(jobs, found):
                by_case.setdefault(json.dumps(case, sort_keys=True), {})[p] = res
            for rec in records:
                res = by_case[json.dumps(rec["case"], sort_keys=True)]
                key = f"{rec['mode']}_mb"
                rec["ours_mb"], rec["torch_mb"] = res["ours"].get(key), res["torch"].get(key)
                rec["memory_errors"] = [r["error"] for r in res.values() if "error" in r] or None
    finally:
        torch.set_num_threads(threads)
        info["loadavg_end"] = os.getloadavg()
        info["seconds"] = time.monotonic() - start
        summary = table(records, info)
        with open(os.path.join(args.out, "cpu.json"), "w") as f:
            json.dump(dict(machine=info, records=records), f, indent=1)
        with open(os.path.join(args.out, "cpu.md"), "w") as f:
            f.write(summary)
        print("\n" + summary + f"\nwrote {args.out}/cpu.md and cpu.json in {info['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

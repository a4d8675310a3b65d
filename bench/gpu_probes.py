"""Targeted GPU probes for ``bench/gpu_check.sh``: the things the interpreter cannot show, each checked against a
reference, one line per case (``PASS`` / ``FAIL``), exit code 1 on any failure.

    python bench/gpu_probes.py [--dry-run] PROBE ...

Probes (run each in its own process under ``CUDA_LAUNCH_BLOCKING=1``: a fault then names its launch, and cannot
take the other probes' context with it):

- ``grid``: launches over 65,535 programs on grid axis 1 or 2 (B*H = 70,000 dense forward and backward,
  flash-decoding over B*Hkv = 70,000, varlen with 2,048 sequences x 32 heads, the paged cache with 8,192 sequences
  x 8 KV heads, a block mask over B*H = 70,000): each is split into launches the driver accepts
  (``_core.launch.split_grid``; the probe checks that the split happened) and matches the reference;
- ``fp64``: float64 attention with bool and float masks, causal, ``seqlens_k``, GQA and decoding, forward and
  gradients, against the float64 reference (the bool mask takes the float-mask kernels where the triton release's
  compiler fails it: ``ops.attention.launch.FP64_BOOL_MASK_AS_FLOAT``);
- ``sdpa_views``: bf16 ``scaled_dot_product_attention`` on q, k, v views of one fused (B, L, 3, H, D) projection,
  forward and gradients, ours and torch's against a float32 reference: ours within 2x torch's error;
- ``small``: one small call of every kernel (dense forward / backward with and without TMA, decoding, varlen,
  paged append and attention, block mask, variants, LayerNorm, softmax), checked loosely: the workload of the
  ``compute-sanitizer --tool memcheck`` stage.

Judging (``_judge``): against a reference in float32 (float64 for float64), the kernel's error at most twice that
of the same computation in PyTorch in the kernel's dtype, plus two ulps of the dtype at the output's scale.

``--dry-run``: the same probes at interpreter-sized shapes through Triton's interpreter on the CPU, with the grid
limit lowered so that the splits happen (how ``tests/test_gpu_check.py`` runs this script end to end).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace


def _sizes(dry: bool) -> SimpleNamespace:
    """Shapes per probe: the real ones on a GPU, tiny ones for the dry run (the grid limit is then 3)."""
    if dry:
        return SimpleNamespace(grid_limit=3, dense=(5, 2, 2, 16, 16), decode=(7, 4, 1, 300), varlen=(5, 2, 7),
                               paged=(5, 4, 2, 16, 40), mask=(4, 2, 64), fp64=(2, 2, 1, 20, 23), fp64_dims=(16,),
                               views=(2, 40, 2), small=(1, 2, 1, 40, 53))
    return SimpleNamespace(grid_limit=None, dense=(7000, 10, 10, 16, 16), decode=(70_000, 4, 1, 256),
                           varlen=(2048, 32, 8), paged=(8192, 32, 8, 16, 40), mask=(7000, 10, 128),
                           fp64=(2, 4, 2, 300, 333), fp64_dims=(64, 128), views=(4, 1000, 12),
                           small=(2, 4, 2, 300, 333))


class Probe:
    """Runs cases, prints one line each, remembers failures."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def case(self, name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            detail = fn()
            print(f"PASS {name}: {detail} ({time.perf_counter() - start:.1f} s)", flush=True)
        except Exception as exc:   # report and go on: one line per case
            self.failed.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc).strip()[:2000]}", flush=True)
            traceback.print_exc(limit=4, file=sys.stdout)


# Floor of the 2x rule per dtype, relative to the output's scale: two ulps of a 16-bit dtype; in float32 and
# float64, where the reference may be the same computation in the same dtype (PyTorch's error 0), the tolerances of
# tests/helpers.py.
_FLOOR = {"torch.float16": 2 * 2.0**-10, "torch.bfloat16": 2 * 2.0**-7, "torch.float32": 1e-5, "torch.float64": 1e-10}


def _judge(name: str, got, want, base) -> str:
    """``got`` (kernel) vs ``want`` (high precision) by the 2x rule with ``base`` (PyTorch in got's dtype)."""
    import torch
    floor = _FLOOR[str(got.dtype)]
    got, want, base = (t.detach().double().cpu() for t in (got, want, base))
    if not torch.equal(got.isnan(), want.isnan()):
        raise AssertionError(f"{name}: NaN positions differ from the reference")
    ok = ~want.isnan()
    err = (got - want)[ok].abs().max().item() if ok.any() else 0.0
    base_err = (base - want)[ok].abs().max().item() if ok.any() else 0.0
    scale = max(want[ok].abs().max().item() if ok.any() else 0.0, 1e-3)
    bound = 2.0 * base_err + floor * scale
    if not math.isfinite(err) or err > bound:
        raise AssertionError(f"{name}: error {err:.3g} > {bound:.3g} (2 x PyTorch's {base_err:.3g} + floor)")
    return f"{name} err {err:.2e} (torch {base_err:.2e})"


def _grads(out, inputs, dout):
    import torch
    return list(torch.autograd.grad(out, inputs, dout))


def _compare(name: str, kernel: Callable, reference: Callable, inputs: list, *, grads: bool = True,
             ref_dtype=None) -> str:
    """kernel(*inputs) vs reference on ``ref_dtype`` (float32, or float64 for float64) copies, by the 2x rule
    against reference(*inputs) in the inputs' dtype; the same for every input's gradient when ``grads``."""
    import torch
    dtype = inputs[0].dtype
    ref_dtype = ref_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)

    def run(fn, xs):
        leaves = [x.detach().clone().requires_grad_(grads) for x in xs]
        out = fn(*leaves)
        return out, leaves

    out, leaves = run(kernel, inputs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    got = [out, *(_grads(out, leaves, dout) if grads else [])]
    ref_out, ref_leaves = run(reference, [x.to(ref_dtype) for x in inputs])
    want = [ref_out, *(_grads(ref_out, ref_leaves, dout.to(ref_dtype)) if grads else [])]
    base_out, base_leaves = run(reference, inputs)
    base = [base_out, *(_grads(base_out, base_leaves, dout) if grads else [])]
    return "; ".join(_judge(label, g, w, b) for label, g, w, b in zip(("out", "d0", "d1", "d2"), got, want, base))


class _Launches:
    """Counts the launches per kernel (through ``_core.launch.intercept``)."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}

    def __call__(self, call, run) -> None:
        self.count[call.name] = self.count.get(call.name, 0) + 1
        run(call)


def probe_grid(p: Probe, sz, device: str) -> None:
    import torch

    import fused_kernels
    from fused_kernels._core.launch import intercept
    from fused_kernels.ops.attention.examples import stripes

    def torch_path(fn):
        def run(*args):
            with fused_kernels.use_backend("torch"):
                return fn(*args)
        return run

    def split(name: str, launches: _Launches, kernels: tuple[str, ...]) -> str:
        many = {k: launches.count.get(k, 0) for k in kernels}
        if not all(n > 1 for n in many.values()):
            raise AssertionError(f"{name}: expected split launches, got {many}")
        return " launches " + ", ".join(f"{k} x{n}" for k, n in many.items())

    gen = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16

    def rand(*shape, dtype=bf16):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    def dense(b, h, hkv, l, s):
        q, k, v = rand(b, h, l, 64), rand(b, hkv, s, 64), rand(b, hkv, s, 64)
        launches = _Launches()

        def fn(q, k, v):
            return fused_kernels.attention(q, k, v, causal=True)

        with intercept(launches):
            detail = _compare("dense", fn, torch_path(fn), [q, k, v])
        return detail + split("dense", launches, ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel",
                                                  "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"))

    def decode(b, h, hkv, s):
        q, k, v = rand(b, h, 1, 64), rand(b, hkv, s, 64), rand(b, hkv, s, 64)
        launches = _Launches()

        def fn(q, k, v):
            return fused_kernels.attention(q, k, v, causal=True)

        with intercept(launches), torch.no_grad():
            detail = _compare("decode", fn, torch_path(fn), [q, k, v], grads=False)
        return detail + split("decode", launches, ("_attn_fwd_split_kernel", "_attn_combine_kernel"))

    def varlen(batch, h, n):
        lengths = [(i % n) + 1 for i in range(batch)]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        total = int(cu[-1])
        q, k, v = rand(total, h, 64), rand(total, h, 64), rand(total, h, 64)
        launches = _Launches()

        def fn(q, k, v):
            return fused_kernels.varlen_attention(q, k, v, cu, cu, n, n, causal=True)

        with intercept(launches):
            detail = _compare("varlen", fn, torch_path(fn), [q, k, v])
        return detail + split("varlen", launches, ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"))

    def paged(b, h, hkv, page, length):
        blocks = -(-length // page)
        table = torch.arange(b * blocks, dtype=torch.int32, device=device).view(b, blocks)
        lens = torch.tensor([(i % length) + 1 for i in range(b)], dtype=torch.int32, device=device)
        zero = torch.zeros_like(lens)
        k_cache = torch.zeros(b * blocks, page, hkv, 64, dtype=bf16, device=device)
        v_cache = torch.zeros_like(k_cache)
        k_new, v_new = rand(b, hkv, length, 64), rand(b, hkv, length, 64)
        launches = _Launches()
        with intercept(launches), torch.no_grad():
            fused_kernels.paged_append(k_cache, v_cache, table, zero, k_new, v_new)
            want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
            with fused_kernels.use_backend("torch"):
                fused_kernels.paged_append(want_k, want_v, table, zero, k_new, v_new)
            if not (torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)):
                raise AssertionError("paged_append: the pool differs from the PyTorch path's")

            def fn(q):   # the pool in q's dtype: the float32 reference reads the same values
                return fused_kernels.paged_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), table, lens)

            detail = _compare("paged", fn, torch_path(fn), [rand(b, h, 1, 64)], grads=False)
        return "append equal; " + detail + split("paged", launches, ("_paged_append_kernel", "_paged_attn_fwd_kernel",
                                                                     "_attn_combine_kernel"))

    def mask(bm, hm, length):
        launches = _Launches()
        with intercept(launches):
            got = fused_kernels.block_mask(stripes, bm, hm, length, length, device=device)
        with fused_kernels.use_backend("torch"):
            want = fused_kernels.block_mask(stripes, bm, hm, length, length, device=device)
        if not torch.equal(got.classes, want.classes):
            raise AssertionError("block_mask: classes differ from the PyTorch path's")
        return "classes equal;" + split("block_mask", launches, ("_block_mask_kernel",))

    b, h, hkv, _, _ = sz.dense
    p.case(f"grid dense B*H={b * h}", lambda: dense(*sz.dense))
    b, _, hkv, _ = sz.decode
    p.case(f"grid decode B*Hkv={b * hkv}", lambda: decode(*sz.decode))
    p.case(f"grid varlen {sz.varlen[0]} sequences x {sz.varlen[1]} heads", lambda: varlen(*sz.varlen))
    p.case(f"grid paged {sz.paged[0]} sequences x {sz.paged[2]} KV heads", lambda: paged(*sz.paged))
    p.case(f"grid block_mask B*H={sz.mask[0] * sz.mask[1]}", lambda: mask(*sz.mask))


def probe_fp64(p: Probe, sz, device: str) -> None:
    import torch

    from fused_kernels.ops.attention import launch as at

    b, h, hkv, l, s = sz.fp64
    gen = torch.Generator().manual_seed(0)
    print(f"bool masks in float64 take the float-mask kernels: {at.FP64_BOOL_MASK_AS_FLOAT}", flush=True)
    for d in sz.fp64_dims:
        q = torch.randn(b, h, l, d, generator=gen, dtype=torch.float64).to(device)
        k = torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64).to(device)
        v = torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64).to(device)
        keep = (torch.rand(b, 1, l, s, generator=gen) > 0.3).to(device)
        keep[:, :, :3] = False                                               # fully masked rows
        bias = torch.randn(b, h, l, s, generator=gen, dtype=torch.float64).to(device)
        seqlens = torch.tensor([s, s // 3] * (b // 2) + [s] * (b % 2), device=device)
        cases = {
            "bool mask": dict(attn_mask=keep),
            "bool mask + causal + seqlens_k": dict(attn_mask=keep, causal=True, seqlens_k=seqlens),
            "float mask + causal": dict(attn_mask=bias, causal=True),
            "plain": {},
        }
        for label, kw in cases.items():
            p.case(f"fp64 d={d} {label}", _attention_case("fp64", kw, q, k, v))
        p.case(f"fp64 d={d} decode bool mask", _attention_case(   # one query: row 3 (rows 0-2 see no key)
            "fp64 decode", dict(attn_mask=keep[:, :, 3:4], causal=True), q[:, :, 3:4].contiguous(), k, v))


def _attention_case(name: str, kw: dict, q, k, v) -> Callable[[], str]:
    """A case: ``fused_kernels.attention(q, k, v, **kw)`` against ``attention_ref`` (``_compare``)."""
    import fused_kernels
    from fused_kernels import reference as ref
    return lambda: _compare(name, lambda *x: fused_kernels.attention(*x, **kw),
                            lambda *x: ref.attention_ref(*x, **kw), [q, k, v])


def probe_sdpa_views(p: Probe, sz, device: str) -> None:
    import torch
    import torch.nn.functional as F

    import fused_kernels

    b, l, h = sz.views
    for causal in (False, True):
        gen = torch.Generator().manual_seed(int(causal))
        qkv = torch.randn(b, l, 3, h, 64, generator=gen).to(device, torch.bfloat16)

        def split(t):
            return [t[:, :, i].transpose(1, 2) for i in range(3)]

        def ours(t, causal=causal):
            return fused_kernels.scaled_dot_product_attention(*split(t), is_causal=causal)

        def theirs(t, causal=causal):
            return F.scaled_dot_product_attention(*split(t), is_causal=causal)

        def case(qkv=qkv, ours=ours, theirs=theirs):
            # ours vs the float32 reference, judged by torch's own bf16 SDPA error on the same views
            return _compare("sdpa", ours, theirs, [qkv])

        p.case(f"sdpa bf16 fused-QKV views B={b} L={l} H={h} causal={causal}", case)


def probe_small(p: Probe, sz, device: str) -> None:
    """One small call of every kernel (the compute-sanitizer workload)."""
    import torch

    import fused_kernels
    from fused_kernels import reference as ref
    from fused_kernels._core.launch import force_arch
    from fused_kernels.ops.attention.examples import distance_penalty, distance_penalty_grad, stripes

    b, h, hkv, l, s = sz.small
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q, k, v = rand(b, h, l, 64), rand(b, hkv, s, 64), rand(b, hkv, s, 64)
    keep = (torch.rand(b, 1, 1, s, generator=gen) > 0.2).to(device)
    archs = [None] if device == "cpu" else [None, 80]      # None: the device's own configuration
    for arch in archs:
        tag = "native" if arch is None else f"sm{arch} tiles"
        with force_arch(arch) if arch is not None else contextlib.nullcontext():
            for label, kw in {"causal": dict(causal=True), "bool mask + seqlens_k": dict(
                    attn_mask=keep, seqlens_k=torch.tensor([s, s // 2] * (b // 2) + [s] * (b % 2), device=device)),
                    "dropout": dict(dropout_p=0.1),
                    "variants": dict(window=(64, 0), softcap=20.0, score_mod=distance_penalty,
                                     score_mod_grad=distance_penalty_grad, mask_mod=stripes)}.items():
                def run(kw=kw):
                    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
                    out = fused_kernels.attention(qq, kk, vv, **kw)
                    torch.autograd.grad(out.float().sum(), (qq, kk, vv))
                    if "dropout_p" in kw:
                        return "ran"
                    want = ref.attention_ref(q.float(), k.float(), v.float(), **kw)
                    err = (out.float() - want).abs().max().item()
                    if not err < 0.1:
                        raise AssertionError(f"error {err:.3g}")
                    return f"err {err:.2e}"

                p.case(f"small attention {label} ({tag})", run)
    p.case("small decode", lambda: _loose(fused_kernels.attention(q[:, :, :1], k, v, causal=True),
                                          ref.attention_ref(q[:, :, :1].float(), k.float(), v.float(), causal=True)))
    lens = [l // 3, 1, l - l // 3 - 1]
    cu = torch.tensor([0, lens[0], lens[0] + 1, l], dtype=torch.int32, device=device)
    qp, kp, vp = rand(l, h, 64), rand(l, hkv, 64), rand(l, hkv, 64)

    def varlen():
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (qp, kp, vp))
        out = fused_kernels.varlen_attention(qq, kk, vv, cu, cu, max(lens), max(lens), causal=True)
        torch.autograd.grad(out.float().sum(), (qq, kk, vv))
        return _loose(out, ref.varlen_attention_ref(qp.float(), kp.float(), vp.float(), cu, cu, max(lens), max(lens),
                                                    causal=True))

    p.case("small varlen", varlen)

    def paged():
        page, blocks = 16, -(-s // 16)
        table = torch.arange(b * blocks, dtype=torch.int32, device=device).view(b, blocks)
        k_cache = torch.zeros(b * blocks, page, hkv, 64, dtype=torch.bfloat16, device=device)
        v_cache = torch.zeros_like(k_cache)
        zero = torch.zeros(b, dtype=torch.int32, device=device)
        fused_kernels.paged_append(k_cache, v_cache, table, zero, k, v)
        out = fused_kernels.paged_attention(q[:, :, :4], k_cache, v_cache, table, zero + s)
        return _loose(out, ref.attention_ref(q[:, :, :4].float(), k.float(), v.float(), causal=True))

    p.case("small paged", paged)
    p.case("small block_mask", lambda: f"{fused_kernels.block_mask(stripes, b, h, l, s, device=device).classes.sum()} "
                                       "summed tile classes")
    x = rand(3, 37, 1000)
    w = rand(1000)

    def norms():
        xx, ww = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = fused_kernels.layer_norm(xx, (1000,), ww)
        torch.autograd.grad(out.float().sum(), (xx, ww))
        sm = fused_kernels.softmax(xx.detach(), mask=(x > 0), scale=0.5)
        return _loose(out, ref.layer_norm_ref(x.float(), (1000,), w.float())) + "; " + _loose(
            sm, ref.softmax_ref(x.float(), mask=(x > 0), scale=0.5))

    p.case("small layer_norm + softmax", norms)


def _loose(got, want) -> str:
    err = (got.float() - want.float()).abs().max().item()
    if not err < 0.1:
        raise AssertionError(f"error {err:.3g}")
    return f"err {err:.2e}"


PROBES = {"grid": probe_grid, "fp64": probe_fp64, "sdpa_views": probe_sdpa_views, "small": probe_small}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_probes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("probes", nargs="+", choices=sorted(PROBES))
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes through Triton's interpreter on the CPU, the grid limit lowered to 3")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"          # before triton is imported (by fused_kernels)
    import torch

    import fused_kernels
    from fused_kernels._core.launch import max_grid

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("FAIL no CUDA device (use --dry-run on a CPU)", flush=True)
        return 1
    sz = _sizes(args.dry_run)
    p = Probe()
    with fused_kernels.use_backend("triton"):
        for name in args.probes:
            print(f"-- probe {name} on {device}" + (f" (grid limit {sz.grid_limit})" if sz.grid_limit else ""),
                  flush=True)
            if sz.grid_limit:
                with max_grid(sz.grid_limit):
                    PROBES[name](p, sz, device)
            else:
                PROBES[name](p, sz, device)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{len(p.failed)} failed: {', '.join(p.failed)}" if p.failed else "all probes passed", flush=True)
    return 1 if p.failed else 0


if __name__ == "__main__":
    sys.exit(main())

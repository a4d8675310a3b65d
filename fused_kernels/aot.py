"""``python -m fused_kernels.aot``: compile every kernel configuration the launchers can choose, ahead of time
for real GPUs (sm_80 and sm_90a), on a machine without one, and check registers, spills and shared
memory.

    python -m fused_kernels.aot [--arch 80 90] [--json PATH] [--family NAME ...] [--filter SUBSTRING] [--jobs N]

Each configuration goes through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
with the specialization the runtime launcher would give a typical contiguous call: pointers aligned
to 16 bytes and integer arguments divisible by 16 carry ``tt.divisibility=16``, integers equal to 1
(a unit last-dim stride, a collapsed leading dim of size 1) become constants, floats stay ``fp32``
(``specialize`` below, the same rules as ``triton.runtime.jit``; where this triton exposes its own
argument binder the result is cross-checked against it). Registers and spill bytes come from the
``ptxas -v`` log of the PTX (the ptxas bundled with triton, ``--gpu-name=sm_80`` / ``sm_90a``): the
run triton itself makes to build the cubin, printed with ``TRITON_DUMP_PTXAS_LOG=1`` and captured, so
the numbers are those of the real cubin with triton's own extra flags (triton 3.9 adds
``--regAllocOptLevel=2`` and uses the CUDA 13 ptxas for sm_90a, which spill where a plain
``ptxas -v`` does not); on a cache hit, where no ptxas ran, ``ptxas -v`` is run on the PTX here. Shared
memory comes from the compiled kernel's metadata, and the static count of tensor-core instructions
(``mma.sync``, ``wgmma.mma_async``) from the PTX. Exit code 1 if any
configuration fails to compile, spills, needs more shared memory than a block may have (sm_80: 163 KB,
sm_90: 227 KB, the CUDA per-block opt-in limits the runtime checks at launch), or, for a kernel built
on ``tl.dot``, has no tensor-core instruction.

How the configurations are enumerated (one spec generator per kernel family, in ``FAMILIES``):

- Block sizes come from the launchers' own choice, never from numbers copied here: the row lengths
  ``n = 1, 2, 4, ...`` (and the largest ``n`` the single-block path takes) are run through the
  launcher's block choice (``layer_norm._block`` with ``layer_norm.fused_limit``; for
  softmax ``softmax._launch_rows`` itself, handed a recorder instead of the kernel) until the
  multi-pass path is reached. That yields every power-of-two ``BLOCK_N`` up to the single-block limit
  plus ``MULTIPASS_BLOCK``, each with its ``num_warps`` (``_launch.row_warps``). The row length kept
  for a block is ``n = BLOCK_N`` (a typical size, divisible by 16 from 16 up; sizes 1 to 8 specialize
  as such), the largest single-block ``n`` if the limit is not a power of two, and the first power of
  two past the limit for the multi-pass path.
- Every dtype the ops accept (fp16, bf16, fp32, fp64); the accumulator constexpr ``ACC`` follows it
  (``_launch.acc_dtype``) and fp64 halves the single-block limit inside the launchers.
- The constexpr feature switches at their heaviest and at their plainest. Every switch only adds
  loads, arithmetic and live values, so "all on" bounds registers and shared memory from above, and
  "all off" is the plain default call:
  LayerNorm forward: residual + dropout + weight + bias (float32 parameters with half inputs, the
  widest mixed precision the op accepts), LayerNorm not RMSNorm; or none of them.
  LayerNorm backward: weight + bias + gradient into residual_out + dropout + stored dresidual; or none.
  Softmax forward: no mask; bool mask + causal; float mask (input dtype) + causal. Softmax backward
  has no switches.
- Launch arguments are those of a typical call: contiguous ``(M, N)`` rows for LayerNorm (the
  backward's ``rows_per_program`` as for 8192 rows on 432 programs, 4 per SM of an A100), and for
  softmax 4-D ``(B, H, L, N)`` inputs laid out by the launcher (a padding mask ``(B, 1, 1, N)`` for
  the bool mask, a per-query mask ``(B, 1, L, N)`` for the float one, ``L = N`` when causal).
- Attention: see ``attention_specs``; the paged KV cache: ``paged_specs``; packed variable-length attention:
  ``varlen_specs``; the attention variants (windows, ALiBi, softcap, documents, prefix-LM, score and mask mods):
  ``variants_specs``.

To add a kernel family, write one generator yielding ``Spec`` objects and append it to ``FAMILIES``;
set ``tensor_cores=True`` on specs whose kernel must use tensor cores (``tl.dot``).

It must not run in a process with ``TRITON_INTERPRET=1`` (the ``jit`` decorators read it at import):
when that variable is set the command re-executes itself without it. ``TRITON_CACHE_DIR`` points at
a temporary directory unless it is already set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import sass

ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), which
# triton checks when it loads a kernel: 163 KB of the A100's 164 KB per SM, 227 KB of the H100's 228.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_TYPE = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.bool: "i1",
}
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: a tensor of ``dtype``, 16-byte aligned unless said otherwise."""

    dtype: torch.dtype
    aligned: bool = True


@dataclass
class Spec:
    """One kernel configuration as a launcher would launch it."""

    family: str
    kernel: Any                     # the triton.jit function
    config: str                     # short description for the table
    args: dict[str, Any]            # every kernel parameter by name: Ptr / tensor, int, float, constexpr value
    options: dict[str, int]         # launch options (num_warps, num_stages, ...)
    tensor_cores: bool = False      # the kernel uses tl.dot: it must contain tensor-core instructions
    meta: dict[str, Any] = field(default_factory=dict)  # extra facts for the JSON (dtype, BLOCK_N, ...)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid")


def bind(kernel, args: tuple = (), kwargs: dict | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a launch ``kernel[grid](*args, **kwargs)`` into (kernel arguments by name, launch options);
    a missing kernel argument without a default is an error naming it."""
    kwargs = dict(kwargs or {})
    names = list(kernel.arg_names)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
    unknown = [k for k in options if k not in _LAUNCH_OPTIONS]
    if unknown:
        raise TypeError(f"{kernel.fn.__name__}: unknown launch arguments {unknown}")
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments), options


class _Recorder:
    """Stands in for a triton kernel in a launcher: ``rec[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.launches: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def __getitem__(self, grid) -> Callable[..., None]:
        def launch(*args, **kwargs) -> None:
            self.launches.append(bind(self.kernel, args, kwargs))
        return launch


def _row_lengths(single_block: Callable[[int], bool]) -> list[int]:
    """Row lengths that reach every block the launcher can pick: powers of two while the single-block
    path takes them, the largest length it takes (found by bisection), and the first power of two past
    it (the multi-pass path). ``single_block(n)`` asks the launcher."""
    lengths, n = [], 1
    while single_block(n):
        lengths.append(n)
        n *= 2
        if n > 1 << 40:
            raise RuntimeError("the launcher never leaves the single-block path")
    lo, hi = max(1, n // 2), n           # single_block(lo) (or lo == 1), not single_block(hi)
    if lengths:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if single_block(mid) else (lo, mid)
        if lo not in lengths:
            lengths.append(lo)
    return [*lengths, n]


def _dedupe(specs: list[Spec], key: Callable[[Spec], Any]) -> list[Spec]:
    """Keep the last spec of each key (the launcher picks the same block for several row lengths; the
    last one is the block-sized or largest length)."""
    kept: dict[Any, Spec] = {}
    for spec in specs:
        kept.pop(key(spec), None)
        kept[key(spec)] = spec
    return list(kept.values())


def _flags(on: dict[str, bool]) -> str:
    names = [name for name, value in on.items() if value]
    return "+".join(names) if names else "plain"


def layer_norm_specs() -> Iterator[Spec]:
    """LayerNorm / RMSNorm / add+LayerNorm forward and backward, as ``layer_norm_fwd`` / ``layer_norm_bwd``
    launch them on contiguous (M, N) rows."""
    ln = importlib.import_module(".layer_norm", __package__)  # the package's `layer_norm` is the function
    from ._launch import acc_dtype, row_warps, torch_acc_dtype

    m, programs = 8192, 4 * 108          # backward rows, programs (4 per SM on an A100)
    rows_per_program = -(-m // programs)
    for dtype in DTYPES:
        acc, acc_t = acc_dtype(dtype), torch_acc_dtype(dtype)
        x, a = Ptr(dtype), Ptr(acc_t)
        for heavy in (False, True):
            # Forward: layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, is_rms_norm).
            p = Ptr(acc_t) if heavy else x   # the launcher passes x for an absent weight / bias
            dropout_p, seed = (0.1, 12345) if heavy else (0.0, 0)
            fwd_flags = dict(HAS_RESIDUAL=heavy, HAS_DROPOUT=heavy, STORE_RES_OUT=heavy, HAS_WEIGHT=heavy,
                             HAS_BIAS=heavy, IS_RMS_NORM=False)
            label = _flags({"res": heavy, "drop": heavy, "w": heavy, "b": heavy})
            specs = []
            for n in _row_lengths(lambda n, dtype=dtype: ln._block(n, ln.fused_limit(dtype, False))[1]):
                block, single = ln._block(n, ln.fused_limit(dtype, False))
                args, options = bind(ln._layer_norm_fwd_kernel, kwargs=dict(
                    X=x, R=x, W=p, B=p, Y=x, RES_OUT=x, MEAN=a, RSTD=a,
                    stride_xm=n, stride_xn=1, stride_rm=n, stride_rn=1, stride_ym=n, stride_om=n,
                    N=n, eps=1e-5, dropout_p=dropout_p, seed=seed, **fwd_flags,
                    SINGLE_BLOCK=single, BLOCK_N=block, ACC=acc, num_warps=row_warps(block)))
                specs.append(_row_spec("layer_norm", ln._layer_norm_fwd_kernel, dtype, n, args, options, label))
            yield from _dedupe(specs, lambda s: (s.meta["BLOCK_N"], s.meta["SINGLE_BLOCK"]))

            # Backward: layer_norm_bwd(dy, dres_out, prenorm, weight, has_bias, mean, rstd, seed, ...).
            bwd_flags = dict(HAS_WEIGHT=heavy, HAS_BIAS=heavy, HAS_DRES_OUT=heavy, HAS_DROPOUT=heavy,
                             STORE_DRES=heavy, IS_RMS_NORM=False)
            label = _flags({"w": heavy, "b": heavy, "dres_out": heavy, "drop": heavy, "dres": heavy})
            part = a if heavy else x             # dW/dB partials, or dx in their place when absent
            specs = []
            for n in _row_lengths(lambda n, dtype=dtype: ln._block(n, ln.fused_limit(dtype, True))[1]):
                block, single = ln._block(n, ln.fused_limit(dtype, True))
                args, options = bind(ln._layer_norm_bwd_kernel, kwargs=dict(
                    X=x, W=p, DY=x, DRES_OUT=x, DX=x, DRES=x, DW_PART=part, DB_PART=part, MEAN=a, RSTD=a,
                    stride_xm=n, stride_xn=1, stride_dym=n, stride_dyn=1, stride_drm=n, stride_drn=1,
                    M=m, N=n, rows_per_program=rows_per_program, dropout_p=dropout_p, seed=seed, **bwd_flags,
                    SINGLE_BLOCK=single, BLOCK_N=block, ACC=acc, num_warps=row_warps(block)))
                specs.append(_row_spec("layer_norm", ln._layer_norm_bwd_kernel, dtype, n, args, options, label))
            yield from _dedupe(specs, lambda s: (s.meta["BLOCK_N"], s.meta["SINGLE_BLOCK"]))


def softmax_specs() -> Iterator[Spec]:
    """Masked softmax forward and backward, launched by ``softmax._launch_rows`` itself (handed a recorder
    in place of the kernel and meta tensors shaped like a typical attention-score call)."""
    sm = importlib.import_module(".softmax", __package__)

    def launch(kernel, tensors, n, args, dtype, **meta) -> tuple[dict, dict] | None:
        rec = _Recorder(kernel)
        sm._launch_rows(rec, tensors, n, args, dtype, **meta)
        if len(rec.launches) != 1:
            raise RuntimeError(f"{kernel.fn.__name__}: expected one launch, got {len(rec.launches)}")
        return rec.launches[0]

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    b, h, length = 8, 12, 512
    for dtype in DTYPES:
        # Forward, as softmax_fwd(x, mask, dim=-1, scale, is_causal) prepares it.
        for kind in ("none", "bool", "float"):
            causal = kind != "none"
            label = "plain" if kind == "none" else f"{kind}_mask+causal"
            specs = []

            def single_block(n, kind=kind, causal=causal, dtype=dtype):
                return _softmax_fwd_launch(sm, launch, empty, dtype, kind, causal, b, h, length, n)[0]["SINGLE_BLOCK"]

            for n in _row_lengths(single_block):
                args, options = _softmax_fwd_launch(sm, launch, empty, dtype, kind, causal, b, h, length, n)
                specs.append(_row_spec("softmax", sm._softmax_fwd_kernel, dtype, n, args, options, label))
            yield from _dedupe(specs, lambda s: (s.meta["BLOCK_N"], s.meta["SINGLE_BLOCK"]))

        # Backward, as softmax_bwd(y, dy, dim=-1, scale) prepares it.
        def bwd(n, dtype=dtype):
            y, dy, dx = (empty(b, h, length, n, dtype=dtype) for _ in range(3))
            return launch(sm._softmax_bwd_kernel, [y, dy, dx], n, (0.125,), dtype)

        specs = []
        for n in _row_lengths(lambda n: bwd(n)[0]["SINGLE_BLOCK"]):
            args, options = bwd(n)
            specs.append(_row_spec("softmax", sm._softmax_bwd_kernel, dtype, n, args, options, "plain"))
        yield from _dedupe(specs, lambda s: (s.meta["BLOCK_N"], s.meta["SINGLE_BLOCK"]))


def _softmax_fwd_launch(sm, launch, empty, dtype, kind, causal, b, h, length, n):
    length = n if causal else length                      # causal self-attention scores are square
    x = empty(b, h, length, n, dtype=dtype)
    y = empty(b, h, length, n, dtype=dtype)
    if kind == "none":
        mask, mask_kind = x, sm.MASK_NONE
    elif kind == "bool":                                   # key padding mask, broadcast over heads and queries
        mask, mask_kind = empty(b, 1, 1, n, dtype=torch.bool).expand(x.shape).view(torch.uint8), sm.MASK_BOOL
    else:                                                  # additive per-query mask, broadcast over heads
        mask, mask_kind = empty(b, 1, length, n, dtype=dtype).expand(x.shape), sm.MASK_FLOAT
    causal_len = length if causal else 1
    return launch(sm._softmax_fwd_kernel, [x, mask, y], n, (0.125, causal_len), dtype,
                  MASK_KIND=mask_kind, IS_CAUSAL=causal)


def _row_spec(family, kernel, dtype, n, args, options, label) -> Spec:
    block, single = args["BLOCK_N"], args["SINGLE_BLOCK"]
    config = f"{_SHORT[dtype]} BLOCK_N={block}{'' if single else ' multipass'} w{options.get('num_warps', 4)} {label}"
    return Spec(family, kernel, config, args, options,
                meta=dict(dtype=_SHORT[dtype], n=n, BLOCK_N=block, SINGLE_BLOCK=single, flags=label,
                          work=block, unit="elements"))


# Per-score promises of the attention kernels' steady-state loops (``--sass``), on the 16-bit tensor-core
# configurations without dropout at head dims <= 128: one exponential per score (no score work duplicated
# across warps or warp groups, the online-softmax rescale amortized over the key block) and, in the sm_90a
# forward, at most 1.2 FMUL per score: the accumulator rescale (Dv / BLOCK_N = 1 at d = 128) and the
# rescale of the tensor-core row sums (16 / BLOCK_N), the softmax scale being folded into the exponent's
# FFMA. Reported, not bounded: the rescale costs Dv / BLOCK_N FMUL per score, 2 on sm_80 at d = 128 (a
# 128-key tile spills with mma.sync operands in registers) and 4 at d = 256; at d = 256 the dK/dV kernel's
# two BLOCK_N x 256 fp32 accumulators leave no registers for a tile without duplicated score work; dropout
# configurations spend FMULs and integer work on the in-kernel Philox stream and use narrower tiles; the
# flash-decoding kernel's rows are a GQA group's few queries (padded to 16), memory-bound.
SASS_LIMITS = {
    "_attn_fwd_kernel": {"ex2": 1.1, "fmul": 1.2},
    "_attn_bwd_dkdv_kernel": {"ex2": 1.1},
    "_attn_bwd_dq_kernel": {"ex2": 1.1},
}


def attention_specs() -> Iterator[Spec]:
    """Fused attention forward (main and flash-decoding with its combine) and backward (preprocess, dK/dV,
    dQ), recorded from the launchers themselves (``attention._fwd_launch`` / ``_bwd_launch`` on meta
    tensors, each kernel replaced by a recorder) with the configuration ``attention_config`` picks per
    architecture: a spec is compiled only for the architecture it was chosen for. Shapes of FlashAttention's
    benchmark grid: 16k tokens per batch (16 x 1024 queries and keys), H x D = 2048 with 4 query heads per
    key/value head (GQA), head dims 64, 128 and 256 (decode: 1 query over 4096 keys in 16 splits).
    "plain" is no mask, no causal, no dropout; "causal" adds the causal mask alone; "heavy" is a bool padding
    mask (B, 1, L, S) + causal + seqlens_k + dropout (+ lse gradient in the backward). fp16 and bf16 run all
    three, fp32 and fp64 the heavy one (fp32 with true-fp32 dots, fp64 only at head dims 64 and 128: fp64 at
    head dim 256 spills, a known gap). A steady-state loop iteration of a kernel built on ``tl.dot`` covers
    BLOCK_M x BLOCK_N scores (the SASS report's unit)."""
    at = importlib.import_module(".attention.launch", __package__)  # the launchers and the kernels they call
    names = ("_attn_fwd_kernel", "_attn_fwd_split_kernel", "_attn_combine_kernel", "_attn_bwd_preprocess_kernel",
             "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    dot_kernels = {"_attn_fwd_kernel", "_attn_fwd_split_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    def record(run) -> list[tuple[Any, dict, dict]]:
        recorders = {name: _Recorder(getattr(at, name)) for name in names}
        originals = {name: getattr(at, name) for name in names}
        try:
            for name, rec in recorders.items():
                setattr(at, name, rec)
            run()
        finally:
            for name, kernel in originals.items():
                setattr(at, name, kernel)
        return [(originals[name], *launch) for name, rec in recorders.items() for launch in rec.launches]

    b, l, s, s_dec, splits = 16, 1024, 1024, 4096, 16
    half = [(dtype, d, kind) for dtype in (torch.float16, torch.bfloat16) for d in (64, 128, 256)
            for kind in ("plain", "causal", "heavy")]
    cases = half + [(torch.float32, d, "heavy") for d in (64, 128, 256)]
    cases += [(torch.float64, d, "heavy") for d in (64, 128)]
    seen = set()
    for arch in ARCHS:
        for dtype, d, kind in cases:
            h = 2048 // d
            hkv = h // 4
            heavy, causal = kind == "heavy", kind != "plain"
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            mask = empty(b, 1, l, s, dtype=torch.bool) if heavy else None
            seqlens = empty(b, dtype=torch.int32) if heavy else None
            p, seed = (0.1, 12345) if heavy else (0.0, 0)
            q, k, v = empty(b, h, l, d, dtype=dtype), empty(b, hkv, s, d, dtype=dtype), empty(b, hkv, s, d, dtype=dtype)
            q1 = empty(b, h, 1, d, dtype=dtype)
            kd, vd = empty(b, hkv, s_dec, d, dtype=dtype), empty(b, hkv, s_dec, d, dtype=dtype)
            mask1 = empty(b, 1, 1, s_dec, dtype=torch.bool) if heavy else None
            out, lse = empty(b, h, l, d, dtype=dtype), empty(b, h, l, dtype=acc)
            dlse = empty(b, h, l, dtype=acc) if heavy else None

            def run(q=q, k=k, v=v, q1=q1, kd=kd, vd=vd, mask=mask, mask1=mask1, seqlens=seqlens, p=p, seed=seed,
                    causal=causal, out=out, lse=lse, dlse=dlse, arch=arch):
                at._fwd_launch(q, k, v, mask, seqlens, 0.125, causal, 0, p, 0, seed, arch)
                at._fwd_launch(q1, kd, vd, mask1, seqlens, 0.125, causal, s_dec - 1, p, splits, seed, arch)
                at._bwd_launch(out, dlse, q, k, v, out, lse, mask, seqlens, seed, 0.125, causal, 0, p, arch)

            for kernel, args, options in record(run):
                name = kernel.fn.__name__
                key = (arch, name, repr(sorted((k_, str(v_.dtype) if isinstance(v_, torch.Tensor) else repr(v_))
                                               for k_, v_ in args.items())), repr(sorted(options.items())))
                if key in seen:   # the combine / preprocess kernels repeat across head dims and kinds
                    continue
                seen.add(key)
                tc = name in dot_kernels and dtype in (torch.float16, torch.bfloat16)
                bm, bn = args.get("BLOCK_M", "-"), args.get("BLOCK_N", "-")
                config = (f"{_SHORT[dtype]} d={d} M{bm} N{bn} w{options.get('num_warps', 4)} "
                          f"s{options.get('num_stages', 3)} {kind}")
                cost = (bm if isinstance(bm, int) else 16) * (bn if isinstance(bn, int) else 16) * d
                if name in dot_kernels:
                    work, unit = bm * bn, "scores"
                elif name == "_attn_combine_kernel":
                    work, unit = args["BLOCK_S"] * args["BLOCK_DV"], "elements"
                else:
                    work, unit = args["BLOCK_M"] * args["BLOCK_DV"], "elements"
                limits = {} if not tc or heavy or d > 128 else dict(SASS_LIMITS.get(name, {}))
                if arch < 90:
                    limits.pop("fmul", None)
                yield Spec("attention", kernel, config, args, options, tensor_cores=tc,
                           meta=dict(dtype=_SHORT[dtype], head_dim=d, BLOCK_M=bm, BLOCK_N=bn, flags=kind,
                                     archs=(arch,), cost=cost, work=work, unit=unit, sass_limits=limits))


def paged_specs() -> Iterator[Spec]:
    """Paged KV cache: the append kernel and the paged attention (with the combine kernel), recorded from the
    launchers (``paged._append_launch`` / ``paged._paged_launch`` on meta tensors, kernels replaced by
    recorders) with the tiles ``paged.paged_config`` picks per architecture. Shapes: 16 sequences, 32 query
    heads over 8 kv heads (GQA 4), block tables of 4096 positions; "decode" is 1 new query per sequence (one row
    tile of the 4 heads' rows, split keys), "prefill" 256 new queries (row tiles of the forward's BLOCK_M);
    block sizes 16 (a key tile of 16), 256 (the configuration's key tile, one page per tile) and 24 (not a
    multiple of the key tile: per-row page lookups). Every dtype, head dims 64, 128 and 256."""
    pg = importlib.import_module(".paged", __package__)
    names = ("_paged_append_kernel", "_paged_attn_fwd_kernel", "_attn_combine_kernel")

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    b, h, hkv, capacity = 16, 32, 8, 4096
    seen = set()
    for arch in ARCHS:
        for dtype in DTYPES:
            for d in (64, 128, 256):
                for page in (16, 256, 24):
                    for kind, lq in (("decode", 1), ("prefill", 256)):
                        max_blocks = -(-capacity // page)
                        k_cache = empty(b * max_blocks, page, hkv, d, dtype=dtype)
                        table, lens = empty(b, max_blocks, dtype=torch.int32), empty(b, dtype=torch.int32)
                        q = empty(b, h, lq, d, dtype=dtype)
                        k_new = empty(b, lq, hkv, d, dtype=dtype).transpose(1, 2)   # a model's head split
                        recorders = {name: _Recorder(getattr(pg, name)) for name in names}
                        originals = {name: getattr(pg, name) for name in names}
                        try:
                            for name, rec in recorders.items():
                                setattr(pg, name, rec)
                            pg._append_launch(k_cache, k_cache, table, lens, k_new, k_new)
                            pg._paged_launch(q, k_cache, k_cache, table, lens, 0.125, True, None, arch)
                        finally:
                            for name, kernel in originals.items():
                                setattr(pg, name, kernel)
                        for name, rec in recorders.items():
                            for args, options in rec.launches:
                                key = (arch, name, repr(sorted((k_, str(v_.dtype) if isinstance(v_, torch.Tensor)
                                                                else repr(v_)) for k_, v_ in args.items())),
                                       repr(sorted(options.items())))
                                if key in seen:
                                    continue
                                seen.add(key)
                                bm, bn = args.get("BLOCK_M", "-"), args.get("BLOCK_N", "-")
                                label = f"{kind} page={page}" if name == "_paged_attn_fwd_kernel" else kind
                                config = (f"{_SHORT[dtype]} d={d} M{bm} N{bn} w{options.get('num_warps', 4)} "
                                          f"s{options.get('num_stages', 3)} {label}")
                                attn = name == "_paged_attn_fwd_kernel"
                                if attn:
                                    work, unit = bm * bn, "scores"
                                elif name == "_attn_combine_kernel":
                                    work, unit = args["BLOCK_S"] * args["BLOCK_DV"], "elements"
                                else:
                                    work, unit = args["BLOCK_T"] * args["BLOCK_D"], "elements"
                                yield Spec("paged", originals[name], config, args, options,
                                           tensor_cores=attn and dtype in (torch.float16, torch.bfloat16),
                                           meta=dict(dtype=_SHORT[dtype], head_dim=d, BLOCK_M=bm, BLOCK_N=bn,
                                                     flags=label, archs=(arch,), cost=work * d, work=work,
                                                     unit=unit))


def varlen_specs() -> Iterator[Spec]:
    """Packed variable-length attention (``fused_kernels.varlen_attention``): the attention forward, dK/dV and dQ
    kernels with ``VARLEN=True`` and the dense preprocess over the packed rows, recorded from the launchers
    (``varlen._varlen_fwd_launch`` / ``_varlen_bwd_launch`` on meta tensors, kernels replaced by recorders)
    with the tiles ``attention_config`` picks per architecture. Shapes: 16 sequences packed into 16k tokens
    (longest 2048), H x D = 2048 with GQA 4; "plain", "causal" and "heavy" (causal + dropout + lse gradient)
    as ``attention_specs``: fp16 / bf16 all three, fp32 heavy, fp64 heavy at head dims 64 and 128."""
    vl = importlib.import_module(".varlen", __package__)
    names = ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    dot_kernels = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    batch, total, longest = 16, 16384, 2048
    half = [(dtype, d, kind) for dtype in (torch.float16, torch.bfloat16) for d in (64, 128, 256)
            for kind in ("plain", "causal", "heavy")]
    cases = half + [(torch.float32, d, "heavy") for d in (64, 128, 256)]
    cases += [(torch.float64, d, "heavy") for d in (64, 128)]
    seen = set()
    for arch in ARCHS:
        for dtype, d, kind in cases:
            h = 2048 // d
            hkv = h // 4
            heavy, causal = kind == "heavy", kind != "plain"
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            p, seed = (0.1, 12345) if heavy else (0.0, 0)
            q, k, v = (empty(total, n, d, dtype=dtype) for n in (h, hkv, hkv))
            cu = empty(batch + 1, dtype=torch.int32)
            out, lse = empty(total, h, d, dtype=dtype), empty(h, total, dtype=acc)
            dlse = empty(h, total, dtype=acc) if heavy else None
            recorders = {name: _Recorder(getattr(vl, name)) for name in names}
            originals = {name: getattr(vl, name) for name in names}
            try:
                for name, rec in recorders.items():
                    setattr(vl, name, rec)
                vl._varlen_fwd_launch(q, k, v, cu, cu, longest, longest, 0.125, causal, p, seed, arch)
                vl._varlen_bwd_launch(out, dlse, q, k, v, out, lse, cu, cu, longest, longest, seed, 0.125, causal, p,
                                      arch)
            finally:
                for name, kernel in originals.items():
                    setattr(vl, name, kernel)
            for name, rec in recorders.items():
                for args, options in rec.launches:
                    key = (arch, name, repr(sorted((k_, str(v_.dtype) if isinstance(v_, torch.Tensor) else repr(v_))
                                                   for k_, v_ in args.items())), repr(sorted(options.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    bm, bn = args.get("BLOCK_M", "-"), args.get("BLOCK_N", "-")
                    config = (f"{_SHORT[dtype]} d={d} M{bm} N{bn} w{options.get('num_warps', 4)} "
                              f"s{options.get('num_stages', 3)} {kind} varlen")
                    if name in dot_kernels:
                        work, unit = bm * bn, "scores"
                    else:
                        work, unit = args["BLOCK_M"] * args["BLOCK_DV"], "elements"
                    cost = (bm if isinstance(bm, int) else 16) * (bn if isinstance(bn, int) else 16) * d
                    yield Spec("varlen", originals[name], config, args, options,
                               tensor_cores=name in dot_kernels and dtype in (torch.float16, torch.bfloat16),
                               meta=dict(dtype=_SHORT[dtype], head_dim=d, BLOCK_M=bm, BLOCK_N=bn, flags=kind,
                                         archs=(arch,), cost=cost, work=work, unit=unit))


# Variant configurations of ``variants_specs``: name -> (causal, the variant attributes set); "all" combines every
# mask and score variant that takes no mod_args (a call's mods share one MOD_ARGS, so relative_bias stands alone).
_VARIANT_CASES = {
    "window": (True, dict(window=(255, 0))),
    "alibi": (False, dict(alibi=True)),
    "softcap": (False, dict(softcap=30.0)),
    "document": (False, dict(document=True)),
    "prefix": (True, dict(prefix=True)),
    "score_mod": (False, dict(score_mod=("distance_penalty", "distance_penalty_grad"))),
    "mask_mod": (False, dict(mask_mod="stripes")),
    "mod_args": (False, dict(score_mod=("relative_bias", "relative_bias_grad"), mod_args=True)),
    "all": (True, dict(window=(255, 0), prefix=True, document=True, alibi=True, softcap=30.0,
                       score_mod=("distance_penalty", "distance_penalty_grad"), mask_mod="stripes")),
}


def variants_specs() -> Iterator[Spec]:
    """Attention variants (programmable attention): the forward, dK/dV and dQ kernels with each variant alone
    and all at once, recorded from the launchers (``attention.launch._fwd_launch`` / ``_bwd_launch`` with a
    ``var``, on meta tensors, kernels replaced by recorders; the sparse lists of the mask variants are built by
    ``attention.sparse`` on meta tensors too, only their shapes reach the kernels) with the tiles
    ``attention_config`` picks per architecture. Variants (``_VARIANT_CASES``): "window" (255, 0) causal,
    "alibi", "softcap" (30), "document" (q_ids / k_ids), "prefix" (prefix-LM, causal), "score_mod"
    (``examples.distance_penalty``), "mask_mod" (``examples.stripes``), "mod_args" (``examples.relative_bias``
    with its table) and "all" (window + prefix + document + alibi + softcap + distance_penalty + stripes);
    without the window / prefix, non-causal. The mask variants run the SPARSE path (full then partial tile lists;
    its steady-state loop is the full-tile one). Shapes as ``attention_specs`` (16 x 1024 queries and keys,
    H x D = 2048, GQA 4); bf16 and fp16 at head dims 64 and 128, fp32 "all" at 128. The mods are module-level
    ``@triton.jit`` functions of ``fused_kernels.attention.examples``: they travel to the compile processes by
    (module, name), see ``_JitRef``."""
    at = importlib.import_module(".attention.launch", __package__)
    ex = importlib.import_module(".attention.examples", __package__)
    from types import SimpleNamespace
    names = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_preprocess_kernel")
    kept = names[:3]                      # the preprocess kernel is that of the attention family

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    b, l, s = 16, 1024, 1024
    cases = [(dtype, d, v) for dtype in (torch.bfloat16, torch.float16) for d in (64, 128) for v in _VARIANT_CASES]
    cases.append((torch.float32, 128, "all"))
    seen = set()
    for arch in ARCHS:
        for dtype, d, variant in cases:
            h = 2048 // d
            hkv = h // 4
            causal, on = _VARIANT_CASES[variant]
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            score_mod = on.get("score_mod")
            var = SimpleNamespace(
                window=on.get("window"), softcap=on.get("softcap"),
                alibi_slopes=empty(b, h, dtype=torch.float32) if on.get("alibi") else None,
                q_ids=empty(b, l, dtype=torch.int32) if on.get("document") else None,
                k_ids=empty(b, s, dtype=torch.int32) if on.get("document") else None,
                prefix_lengths=empty(b, dtype=torch.int32) if on.get("prefix") else None,
                score_mod=getattr(ex, score_mod[0]) if score_mod else None,
                score_mod_grad=getattr(ex, score_mod[1]) if score_mod else None,
                mask_mod=getattr(ex, on["mask_mod"]) if on.get("mask_mod") else None,
                mod_args=(empty(h, 2 * ex.REL_R.value + 1, dtype=torch.float32),) if on.get("mod_args") else (),
                block_mask=None)
            q, k, v = empty(b, h, l, d, dtype=dtype), empty(b, hkv, s, d, dtype=dtype), empty(b, hkv, s, d, dtype=dtype)
            out, lse = empty(b, h, l, d, dtype=dtype), empty(b, h, l, dtype=acc)
            recorders = {name: _Recorder(getattr(at, name)) for name in names}
            originals = {name: getattr(at, name) for name in names}
            try:
                for name, rec in recorders.items():
                    setattr(at, name, rec)
                with _shape_only_tables():
                    at._fwd_launch(q, k, v, None, None, 0.125, causal, 0, 0.0, 0, 0, arch, var=var)
                    at._bwd_launch(out, None, q, k, v, out, lse, None, None, 0, 0.125, causal, 0, 0.0, arch, var=var)
            finally:
                for name, kernel in originals.items():
                    setattr(at, name, kernel)
            for name in kept:
                for args, options in recorders[name].launches:
                    key = (arch, name, repr(sorted((k_, _arg_key(v_)) for k_, v_ in args.items())),
                           repr(sorted(options.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    bm, bn = args["BLOCK_M"], args["BLOCK_N"]
                    config = (f"{_SHORT[dtype]} d={d} M{bm} N{bn} w{options.get('num_warps', 4)} "
                              f"s{options.get('num_stages', 3)} {variant}")
                    yield Spec("variants", originals[name], config, args, options,
                               tensor_cores=dtype in (torch.float16, torch.bfloat16),
                               meta=dict(dtype=_SHORT[dtype], head_dim=d, BLOCK_M=bm, BLOCK_N=bn, flags=variant,
                                         causal=causal, sparse=bool(args.get("SPARSE")), archs=(arch,),
                                         cost=bm * bn * d, work=bm * bn, unit="scores"))


@contextlib.contextmanager
def _shape_only_tables() -> Iterator[None]:
    """While recording on meta tensors: ``attention.sparse``'s document and ``mask_mod`` tile tables as empty
    tensors of their shapes, (B, 1, nm, nn) and (B, H, nm, nn) int8 (the real ones evaluate every score of the
    call, minutes of meta-tensor bookkeeping at these shapes; the kernels see only the lists' shapes)."""
    import triton

    sp = importlib.import_module(".attention.sparse", __package__)
    bmk = importlib.import_module(".attention.blockmask", __package__)

    def document_classes(q_ids, k_ids, block_m, block_n):
        shape = (q_ids.shape[0], 1, triton.cdiv(q_ids.shape[1], block_m), triton.cdiv(k_ids.shape[1], block_n))
        return torch.empty(shape, dtype=torch.int8, device=q_ids.device)

    def block_mask(mask_mod, B, H, L, S, *, block, mod_args=(), device=None):
        bm, bn = block
        classes = torch.empty((B or 1, H or 1, triton.cdiv(L, bm), triton.cdiv(S, bn)), dtype=torch.int8,
                              device=device)
        return bmk.BlockMask(classes, (bm, bn), (B, H, L, S), mask_mod, tuple(mod_args))

    saved = sp.document_classes, sp.block_mask
    sp.document_classes, sp.block_mask = document_classes, block_mask
    try:
        yield
    finally:
        sp.document_classes, sp.block_mask = saved


def _arg_key(value) -> str:
    """A launch argument for de-duplication: tensors by dtype (and tuples of them), others by repr."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype)
    if isinstance(value, tuple):
        return "(" + ", ".join(_arg_key(v) for v in value) + ")"
    return repr(value)


def quick_subset(specs: list[Spec]) -> list[Spec]:
    """A representative subset for the test suite: every kernel on every arch, at the configurations that
    bound the others. Row kernels (LayerNorm, softmax): per kernel, dtype and feature set, the largest
    single-block configuration (the most registers) and the multi-pass one. Attention: every bf16
    configuration at head dims 64 and 128 (the performance promises of the SASS report), and per kernel the
    heaviest configuration of every other dtype (largest tiles x head dim, every feature on). Paged attention:
    per dtype and arch the heaviest decode and prefill configuration, each with whole-page key tiles and with
    per-row page lookups. Packed varlen attention: per kernel and arch the heaviest 16-bit and the heaviest
    fp32 / fp64 configuration. Attention variants: per kernel and arch the "all" variant (every mask and score
    variant at once) in bf16 at head dim 128."""
    keep: dict[Any, Spec] = {}
    for spec in specs:
        m = spec.meta
        if spec.family == "paged":   # per kernel, dtype and arch (and kind) the largest tiles x head dim
            key = (spec.name, m["dtype"], m["archs"], m["flags"].split(" ")[0], "page=24" in m["flags"])
            if key in keep and keep[key].meta["cost"] >= m["cost"]:
                continue
        elif spec.family == "varlen":   # per kernel, dtype family and arch the heaviest configuration
            key = (spec.name, m["dtype"] in ("fp16", "bf16"), m["archs"])
            if key in keep and keep[key].meta["cost"] >= m["cost"]:
                continue
        elif spec.family == "variants":   # the "all" variant per kernel and arch, bf16 at head dim 128
            if m["flags"] != "all" or m["dtype"] != "bf16" or m["head_dim"] != 128:
                continue
            key = (spec.name, m["archs"], "variants")
        elif spec.family == "attention":
            if m["dtype"] == "bf16" and m["head_dim"] <= 128:
                key: Any = id(spec)
            else:
                key = (spec.name, m["dtype"], m["archs"])
                if key in keep and keep[key].meta["cost"] >= m["cost"]:
                    continue
        else:
            key = (spec.name, m["dtype"], m["flags"], m["SINGLE_BLOCK"])
            if key in keep and keep[key].meta["BLOCK_N"] >= m["BLOCK_N"]:
                continue
        keep[key] = spec
    return list(keep.values())


# Per-family spec generators: (family name, generator). The attention family adds one line here.
FAMILIES: list[tuple[str, Callable[[], Iterator[Spec]]]] = [
    ("layer_norm", layer_norm_specs),
    ("softmax", softmax_specs),
    ("attention", attention_specs),
    ("paged", paged_specs),
    ("varlen", varlen_specs),
    ("variants", variants_specs),
]


def all_specs(families: list[tuple[str, Callable[[], Iterator[Spec]]]] | None = None) -> list[Spec]:
    specs = []
    for family, generate in families or FAMILIES:
        for spec in generate():
            if spec.family != family:
                raise RuntimeError(f"{spec.name}: spec of family {spec.family!r} from the {family!r} generator")
            specs.append(spec)
    return specs


# ----------------------------------------------------------------------------- specialization


def _int_type(v: int) -> str:
    if -(2**31) <= v < 2**31:
        return "i32"
    if 2**63 <= v < 2**64:
        return "u64"
    return "i64"


def specialize(spec: Spec) -> tuple[dict[str, str], dict[tuple[int, ...], Any], dict[tuple[int, ...], list]]:
    """(signature, constexprs, attrs) for ``ASTSource``, by the rules of triton's launcher: constexpr
    parameters are constants; a tensor is a typed pointer, divisible by 16 when aligned; an int equal
    to 1 is a constant, another int an i32/i64/u64 divisible by 16 when it is; bools are i1 and floats
    fp32, never specialized; an argument annotated with a type keeps that type."""
    kernel = spec.kernel
    missing = [p.name for p in kernel.params if p.name not in spec.args]
    extra = [k for k in spec.args if k not in kernel.arg_names]
    if missing or extra:
        raise TypeError(f"{spec.name}: spec misses kernel arguments {missing} / has unknown ones {extra}")
    divisible = [["tt.divisibility", 16]]
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(kernel.params):
        value = spec.args[param.name]
        align = not getattr(param, "do_not_specialize_on_alignment", False)
        specialize_int = not getattr(param, "do_not_specialize", False)
        annotated = getattr(param, "annotation_type", "") or ""
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        if isinstance(value, torch.Tensor):
            value = Ptr(value.dtype)
        if isinstance(value, tuple):   # a tuple of tensors (the mods' MOD_ARGS): one typed pointer per element
            types = []
            for j, item in enumerate(value):
                item = Ptr(item.dtype) if isinstance(item, torch.Tensor) else item
                if not isinstance(item, Ptr):
                    raise TypeError(f"{spec.name}: cannot specialize tuple argument {param.name}[{j}]={item!r}")
                types.append("*" + _TRITON_TYPE[item.dtype])
                attrs[(i, j)] = divisible if item.aligned and align else []
            signature[param.name] = tuple(types)
            continue
        if type(value).__name__ == "TensorDescriptor":   # host-side TMA descriptor: typed by dtype and box
            block = ", ".join(str(n) for n in value.block_shape)
            signature[param.name] = f"tensordesc<{_TRITON_TYPE[value.base.dtype]}[{block}]>"
        elif isinstance(value, Ptr):
            signature[param.name] = "*" + _TRITON_TYPE[value.dtype]
            attrs[(i,)] = divisible if value.aligned and align else []
        elif value is None:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = None
        elif isinstance(value, bool):
            signature[param.name] = annotated or "i1"
        elif isinstance(value, int):
            if annotated and (annotated == "u1" or annotated[:2] in ("fp", "bf")):
                specialize_int = False
            if specialize_int and value == 1:
                signature[param.name] = "constexpr"
                constexprs[(i,)] = 1
            else:
                signature[param.name] = annotated or _int_type(value)
                attrs[(i,)] = divisible if specialize_int and align and value % 16 == 0 else []
        elif isinstance(value, float):
            signature[param.name] = annotated or "fp32"
        else:
            raise TypeError(f"{spec.name}: cannot specialize argument {param.name}={value!r}")
    return signature, constexprs, attrs


def _runtime_specialization(spec: Spec, target) -> tuple[dict, dict, dict] | None:
    """What this triton's own launcher binder makes of the same arguments, or None where its internal
    API is not there; used only to cross-check ``specialize``."""
    try:
        from triton._utils import find_paths_if, get_iterable_path
        from triton.compiler import make_backend
        from triton.runtime.jit import MockTensor, create_function_from_signature
    except ImportError:
        return None
    kernel = spec.kernel
    try:
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        def mock(v):
            if isinstance(v, tuple):
                return tuple(mock(x) for x in v)
            return MockTensor(v.dtype) if isinstance(v, (Ptr, torch.Tensor)) else v

        args = {k: mock(v) for k, v in spec.args.items()}
        bound, specialization, _ = binder(**args)
    except Exception:  # internal API of another shape: nothing to compare with
        return None
    sigvals = [s[0] for s in specialization]
    signature = dict(zip([p.name for p in kernel.params], sigvals))
    paths = find_paths_if(sigvals, lambda _, v: v == "constexpr")
    constexprs = {p: get_iterable_path(list(bound.values()), p) for p in paths}
    attrvals = ["" if s[0] == "constexpr" else s[1] for s in specialization]
    paths = find_paths_if(attrvals, lambda _, v: isinstance(v, str))
    attrs = {p: backend.parse_attr(get_iterable_path(attrvals, p)) for p in paths}
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------- compile and measure


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for ``arch``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        pass
    try:
        from triton import knobs
        return knobs.nvidia.ptxas.path
    except (ImportError, AttributeError):
        import triton
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _gpu_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, spill bytes and stack frame from ``ptxas -v`` output (the maximum over functions)."""
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", log)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = [int(v) for v in re.findall(r"(\d+) bytes stack frame", log)]
    if not regs:
        raise RuntimeError(f"no register count in the ptxas output:\n{log}")
    return dict(registers=max(regs), spill_stores=max((int(s) for s, _ in spills), default=0),
                spill_loads=max((int(l) for _, l in spills), default=0), stack_frame=max(stack, default=0))


def count_tensor_core_instructions(ptx: str) -> dict[str, int]:
    """Static counts of tensor-core instructions in PTX: ``mma.sync`` (sm_80 style) and
    ``wgmma.mma_async`` (sm_90a warpgroup MMA)."""
    return dict(mma_sync=len(re.findall(r"\bmma\.sync\.", ptx)),
                wgmma=len(re.findall(r"\bwgmma\.mma_async\.", ptx)))


def _run_ptxas(ptx: str, arch: int) -> str:
    """``ptxas -v`` on ``ptx``; returns its log (stderr)."""
    with tempfile.TemporaryDirectory(prefix="fused_kernels-aot-ptx-") as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={_gpu_name(arch)}", path,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stderr


_worker_ready = False


def _init_worker() -> None:
    global _worker_ready
    if not _worker_ready:
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        _worker_ready = True


def _die_with_parent() -> None:
    """Pool initializer: on Linux, the kernel kills this worker when the parent dies (a timeout that kills
    ``python -m fused_kernels.aot`` must not leave its compile workers running)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one (kernel, specialization, arch) and measure it; errors become part of the result."""
    _init_worker()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = job["arch"]
    result: dict[str, Any] = {"error": None}
    t0 = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
        constexprs = {k: v.resolve() if isinstance(v, _JitRef) else v for k, v in job["constexprs"].items()}
        src = ASTSource(fn=kernel, signature=job["signature"], constexprs=constexprs, attrs=job["attrs"])
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: triton prints its ptxas -v log
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(job["options"]))
        ptx = compiled.asm["ptx"]
        result["shared"] = int(compiled.metadata.shared)
        if job.get("sass"):
            result["sass"] = sass.analyze(compiled.asm["cubin"], int(job["options"].get("num_warps", 4)),
                                          job["work"], job["unit"])
        result.update(count_tensor_core_instructions(ptx))
        if "Used" in log.getvalue():         # the cubin's own ptxas run, triton's exact flags
            result.update(parse_ptxas(log.getvalue()), ptxas="triton")
        else:                                 # a cache hit ran no ptxas: run it on the PTX
            result.update(parse_ptxas(_run_ptxas(ptx, arch)), ptxas="aot")
    except Exception as exc:  # report every failing config, do not stop at the first
        result["error"] = f"{type(exc).__name__}: {exc}".strip()[-4000:]
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _normalized(specialization: tuple[dict, dict, dict]) -> tuple[dict, dict, dict]:
    signature, constexprs, attrs = specialization
    return signature, constexprs, {k: v for k, v in attrs.items() if v}


@dataclass(frozen=True)
class _JitRef:
    """A ``@triton.jit`` function passed as a constexpr (a score / mask mod), by (module, qualified name): a
    ``JITFunction`` does not pickle, so the compile processes re-import it (``resolve``). Such a function must
    be defined at module level (``fused_kernels.attention.examples``)."""

    module: str
    qualname: str

    @staticmethod
    def of(value: Any) -> Any:
        from triton.runtime.jit import JITFunction
        if not isinstance(value, JITFunction):
            return value
        fn = value.fn
        ref = _JitRef(fn.__module__, fn.__qualname__)
        if ref.resolve() is not value:
            raise TypeError(f"{fn.__qualname__}: a @triton.jit constexpr must be a module-level function that "
                            f"{fn.__module__}.{fn.__qualname__} names (the compile processes re-import it)")
        return ref

    def resolve(self) -> Any:
        value: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            value = getattr(value, part)
        return value


def _make_jobs(specs: list[Spec], archs: list[int], with_sass: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    from triton.backends.compiler import GPUTarget

    jobs, mismatches = [], []
    for index, spec in enumerate(specs):
        signature, constexprs, attrs = specialize(spec)
        runtime = _runtime_specialization(spec, GPUTarget("cuda", archs[0], 32))
        if runtime is not None and _normalized(runtime) != _normalized((signature, constexprs, attrs)):
            mismatches.append(f"{spec.name} [{spec.config}]: aot specialization {(signature, constexprs, attrs)} "
                              f"differs from the runtime launcher's {runtime}")
        for arch in archs:
            if arch not in spec.meta.get("archs", archs):   # a configuration chosen for another arch
                continue
            jobs.append(dict(spec=index, module=spec.kernel.fn.__module__, kernel=spec.kernel.fn.__name__,
                             signature=signature, constexprs={k: _JitRef.of(v) for k, v in constexprs.items()},
                             attrs=attrs, options=dict(spec.options), arch=arch,
                             cost=spec.meta.get("cost", spec.meta.get("BLOCK_N", 0)), sass=with_sass,
                             work=spec.meta.get("work", 0), unit=spec.meta.get("unit", "elements")))
    return jobs, mismatches


class _Progress:
    """A tqdm bar on a terminal's stderr when tqdm is installed (the ``train`` extra), else a line every 5%."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.failed, self._last = total, 0, 0, -1
        self.bar = None
        if sys.stderr.isatty():   # a log file gets the plain lines
            with contextlib.suppress(ImportError):
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="compile", file=sys.stderr, dynamic_ncols=True)

    def update(self, result: dict[str, Any]) -> None:
        self.done += 1
        self.failed += bool(result.get("error"))
        if self.bar is not None:
            self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)
            return
        step = self.done * 20 // max(1, self.total)
        if step != self._last or self.done == self.total:
            self._last = step
            print(f"  compiled {self.done}/{self.total} ({self.failed} failed)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_jobs(jobs: list[dict[str, Any]], workers: int, progress: bool = True) -> list[dict[str, Any]]:
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    bar = _Progress(len(jobs)) if progress else None
    try:
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = compile_job(job)
                if bar:
                    bar.update(results[i])
            return results  # type: ignore[return-value]
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i]["cost"])  # the expensive ones first
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                    initializer=_die_with_parent) as pool:
            futures = {pool.submit(compile_job, jobs[i]): i for i in order}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except Exception as exc:  # a worker died
                    results[i] = {"error": f"{type(exc).__name__}: {exc}", "seconds": 0.0}
                if bar:
                    bar.update(results[i])
        return results  # type: ignore[return-value]
    finally:
        if bar:
            bar.close()


def evaluate(spec: Spec, arch: int, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(family=spec.family, kernel=spec.name, config=spec.config, arch=arch,
                               gpu_name=_gpu_name(arch), options=spec.options, **spec.meta, **result)
    problems = []
    if result.get("error"):
        problems.append("compile failed")
    else:
        row["spill_bytes"] = row["spill_stores"] + row["spill_loads"]
        row["tensor_core_instructions"] = row["mma_sync"] + row["wgmma"]
        if row["spill_bytes"]:
            problems.append(f"spills {row['spill_stores']}+{row['spill_loads']} B")
        if row["shared"] > SHARED_LIMIT[arch]:
            problems.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[arch]} B")
        if spec.tensor_cores and not row["tensor_core_instructions"]:
            problems.append("no tensor-core instructions")
        if row.get("sass"):
            problems += sass_problems(spec, row["sass"])
    row["problems"] = problems
    row["ok"] = not problems
    return row


def sass_problems(spec: Spec, report: dict[str, Any]) -> list[str]:
    """The structural promises of the SASS: no local memory (LDL/STL) anywhere; tensor-core instructions in
    every steady-state loop of a kernel built on ``tl.dot``; per-unit limits of ``spec.meta["sass_limits"]``
    (e.g. ``{"ex2": 1.1}``: at most 1.1 MUFU.EX2 per score) in each steady-state loop."""
    problems = []
    if report["local_memory"]:
        problems.append(f"SASS: {report['local_memory']} local-memory instructions (LDL/STL)")
    unit = report["unit"]
    for i, loop in enumerate(report["loops"]):
        if loop.get("straight_line"):
            continue
        if spec.tensor_cores and not loop["tensor_core"]:
            problems.append(f"SASS loop {i}: no tensor-core instructions")
        for key, limit in spec.meta.get("sass_limits", {}).items():
            value = loop[f"{key}_per_{unit}"]
            if value > limit:
                problems.append(f"SASS loop {i}: {key.upper()} per {unit[:-1]} {value} > {limit}")
    return problems


def _short_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}x{v}" for k, v in counts.items()) or "-"


def print_sass_table(specs_rows: list[tuple[Spec, dict[str, Any]]]) -> None:
    """One line per steady-state loop: what one iteration issues, normalized per 1,024 units of work."""
    lines = []
    for spec, row in specs_rows:
        report = row.get("sass")
        if not report:
            continue
        unit = report["unit"]
        for i, loop in enumerate(report["loops"]):
            label = "body" if loop.get("straight_line") else f"loop{i}"
            lines.append((f"{spec.name}", spec.config, row["gpu_name"], label, str(loop["instructions"]),
                          f"{loop[f'warp_instructions_per_1k_{unit}']:.0f}", f"{loop[f'ex2_per_{unit}']:.3g}",
                          f"{loop[f'fmul_per_{unit}']:.3g}", f"{loop[f'ffma_per_{unit}']:.3g}",
                          _short_counts(loop["wgmma_wait_depths"]), str(loop["cta_barriers"]),
                          str(loop["int64_ops"]), str(report["local_memory"]),
                          _short_counts(loop["global_loads"]), _short_counts(loop["tensor_core"])))
    if not lines:
        return
    header = ("kernel", "config", "arch", "loop", "instr", "per1k", "EX2/u", "FMUL/u", "FFMA/u", "wgmma wait",
              "BAR", "int64", "LDL/STL", "global loads", "tensor cores")
    widths = [max(len(h), *(len(line[c]) for line in lines)) for c, h in enumerate(header[:-1])]
    print("\nSASS steady-state loops (instr: per iteration and warp; per1k: warp-instructions per 1,024 units "
          "(scores of attention, elements of row kernels); /u: lane instructions per unit)")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[-1])
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])


def _tc_cell(spec: Spec, row: dict[str, Any]) -> str:
    if not spec.tensor_cores and not row.get("tensor_core_instructions"):
        return "-"
    return f"mma{row['mma_sync']}/wgmma{row['wgmma']}"


def print_table(specs_rows: list[tuple[Spec, dict[str, Any]]]) -> None:
    kw = max([len("kernel")] + [len(s.name) for s, _ in specs_rows])
    cw = max([len("config")] + [len(s.config) for s, _ in specs_rows])
    header = (f"{'kernel':<{kw}}  {'config':<{cw}}  {'arch':<6}  {'regs':>4}  {'spill':>6}  {'smem':>7}  "
              f"{'tensor cores':>14}  result")
    print(header)
    print("-" * len(header))
    for spec, row in specs_rows:
        if row.get("error"):
            cells = f"{'-':>4}  {'-':>6}  {'-':>7}  {'-':>14}"
        else:
            cells = (f"{row['registers']:>4}  {row['spill_bytes']:>6}  {row['shared']:>7}  "
                     f"{_tc_cell(spec, row):>14}")
        verdict = "ok" if row["ok"] else "FAIL: " + "; ".join(row["problems"])
        print(f"{spec.name:<{kw}}  {spec.config:<{cw}}  {row['gpu_name']:<6}  {cells}  {verdict}")


def print_summary(rows: list[dict[str, Any]]) -> None:
    print("\nsummary (max over configurations):")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["gpu_name"]), []).append(row)
    for (kernel, gpu), group in groups.items():
        built = [r for r in group if not r.get("error")]
        if not built:
            print(f"  {kernel:<24} {gpu:<6} no configuration compiled")
            continue
        worst = max(built, key=lambda r: r["registers"])
        spills = [r for r in built if r["spill_bytes"]]
        print(f"  {kernel:<24} {gpu:<6} {len(group):>3} configs  max regs {worst['registers']:>3} "
              f"({worst['config']})  max smem {max(r['shared'] for r in built):>6} B  "
              f"spilling configs {len(spills)}  failed {len(group) - len(built)}")


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    if "TRITON_INTERPRET" in os.environ:
        # The jit decorators read TRITON_INTERPRET when the kernels are imported (already done by the
        # package import): start again in a process without it.
        del os.environ["TRITON_INTERPRET"]
        sys.stdout.flush()
        sys.stderr.flush()
        args = sys.argv[1:] if argv is None else argv
        os.execv(sys.executable, [sys.executable, "-m", "fused_kernels.aot", *args])

    parser = argparse.ArgumentParser(prog="python -m fused_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--json", metavar="PATH", help="also write every row, with all numbers, as JSON")
    parser.add_argument("--filter", metavar="SUBSTRING", default="",
                        help="only configurations whose kernel name or config contains SUBSTRING")
    parser.add_argument("--family", nargs="+", choices=[name for name, _ in FAMILIES],
                        help="only these kernel families (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--sass", action="store_true",
                        help="also disassemble every cubin and report its steady-state loops (fused_kernels.sass), "
                             "checking the structural promises (no local memory, tensor cores, EX2/FMUL limits)")
    parser.add_argument("--quick", action="store_true",
                        help="a representative subset (what the test suite compiles): see quick_subset")
    opts = parser.parse_args(argv)

    own_cache = None
    if not os.environ.get("TRITON_CACHE_DIR"):
        shm = "/dev/shm"  # memory-backed where there is one: the cache is written ~8 times per compile
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
        own_cache = tempfile.mkdtemp(prefix="fused_kernels-aot-cache-", dir=base)
        os.environ["TRITON_CACHE_DIR"] = own_cache
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        return _run(opts)
    finally:
        if own_cache:
            shutil.rmtree(own_cache, ignore_errors=True)


def _run(opts: argparse.Namespace) -> int:
    import triton

    t0 = time.perf_counter()
    archs = list(dict.fromkeys(opts.arch))
    families = [(name, gen) for name, gen in FAMILIES if not opts.family or name in opts.family]
    specs = [s for s in all_specs(families) if opts.filter in s.name or opts.filter in s.config]
    if opts.quick:
        specs = quick_subset(specs)
    jobs, mismatches = _make_jobs(specs, archs, opts.sass)
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(specs)} configurations x "
          f"{len(archs)} archs = {len(jobs)} compiles on {max(1, min(opts.jobs, len(jobs)))} processes")
    for arch in archs:
        print(f"  {_gpu_name(arch)}: {_ptxas(arch)}")
    sys.stdout.flush()
    results = run_jobs(jobs, max(1, opts.jobs))
    specs_rows = []
    for k, result in enumerate(results):
        spec, arch = specs[jobs[k]["spec"]], jobs[k]["arch"]
        specs_rows.append((spec, evaluate(spec, arch, result)))
    specs_rows.sort(key=lambda sr: (sr[1]["arch"], sr[0].family, sr[0].name))
    print()
    print_table(specs_rows)
    if opts.sass:
        print_sass_table(specs_rows)
    rows = [row for _, row in specs_rows]
    print_summary(rows)
    print("\ncompile time per family (CPU seconds, summed over processes):")
    for family in sorted({r["family"] for r in rows}):
        group = [r for r in rows if r["family"] == family]
        print(f"  {family:<12} {len(group):>4} compiles  {sum(r['seconds'] for r in group):>7.0f} s")
    for spec, row in specs_rows:
        if row.get("error"):
            print(f"\n{spec.name} [{spec.config}] on {row['gpu_name']}:\n{row['error']}")
    for line in mismatches:
        print(f"\nspecialization mismatch: {line}")
    failed = [row for row in rows if not row["ok"]]
    elapsed = time.perf_counter() - t0
    print(f"\n{len(rows) - len(failed)} of {len(rows)} compiles clean, {len(failed)} failing; "
          f"{len(mismatches)} specialization mismatches; {elapsed:.0f} s")
    if opts.json:
        report = dict(triton=triton.__version__, torch=torch.__version__, archs=[_gpu_name(a) for a in archs],
                      shared_limit={_gpu_name(a): SHARED_LIMIT[a] for a in archs},
                      families=sorted({s.family for s in specs}), kernels=sorted({s.name for s in specs}),
                      mismatches=mismatches, seconds=round(elapsed, 1), rows=rows)
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if failed or mismatches else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

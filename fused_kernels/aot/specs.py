"""The kernel configurations ``python -m fused_kernels.aot`` compiles: one spec generator per kernel family
(``FAMILIES``), each recording what the launchers themselves launch (meta tensors, kernels replaced by
recorders), and the ``--quick`` subset."""


from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .._core.launch import ARCH_FAMILIES, ArchValue, arch_family, max_grid

Archs = tuple[ArchValue, ...]
# Every architecture ``--arch all`` compiles for: each target of each family of the tile table, CUDA compute
# capabilities then AMD gfx names.
ALL_ARCHS: Archs = tuple(target for family in ARCH_FAMILIES for target in family.targets)
# The default of ``--arch``: sm_80 and sm_90, the datacenter GPUs the SASS promises are made for.
ARCHS: Archs = (80, 90)
# A family's spec generator: the specs of its configurations as the launchers pick them for each of ``archs``.
Generator = Callable[[Archs], Iterator["Spec"]]
# Largest shared memory (LDS) one block may use (CUDA: cudaDevAttrMaxSharedMemoryPerBlockOptin, which triton
# checks when it loads a kernel), per architecture: the family's limit.
SHARED_LIMIT = {target: family.shared_memory for family in ARCH_FAMILIES for target in family.targets}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_TYPE = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.bool: "i1",
}
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}





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


@contextlib.contextmanager
def _recorded() -> Iterator[dict[str, list[tuple[Any, dict[str, Any], dict[str, Any]]]]]:
    """Inside the block every launch (``_core.launch.launch``) is recorded instead of run: {kernel name: [(kernel,
    arguments by name, launch options), ...]} in launch order. The launchers run on meta tensors meanwhile."""
    from .._core.launch import intercept

    seen: dict[str, list[tuple[Any, dict[str, Any], dict[str, Any]]]] = {}

    def record(call, run) -> None:
        seen.setdefault(call.name, []).append((call.kernel, *bind(call.kernel, call.args, call.kwargs)))

    with intercept(record):
        yield seen


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


def layer_norm_specs(archs: Archs) -> Iterator[Spec]:
    """LayerNorm / RMSNorm / add+LayerNorm forward and backward, as ``layer_norm_fwd`` / ``layer_norm_bwd``
    launch them on contiguous (M, N) rows."""
    from .._core.launch import acc_dtype, row_warps, torch_acc_dtype
    from ..ops import norms as ln

    m, programs = 8192, 4 * 108          # backward rows, programs (4 per SM on an A100)
    rows_per_program = -(-m // programs)
    # the architectures by their single-block limits (``ln.fused_limit``): each group's blocks, compiled for it
    groups: dict[tuple[Any, ...], list[ArchValue]] = {}
    for arch in archs:
        key = tuple(ln.fused_limit(dtype, backward, arch) for dtype in DTYPES for backward in (False, True))
        groups.setdefault(key, []).append(arch)
    for (dtype, heavy), group in itertools.product(itertools.product(DTYPES, (False, True)), groups.values()):
        acc, acc_t = acc_dtype(dtype), torch_acc_dtype(dtype)
        x, a = Ptr(dtype), Ptr(acc_t)
        arch0 = group[0]
        # Forward: layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, is_rms_norm).
        p = Ptr(acc_t) if heavy else x   # the launcher passes x for an absent weight / bias
        dropout_p, seed = (0.1, 12345) if heavy else (0.0, 0)
        fwd_flags = dict(HAS_RESIDUAL=heavy, HAS_DROPOUT=heavy, STORE_RES_OUT=heavy, HAS_WEIGHT=heavy,
                         HAS_BIAS=heavy, IS_RMS_NORM=False)
        label = _flags({"res": heavy, "drop": heavy, "w": heavy, "b": heavy})
        specs = []
        for n in _row_lengths(lambda n, dtype=dtype, arch0=arch0: ln._block(n, ln.fused_limit(dtype, False, arch0))[1]):
            block, single = ln._block(n, ln.fused_limit(dtype, False, arch0))
            args, options = bind(ln._layer_norm_fwd_kernel, kwargs=dict(
                X=x, R=x, W=p, B=p, Y=x, RES_OUT=x, MEAN=a, RSTD=a,
                stride_xm=n, stride_xn=1, stride_rm=n, stride_rn=1, stride_ym=n, stride_om=n,
                N=n, eps=1e-5, dropout_p=dropout_p, seed=seed, **fwd_flags,
                SINGLE_BLOCK=single, BLOCK_N=block, ACC=acc, num_warps=ln.norm_warps(block, dtype, backward=False)))
            fwd_archs = tuple(a for a in group if ln.fwd_kernel_compiles(n, dtype, heavy, a))   # else PyTorch
            if fwd_archs:
                specs.append(_row_spec("layer_norm", ln._layer_norm_fwd_kernel, dtype, n, args, options, label,
                                       fwd_archs))
        yield from _dedupe(specs, lambda s: (s.meta["BLOCK_N"], s.meta["SINGLE_BLOCK"]))

        # Backward: layer_norm_bwd(dy, dres_out, prenorm, weight, has_bias, mean, rstd, seed, ...).
        bwd_flags = dict(HAS_WEIGHT=heavy, HAS_BIAS=heavy, HAS_DRES_OUT=heavy, HAS_DROPOUT=heavy,
                         STORE_DRES=heavy, IS_RMS_NORM=False)
        label = _flags({"w": heavy, "b": heavy, "dres_out": heavy, "drop": heavy, "dres": heavy})
        part = a if heavy else x             # dW/dB partials, or dx in their place when absent
        specs = []
        for n in _row_lengths(lambda n, dtype=dtype, arch0=arch0: ln.bwd_block(n, dtype, arch0)[1]):
            block, row_sums = ln.bwd_block(n, dtype, arch0)
            args, options = bind(ln._layer_norm_bwd_kernel, kwargs=dict(
                X=x, W=p, DY=x, DRES_OUT=x, DX=x, DRES=x, DW_PART=part, DB_PART=part, MEAN=a, RSTD=a,
                SUMS=a, stride_xm=n, stride_xn=1, stride_dym=n, stride_dyn=1, stride_drm=n, stride_drn=1,
                M=m, N=n, rows_per_program=rows_per_program, dropout_p=dropout_p, seed=seed, **bwd_flags,
                ROW_SUMS=row_sums, BLOCK_N=block, ACC=acc, num_warps=ln.norm_warps(block, dtype, backward=True)))
            specs.append(_row_spec("layer_norm", ln._layer_norm_bwd_kernel, dtype, n, args, options, label,
                                   tuple(group), single=row_sums))
            if not row_sums:     # the row sums of the chunked backward
                args, options = bind(ln._layer_norm_bwd_sums_kernel, kwargs=dict(
                    X=x, W=p, DY=x, MEAN=a, RSTD=a, SUMS=a, stride_xm=n, stride_xn=1, stride_dym=n,
                    stride_dyn=1, M=m, N=n, HAS_WEIGHT=heavy, IS_RMS_NORM=False, BLOCK_N=ln.MULTIPASS_BLOCK,
                    ACC=acc, num_warps=row_warps(ln.MULTIPASS_BLOCK)))
                specs.append(_row_spec("layer_norm", ln._layer_norm_bwd_sums_kernel, dtype, n, args, options,
                                       _flags({"w": heavy}), tuple(group), single=False))
        yield from _dedupe(specs, lambda s: (s.name, s.meta["BLOCK_N"], s.meta["SINGLE_BLOCK"]))


def softmax_specs(archs: Archs) -> Iterator[Spec]:
    """Masked softmax forward and backward, launched by ``softmax.launch_rows`` itself (handed a recorder
    in place of the kernel and meta tensors shaped like a typical attention-score call)."""
    from ..ops import softmax as sm

    def launch(kernel, tensors, n, args, dtype, **meta) -> tuple[dict, dict] | None:
        with _recorded() as seen:
            sm.launch_rows(kernel, tensors, n, args, dtype, **meta)
        launches = [launch[1:] for calls in seen.values() for launch in calls]
        if len(launches) != 1:
            raise RuntimeError(f"{kernel.fn.__name__}: expected one launch, got {len(launches)}")
        return launches[0]

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
                specs.append(_row_spec("softmax", sm._softmax_fwd_kernel, dtype, n, args, options, label, archs))
            yield from _dedupe(specs, lambda s: (s.meta["BLOCK_N"], s.meta["SINGLE_BLOCK"]))

        # Backward, as softmax_bwd(y, dy, dim=-1, scale) prepares it.
        def bwd(n, dtype=dtype):
            y, dy, dx = (empty(b, h, length, n, dtype=dtype) for _ in range(3))
            return launch(sm._softmax_bwd_kernel, [y, dy, dx], n, (0.125,), dtype)

        specs = []
        for n in _row_lengths(lambda n: bwd(n)[0]["SINGLE_BLOCK"]):
            args, options = bwd(n)
            specs.append(_row_spec("softmax", sm._softmax_bwd_kernel, dtype, n, args, options, "plain", archs))
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


def _row_spec(family, kernel, dtype, n, args, options, label, archs: Archs, single: bool | None = None) -> Spec:
    """A row kernel's spec: its configuration depends on the row length and dtype only, the same on every arch.
    ``single``: whether a row fits one block (default: the kernel's SINGLE_BLOCK); a longer row is "multipass"
    (the LayerNorm backward's column chunks and its row sums included)."""
    block = args["BLOCK_N"]
    single = args["SINGLE_BLOCK"] if single is None else single
    config = f"{_SHORT[dtype]} BLOCK_N={block}{'' if single else ' multipass'} w{options.get('num_warps', 4)} {label}"
    return Spec(family, kernel, config, args, options,
                meta=dict(dtype=_SHORT[dtype], n=n, BLOCK_N=block, SINGLE_BLOCK=single, flags=label, archs=archs,
                          work=block, unit="elements"))


# Per-score promises of the attention kernels' steady-state loops (``--sass``), on the 16-bit tensor-core
# configurations without dropout at head dims <= 128: one exponential per score (no score work duplicated
# across warps or warp groups, the online-softmax rescale amortized over the key block) and, in the sm_90a
# forward, at most 1.1 FMUL per score: the accumulator rescale (Dv / BLOCK_N = 1 at d = 128), the row sums
# being FADDs and the softmax scale folded into the exponent's FFMA. Reported, not bounded: the rescale
# costs Dv / BLOCK_N FMUL per score, 2 on sm_80 at d = 128 (a 128-key tile spills with mma.sync operands
# in registers) and 4 at d = 256; at d = 256 the dK/dV kernel's two BLOCK_N x 256 fp32 accumulators leave
# no registers for a tile without duplicated score work; dropout
# configurations spend FMULs and integer work on the in-kernel Philox stream and use narrower tiles; the
# flash-decoding kernel's rows are a GQA group's few queries (padded to 16), memory-bound.
SASS_LIMITS = {
    "_attn_fwd_kernel": {"ex2": 1.1, "fmul": 1.1},
    "_attn_bwd_dkdv_kernel": {"ex2": 1.1},
    "_attn_bwd_dq_kernel": {"ex2": 1.1},
}


def attention_specs(archs: Archs) -> Iterator[Spec]:
    """Fused attention forward (main and flash-decoding with its combine) and backward (preprocess, dK/dV,
    dQ), recorded from the launchers themselves (``attention.fwd_launch`` / ``bwd_launch`` on meta
    tensors, each kernel replaced by a recorder) with the configuration ``attention_config`` picks per
    architecture: a spec is compiled only for the architecture it was chosen for. Shapes of FlashAttention's
    benchmark grid: 16k tokens per batch (16 x 1024 queries and keys), H x D = 2048 with 4 query heads per
    key/value head (GQA), head dims 64, 128 and 256 (decode: 1 query over 4096 keys in 16 splits).
    "plain" is no mask, no causal, no dropout; "causal" adds the causal mask alone; "heavy" is a bool padding
    mask (B, 1, L, S) + causal aligned per row to seqlens_k + dropout (+ lse gradient in the backward). fp16
    and bf16 run all three, fp32 and fp64 "heavy" and "causal" (the tiles without dropout; fp32 with true-fp32
    dots; fp64 at head dim 256 only where the column has a kernel for it: its forward on some columns, its
    backward nowhere). MHA ("mha": one query head per key/value head, ``GROUP=1``, which the launcher's
    specialization turns into a constant): fp16 and bf16 at head dims 64 and
    128, all three. "causal-seqlens" (bf16, head dims 64 and 128): causal aligned per row to seqlens_k alone,
    what a padded KV cache runs. "plain-tail" (bf16, head dims 64 and 128): "plain" over 1000 keys, a partial last
    key block (sm_90a's "plain" takes the warp-specialized forward where it compiles, this one the plain loops).
    "plain-split" (MHA, fp16 and bf16, head dims 64 and 128): "plain" on a split grid (``max_grid``), which takes
    neither warp-specialized kernel (sm_90a's MHA "plain" backward runs ``_attn_bwd_dkdv_ws_kernel``). A
    steady-state loop iteration of a kernel built on ``tl.dot`` covers BLOCK_M x BLOCK_N scores (the SASS
    report's unit)."""
    from ..ops.attention import launch as at  # the launchers and the kernels they call
    from ..ops.attention.config import has_kernels
    names = ("_attn_fwd_kernel", "_attn_fwd_split_kernel", "_attn_combine_kernel", "_attn_bwd_preprocess_kernel",
             "_attn_bwd_dkdv_kernel", "_attn_bwd_dkdv_ws_kernel", "_attn_bwd_dq_kernel")
    dot_kernels = {"_attn_fwd_kernel", "_attn_fwd_split_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dkdv_ws_kernel",
                   "_attn_bwd_dq_kernel"}

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    def record(run) -> list[tuple[Any, dict, dict]]:
        with _recorded() as seen:
            run()
        return [launch for name in names for launch in seen.get(name, [])]

    b, l, s, s_dec, splits = 16, 1024, 1024, 4096, 16
    half = [(dtype, d, kind, 4) for dtype in (torch.float16, torch.bfloat16) for d in (64, 128, 256)
            for kind in ("plain", "causal", "heavy")]
    cases = half + [(torch.float32, d, "heavy", 4) for d in (64, 128, 256)]
    cases += [(torch.float64, d, "heavy", 4) for d in (64, 128, 256)]
    cases += [(dtype, d, "causal", 4) for dtype in (torch.float32, torch.float64) for d in (64, 128, 256)]
    cases += [(dtype, d, kind, 1) for dtype in (torch.float16, torch.bfloat16) for d in (64, 128)
              for kind in ("plain", "causal", "heavy")]
    cases += [(torch.bfloat16, d, "causal-seqlens", 4) for d in (64, 128)]
    cases += [(torch.bfloat16, d, "plain-tail", 4) for d in (64, 128)]
    cases += [(dtype, d, "plain-split", 1) for dtype in (torch.float16, torch.bfloat16) for d in (64, 128)]
    seen = set()
    for arch in archs:
        for dtype, d, kind, group in cases:
            h = 2048 // d
            hkv = h // group
            heavy, causal = kind == "heavy", kind not in ("plain", "plain-tail", "plain-split")
            s = 1000 if kind == "plain-tail" else 1024
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            mask = empty(b, 1, l, s, dtype=torch.bool) if heavy else None
            seqlens = empty(b, dtype=torch.int32) if heavy or kind == "causal-seqlens" else None
            p, seed = (0.1, 12345) if heavy else (0.0, 0)
            q, k, v = empty(b, h, l, d, dtype=dtype), empty(b, hkv, s, d, dtype=dtype), empty(b, hkv, s, d, dtype=dtype)
            q1 = empty(b, h, 1, d, dtype=dtype)
            kd, vd = empty(b, hkv, s_dec, d, dtype=dtype), empty(b, hkv, s_dec, d, dtype=dtype)
            mask1 = empty(b, 1, 1, s_dec, dtype=torch.bool) if heavy else None
            out, lse = empty(b, h, l, d, dtype=dtype), empty(b, h, l, dtype=acc)
            dlse = empty(b, h, l, dtype=acc) if heavy else None

            # a NO_KERNEL entry of the tile table: the call takes the PyTorch path on that arch, nothing to compile
            fwd_on = has_kernels(d, d, dtype, arch, heavy, backward=False)
            bwd_on = has_kernels(d, d, dtype, arch, heavy, backward=True)

            def run(q=q, k=k, v=v, q1=q1, kd=kd, vd=vd, mask=mask, mask1=mask1, seqlens=seqlens, p=p, seed=seed,
                    causal=causal, out=out, lse=lse, dlse=dlse, arch=arch, fwd_on=fwd_on, bwd_on=bwd_on):
                # align_seqlens: what attention(causal=True, seqlens_k=...) runs (a no-op without seqlens)
                if fwd_on:
                    at.fwd_launch(q, k, v, mask, seqlens, 0.125, causal, 0, p, 0, seed, arch, align_seqlens=True)
                    at.fwd_launch(q1, kd, vd, mask1, seqlens, 0.125, causal, s_dec - 1, p, splits, seed, arch,
                                  align_seqlens=True)
                if bwd_on:
                    at.bwd_launch(out, dlse, q, k, v, out, lse, mask, seqlens, seed, 0.125, causal, 0, p, arch,
                                  align_seqlens=True)

            if kind == "plain-split":    # a split grid: the plain loops where "plain" takes the specialized ones
                def run(run=run):
                    with max_grid(64):
                        run()

            for kernel, args, options in record(run):
                name = kernel.fn.__name__
                key = (arch, name, repr(sorted((k_, str(v_.dtype) if isinstance(v_, torch.Tensor) else repr(v_))
                                               for k_, v_ in args.items() if k_ not in ("PID1_BASE", "PID2_BASE"))),
                       repr(sorted(options.items())))    # a split grid's parts: one kernel
                if key in seen:   # the combine / preprocess kernels repeat across head dims and kinds
                    continue
                seen.add(key)
                tc = name in dot_kernels and dtype in (torch.float16, torch.bfloat16)
                bm, bn = args.get("BLOCK_M", "-"), args.get("BLOCK_N", "-")
                config = (f"{_SHORT[dtype]} d={d} M{bm} N{bn} w{options.get('num_warps', 4)} "
                          f"s{options.get('num_stages', 3)} {kind}{' mha' if group == 1 else ''}")
                cost = (bm if isinstance(bm, int) else 16) * (bn if isinstance(bn, int) else 16) * d
                if name in dot_kernels:
                    work, unit = bm * bn, "scores"
                elif name == "_attn_combine_kernel":
                    work, unit = args["BLOCK_S"] * args["BLOCK_DV"], "elements"
                else:
                    work, unit = args["BLOCK_M"] * args["BLOCK_DV"], "elements"
                limits = {} if not tc or heavy or d > 128 else dict(SASS_LIMITS.get(name, {}))
                if arch_family(arch).mma != "wgmma":   # the FMUL promise is the sm_90a forward's
                    limits.pop("fmul", None)
                yield Spec("attention", kernel, config, args, options, tensor_cores=tc,
                           meta=dict(dtype=_SHORT[dtype], head_dim=d, BLOCK_M=bm, BLOCK_N=bn, flags=kind,
                                     group=group, archs=(arch,), cost=cost, work=work, unit=unit, sass_limits=limits))


def paged_specs(archs: Archs) -> Iterator[Spec]:
    """Paged KV cache: the append kernel and the paged attention (with the combine kernel), recorded from the
    launchers (``paged.append_launch`` / ``paged.paged_launch`` on meta tensors, kernels replaced by
    recorders) with the tiles ``config.paged_config`` picks per architecture. Shapes: 16 sequences, 32 query
    heads over 8 kv heads (GQA 4), block tables of 4096 positions; "decode" is 1 new query per sequence (one row
    tile of the 4 heads' rows, split keys), "prefill" 256 new queries (row tiles of the forward's BLOCK_M);
    block sizes 16 (a key tile of 16), 256 (the configuration's key tile, one page per tile) and 24 (not a
    multiple of the key tile: per-row page lookups). Every dtype, head dims 64, 128 and 256."""
    from ..ops.attention import paged as pg
    from ..ops.attention.config import has_kernels
    names = ("_paged_append_kernel", "_paged_attn_fwd_kernel", "_attn_combine_kernel")

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    b, h, hkv, capacity = 16, 32, 8, 4096
    seen = set()
    for arch in archs:
        for dtype in DTYPES:
            for d in (64, 128, 256):
                for page in (16, 256, 24):
                    for kind, lq in (("decode", 1), ("prefill", 256)):
                        max_blocks = -(-capacity // page)
                        k_cache = empty(b * max_blocks, page, hkv, d, dtype=dtype)
                        table, lens = empty(b, max_blocks, dtype=torch.int32), empty(b, dtype=torch.int32)
                        q = empty(b, h, lq, d, dtype=dtype)
                        k_new = empty(b, lq, hkv, d, dtype=dtype).transpose(1, 2)   # a model's head split
                        with _recorded() as recorded:
                            pg.append_launch(k_cache, k_cache, table, lens, k_new, k_new)
                            if has_kernels(d, d, dtype, arch, False, backward=False):
                                pg.paged_launch(q, k_cache, k_cache, table, lens, 0.125, True, None, arch)
                        for name in names:
                            for kernel, args, options in recorded.get(name, []):
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
                                yield Spec("paged", kernel, config, args, options,
                                           tensor_cores=attn and dtype in (torch.float16, torch.bfloat16),
                                           meta=dict(dtype=_SHORT[dtype], head_dim=d, BLOCK_M=bm, BLOCK_N=bn,
                                                     flags=label, archs=(arch,), cost=work * d, work=work,
                                                     unit=unit))


def varlen_specs(archs: Archs) -> Iterator[Spec]:
    """Packed variable-length attention (``fused_kernels.varlen_attention``): the attention forward, dK/dV and dQ
    kernels with ``VARLEN=True`` and the dense preprocess over the packed rows, recorded from the launchers
    (``varlen.varlen_fwd_launch`` / ``varlen_bwd_launch`` on meta tensors, kernels replaced by recorders)
    with the tiles ``attention_config`` picks per architecture. Shapes: 16 sequences packed into 16k tokens
    (longest 2048), H x D = 2048 with GQA 4; "plain", "causal" and "heavy" (causal + dropout + lse gradient)
    as ``attention_specs``: fp16 / bf16 all three, fp32 heavy, fp64 heavy at head dims 64 and 128."""
    from ..ops.attention import varlen as vl
    from ..ops.attention.config import has_kernels
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
    for arch in archs:
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
            with _recorded() as recorded:
                if has_kernels(d, d, dtype, arch, heavy, backward=False, varlen=True):
                    vl.varlen_fwd_launch(q, k, v, cu, cu, longest, longest, 0.125, causal, p, seed, arch)
                if has_kernels(d, d, dtype, arch, heavy, backward=True, varlen=True):
                    vl.varlen_bwd_launch(out, dlse, q, k, v, out, lse, cu, cu, longest, longest, seed, 0.125, causal,
                                         p, arch)
            for name in names:
                for kernel, args, options in recorded.get(name, []):
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
                    yield Spec("varlen", kernel, config, args, options,
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


def variants_specs(archs: Archs) -> Iterator[Spec]:
    """Attention variants (programmable attention): the forward, dK/dV and dQ kernels with each variant alone
    and all at once, recorded from the launchers (``attention.launch.fwd_launch`` / ``bwd_launch`` with a
    ``var``, on meta tensors, kernels replaced by recorders; the sparse lists of the mask variants are built by
    ``attention.sparse`` on meta tensors too, only their shapes reach the kernels) with the tiles
    ``attention_config`` picks per architecture. Variants (``_VARIANT_CASES``): "window" (255, 0) causal,
    "alibi", "softcap" (30), "document" (q_ids / k_ids), "prefix" (prefix-LM, causal), "score_mod"
    (``examples.distance_penalty``), "mask_mod" (``examples.stripes``), "mod_args" (``examples.relative_bias``
    with its table) and "all" (window + prefix + document + alibi + softcap + distance_penalty + stripes);
    without the window / prefix, non-causal. The mask variants run the SPARSE path (full then partial tile lists;
    its steady-state loop is the full-tile one). Shapes as ``attention_specs`` (16 x 1024 queries and keys,
    H x D = 2048, GQA 4); bf16 and fp16 at head dims 64 and 128, fp32 "all" at 128. The mods are module-level
    ``@triton.jit`` functions of ``fused_kernels.ops.attention.examples``: they travel to the compile processes by
    (module, name), see ``_JitRef``."""
    from types import SimpleNamespace

    from ..ops.attention import examples as ex
    from ..ops.attention import launch as at
    from ..ops.attention.config import has_kernels
    names = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_preprocess_kernel")
    kept = names[:3]                      # the preprocess kernel is that of the attention family

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    b, l, s = 16, 1024, 1024
    cases = [(dtype, d, v) for dtype in (torch.bfloat16, torch.float16) for d in (64, 128) for v in _VARIANT_CASES]
    cases.append((torch.float32, 128, "all"))
    seen = set()
    for arch in archs:
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
                block_mask=None, off=s - l)
            q, k, v = empty(b, h, l, d, dtype=dtype), empty(b, hkv, s, d, dtype=dtype), empty(b, hkv, s, d, dtype=dtype)
            out, lse = empty(b, h, l, d, dtype=dtype), empty(b, h, l, dtype=acc)
            with _recorded() as recorded, _shape_only_tables():
                if has_kernels(d, d, dtype, arch, at._heavy(var, 0.0), backward=False):
                    at.fwd_launch(q, k, v, None, None, 0.125, causal, 0, 0.0, 0, 0, arch, var=var)
                if has_kernels(d, d, dtype, arch, at._heavy(var, 0.0), backward=True):
                    at.bwd_launch(out, None, q, k, v, out, lse, None, None, 0, 0.125, causal, 0, 0.0, arch, var=var)
            for name in kept:
                for kernel, args, options in recorded.get(name, []):
                    key = (arch, name, repr(sorted((k_, _arg_key(v_)) for k_, v_ in args.items())),
                           repr(sorted(options.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    bm, bn = args["BLOCK_M"], args["BLOCK_N"]
                    config = (f"{_SHORT[dtype]} d={d} M{bm} N{bn} w{options.get('num_warps', 4)} "
                              f"s{options.get('num_stages', 3)} {variant}")
                    yield Spec("variants", kernel, config, args, options,
                               tensor_cores=dtype in (torch.float16, torch.bfloat16),
                               meta=dict(dtype=_SHORT[dtype], head_dim=d, BLOCK_M=bm, BLOCK_N=bn, flags=variant,
                                         causal=causal, sparse=bool(args.get("SPARSE")), archs=(arch,),
                                         cost=bm * bn * d, work=bm * bn, unit="scores"))
    yield from block_mask_specs(archs)


def block_mask_specs(archs: Archs) -> Iterator[Spec]:
    """``_block_mask_kernel`` (the tile classes of a ``mask_mod``, ``fused_kernels.block_mask``) as ``block_mask``
    launches it: ``examples.stripes`` at the default 128 x 128 blocks over (16, 16, 1024, 1024), and at 64 x 64."""
    from ..ops.attention import examples as ex
    from ..ops.attention.blockmask import classes_launch

    for arch in archs:
        for block in (128, 64):
            classes = torch.empty((16, 16, 1024 // block, 1024 // block), dtype=torch.int8, device="meta")
            with _recorded() as seen:
                classes_launch(classes, ex.stripes, (), 1024, 1024, block, block)
            ((kernel, args, options),) = seen["_block_mask_kernel"]
            yield Spec("variants", kernel, f"M{block} N{block} w{options.get('num_warps', 4)} stripes",
                       args, options, meta=dict(dtype="i8", head_dim=0, BLOCK_M=block, BLOCK_N=block, archs=(arch,),
                                                flags="stripes", cost=block * block, work=block * block,
                                                unit="scores"))


def _recorded_specs(family: str, names: tuple[str, ...], dot_kernels: set[str], run: Callable[[], None],
                    arch: ArchValue, dtype: torch.dtype, label: str, seen: set, work_of: Callable[[str, dict], tuple]):
    """Specs of the launches ``run()`` makes (under ``force_arch(arch)``, kernels replaced by recorders), one per
    distinct (kernel, arguments, options); ``work_of(name, args)`` gives (work, unit, config text) of a kernel."""
    from .._core.launch import force_arch

    with force_arch(arch), _recorded() as recorded:
        run()
    for name in names:
        for kernel, args, options in recorded.get(name, []):
            key = (arch, name, repr(sorted((k, _arg_key(v)) for k, v in args.items())), repr(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            work, unit, text = work_of(name, args)
            on = [k for k, v in args.items() if v is True and k not in ("EVEN_K", "UPCAST")]
            on += [f"{k}={v}" for k, v in args.items() if k == "GRAD_MODE"]
            yield Spec(family, kernel, f"{_SHORT[dtype]} {text} w{options.get('num_warps', 4)} "
                                       f"s{options.get('num_stages', 3)} {label} [{' '.join(on)}]", args, options,
                       tensor_cores=name in dot_kernels and dtype in (torch.float16, torch.bfloat16),
                       meta=dict(dtype=_SHORT[dtype], flags=label, archs=(arch,), cost=work, work=work, unit=unit))


def cross_entropy_specs(archs: Archs) -> Iterator[Spec]:
    """Linear cross-entropy and cross-entropy (``fused_kernels.ops.cross_entropy``), recorded from the launchers
    (``_lce_triton`` / ``_ce_triton`` on meta tensors under ``force_arch``, kernels replaced by recorders) at the
    issue's sizes: N = 8,192 rows, hidden 4,096, vocabulary 131,072 (chunks of 512 rows). "plain": no bias or
    option, reduction "mean" (logits + softmax part + dX + dW in the forward); "all": bias, label smoothing,
    z-loss and soft-cap, reduction "none" (the loss-only forward, and the backward's recompute with each row's
    gradient). fp16 / bf16 both, fp32 and fp64 "all"; ``cross_entropy`` on given (8,192 x 131,072) logits (the
    stats kernel and the softmax part) in bf16 ("plain", "all") and fp32 ("all"). A steady-state iteration of a
    matmul kernel covers BLOCK_M x BLOCK_N logits (dX: BLOCK_M x BLOCK_K outputs over BLOCK_N classes, dW:
    BLOCK_N x BLOCK_K over BLOCK_M rows), of a row kernel BLOCK_V elements."""
    from ..ops import cross_entropy as ce
    names = ("_lce_logits_kernel", "_ce_softmax_kernel", "_lce_dx_kernel", "_lce_dw_kernel", "_ce_stats_kernel")
    dots = {"_lce_logits_kernel", "_lce_dx_kernel", "_lce_dw_kernel"}

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    def work_of(name, args):
        if name in dots:
            bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
            work = {"_lce_logits_kernel": bm * bn, "_lce_dx_kernel": bm * bk, "_lce_dw_kernel": bn * bk}[name]
            return work, "scores", f"M{bm} N{bn} K{bk}"
        return args["BLOCK_V"], "elements", f"BLOCK_V={args['BLOCK_V']}"

    n, h, v = 8192, 4096, 131072
    cases = [(dt, kind) for dt in (torch.bfloat16, torch.float16) for kind in ("plain", "all")]
    cases += [(torch.float32, "all"), (torch.float64, "all")]
    seen: set = set()
    for arch in archs:
        for dtype, kind in cases:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            x, w, t = empty(n, h, dtype=dtype), empty(v, h, dtype=dtype), empty(n, dtype=torch.int64)
            b = empty(v, dtype=dtype)

            def run(x=x, w=w, t=t, b=b, kind=kind, acc=acc):
                if kind == "plain":
                    ce._lce_triton(x, w, None, t, -100, 0.0, 0.0, 0.0, True, True, False, None, empty(dtype=acc))
                else:
                    ce._lce_triton(x, w, b, t, -100, 0.1, 1e-4, 30.0, False, False, False, None, None)
                    ce._lce_triton(x, w, b, t, -100, 0.1, 1e-4, 30.0, True, True, True, empty(n, dtype=acc), None)
            yield from _recorded_specs("cross_entropy", names, dots, run, arch, dtype, kind, seen, work_of)
        for dtype, kind in ((torch.bfloat16, "plain"), (torch.bfloat16, "all"), (torch.float32, "all")):
            logits, t = empty(n, v, dtype=dtype), empty(n, dtype=torch.int64)
            opts = (0.0, 0.0, 0.0) if kind == "plain" else (0.1, 1e-4, 30.0)

            def run(logits=logits, t=t, opts=opts):
                ce._ce_triton(logits, t, -100, *opts, logits)
            yield from _recorded_specs("cross_entropy", names, dots, run, arch, dtype, f"{kind} given-logits", seen,
                                       work_of)


def rotary_specs(archs: Archs) -> Iterator[Spec]:
    """Rotary embeddings (``fused_kernels.ops.rotary._rope_kernel``), forward and backward, recorded from the
    launcher (``rotary._launch`` on meta tensors): 8 sequences of 2,048 positions, 32 query heads over 8 key /
    value heads (GQA), q / k (B, H, L, D) with tables (B, L, R); "full": head dim 128, rotate-half; "interleaved":
    GPT-J's pairs at head dim 128; "partial": head dim 80, 32 rotary dims (Phi-2); "proj": q / k as strided views of
    one fused qkv projection (the model layout), head dim 128. Every dtype runs "full"; bf16 every kind. A
    steady-state iteration covers BLOCK_H heads x the whole head dim: the rotary dims, then the pass-through dims
    copied (the outputs are new tensors, so their bytes are part of the one-read-one-write count)."""
    from ..ops import rotary as rt
    names = ("_rope_kernel",)

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    def work_of(name, args):
        chunk = f"/P{args['BLOCK_P']}" if args["PASS"] else ""
        return args["BLOCK_H"] * (2 * args["HALF"] + args["PASS"]), "elements", \
            f"H{args['BLOCK_H']} half={args['HALF']} pass={args['PASS']}{chunk}"

    b, l, hq, hk = 8, 2048, 32, 8
    cases = [(dt, "full") for dt in DTYPES] + [(torch.bfloat16, k) for k in ("interleaved", "partial", "proj")]
    seen: set = set()
    for arch in archs:
        for dtype, kind in cases:
            d, rot = (80, 32) if kind == "partial" else (128, 128)
            if kind == "proj":
                fused = empty(b, l, (hq + 2 * hk) * d, dtype=dtype)
                q = fused[..., : hq * d].view(b, l, hq, d).transpose(1, 2)
                k = fused[..., hq * d:(hq + hk) * d].view(b, l, hk, d).transpose(1, 2)
            else:
                q, k = empty(b, hq, l, d, dtype=dtype), empty(b, hk, l, d, dtype=dtype)
            cos = empty(b, l, rot, dtype=dtype)[:, None]
            qo, ko = empty(b, hq, l, d, dtype=dtype), empty(b, hk, l, d, dtype=dtype)

            def run(q=q, k=k, cos=cos, qo=qo, ko=ko, kind=kind):
                rt._launch(q, k, cos, cos, qo, ko, 1, kind == "interleaved", False)
                rt._launch(qo, ko, cos, cos, qo, ko, 1, kind == "interleaved", True)
            yield from _recorded_specs("rotary", names, set(), run, arch, dtype, kind, seen, work_of)


def gated_mlp_specs(archs: Archs) -> Iterator[Spec]:
    """SwiGLU / GeGLU (``fused_kernels.ops.gated_mlp``), forward and backward, recorded from the custom ops'
    launches on meta tensors: 16,384 tokens x 14,336 intermediate features (Llama 3 8B's feed-forward), gate and up
    as two tensors ("pair") and as the halves of one (tokens, 2 x 14,336) projection ("concat"); every activation in
    bf16, silu in every dtype. One program (no loop) covers BLOCK_M x BLOCK_F elements."""
    from ..ops import gated_mlp as gm
    names = ("_glu_fwd_kernel", "_glu_bwd_kernel")

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    def work_of(name, args):
        return args["BLOCK_M"] * args["BLOCK_F"], "elements", f"M{args['BLOCK_M']} F{args['BLOCK_F']} " \
            f"act={args['ACT']}"

    m, f = 16384, 14336
    cases = [(dt, gm.SILU, kind) for dt in DTYPES for kind in ("pair", "concat")]
    cases += [(torch.bfloat16, act, kind) for act in (gm.GELU, gm.GELU_TANH) for kind in ("pair", "concat")]
    seen: set = set()
    for arch in archs:
        for dtype, act, kind in cases:
            if kind == "pair":
                gate, up = empty(m, f, dtype=dtype), empty(m, f, dtype=dtype)
            else:
                gate, up = empty(m, 2 * f, dtype=dtype), None
            out = empty(m, f, dtype=dtype)
            g, u = gm._split(gate, up)
            dgu = empty(*gate.shape, dtype=dtype)
            dg, du = gm._split(dgu, None) if up is None else (out, out)

            def run(g=g, u=u, out=out, dg=dg, du=du, act=act):
                gm.fwd_launch(g, u, out, act)
                gm.bwd_launch(g, u, out, dg, du, act)
            yield from _recorded_specs("gated_mlp", names, set(), run, arch, dtype, kind, seen, work_of)


@contextlib.contextmanager
def _shape_only_tables() -> Iterator[None]:
    """While recording on meta tensors: ``attention.sparse``'s document and ``mask_mod`` tile tables as empty
    tensors of their shapes, (B, 1, nm, nn) and (B, H, nm, nn) int8 (the real ones evaluate every score of the
    call, minutes of meta-tensor bookkeeping at these shapes; the kernels see only the lists' shapes)."""
    import triton

    from ..ops.attention import blockmask as bmk
    from ..ops.attention import sparse as sp

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
    configuration at head dims 64 and 128 (the performance promises of the SASS report; MHA at 128 only), and
    per kernel the heaviest configuration of every other dtype (largest tiles x head dim, every feature on). Paged
    attention: per dtype and arch the heaviest decode and prefill configuration, each with whole-page key tiles and with
    per-row page lookups. Packed varlen attention: per kernel and arch the heaviest 16-bit and the heaviest
    fp32 / fp64 configuration. Attention variants: per kernel and arch the "all" variant (every mask and score
    variant at once) in bf16 at head dim 128, and the block-mask kernel at its default 128 x 128 blocks. Split
    launches (``grid_split_twins``): per kernel and arch a bf16 twin, with dropout where the kernel has it."""
    keep: dict[Any, Spec] = {}
    for spec in specs:
        m = spec.meta
        if m.get("grid_split"):   # per kernel and arch one bf16 twin: with dropout (the most registers) if any
            if m["dtype"] not in ("bf16", "i8"):
                continue
            key = (spec.name, m["archs"], "grid_split")
            rank = (m.get("flags") == "heavy", m.get("cost", 0))
            if key in keep and (keep[key].meta.get("flags") == "heavy", keep[key].meta.get("cost", 0)) >= rank:
                continue
        elif spec.family == "paged":   # per kernel, dtype and arch (and kind) the largest tiles x head dim
            key = (spec.name, m["dtype"], m["archs"], m["flags"].split(" ")[0], "page=24" in m["flags"])
            if key in keep and keep[key].meta["cost"] >= m["cost"]:
                continue
        elif spec.family == "varlen":   # per kernel, dtype family and arch the heaviest configuration
            key = (spec.name, m["dtype"] in ("fp16", "bf16"), m["archs"])
            if key in keep and keep[key].meta["cost"] >= m["cost"]:
                continue
        elif spec.name == "_block_mask_kernel":   # per arch at the default 128 x 128 blocks
            if m["BLOCK_M"] != 128:
                continue
            key = (spec.name, m["archs"])
        elif spec.family == "variants":   # the "all" variant per kernel and arch, bf16 at head dim 128
            if m["flags"] != "all" or m["dtype"] != "bf16" or m["head_dim"] != 128:
                continue
            key = (spec.name, m["archs"], "variants")
        elif spec.family == "attention" and m.get("group") == 1:   # MHA: bf16 at head dim 128
            if m["dtype"] != "bf16" or m["head_dim"] != 128:
                continue
            key = id(spec)
        elif spec.family in ("cross_entropy", "rotary", "gated_mlp"):   # every configuration (a few per arch)
            key = id(spec)
        elif spec.family == "attention":
            if m["dtype"] == "bf16" and m["head_dim"] <= 128:
                key: Any = id(spec)
            else:
                key = (spec.name, m["dtype"], m["archs"])
                if key in keep and keep[key].meta["cost"] >= m["cost"]:
                    continue
        else:   # row kernels: per kernel, dtype, features and architectures (their limits differ) the largest
            key = (spec.name, m["dtype"], m["flags"], m["SINGLE_BLOCK"], m["archs"])
            if key in keep and keep[key].meta["BLOCK_N"] >= m["BLOCK_N"]:
                continue
        keep[key] = spec
    return list(keep.values())


# Per-family spec generators: (family name, generator). The attention family adds one line here.
FAMILIES: list[tuple[str, Generator]] = [
    ("layer_norm", layer_norm_specs),
    ("softmax", softmax_specs),
    ("attention", attention_specs),
    ("paged", paged_specs),
    ("varlen", varlen_specs),
    ("variants", variants_specs),
    ("cross_entropy", cross_entropy_specs),
    ("rotary", rotary_specs),
    ("gated_mlp", gated_mlp_specs),
]


def grid_split_twins(specs: list[Spec]) -> list[Spec]:
    """The configurations a launch over more than 65,535 programs on axis 1 or 2 compiles (``_core.launch.split_grid``:
    ``GRID_SPLIT=True``, the first program in ``PID1_BASE`` / ``PID2_BASE``), for the kernels that take them: per
    kernel, arch, dtype and feature set (``flags``) the heaviest configuration again (largest tiles x head dim),
    so that the split variant is proven to compile without spills next to the plain one."""
    heaviest: dict[Any, Spec] = {}
    for spec in specs:
        # never split (attention.launch), or recorded from a split launch already
        if "GRID_SPLIT" not in spec.args or spec.args.get("WARP_SPECIALIZE") or spec.args.get("GRID_SPLIT"):
            continue
        key = (spec.name, spec.meta.get("archs"), spec.meta.get("dtype"), spec.meta.get("flags"))
        if key not in heaviest or spec.meta.get("cost", 0) > heaviest[key].meta.get("cost", 0):
            heaviest[key] = spec
    return [Spec(s.family, s.kernel, f"{s.config} grid-split", {**s.args, "GRID_SPLIT": True}, s.options,
                 s.tensor_cores, {**s.meta, "grid_split": True}) for s in heaviest.values()]


def all_specs(families: list[tuple[str, Generator]] | None = None, archs: Archs = ARCHS) -> list[Spec]:
    """Every spec of ``families`` (default: all) for the architectures ``archs`` (default: ``ARCHS``), with the
    grid-split twins of each family."""
    specs = []
    for family, generate in families or FAMILIES:
        found = []
        for spec in generate(tuple(archs)):
            if spec.family != family:
                raise RuntimeError(f"{spec.name}: spec of family {spec.family!r} from the {family!r} generator")
            found.append(spec)
        specs += found + grid_split_twins(found)
    return specs

"""Memory-bound benchmarks: layer_norm, rms_norm, add_layer_norm (family "norm") and softmax with and
without a mask (family "softmax"), forward and forward+backward, rows of 512..262,144 elements.

Each case holds the total size fixed (2^26 elements on a GPU, 128 MiB in bf16, well past any L2) and
varies the row length N (rows M = 2^26 / N). The metric is GB/s of the minimal traffic (every input read
once, every output written once; the few bytes of per-row statistics are left out) and its fraction of
the device-to-device copy bandwidth measured at the start of the run:

    op               forward                      backward (added for fwd+bwd)
    layer_norm       x in, y out, w b in          x dy in, dx out, w in, dw db out
    rms_norm         x in, y out, w in            x dy in, dx out, w in, dw out
    add_layer_norm   x res in, y res_out out,     res_out dy dres in, dx out (without dropout one
                     w b in                       gradient serves x and residual), w in, dw db out
    softmax          x in, y out (+ mask in)      y dy in, dx out

Providers: ours, torch eager, torch.compile (GPU only: compiling costs seconds per shape), Liger and Apex
when installed (they have no fused residual add nor masked softmax: those cases are recorded as skipped).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import fused_kernels
from bench.attention import ours_context
from bench.harness import (
    DTYPES,
    REGISTRY,
    Case,
    Env,
    Prepared,
    Rotation,
    Unsupported,
    all_of,
    cuda_only,
    module_available,
    nbytes,
    rotation_count,
)

NORM_OPS = ("layer_norm", "rms_norm", "add_layer_norm")
SOFTMAX_OPS = ("softmax", "softmax_masked")
EPS = 1e-6          # one epsilon for every provider (torch's rms_norm default depends on the dtype)
MASK_GROUPS = 4     # the masked softmax's mask is (G, 1, N), broadcast over each group's rows


# ----------------------------------------------------------------------------- work counts


def norm_bytes(op: str, mode: str, m: int, n: int, element_size: int, param_size: int | None = None,
               mask_bytes: int = 0) -> int:
    """Minimal bytes moved by ``op`` on an (M, N) input (see the module docstring for the terms)."""
    e = m * n * element_size
    p = n * (param_size or element_size)
    fwd, bwd = {
        "layer_norm": (2 * e + 2 * p, 3 * e + 3 * p),
        "rms_norm": (2 * e + p, 3 * e + 2 * p),
        "add_layer_norm": (4 * e + 2 * p, 4 * e + 3 * p),
        "softmax": (2 * e + mask_bytes, 3 * e),
        "softmax_masked": (2 * e + mask_bytes, 3 * e),
    }[op]
    return fwd if mode == "fwd" else fwd + bwd


def _mask_shape(m: int, n: int) -> tuple[int, int, int]:
    g = MASK_GROUPS if m % MASK_GROUPS == 0 else 1
    return g, 1, n


# ----------------------------------------------------------------------------- grids


def _case(family: str, op: str, mode: str, dtype: str, m: int, n: int, skip: dict[str, str]) -> Case:
    elt = DTYPES[dtype].itemsize
    mask_bytes = 0
    if op == "softmax_masked":
        g, _, _ = _mask_shape(m, n)
        mask_bytes = g * n                                  # bool, one byte each
    return Case(family, op, mode, "rows", dtype, dict(M=m, N=n), "gbps",
                bytes=norm_bytes(op, mode, m, n, elt, mask_bytes=mask_bytes), skip=dict(skip))


def _grid(env: Env, family: str, ops: tuple[str, ...]) -> list[Case]:
    if not env.is_cuda:
        sizes, total = [64, 1024], 1 << 12
    elif env.quick:
        sizes, total = [1024, 4096, 16384, 65536, 262144], 1 << 26
    else:
        sizes, total = [1 << k for k in range(9, 19)], 1 << 26
    out = []
    for op in ops:
        for mode in ("fwd", "fwd+bwd"):
            for n in sizes:
                skip = {}
                if env.quick and env.is_cuda and n != 4096:
                    skip["torch-compile"] = "quick run: torch.compile timed at N=4096 only (compile time)"
                out.append(_case(family, op, mode, "bf16", max(1, total // n), n, skip))
    return out


def norm_cases(env: Env) -> list[Case]:
    return _grid(env, "norm", NORM_OPS)


def softmax_cases(env: Env) -> list[Case]:
    return _grid(env, "softmax", SOFTMAX_OPS)


# ----------------------------------------------------------------------------- inputs and the timed call


def _inputs(case: Case, env: Env) -> tuple[Rotation, tuple[torch.Tensor, ...]]:
    """Rotating sets of (x, residual, dy, dres, mask) (absent ones None) and the shared (w, b)."""
    m, n = case.shape["M"], case.shape["N"]
    dtype, dev = DTYPES[case.dtype], env.device
    grad = case.mode != "fwd"
    op = case.op
    shape = (m, n)
    torch.manual_seed(0)       # every provider of a case gets the same inputs: the agreement check needs it
    if op == "softmax_masked":
        g, _, _ = _mask_shape(m, n)
        shape = (g, m // g, n)
    w = (1 + 0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_(grad)
    b = (0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_(grad)

    def one() -> tuple:
        x = torch.randn(shape, device=dev, dtype=dtype).requires_grad_(grad)
        res = torch.randn(shape, device=dev, dtype=dtype) if op == "add_layer_norm" else None
        if res is not None:
            res.requires_grad_(grad)
        dy = torch.randn(shape, device=dev, dtype=dtype) if grad else None
        dres = torch.randn(shape, device=dev, dtype=dtype) if grad and op == "add_layer_norm" else None
        mask = None
        if op == "softmax_masked":
            g = torch.Generator().manual_seed(0)
            # ~10% of the keys masked, never a whole row (fully masked rows differ from torch by design).
            mask = (torch.rand(_mask_shape(m, n), generator=g) > 0.1).to(dev)
            mask[..., 0] = True
        return x, res, dy, dres, mask

    first = one()
    n_sets = rotation_count(nbytes(*first), env)
    return Rotation([first] + [one() for _ in range(n_sets - 1)]), (w, b)


Fwd = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None],
               tuple[torch.Tensor, ...]]


def _prepared(case: Case, env: Env, fwd: Fwd, *, context: Callable | None = None,
              impl: str | None = None) -> Prepared:
    """``fwd(x, residual, w, b, mask)`` returns a tuple of outputs; the first is the one compared."""
    rot, (w, b) = _inputs(case, env)
    if case.mode == "fwd":
        def fn() -> object:
            x, res, _, _, mask = rot.next()
            with torch.no_grad():
                return fwd(x, res, w, b, mask)
    else:
        def fn() -> object:
            x, res, dy, dres, mask = rot.next()
            outs = fwd(x, res, w, b, mask)
            grads = (dy,) if dres is None else (dy, dres)
            torch.autograd.backward(outs[:len(grads)], grads)
            return None

    def output() -> torch.Tensor:
        x, res, _, _, mask = rot.first
        return fwd(x, res, w, b, mask)[0]

    leaves = [t for s in rot.sets for t in s[:2] if t is not None and t.requires_grad]
    leaves += [t for t in (w, b) if t.requires_grad]
    kw = {} if context is None else {"context": context}
    return Prepared(fn, output, leaves, impl=impl, **kw)


# ----------------------------------------------------------------------------- providers


def _ours_fwd(op: str) -> Fwd:
    def fwd(x, res, w, b, mask):
        n = x.shape[-1]
        if op == "layer_norm":
            return (fused_kernels.layer_norm(x, (n,), w, b, EPS),)
        if op == "rms_norm":
            return (fused_kernels.rms_norm(x, (n,), w, EPS),)
        if op == "add_layer_norm":
            return fused_kernels.add_layer_norm(x, res, w, b, EPS)
        return (fused_kernels.softmax(x, -1, mask=mask),)
    return fwd


def eager_fwd(op: str) -> Fwd:
    """The same computation in plain torch ops: the eager baseline, and what torch.compile compiles."""
    def fwd(x, res, w, b, mask):
        n = x.shape[-1]
        if op == "layer_norm":
            return (F.layer_norm(x, (n,), w, b, EPS),)
        if op == "rms_norm":
            return (F.rms_norm(x, (n,), w, EPS),)
        if op == "add_layer_norm":
            r = x + res
            return F.layer_norm(r, (n,), w, b, EPS), r
        if mask is not None:
            return (torch.softmax(x.masked_fill(~mask, float("-inf")), -1),)
        return (torch.softmax(x, -1),)
    return fwd


def _ours(case: Case, env: Env) -> Prepared:
    return _prepared(case, env, _ours_fwd(case.op), context=ours_context(env),
                     impl="triton" if env.is_cuda else "fast_torch")


def _eager(case: Case, env: Env) -> Prepared:
    return _prepared(case, env, eager_fwd(case.op), impl="eager")


def _compiled(case: Case, env: Env) -> Prepared:
    from torch import _dynamo

    # A fresh compile per case: dynamo's recompile limit would otherwise fall back to eager silently
    # after a few shapes, and the record would name a provider that did not run.
    _dynamo.reset()
    return _prepared(case, env, torch.compile(eager_fwd(case.op), dynamic=False), impl="inductor")


def _liger(case: Case, env: Env) -> Prepared:
    if case.op == "layer_norm":
        from liger_kernel.transformers.functional import liger_layer_norm

        def fwd(x, res, w, b, mask):
            return (liger_layer_norm(x, w, b, EPS),)
    elif case.op == "rms_norm":
        from liger_kernel.transformers.functional import liger_rms_norm

        def fwd(x, res, w, b, mask):
            return (liger_rms_norm(x, w, EPS),)
    elif case.op == "softmax":
        try:
            from liger_kernel.ops.softmax import LigerSoftmaxFunction
        except ImportError as exc:
            raise Unsupported(f"this liger-kernel has no softmax ({exc})") from None

        def fwd(x, res, w, b, mask):
            return (LigerSoftmaxFunction.apply(x),)
    else:
        raise Unsupported(f"Liger has no {case.op.replace('_', ' ')} kernel")
    return _prepared(case, env, fwd, impl="liger")


def _apex(case: Case, env: Env) -> Prepared:
    if case.op == "layer_norm":
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        def fwd(x, res, w, b, mask):
            return (fused_layer_norm_affine(x, w, b, (x.shape[-1],), EPS),)
    elif case.op == "rms_norm":
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        def fwd(x, res, w, b, mask):
            return (fused_rms_norm_affine(x, w, (x.shape[-1],), EPS),)
    else:
        raise Unsupported(f"Apex has no general {case.op.replace('_', ' ')} kernel (its fused softmax is "
                          "specialized to attention scores)")
    return _prepared(case, env, fwd, impl="apex")


_COMPILE_CPU = "torch.compile skipped on the CPU run (compile time; the CPU run only tests the harness)"

for _family in ("norm", "softmax"):
    REGISTRY.register(_family, "ours", _ours)
    REGISTRY.register(_family, "torch", _eager)
    REGISTRY.register(_family, "torch-compile", _compiled, cuda_only(_COMPILE_CPU))
    REGISTRY.register(_family, "liger", _liger, all_of(cuda_only(), module_available("liger_kernel", "liger-kernel")))
    REGISTRY.register(_family, "apex", _apex,
                      all_of(cuda_only(), module_available("apex.normalization", "apex (with its CUDA extensions)")))

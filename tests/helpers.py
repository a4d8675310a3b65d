"""Correctness helpers shared by the kernel tests (norms, softmax, attention, ...).

How a kernel result is judged (``../shared/ENGINEERING.md`` section 4, "the 2x rule"):

* compute a high-precision reference in float64 (``ref``),
* the kernel's result in dtype ``d`` (``out``),
* plain PyTorch's result for the same computation in dtype ``d`` (``torch_out``),

then ``max|out - ref| <= factor * max|torch_out - ref| + floor``, with ``factor`` 2 for outputs and 3
for gradients, and ``floor`` a couple of ulps of ``d`` at the output's scale (``max|ref|``). That
rule is used for float16 and bfloat16. In float32/float64 under the interpreter PyTorch's error is
often exactly 0, so there the check is elementwise ``|out - ref| <= atol * scale + rtol * |ref|``
(plus ``factor`` times PyTorch's error when it is given), with tolerances per dtype (``TOLERANCES``);
there the scale is at least ``MIN_SCALE``.

Every comparison is NaN-aware: NaN positions of ``out`` and ``ref`` must be the same, and so must the
positions and signs of infinities; errors are measured on the remaining (finite) entries. A NaN in
the reference therefore cannot silently pass a comparison.

Catching out-of-bounds memory access (the interpreter does not check bounds):

* ``nan_padded`` / ``as_layout``: inputs laid out inside a larger NaN-filled buffer, so an unmasked
  read of a neighbouring element puts a NaN into the result, which the NaN-aware comparison catches.
* ``bounds_checked``: wraps Triton kernels so every launch runs on copies of its tensor arguments
  placed inside guard bytes (NaN in every float dtype); after the launch the guards and
  the gaps of strided tensors must be untouched (no out-of-bounds write), and reads of the guards
  show up as NaN in the results (out-of-bounds read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from fused_kernels._core.launch import Launch, intercept

# (atol relative to the reference's scale, rtol) for the elementwise check in high precision.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
}
# The 2x rule applies to these dtypes (PyTorch's own rounding error is the yardstick).
LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOOR_ULPS = 2
# In float32/float64 ``atol`` is relative to max(max|ref|, MIN_SCALE): a result that is exactly 0 in
# theory (e.g. the gradient of a LayerNorm over one element) comes out of the float64 reference as
# rounding noise around 1e-15, which must not set the scale it is judged at.
MIN_SCALE = 1e-3
OUTPUT_FACTOR, GRAD_FACTOR = 2.0, 3.0


def _finite_view(out: torch.Tensor, ref: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check NaN/inf positions agree; return ``out`` and ``ref`` (float64, CPU) at the finite entries."""
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    got = out.detach().to("cpu", torch.float64)
    want = ref.detach().to("cpu", torch.float64)
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    if not torch.equal(nan_got, nan_want):
        bad = (nan_got != nan_want).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN positions differ from the reference ({int(nan_got.sum())} NaN vs "
                             f"{int(nan_want.sum())}; first differences at {bad})")
    inf_got, inf_want = torch.isinf(got), torch.isinf(want)
    if not torch.equal(inf_got, inf_want) or not torch.equal(got[inf_got], want[inf_want]):
        raise AssertionError(f"{name}: infinities differ from the reference")
    finite = torch.isfinite(want)
    if bool(finite.all()):
        return got.reshape(-1), want.reshape(-1)
    return got[finite], want[finite]


def max_error(out: torch.Tensor, ref: torch.Tensor, name: str = "output") -> float:
    """Largest absolute difference at the finite entries, after checking NaN/inf positions agree."""
    got, want = _finite_view(out, ref, name)
    return (got - want).abs().max().item() if got.numel() else 0.0


def _torch_error(torch_out: torch.Tensor, ref: torch.Tensor) -> float:
    """PyTorch's own error; its NaNs (where the reference is finite) are not counted against it."""
    got = torch_out.detach().to("cpu", torch.float64)
    want = ref.detach().to("cpu", torch.float64)
    diff = (got - want).abs()
    both = torch.isfinite(diff)
    if bool(both.all()):
        return diff.max().item() if diff.numel() else 0.0
    return diff[both].max().item() if both.any() else 0.0


def assert_close(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor | None = None, *,
                 grad: bool = False, name: str = "output", factor: float | None = None,
                 atol: float | None = None, rtol: float | None = None, ulps: float = FLOOR_ULPS) -> None:
    """Judge a kernel result ``out`` (dtype d) against the float64 reference ``ref`` (module docstring).

    ``torch_out``: plain PyTorch's result in dtype d, required for float16/bfloat16 (the 2x rule),
    optional in float32/float64. ``grad=True`` selects the gradient factor (3x instead of 2x).
    ``atol`` (relative to ``max|ref|``) and ``rtol`` override ``TOLERANCES`` in float32/float64.
    """
    dtype = out.dtype
    if factor is None:
        factor = GRAD_FACTOR if grad else OUTPUT_FACTOR
    got, want = _finite_view(out, ref, name)
    if got.numel() == 0:
        return
    scale = want.abs().max().item()
    diff = (got - want).abs()
    torch_err = _torch_error(torch_out, ref) if torch_out is not None else 0.0
    if dtype in LOW_PRECISION:
        if torch_out is None:
            raise ValueError(f"{name}: the 2x rule for {dtype} needs PyTorch's own {dtype} result")
        floor = ulps * torch.finfo(dtype).eps * scale
        err, bound = diff.max().item(), factor * torch_err + floor
        if err > bound:
            worst = diff.argmax().item()
            raise AssertionError(
                f"{name} ({dtype}): max error {err:.3e} > {factor:g} x PyTorch's {torch_err:.3e} + floor "
                f"{floor:.3e} (scale {scale:.3e}; worst at finite entry {worst}: got {got[worst].item():.6g}, "
                f"want {want[worst].item():.6g})")
        return
    default_atol, default_rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    scale = max(scale, MIN_SCALE)
    allowed = atol * scale + rtol * want.abs() + factor * torch_err
    if bool((diff > allowed).any()):
        worst = (diff - allowed).argmax().item()
        raise AssertionError(
            f"{name} ({dtype}): |out - ref| exceeds atol {atol:g} x scale {scale:.3e} + rtol {rtol:g} x |ref|"
            f"{f' + {factor:g} x PyTorch error {torch_err:.3e}' if torch_out is not None else ''}: "
            f"max error {diff.max().item():.3e}; worst at finite entry {worst}: got {got[worst].item():.8g}, "
            f"want {want[worst].item():.8g}")


def assert_all_close(outs: Sequence[torch.Tensor | None], refs: Sequence[torch.Tensor | None],
                     torch_outs: Sequence[torch.Tensor | None] | None = None, *, names: Sequence[str],
                     grad: bool = False, **kwargs) -> None:
    """``assert_close`` over matching lists (e.g. every gradient); a None must be None on both sides."""
    torch_outs = [None] * len(outs) if torch_outs is None else torch_outs
    assert len(outs) == len(refs) == len(torch_outs) == len(names)
    for out, ref, tout, name in zip(outs, refs, torch_outs, names):
        if ref is None or out is None:
            assert out is None and ref is None, f"{name}: got {out is not None}, reference {ref is not None}"
            continue
        assert_close(out, ref, tout, grad=grad, name=name, **kwargs)


# ----------------------------------------------------------------------------- inputs and layouts


def nan_padded(t: torch.Tensor, pad: int = 2, step: int = 1) -> torch.Tensor:
    """``t``'s values as a view into a larger NaN-filled buffer: ``pad`` NaNs before and after every
    dim, and ``step - 1`` NaNs between neighbours along the last dim (last-dim stride ``step``).

    The result is a leaf that does not require grad (call ``.requires_grad_()``); its gradient has
    ``t``'s shape. A kernel that reads past a row, a block or the tensor gets NaN in its result."""
    t = t.detach()
    if t.dim() == 0:
        return t.clone()
    steps = [1] * (t.dim() - 1) + [step]
    big = torch.full([s * k + 2 * pad for s, k in zip(t.shape, steps)], float("nan"), dtype=t.dtype,
                     device=t.device)
    view = big[tuple(slice(pad, pad + s * k, k) for s, k in zip(t.shape, steps))]
    view.copy_(t)
    return view


LAYOUTS = ("contiguous", "transposed", "permuted", "padded", "strided")


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values (a leaf not requiring grad) laid out in memory as ``layout``:

    - "contiguous": a fresh contiguous copy;
    - "transposed": the last two dims swapped in memory (last-dim stride != 1);
    - "permuted": every dim reversed in memory;
    - "padded": inside a NaN buffer, rows separated by NaN (``nan_padded``);
    - "strided": padded, and a NaN between every two elements of a row (last-dim stride 2).
    """
    t = t.detach()
    if layout == "contiguous":
        return t.clone()
    if layout == "transposed":
        if t.dim() < 2:
            return nan_padded(t, pad=1, step=2)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "permuted":
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)
    if layout == "padded":
        return nan_padded(t, pad=2)
    if layout == "strided":
        return nan_padded(t, pad=1, step=2)
    raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None, layout: str = "contiguous") -> torch.Tensor:
    """A leaf requiring grad with ``t``'s values (cast to ``dtype``), laid out as ``layout``."""
    return as_layout(t.detach().to(dtype or t.dtype), layout).requires_grad_()


def grads(outputs: Sequence[torch.Tensor] | torch.Tensor, inputs: Sequence[torch.Tensor | None],
          cotangents: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor | None]:
    """Gradients of ``outputs`` (with ``cotangents``) for each input (None where an input is None)."""
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    cotangents = [cotangents] if isinstance(cotangents, torch.Tensor) else list(cotangents)
    present = [t for t in inputs if t is not None]
    found = iter(torch.autograd.grad(outputs, present, cotangents, allow_unused=True))
    return [None if t is None else next(found) for t in inputs]


# ----------------------------------------------------------------------------- out-of-bounds writes

GUARD_BYTES = 256


def _guard_pattern(n: int, index: int, device) -> torch.Tensor:
    """``n`` guard bytes ``[p, 0xFF, p, 0xFF, ...]`` with ``p`` in 0xF0..0xFF chosen by ``index``: NaN
    in float16, bfloat16, float32 and float64 alike, with a payload that differs between the tensors of
    one launch (so a value read from one tensor's guard and written to another's is still caught)."""
    pattern = torch.tensor([0xF0 + index % 16, 0xFF], dtype=torch.uint8)
    return pattern.repeat((n + 1) // 2)[:n].to(device)


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte offsets, within its storage, of the bytes ``t``'s elements occupy."""
    first = t.storage_offset() * t.element_size()
    last = first + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) * t.element_size()
    return first, last + t.element_size()


def _mark_bytes(inside: torch.Tensor, t: torch.Tensor, start: int) -> None:
    """Set ``inside`` (bytes of ``t``'s storage from offset ``start``) True where ``t`` has an element."""
    size = [1 if stride == 0 else n for n, stride in zip(t.shape, t.stride())]  # stride 0: no overlap
    itemsize = t.element_size()
    inside.as_strided((*size, itemsize), (*(stride * itemsize for stride in t.stride()), 1),
                      t.storage_offset() * itemsize - start).fill_(True)


def _guarded_run(call: Launch, run) -> None:
    """Run ``call`` on copies of its tensor arguments placed between guard bytes (``bounds_checked``)."""
    tensors = [a for a in (*call.args, *call.kwargs.values()) if isinstance(a, torch.Tensor) and a.numel() > 0]
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    replaced: dict[int, torch.Tensor] = {}
    checks = []
    for index, group in enumerate(by_storage.values()):
        storage = group[0].untyped_storage()
        spans = [_byte_span(t) for t in group]
        lo = min(first for first, _ in spans) // 16 * 16
        hi = max(end for _, end in spans)
        span = hi - lo
        buf = _guard_pattern(GUARD_BYTES + span + GUARD_BYTES, index, storage.device)
        original = _byte_view(storage)
        buf[GUARD_BYTES:GUARD_BYTES + span] = original[lo:hi]
        before = buf.clone()
        for t in group:
            offset = t.storage_offset() * t.element_size() - lo + GUARD_BYTES
            assert offset % t.element_size() == 0
            copy = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                buf.untyped_storage(), offset // t.element_size(), t.shape, t.stride())
            replaced[id(t)] = copy
        inside = torch.zeros(buf.numel(), dtype=torch.bool, device=buf.device)
        for t in group:
            _mark_bytes(inside, t, lo - GUARD_BYTES)
        checks.append((buf, before, inside, original, lo, hi))
    swap = lambda a: replaced.get(id(a), a) if isinstance(a, torch.Tensor) else a
    run(Launch(call.kernel, call.grid, tuple(swap(a) for a in call.args),
               {k: swap(v) for k, v in call.kwargs.items()}))
    for buf, before, inside, original, lo, hi in checks:
        changed = (buf != before) & ~inside
        if bool(changed.any()):
            where = (changed.nonzero().reshape(-1)[:8] - GUARD_BYTES).tolist()
            raise AssertionError(f"{call.name}: wrote outside its tensors (byte offsets relative to "
                                 f"the start of the tensors' span {hi - lo}: {where})")
        original[lo:hi] = buf[GUARD_BYTES:GUARD_BYTES + hi - lo]


@contextlib.contextmanager
def bounds_checked(*kernel_names: str) -> Iterator[dict[str, int]]:
    """Within the block, every launch of the named kernels (through ``fused_kernels._core.launch.launch``, the
    one place every kernel starts) runs on copies of its tensor arguments placed between guard bytes (NaN in
    every float dtype); tensors sharing storage share one copy, so aliasing is kept. After each launch it raises
    AssertionError if the kernel changed a guard byte or a byte in the gaps of a strided tensor (an
    out-of-bounds write), then copies the results back. An out-of-bounds read shows up as NaN in the results.

    Yields a dict counting the launches per kernel name, so a test can assert the kernel really ran.

    >>> with bounds_checked("_softmax_fwd_kernel") as launches:
    ...     y = fused_kernels.softmax(x)
    >>> assert launches["_softmax_fwd_kernel"] == 1
    """
    launches: dict[str, int] = {}

    def hook(call: Launch, run) -> None:
        if call.name not in kernel_names:
            run(call)
            return
        launches[call.name] = launches.get(call.name, 0) + 1
        _guarded_run(call, run)

    with intercept(hook):
        yield launches


def assert_fresh_contiguous(out: torch.Tensor, *inputs: torch.Tensor, name: str = "output") -> None:
    """``out`` is a freshly allocated contiguous tensor: never a view of an input, never restrided like one."""
    assert out.is_contiguous(), f"{name}: strides {out.stride()} for shape {tuple(out.shape)} are not contiguous"
    for t in inputs:
        if t is not None and t.numel() and out.numel():
            assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), \
                f"{name} shares memory with an input"

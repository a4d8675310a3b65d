"""bf16 executed as a GPU executes it, in Triton's interpreter (tests only; the shipped kernels are unchanged).

The stock interpreter stores bf16 as raw 16-bit integers: ``tl.dot`` on bf16 operands multiplies the integers,
and fp32 -> bf16 casts truncate where a GPU rounds to nearest even (``cvt.rn.bf16.f32``). The launchers
therefore upcast bf16 to fp32 under the interpreter (``UPCAST=True``), so the bf16 arithmetic of the kernels
never runs in a CPU test. ``bf16_exact()`` patches the two interpreter functions involved:

- ``create_dot``: bf16 operands are widened to fp32 (exact: a bf16 value is the top half of an fp32 one) and
  multiplied with fp32 accumulation, as the tensor cores do;
- ``cast_impl``: fp32 -> bf16 rounds to nearest even (NaN stays NaN, values past the largest bf16 round to
  inf), as ``cvt.rn.bf16.f32``;

and turns ``UPCAST`` off in every launch (a launch hook; ``PRECISION`` as the launcher gives a GPU), so the
kernels run their GPU configuration: bf16 loads, bf16 dot operands, p rounded to bf16 before ``p @ v``. The
other bf16 operations of the kernels (loads, stores, ``where`` with 0, conversions to fp32) are bit moves the
interpreter already does right.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from fused_kernels._core import backend as _backend
from fused_kernels._core.launch import intercept


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 values stored as uint16 bit patterns -> the same values as float32 (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded).astype(np.uint16)


@contextlib.contextmanager
def bf16_exact() -> Iterator[None]:
    """Inside the block the interpreter executes bf16 as a GPU does and the launchers' ``UPCAST`` is off; without
    the interpreter (a GPU) nothing changes."""
    if not _backend.INTERPRET:
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    from fused_kernels._core.launch import dot_precision

    stock_dot, stock_cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            a = TensorHandle(bf16_bits_to_f32(a.data), tl.float32) if a.dtype.scalar == tl.bfloat16 else a
            b = TensorHandle(bf16_bits_to_f32(b.data), tl.float32) if b.dtype.scalar == tl.bfloat16 else b
        return stock_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(f32_to_bf16_bits(src.data), tl.bfloat16)
        return stock_cast(self, src, dst_type)

    def no_upcast(call, run):
        if call.kwargs.get("UPCAST"):
            call = dataclasses.replace(call, kwargs={**call.kwargs, "UPCAST": False,
                                                     "PRECISION": dot_precision(torch.bfloat16, False)})
        run(call)

    InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = create_dot, cast_impl
    try:
        with intercept(no_upcast):
            yield
    finally:
        InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = stock_dot, stock_cast

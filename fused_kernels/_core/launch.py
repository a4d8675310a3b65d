"""Small launch-time helpers shared by the kernel families."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def acc_dtype(x: torch.dtype) -> tl.dtype:
    """Accumulate in float64 for float64 inputs, in float32 otherwise."""
    return tl.float64 if x == torch.float64 else tl.float32


def torch_acc_dtype(x: torch.dtype) -> torch.dtype:
    return torch.float64 if x == torch.float64 else torch.float32


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_persistent_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Programs for a kernel whose programs each loop over a strip of rows: a few per SM on a GPU,
    a handful under the interpreter (which runs them one after another anyway)."""
    if device.type == "cuda":
        programs = per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        programs = 4
    return max(1, min(work_items, programs))


def row_warps(block: int) -> int:
    """Warps for a program that owns one row block: about 8 elements per thread, 1 to 16 warps."""
    return min(16, max(1, block // 256))


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))

"""Launch-time helpers shared by the kernel families, and the one place every kernel is launched (``launch``)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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


# ----------------------------------------------------------------------------- the launch choke point


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **kwargs)``."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


# Hooks around every launch, outermost first: ``hook(launch, run)`` sees the launch and decides whether and how
# it runs by calling ``run(launch)`` (possibly with other arguments) or not at all.
Hook = Callable[[Launch, Callable[[Launch], None]], None]
_hooks: list[Hook] = []


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``: every Triton kernel of the package starts here, so that one
    place sees every launch (``intercept``: ``python -m fused_kernels.aot`` records launches on meta tensors
    without running them; the tests check bounds and count launches)."""
    _through(Launch(kernel, tuple(grid), args, kwargs), 0)


def _through(call: Launch, depth: int) -> None:
    if depth == len(_hooks):
        call.kernel[call.grid](*call.args, **call.kwargs)
    else:
        _hooks[depth](call, lambda c: _through(c, depth + 1))


@contextlib.contextmanager
def intercept(hook: Hook) -> Iterator[None]:
    """Route every launch inside the block through ``hook(launch, run)`` (see ``Hook``)."""
    _hooks.append(hook)
    try:
        yield
    finally:
        _hooks.remove(hook)


# ----------------------------------------------------------------------------- the target architecture

_forced_arch: list[int | None] = []


def device_arch(device: torch.device) -> int | None:
    """The compute capability the launchers pick configurations for, as an int (80, 90, ...), or None for a
    CPU tensor (the interpreter: small tiles). ``force_arch`` overrides it."""
    if _forced_arch:
        return _forced_arch[-1]
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@contextlib.contextmanager
def force_arch(arch: int | None) -> Iterator[None]:
    """Pick every launch configuration inside the block as on compute capability ``arch`` (e.g. 90: the Hopper
    tiles and TMA descriptors), whatever the device: how the tests run a GPU's configuration in the interpreter."""
    _forced_arch.append(arch)
    try:
        yield
    finally:
        _forced_arch.pop()

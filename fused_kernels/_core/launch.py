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

# Programs a launch may have per grid axis on every NVIDIA GPU: 2^31 - 1 on axis 0, 65,535 on axes 1 and 2 (the
# driver rejects more with "invalid argument"; the interpreter has no limit). ``launch`` splits a grid whose axis
# 1 or 2 is longer into launches of at most that many programs there (``split_grid``); each part gets
# ``GRID_SPLIT=True`` and the index of its first program on the axis in ``PID_BASE[axis]``, which the kernel adds
# to ``tl.program_id(axis)`` (``split_program_id``). A launch that fits passes neither: the kernel then compiles
# exactly as without them (GRID_SPLIT is a constexpr, False by default).
MAX_GRID = (2**31 - 1, 65535, 65535)
PID_BASE = {1: "PID1_BASE", 2: "PID2_BASE"}
_max_grid: list[tuple[int, int, int]] = [MAX_GRID]


@triton.jit
def split_program_id(axis: tl.constexpr, base, GRID_SPLIT: tl.constexpr):
    """``tl.program_id(axis)`` in the whole grid of a launch that ``split_grid`` may have split: ``base`` is the
    kernel's ``PID1_BASE`` / ``PID2_BASE`` argument, ``GRID_SPLIT`` its constexpr of the same name."""
    pid = tl.program_id(axis)
    if GRID_SPLIT:
        pid += base
        tl.assume(pid >= 0)
    return pid


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``: every Triton kernel of the package starts here, so that one
    place sees every launch (``intercept``: ``python -m fused_kernels.aot`` records launches on meta tensors
    without running them; the tests check bounds and count launches) and keeps every launch within the GPU's
    grid limits (``MAX_GRID``; the hooks see the split launches)."""
    for sub_grid, bases in split_grid(kernel, tuple(grid)):
        _through(Launch(kernel, sub_grid, args, {**kwargs, **bases}), 0)


def split_grid(kernel: Any, grid: tuple[int, ...]) -> list[tuple[tuple[int, ...], dict[str, int]]]:
    """``[(grid, {"GRID_SPLIT": True, "PID1_BASE": first program, ...}), ...]``: the launches that run ``grid``
    within the limits (``MAX_GRID``, or ``max_grid``'s), in order, each program once; ``[(grid, {})]`` when it
    fits. A kernel without the base argument of an axis it overflows, or an axis 0 over its limit, is an error
    naming the kernel."""
    limits = _max_grid[-1]
    name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
    if grid and grid[0] > limits[0]:
        raise RuntimeError(f"launch: {name} needs grid {grid}, but axis 0 of a launch takes at most "
                           f"{limits[0]} programs")
    over = [axis for axis in (1, 2) if axis < len(grid) and grid[axis] > limits[axis]]
    if not over:
        return [(grid, {})]
    arg_names = getattr(kernel, "arg_names", ())
    for axis in over:
        if PID_BASE[axis] not in arg_names or "GRID_SPLIT" not in arg_names:
            raise RuntimeError(f"launch: {name} needs grid {grid}, over the {limits[axis]} programs axis {axis} of a "
                               f"launch takes, and has no {PID_BASE[axis]} argument to be launched in parts")
    parts: list[tuple[tuple[int, ...], dict[str, int]]] = [(grid, {"GRID_SPLIT": True})]
    for axis in over:
        step = limits[axis]
        parts = [(g[:axis] + (min(step, grid[axis] - base),) + g[axis + 1:], {**bases, PID_BASE[axis]: base})
                 for g, bases in parts for base in range(0, grid[axis], step)]
    return parts


@contextlib.contextmanager
def max_grid(axis1: int, axis2: int | None = None) -> Iterator[None]:
    """Split launches inside the block as if axes 1 and 2 took at most ``axis1`` / ``axis2`` (default: the same)
    programs: how the tests make real splits happen at interpreter-sized shapes."""
    _max_grid.append((MAX_GRID[0], axis1, axis1 if axis2 is None else axis2))
    try:
        yield
    finally:
        _max_grid.pop()


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

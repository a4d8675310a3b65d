"""Launch-time helpers shared by the kernel families, and the one place every kernel is launched (``launch``)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from . import backend as _backend


def acc_dtype(x: torch.dtype) -> tl.dtype:
    """Accumulate in float64 for float64 inputs, in float32 otherwise."""
    return tl.float64 if x == torch.float64 else tl.float32


def torch_acc_dtype(x: torch.dtype) -> torch.dtype:
    return torch.float64 if x == torch.float64 else torch.float32


def dtype_family(dtype: torch.dtype) -> str:
    """The tile tables' dtype column (attention tiles, norm limits): "fp64", "fp32" or "16bit"."""
    return {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "16bit")


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


def scratch_launch(device: torch.device, kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``launch`` for a kernel that needs global scratch memory at run time (a TMA descriptor made in the kernel:
    128 bytes per program), taken from torch's allocator on ``device``. Triton reads its allocator from a context
    variable: it is set in a copy of the caller's context, so an allocator the user set stays as it was."""
    def allocate(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)    # torch's blocks are >= 512-byte aligned

    def run() -> None:
        triton.set_allocator(allocate)
        launch(kernel, grid, *args, **kwargs)

    contextvars.copy_context().run(run)


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


def grid_fits(grid: tuple[int, ...]) -> bool:
    """Whether ``grid`` runs as one launch (``split_grid`` would not split it): what a kernel without the
    program-id base arguments (the warp-specialized ones: triton's pass rejects the offset) needs."""
    return all(n <= limit for n, limit in zip(grid, _max_grid[-1]))


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

# An architecture value, as the launchers and the tile tables take it: the CUDA compute capability as an int
# (75, 80, 90, ...), the AMD gfx name as a string ("gfx942"), or None for a CPU tensor (the interpreter's small
# tiles). ``arch_family`` maps it to its column of the tile tables.
ArchValue = int | str | None


@dataclass(frozen=True)
class ArchFamily:
    """One column of the tile tables: a GPU architecture family and the limits its configurations are proven
    against by ``python -m fused_kernels.aot`` (docs/architectures.md).

    ``shared_memory``: bytes of shared memory (LDS on AMD) one block may use (the per-block opt-in maximum the
    runtime checks at launch); ``registers``: 32-bit registers one thread may hold (NVIDIA 255; CDNA 512 =
    256 VGPRs + 256 AGPRs; RDNA 256); ``mma``: the matrix instructions triton emits for ``tl.dot`` there
    ("fma" where it emits none: triton has no tensor-core path below sm_80); ``mma_dtypes``: the input dtypes
    it emits them for; ``tma``: the GPU has the TMA copy engine and triton lowers tensor descriptors to it (whether a
    column's kernels use it is the tile table's choice)."""

    name: str                       # the column's key in the tile tables
    vendor: str                     # "cuda" or "hip"
    targets: tuple[int | str, ...]  # the architectures it covers (``device_arch`` values)
    gpus: str
    warp_size: int
    shared_memory: int
    registers: int
    mma: str
    mma_dtypes: tuple[str, ...]
    tma: bool = False


_KB = 1024
ARCH_FAMILIES: tuple[ArchFamily, ...] = (
    ArchFamily("sm_70", "cuda", (70,), "V100, Titan V", 32, 96 * _KB, 255, "fma", ()),
    ArchFamily("sm_75", "cuda", (75,), "T4, RTX 20xx, Quadro RTX", 32, 64 * _KB, 255, "fma", ()),
    ArchFamily("sm_80", "cuda", (80,), "A100, A30", 32, 163 * _KB, 255, "mma.sync",
               ("fp16", "bf16", "tf32", "fp64")),
    ArchFamily("sm_86", "cuda", (86, 89), "RTX 30xx / 40xx, A10, A40, L4, L40", 32, 99 * _KB, 255, "mma.sync",
               ("fp16", "bf16", "tf32")),
    ArchFamily("sm_90", "cuda", (90,), "H100, H200, GH200", 32, 227 * _KB, 255, "wgmma",
               ("fp16", "bf16", "tf32", "fp64"), tma=True),
    ArchFamily("sm_100", "cuda", (100,), "B200, GB200", 32, 227 * _KB, 255, "tcgen05",
               ("fp16", "bf16", "tf32", "fp64"), tma=True),
    ArchFamily("sm_120", "cuda", (120,), "RTX 50xx, RTX PRO 6000 Blackwell", 32, 99 * _KB, 255, "mma.sync",
               ("fp16", "bf16", "tf32"), tma=True),
    ArchFamily("gfx90a", "hip", ("gfx90a",), "MI210, MI250, MI250X", 64, 64 * _KB, 512, "mfma",
               ("fp16", "bf16", "fp32", "fp64")),
    ArchFamily("gfx942", "hip", ("gfx942",), "MI300X, MI300A, MI325X", 64, 64 * _KB, 512, "mfma",
               ("fp16", "bf16", "xf32", "fp64")),
    ArchFamily("gfx1100", "hip", ("gfx1100",), "RX 7900 XTX / XT, Radeon PRO W7900", 32, 64 * _KB, 256, "wmma",
               ("fp16", "bf16")),
)
# Any other GPU: the sm_75 column's tiles (sized for the FMA path of a dot, the most register-hungry one, and
# for 64 KB of shared memory, the least of any listed GPU), no TMA, no assumption on its matrix instructions.
GENERIC = ArchFamily("generic", "any", (), "any other GPU", 32, 64 * _KB, 255, "unknown", ())
_BY_TARGET = {target: family for family in ARCH_FAMILIES for target in family.targets}
_forced_arch: list[ArchValue] = []


def arch_family(arch: ArchValue) -> ArchFamily | None:
    """The tile-table column of an architecture value (``device_arch``): its family, ``GENERIC`` for one not
    listed in ``ARCH_FAMILIES``, None for None (the interpreter's tiles)."""
    if arch is None:
        return None
    return _BY_TARGET.get(arch, GENERIC)


def device_arch(device: torch.device) -> ArchValue:
    """The architecture the launchers pick configurations for: the compute capability as an int (80, 90,
    ...) on CUDA, the gfx name ("gfx942", without its feature suffixes) on ROCm, or None for a CPU tensor (the
    interpreter: small tiles). ``force_arch`` overrides it."""
    if _forced_arch:
        return _forced_arch[-1]
    if device.type != "cuda":
        return None
    if getattr(torch.version, "hip", None):
        name = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "") or ""
        return name.split(":")[0] or "gfx"
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def upcast_16bit(dtype: torch.dtype, arch: ArchValue) -> bool:
    """Whether the kernels convert their loaded 16-bit tiles to fp32 and run every dot in fp32 (``UPCAST``): bf16
    under the interpreter (which computes bf16 as raw integers), and 16-bit inputs where the architecture family
    has no tensor-core instruction triton uses for them (sm_70 and sm_75, and an unknown GPU: there triton's FMA
    loop on 16-bit operands spills at tiles where the fp32 one does not: docs/architectures.md)."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    if name is None:
        return False
    family = arch_family(arch)
    return (family is not None and name not in family.mma_dtypes) or (_backend.INTERPRET and name == "bf16")


def dot_precision(dtype: torch.dtype, upcast: bool) -> str | None:
    """``tl.dot``'s input precision for the kernels' ``PRECISION``: true fp32 for fp32 (TF32 where torch allows it
    for matmuls, on CUDA: ROCm's triton takes "tf32" on gfx942 only), fp64 and upcast 16-bit; None (the backend's
    default: "tf32" on NVIDIA, "ieee" on AMD, where gfx90a / gfx1100 reject "tf32") for 16-bit inputs, where it
    is irrelevant."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not torch.version.hip else "ieee"
    if dtype == torch.float64 or upcast:
        return "ieee"
    return None


@contextlib.contextmanager
def force_arch(arch: ArchValue) -> Iterator[None]:
    """Pick every launch configuration inside the block as on architecture ``arch`` (a compute capability
    such as 90: the Hopper tiles and TMA descriptors; a gfx name such as "gfx942"), whatever the device: how the
    tests run a GPU's configuration in the interpreter."""
    if arch is not None and not isinstance(arch, (int, str)) or isinstance(arch, bool):
        raise TypeError(f"force_arch: arch must be a compute capability (int), a gfx name (str) or None, "
                        f"got {arch!r}")
    _forced_arch.append(arch)
    try:
        yield
    finally:
        _forced_arch.pop()

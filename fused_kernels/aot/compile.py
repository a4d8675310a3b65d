"""Compile jobs: ``triton.compile`` for a GPU target in worker processes. NVIDIA: the ptxas log (registers,
spills) and the tensor-core instruction count of the PTX, optionally the SASS analysis (``sass``). AMD: registers
(VGPR / AGPR / SGPR), spilled registers, scratch and LDS from the code object's metadata, and the matrix
instruction count (MFMA / WMMA) of the assembly."""


from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import io
import multiprocessing
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import sass
from .specialize import runtime_specialization, specialize
from .specs import Spec


def ptxas_path(arch: int | str) -> str:
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


def gpu_name(arch: int | str) -> str:
    """The name of a compile target: "sm_80", "sm_90a" (the architecture-specific features triton uses from
    sm_90 on), "gfx942"."""
    if isinstance(arch, str):
        return arch
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def gpu_target(arch: int | str):
    """triton's ``GPUTarget`` of an architecture value: ("cuda", capability, 32) or ("hip", gfx name, wave
    size of its family)."""
    from triton.backends.compiler import GPUTarget

    from .._core.launch import arch_family
    if isinstance(arch, str):
        return GPUTarget("hip", arch, arch_family(arch).warp_size)
    return GPUTarget("cuda", arch, 32)


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, spill bytes and stack frame from ``ptxas -v`` output (the maximum over functions)."""
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", log)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = [int(v) for v in re.findall(r"(\d+) bytes stack frame", log)]
    if not regs:
        raise RuntimeError(f"no register count in the ptxas output:\n{log}")
    return dict(registers=max(regs), spill_stores=max((int(s) for s, _ in spills), default=0),
                spill_loads=max((int(l) for _, l in spills), default=0), stack_frame=max(stack, default=0))


# Matrix instructions by kind, as the PTX (NVIDIA) or the assembly (AMD) spells them.
MMA_PATTERNS = {
    "mma_sync": r"\bmma\.sync\.",               # sm_80 style warp MMA (also DMMA: fp64)
    "wgmma": r"\bwgmma\.mma_async\.",           # sm_90a warpgroup MMA
    "tcgen05": r"\btcgen05\.mma\b",            # sm_100a tensor-memory MMA
    "mfma": r"\bv_mfma_",                        # CDNA matrix cores
    "wmma": r"\bv_wmma_",                        # RDNA3 matrix cores
}


def count_tensor_core_instructions(asm: str) -> dict[str, int]:
    """Static counts of matrix (tensor-core) instructions per kind (``MMA_PATTERNS``) in PTX or AMD assembly."""
    return {kind: len(re.findall(pattern, asm)) for kind, pattern in MMA_PATTERNS.items()}


def parse_amdgcn(asm: str) -> dict[str, int]:
    """Registers, spills, scratch and LDS of the kernel in an AMD assembly listing, from its code-object
    metadata (``.vgpr_count``, ``.agpr_count``, ``.vgpr_spill_count``, ``.private_segment_fixed_size``, ...).
    ``registers`` is the VGPRs a lane holds (VGPRs + AGPRs where the family has AGPRs: one register file of 512
    on CDNA)."""
    def field(name: str) -> int:
        values = [int(v) for v in re.findall(rf"^\s*\.{name}:\s+(\d+)", asm, re.M)]
        return max(values, default=0)

    if not re.search(r"^\s*\.vgpr_count:", asm, re.M):
        raise RuntimeError("no .vgpr_count in the AMD assembly metadata")
    vgpr, agpr = field("vgpr_count"), field("agpr_count")
    return dict(registers=vgpr, vgprs=vgpr, agprs=agpr, sgprs=field("sgpr_count"),
                vgpr_spills=field("vgpr_spill_count"), sgpr_spills=field("sgpr_spill_count"),
                scratch=field("private_segment_fixed_size"))


def _ptxas_log(ptx: str, arch: int, options: dict[str, Any]) -> str:
    """The ``ptxas -v`` log of ``ptx`` as triton's own compile gets it: its backend's ``make_cubin`` runs ptxas
    with the flags triton passes (``-lineinfo``, and ``--regAllocOptLevel=2`` on triton 3.9), which a plain
    ``ptxas -v`` would not (without them the same sm_100a bf16 d=64 dK/dV took 80 registers and spilled 24+40 B;
    triton's cubin takes 90 and spills nothing). For a cache hit, which runs no ptxas."""
    from triton.compiler.compiler import make_backend
    backend = make_backend(gpu_target(arch))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):      # TRITON_DUMP_PTXAS_LOG (``_init_worker``): make_cubin prints it
        backend.make_cubin(ptx, {}, backend.parse_options(dict(options)), arch)
    return log.getvalue()


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


def _partition_warps(ttgir: str) -> int | None:
    """The warps of every partition of a warp-specialized kernel (the default one: the module's
    ``ttg.num-warps``; the workers: ``partitionN(...) num_warps(W)``) when they are all the same, else None
    (no partitions, or partitions of different sizes: a loop cannot be matched to its size)."""
    workers = [int(w) for w in re.findall(r"\bnum_warps\((\d+)\)", ttgir)]
    default = re.search(r'"ttg.num-warps" = (\d+)', ttgir)
    if not workers or default is None:
        return None
    sizes = {int(default.group(1)), *workers}
    return sizes.pop() if len(sizes) == 1 else None


def compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one (kernel, specialization, arch) and measure it; errors become part of the result."""
    _init_worker()
    import triton
    from triton.compiler import ASTSource

    arch = job["arch"]
    result: dict[str, Any] = {"error": None}
    t0 = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
        constexprs = {k: _JitRef.resolved(v) for k, v in job["constexprs"].items()}
        src = ASTSource(fn=kernel, signature=job["signature"], constexprs=constexprs, attrs=job["attrs"])
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: triton prints its ptxas -v log
            compiled = triton.compile(src, target=gpu_target(arch), options=dict(job["options"]))
        result["shared"] = int(compiled.metadata.shared)
        if isinstance(arch, str):            # AMD: the code object's own metadata
            asm = compiled.asm["amdgcn"]
            result.update(count_tensor_core_instructions(asm))
            result.update(parse_amdgcn(asm))
            # A spill is memory traffic: scratch. Spilled SGPRs go to VGPR lanes (v_writelane) and, on CDNA, spilled
            # VGPRs to the AGPR half of the register file (v_accvgpr_write): register moves, reported
            # (``vgpr_spills``, ``sgpr_spills``) but no spill unless they reach scratch (RDNA has no AGPRs).
            result["spill_bytes"] = result["scratch"]
        else:
            ptx = compiled.asm["ptx"]
            if job.get("sass") and sass.readable(arch):
                num_warps = int(job["options"].get("num_warps", 4))
                result["sass"] = sass.analyze(compiled.asm["cubin"], num_warps, job["work"], job["unit"], arch,
                                              cta_warps=int(compiled.metadata.num_warps),
                                              partition_warps=_partition_warps(compiled.asm.get("ttgir", "")))
            result.update(count_tensor_core_instructions(ptx))
            if "Used" in log.getvalue():         # the cubin's own ptxas run
                result.update(parse_ptxas(log.getvalue()), ptxas="compile")
            else:                                 # a cache hit ran no ptxas: run it on the PTX, as triton does
                result.update(parse_ptxas(_ptxas_log(ptx, arch, job["options"])), ptxas="cache hit")
            result["scratch"] = result["stack_frame"]
            result["spill_bytes"] = result["spill_stores"] + result["spill_loads"]
    except Exception as exc:  # report every failing config, do not stop at the first
        cause = exc.__cause__ or exc.__context__     # a CompilationError's message is the source; its cause says why
        why = f"\n(caused by {type(cause).__name__}: {cause})" if cause is not None else ""
        result["error"] = (f"{type(exc).__name__}: {exc}".strip()[-3000:] + why[-3000:])
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _normalized(specialization: tuple[dict, dict, dict]) -> tuple[dict, dict, dict]:
    signature, constexprs, attrs = specialization
    return signature, constexprs, {k: v for k, v in attrs.items() if v}


@dataclass(frozen=True)
class _JitRef:
    """A ``@triton.jit`` function passed as a constexpr (a score / mask mod), by (module, qualified name): a
    ``JITFunction`` does not pickle, so the compile processes re-import it (``resolve``). Such a function must
    be defined at module level (``fused_kernels.ops.attention.examples``)."""

    module: str
    qualname: str

    @staticmethod
    def of(value: Any) -> Any:
        """``value`` with every ``JITFunction`` in it (also inside a tuple, e.g. a ``VariantFlags``) by reference."""
        from triton.runtime.jit import JITFunction
        if isinstance(value, tuple):
            items = [_JitRef.of(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
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

    @staticmethod
    def resolved(value: Any) -> Any:
        """The inverse of ``of``: references (also inside tuples) back to their functions."""
        if isinstance(value, _JitRef):
            return value.resolve()
        if isinstance(value, tuple):
            items = [_JitRef.resolved(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        return value


def _pointer_ranges(signature: dict[str, Any], attrs: dict[tuple[int, ...], list]) -> dict[tuple[int, ...], list]:
    """``attrs`` as triton's AMD launcher specializes them: every pointer to a tensor within 2 GB (a typical
    call's) also carries ``tt.pointer_range=32`` (32-bit buffer offsets)."""
    out = dict(attrs)

    def walk(value: Any, path: tuple[int, ...]) -> None:
        if isinstance(value, tuple):
            for j, item in enumerate(value):
                walk(item, (*path, j))
        elif isinstance(value, str) and value.startswith("*"):
            out[path] = [*out.get(path, []), ["tt.pointer_range", 32]]

    for i, value in enumerate(signature.values()):
        walk(value, (i,))
    return out


def make_jobs(specs: list[Spec], archs: list[int | str], with_sass: bool = False
              ) -> tuple[list[dict[str, Any]], list[str]]:
    from triton.backends.compiler import GPUTarget

    jobs, mismatches = [], []
    for index, spec in enumerate(specs):
        signature, constexprs, attrs = specialize(spec)
        runtime = runtime_specialization(spec, GPUTarget("cuda", 80, 32))
        if runtime is not None and _normalized(runtime) != _normalized((signature, constexprs, attrs)):
            mismatches.append(f"{spec.name} [{spec.config}]: aot specialization {(signature, constexprs, attrs)} "
                              f"differs from the runtime launcher's {runtime}")
        for arch in archs:
            if arch not in spec.meta.get("archs", archs):   # a configuration chosen for another arch
                continue
            jobs.append(dict(spec=index, module=spec.kernel.fn.__module__, kernel=spec.kernel.fn.__name__,
                             signature=signature, constexprs={k: _JitRef.of(v) for k, v in constexprs.items()},
                             attrs=_pointer_ranges(signature, attrs) if isinstance(arch, str) else attrs,
                             options=dict(spec.options), arch=arch,
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


def _pool_pass(jobs: list[dict[str, Any]], indices: list[int], workers: int, compile_fn: Callable,
               results: list[dict[str, Any] | None], bar: _Progress | None) -> tuple[list[int], list[int]]:
    """Compile ``jobs[i]`` for ``i`` in ``indices``, at most ``workers`` at a time, each in a pool process.
    Returns ``([], [])``, or, when a process died (a compiler crash takes the pool down with it), the jobs that
    were running then (one of them crashed) and those not started yet."""
    queue = list(indices)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                initializer=_die_with_parent) as pool:
        running: dict[concurrent.futures.Future, int] = {}
        suspects: list[int] = []
        while queue or running:
            while queue and len(running) < workers:
                i = queue.pop(0)
                running[pool.submit(compile_fn, jobs[i])] = i
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                i = running.pop(future)
                try:
                    results[i] = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    suspects.append(i)
                    continue
                except Exception as exc:  # anything else a worker raised: this job's failure
                    results[i] = {"error": f"{type(exc).__name__}: {exc}", "seconds": 0.0}
                if bar:
                    bar.update(results[i])
            if suspects:    # the pool is gone: every job still running went with it
                return suspects + list(running.values()), queue
    return [], []


def run_jobs(jobs: list[dict[str, Any]], workers: int, progress: bool = True,
             compile_fn: Callable[[dict[str, Any]], dict[str, Any]] = compile_job) -> list[dict[str, Any]]:
    """``compile_fn`` (``compile_job``) of every job on ``workers`` processes, the expensive ones first. A
    compiler that crashes (a segfault in triton's or LLVM's native code) fails its configuration, not the run:
    the jobs that were running when a process died run again alone, the one whose process dies again is
    reported as crashed, and the rest go on in a new pool."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    bar = _Progress(len(jobs)) if progress else None
    try:
        pending = sorted(range(len(jobs)), key=lambda i: -jobs[i]["cost"])  # the expensive ones first
        while pending:
            suspects, pending = _pool_pass(jobs, pending, max(1, workers), compile_fn, results, bar)
            for i in suspects:
                if _pool_pass(jobs, [i], 1, compile_fn, results, bar)[0]:
                    results[i] = {"error": "the compiler crashed: its process died (a segfault or an abort in "
                                           "triton's or LLVM's native code)", "seconds": 0.0}
                    if bar:
                        bar.update(results[i])
        return results  # type: ignore[return-value]
    finally:
        if bar:
            bar.close()

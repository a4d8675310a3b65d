"""The measuring machinery every benchmark family shares: environment, timer, ceilings, provider registry,
input rotation and the loop that turns (case, provider) pairs into JSON records.

How we measure (shared/ENGINEERING.md section 5, device README METHOD.md):
- GPU: ``triton.testing.do_bench`` median (with the 20th/80th percentiles kept to show the spread), after
  a warm-up; Triton's do_bench also zeroes a 256 MB buffer before every timed call, and we additionally
  rotate through several input sets when one set is smaller than twice the L2 cache, so a timed call
  never finds its inputs in cache (the pytest-benchmark path has no flush: the rotation covers it).
- Every number is also given as a fraction of a ceiling measured at the start of the same run on the
  same device: a device-to-device copy (bytes read + bytes written) for memory-bound work and a large
  bf16 matmul for attention, so a result reads "x% of what this card did today".
- Baselines run in the same process, on the same inputs, right after ours.
- On the CPU every timing is a plain wall-clock median of a few calls on tiny shapes: it exercises the
  harness (records, table, plots) and says nothing about speed.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAMILIES = ("attention", "norm", "softmax", "model")

# Distributions whose versions go into every record (the optional providers included, so a record says
# which flash-attn or Liger it was compared with).
_VERSIONED = ("torch", "triton", "flash-attn", "flash_attn_3", "liger-kernel", "apex", "transformers")


class Unsupported(Exception):
    """A provider cannot run this case (missing package, unsupported shape or feature): a skip, not a failure."""


class Interrupted(BaseException):
    """Raised from the SIGTERM handler so that a run stopped by ``timeout`` still writes what it has.

    A BaseException, so the per-measurement ``except Exception`` that turns a provider's failure into a
    record does not swallow it."""


# ----------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


@dataclass
class Env:
    """Where the run happens, what it can use, and the ceilings measured at its start."""

    device: str                       # "cuda" or "cpu"
    gpu: str                          # device name ("cpu (x86_64)" on the CPU)
    l2_bytes: int                     # last-level cache that the rotation must defeat
    quick: bool
    versions: dict[str, str] = field(default_factory=dict)
    copy_gbps: float = math.nan       # measured device-to-device copy, GB/s (read + write)
    matmul_tflops: float = math.nan   # measured bf16 matmul, TFLOP/s
    capability: tuple[int, int] | None = None

    @classmethod
    def detect(cls, quick: bool = False) -> Env:
        import fused_kernels

        versions = {name: v for name in _VERSIONED if (v := _version(name)) is not None}
        versions["torch"] = torch.__version__
        versions["fused_kernels"] = fused_kernels.__version__
        versions["python"] = platform.python_version()
        versions["git"] = _git_commit()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            versions["cuda"] = str(torch.version.cuda)
            versions["cudnn"] = str(torch.backends.cudnn.version())
            return cls("cuda", torch.cuda.get_device_name(0), int(getattr(props, "L2_cache_size", 50 << 20)),
                       quick, versions, capability=torch.cuda.get_device_capability(0))
        # On the CPU a nominal 1 MiB "L2" makes the tiny shapes exercise the rotation code.
        return cls("cpu", f"cpu ({platform.machine()})", 1 << 20, quick, versions)

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    ms: float          # median
    p20: float
    p80: float


class Timer:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU, a wall-clock loop on the CPU."""

    def __init__(self, env: Env, warmup_ms: float | None = None, rep_ms: float | None = None) -> None:
        self.env = env
        # --quick trades a little spread for time: it runs inside the 8-minute gpu_check.
        self.warmup_ms = warmup_ms if warmup_ms is not None else (10.0 if env.quick else 25.0)
        self.rep_ms = rep_ms if rep_ms is not None else (50.0 if env.quick else 100.0)

    def __call__(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
        if self.env.is_cuda:
            return self._gpu(fn, grad_to_none)
        return self._cpu(fn, grad_to_none)

    def _gpu(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None) -> Timing:
        import triton.testing

        fn()                                   # compile / autotune / allocate outside everything timed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = (time.perf_counter() - t0) * 1e3
        # do_bench sizes its loops in milliseconds; for slow calls (a training step, the math backend)
        # ask for enough time to get ~10 timed calls, but never more than 3 s per measurement.
        rep = min(max(self.rep_ms, 10 * est), max(self.rep_ms, 3000.0))
        warmup = min(max(self.warmup_ms, 2 * est), max(self.warmup_ms, 1000.0))
        q = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none or []) or None,
                                    quantiles=[0.5, 0.2, 0.8])
        return Timing(float(q[0]), float(q[1]), float(q[2]))

    @staticmethod
    def _cpu(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None) -> Timing:
        fn()
        times: list[float] = []
        spent = 0.0
        # A few calls, at most ~50 ms: the CPU numbers only prove that the harness runs.
        while len(times) < 3 or (spent < 0.05 and len(times) < 10):
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt * 1e3)
            spent += dt
        times.sort()
        qs = statistics.quantiles(times, n=5, method="inclusive")
        return Timing(statistics.median(times), qs[0], qs[-1])


# ----------------------------------------------------------------------------- ceilings


def _copy_ms(env: Env, timer: Timer, n: int) -> Timing:
    src = torch.randn(n, device=env.device)          # random data: zeros can run faster than real data
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def _matmul_ms(env: Env, timer: Timer, n: int) -> Timing:
    a = torch.randn(n, n, device=env.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=env.device, dtype=torch.bfloat16)
    return timer(lambda: a @ b)


def measure_ceilings(env: Env, timer: Timer) -> list[dict[str, Any]]:
    """Measure copy bandwidth and bf16 matmul rate on this device, store them in ``env``, return records."""
    if env.is_cuda:
        n_copy, n_mm = (1 << 30) // 4, 8192          # 1 GiB copy, the 8192^3 product the device notes use
    else:
        n_copy, n_mm = 1 << 18, 256
    t = _copy_ms(env, timer, n_copy)
    nbytes = 2 * 4 * n_copy                          # fp32, read + write
    env.copy_gbps = nbytes / t.ms / 1e6
    free_memory(env)
    tm = _matmul_ms(env, timer, n_mm)
    flops = 2 * n_mm ** 3
    env.matmul_tflops = flops / tm.ms / 1e9
    free_memory(env)
    common = dict(family="ceiling", grid="ceiling", dtype="bf16", provider="torch", status="ok", reason=None)
    return [
        record(env, dict(common, op="copy", mode="fwd", dtype="fp32", shape={"elements": n_copy},
                         label=f"{nbytes >> 21} MiB", metric="gbps"), t, bytes_=nbytes, gbps=env.copy_gbps),
        record(env, dict(common, op="matmul", mode="fwd", shape={"M": n_mm, "N": n_mm, "K": n_mm},
                         label=f"{n_mm}^3", metric="tflops"), tm, flops=flops, tflops=env.matmul_tflops),
    ]


# ----------------------------------------------------------------------------- cases and providers


@dataclass
class Case:
    """One shape of one op: what to run, how much work it is, and which metric it is judged by."""

    family: str                   # "attention" | "norm" | "softmax" | "model"
    op: str                       # "attention", "decode", "layer_norm", "softmax_masked", "gpt2", ...
    mode: str                     # "fwd" | "fwd+bwd" | "train" | "infer"
    grid: str                     # "standard", "bert", "vit", "decode", "rows", "model"
    dtype: str                    # key of DTYPES
    shape: dict[str, Any]
    metric: str                   # "tflops" | "gbps" | "tokens_per_s"
    flops: float | None = None    # useful FLOPs of one call (attention)
    bytes: float | None = None    # minimal bytes moved by one call (memory-bound ops, decoding)
    tokens: int | None = None     # tokens processed by one call (models)
    skip: dict[str, str] = field(default_factory=dict)   # provider -> reason, decided by the grid

    def label(self) -> str:
        """Compact shape text for tables and plots: "B4 H2 L32 S32 D64 causal", "gpt2 B8 L1024"."""
        parts = []
        for k, v in self.shape.items():
            if v is None or v is False:
                continue
            parts.append(k if v is True else str(v) if isinstance(v, str) else f"{k}{_fmt(v)}")
        return " ".join(parts)

    def key(self) -> tuple:
        return (self.family, self.op, self.mode, self.grid, self.dtype, json.dumps(self.shape, sort_keys=True))


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass
class Prepared:
    """A provider's case, ready to time. ``fn`` is the timed call; ``output`` computes the forward output
    on the first input set for the agreement check against ours (None: no check)."""

    fn: Callable[[], object]
    output: Callable[[], torch.Tensor] | None = None
    grad_to_none: list[torch.Tensor] = field(default_factory=list)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    impl: str | None = None                               # what actually ran ("triton", "reference", ...)
    extra: Callable[[], dict[str, Any]] | None = None     # fields read after timing (peak memory)
    before: Callable[[], None] | None = None              # called right before timing (reset peak memory)


@dataclass
class Provider:
    name: str
    build: Callable[[Case, Env], Prepared]
    available: Callable[[Env], str | None] = lambda env: None   # None when usable, else why not


class Registry:
    """Providers per family, in the order they run; "ours" first, so its output is the check's reference."""

    def __init__(self) -> None:
        self._providers: dict[str, list[Provider]] = {}

    def register(self, family: str, name: str, build: Callable[[Case, Env], Prepared],
                 available: Callable[[Env], str | None] | None = None) -> None:
        providers = self._providers.setdefault(family, [])
        if any(p.name == name for p in providers):
            raise ValueError(f"provider {name!r} already registered for {family!r}")
        providers.append(Provider(name, build, available or (lambda env: None)))

    def providers(self, family: str) -> list[Provider]:
        return list(self._providers.get(family, []))


REGISTRY = Registry()


def module_available(module: str, dist: str | None = None) -> Callable[[Env], str | None]:
    """Availability test for an optional package: importable, else a reason naming it."""
    def check(env: Env) -> str | None:
        import importlib.util
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else f"{dist or module} not installed"
    return check


def cuda_only(reason: str = "needs a CUDA device") -> Callable[[Env], str | None]:
    return lambda env: None if env.is_cuda else reason


def all_of(*checks: Callable[[Env], str | None]) -> Callable[[Env], str | None]:
    def check(env: Env) -> str | None:
        for c in checks:
            if (r := c(env)) is not None:
                return r
        return None
    return check


# ----------------------------------------------------------------------------- inputs


def rotation_count(set_bytes: int, env: Env, cap: int = 64) -> int:
    """How many input sets to cycle through so that consecutive calls never reuse a cached set: enough
    sets to cover twice the L2 cache when one set is smaller than that, else one."""
    if set_bytes <= 0 or set_bytes >= 2 * env.l2_bytes:
        return 1
    return max(1, min(cap, math.ceil(2 * env.l2_bytes / set_bytes)))


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Rotation:
    """Cycles through input sets; ``next()`` gives the set for the next call."""

    def __init__(self, sets: list[tuple]) -> None:
        self.sets, self.i = sets, 0

    def next(self) -> tuple:
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s

    @property
    def first(self) -> tuple:
        return self.sets[0]


def free_memory(env: Env, collect: bool = False) -> None:
    """Return cached device memory between measurements, so one provider's big buffers do not squeeze the
    next. ``collect``: also run the cycle collector (slow with torch.compile's many objects: only after
    measurements that build cyclic structures, such as whole models)."""
    if collect:
        import sys
        if "torch._dynamo" in sys.modules:      # compiled graphs keep their model's tensors alive
            from torch import _dynamo
            _dynamo.reset()
        gc.collect()
    if env.is_cuda:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- records


def record(env: Env, fields: dict[str, Any], t: Timing | None, *, flops: float | None = None,
           bytes_: float | None = None, tflops: float | None = None, gbps: float | None = None,
           **extra: Any) -> dict[str, Any]:
    """One JSON record: the measurement, its units, the ceilings' fractions, the device and versions."""
    rec: dict[str, Any] = dict(fields)
    rec.update(
        ms=None if t is None else t.ms, ms_p20=None if t is None else t.p20, ms_p80=None if t is None else t.p80,
        flops=flops, bytes=bytes_, tflops=tflops, gbps=gbps,
    )
    rec.update(extra)
    for key in ("label", "metric", "impl", "tokens", "tokens_per_s", "rel_err_vs_ours", "agrees_with_ours",
                "peak_mem_gb"):
        rec.setdefault(key, None)      # one schema for every record, whatever produced it
    # Fractions of the ceilings only on a GPU: the CPU run's "ceilings" (a 1 MiB copy that stays in cache, a
    # 256^3 bf16 matmul) are harness checks, not the machine's limits, and other ops beat them.
    rec["pct_matmul"] = 100 * tflops / env.matmul_tflops if env.is_cuda and tflops and env.matmul_tflops > 0 \
        else None
    rec["pct_copy"] = 100 * gbps / env.copy_gbps if env.is_cuda and gbps and env.copy_gbps > 0 else None
    for key, value in rec.items():
        if isinstance(value, float) and not math.isfinite(value):
            rec[key] = None            # strict JSON has no NaN; agrees_with_ours already says False
    rec.update(device=env.device, gpu=env.gpu, versions=env.versions, quick=env.quick,
               time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return rec


def case_fields(case: Case, provider: str) -> dict[str, Any]:
    return dict(family=case.family, op=case.op, mode=case.mode, grid=case.grid, dtype=case.dtype,
                shape=case.shape, provider=provider, label=case.label(), metric=case.metric)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32 (NaN anywhere gives NaN, never a pass)."""
    out, ref = out.detach().float(), ref.detach().float()
    if out.shape != ref.shape:
        return math.nan
    denom = torch.linalg.vector_norm(ref).item()
    return torch.linalg.vector_norm(out - ref).item() / (denom or 1.0)


# Relative L2 error above which a provider's output is flagged as disagreeing with ours: one bf16
# rounding is ~4e-3, accumulation-order differences stay well under 1e-2 for a single op; a whole model
# in bf16 drifts further.
AGREE_TOL = {"attention": 3e-2, "norm": 3e-2, "softmax": 3e-2, "model": 1.5e-1}


class Sink:
    """Collects records and rewrites ``path`` atomically every few seconds (and on ``flush``), so a run
    killed outright still leaves valid JSON missing at most the last seconds of measurements."""

    def __init__(self, path: str | None, every_s: float = 2.0) -> None:
        self.path, self.records, self.every_s = path, [], every_s
        self._last = -math.inf

    def add(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if time.monotonic() - self._last > self.every_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if self.path is None:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.records, f, indent=1, default=str)
        os.replace(tmp, self.path)


def _metric_fields(case: Case, t: Timing) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if case.flops:
        out["tflops"] = case.flops / t.ms / 1e9
    if case.bytes:
        out["gbps"] = case.bytes / t.ms / 1e6
    if case.tokens:
        out["tokens_per_s"] = case.tokens / t.ms * 1e3
    return out


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def run_cases(cases: Sequence[Case], providers: Sequence[Provider], env: Env, timer: Timer, sink: Sink,
              deadline: float = math.inf, log: Callable[[str], None] = print) -> None:
    """Time every (case, provider) pair, appending one record each (skips and errors included)."""
    reasons = {p.name: p.available(env) for p in providers}
    for case in cases:
        ref: torch.Tensor | None = None
        for p in providers:
            fields = case_fields(case, p.name)
            reason = case.skip.get(p.name) or reasons[p.name]
            if reason is None and time.monotonic() > deadline:
                reason = "time budget of this run used up"
            if reason is not None:
                sink.add(record(env, dict(fields, status="skipped", reason=reason), None))
                continue
            status, reason, t, prepared, err = "ok", None, None, None, None
            extra: dict[str, Any] = {}
            try:
                prepared = p.build(case, env)
                with prepared.context():
                    if prepared.output is not None:
                        with torch.no_grad():
                            out = prepared.output()
                        if p.name == "ours":
                            ref = out.detach().float()
                        elif ref is not None:
                            err = rel_err(out, ref)
                        del out
                    if prepared.before is not None:
                        prepared.before()
                    t = timer(prepared.fn, prepared.grad_to_none)
                    if prepared.extra is not None:
                        extra = prepared.extra()
            except Unsupported as exc:
                status, reason = "skipped", str(exc)
            except Exception as exc:  # noqa: BLE001 - one provider's failure must not end the run
                # Ours failing is a bug to report loudly; a baseline failing on a shape it does not
                # support (SDPA's "No available kernel", an OOM in the math backend) is a skip.
                status, reason = ("error" if p.name == "ours" else "skipped"), _short(exc)
                if p.name == "ours":
                    log(traceback.format_exc(limit=3))
            impl = prepared.impl if prepared is not None else None
            prepared = None
            metrics = _metric_fields(case, t) if t is not None else {}
            agree = None if err is None else bool(err <= AGREE_TOL.get(case.family, 3e-2))
            rec = record(env, dict(fields, status=status, reason=reason, impl=impl), t,
                         flops=case.flops, bytes_=case.bytes, tflops=metrics.get("tflops"),
                         gbps=metrics.get("gbps"), tokens=case.tokens, tokens_per_s=metrics.get("tokens_per_s"),
                         rel_err_vs_ours=err, agrees_with_ours=agree, **extra)
            sink.add(rec)
            log(_line(rec))
            free_memory(env, collect=case.family == "model")


def _line(rec: dict[str, Any]) -> str:
    what = f"{rec['family']:<9} {rec['op']:<15} {rec['mode']:<7} {rec['label'][:44]:<44} {rec['provider']:<18}"
    if rec["status"] != "ok":
        return f"{what} {rec['status']}: {rec['reason']}"
    unit = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s"}.get(rec.get("metric") or "", "")
    val = f"{rec[rec['metric']]:9.2f} {unit}" if rec.get(rec.get("metric") or "") else ""
    flag = "" if rec.get("agrees_with_ours") is not False else f"  DISAGREES (rel err {rec['rel_err_vs_ours']:.2e})"
    return f"{what} {rec['ms']:9.4f} ms {val}{flag}"


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM (what ``timeout`` sends) into ``Interrupted`` for the duration."""
    import signal

    def handler(signum, frame):
        raise Interrupted(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:          # not the main thread (pytest-xdist workers, embedded use): leave it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


"""``python -m fused_kernels.aot``: compile every kernel configuration the launchers can choose, ahead of time
for real GPUs (by default sm_80 and sm_90a; ``--arch all``: every architecture of the tile table, NVIDIA and
AMD), on a machine without one, and check registers, spills and shared memory.

The command line; what is compiled and how it is judged: the package docstring (``fused_kernels/aot/__init__.py``).
"""


from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch

from .compile import gpu_name, make_jobs, ptxas_path, run_jobs
from .report import evaluate, print_sass_table, print_summary, print_table, print_targets
from .specs import ALL_ARCHS, ARCHS, FAMILIES, SHARED_LIMIT, all_specs, quick_subset


def parse_archs(values: list[str]) -> list[int | str]:
    """``--arch`` values: compute capabilities ("75", "120"), gfx names ("gfx942") or "all" (``ALL_ARCHS``), in
    order, without repeats; anything else is an error naming the choices."""
    archs: list[int | str] = []
    for value in values:
        if value == "all":
            archs += ALL_ARCHS
            continue
        arch = int(value) if value.isdigit() else value
        if arch not in ALL_ARCHS:
            raise argparse.ArgumentTypeError(
                f"--arch: unknown architecture {value!r}; choose from all, {', '.join(map(str, ALL_ARCHS))}")
        archs.append(arch)
    return list(dict.fromkeys(archs))


def main(argv: list[str] | None = None) -> int:
    if "TRITON_INTERPRET" in os.environ:
        # The jit decorators read TRITON_INTERPRET when the kernels are imported (already done by the
        # package import): start again in a process without it.
        del os.environ["TRITON_INTERPRET"]
        sys.stdout.flush()
        sys.stderr.flush()
        args = sys.argv[1:] if argv is None else argv
        os.execv(sys.executable, [sys.executable, "-m", "fused_kernels.aot", *args])

    parser = argparse.ArgumentParser(prog="python -m fused_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=[str(a) for a in ARCHS], metavar="ARCH",
                        help=f"architectures to compile for: compute capabilities, gfx names or 'all' "
                             f"({' '.join(map(str, ALL_ARCHS))}; default: {' '.join(map(str, ARCHS))})")
    parser.add_argument("--json", metavar="PATH", help="also write every row, with all numbers, as JSON")
    parser.add_argument("--filter", metavar="SUBSTRING", nargs="+", default=[""],
                        help="only configurations whose \"kernel config\" text (\"_attn_fwd_kernel bf16 d=64 M128 "
                             "...\") contains one of the SUBSTRINGs")
    parser.add_argument("--family", nargs="+", choices=[name for name, _ in FAMILIES],
                        help="only these kernel families (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--sass", action="store_true",
                        help="also disassemble every cubin and report its steady-state loops (fused_kernels.aot.sass), "
                             "checking the structural promises (no local memory, tensor cores, EX2/FMUL limits)")
    parser.add_argument("--quick", action="store_true",
                        help="a representative subset (what the test suite compiles): see quick_subset")
    opts = parser.parse_args(argv)
    try:
        opts.arch = parse_archs(opts.arch)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))

    own_cache = None
    if not os.environ.get("TRITON_CACHE_DIR"):
        shm = "/dev/shm"  # memory-backed where there is one: the cache is written ~8 times per compile
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
        own_cache = tempfile.mkdtemp(prefix="fused_kernels-aot-cache-", dir=base)
        os.environ["TRITON_CACHE_DIR"] = own_cache
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        return _run(opts)
    finally:
        if own_cache:
            shutil.rmtree(own_cache, ignore_errors=True)


def _run(opts: argparse.Namespace) -> int:
    import triton

    t0 = time.perf_counter()
    archs = opts.arch
    families = [(name, gen) for name, gen in FAMILIES if not opts.family or name in opts.family]
    specs = [s for s in all_specs(families, tuple(archs)) if any(f in f"{s.name} {s.config}" for f in opts.filter)]
    if opts.quick:
        specs = quick_subset(specs)
    jobs, mismatches = make_jobs(specs, archs, opts.sass)
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(specs)} configurations x "
          f"{len(archs)} archs = {len(jobs)} compiles on {max(1, min(opts.jobs, len(jobs)))} processes")
    for arch in archs:
        print(f"  {gpu_name(arch)}: {ptxas_path(arch) if isinstance(arch, int) else 'triton AMD backend'}")
    sys.stdout.flush()
    results = run_jobs(jobs, max(1, opts.jobs))
    specs_rows = []
    for k, result in enumerate(results):
        spec, arch = specs[jobs[k]["spec"]], jobs[k]["arch"]
        specs_rows.append((spec, evaluate(spec, arch, result)))
    specs_rows.sort(key=lambda sr: (archs.index(sr[1]["arch"]), sr[0].family, sr[0].name))   # in --arch order
    print()
    print_table(specs_rows)
    if opts.sass:
        print_sass_table(specs_rows)
    rows = [row for _, row in specs_rows]
    print_summary(rows)
    print_targets(rows)
    print("\ncompile time per family (CPU seconds, summed over processes):")
    for family in sorted({r["family"] for r in rows}):
        group = [r for r in rows if r["family"] == family]
        print(f"  {family:<12} {len(group):>4} compiles  {sum(r['seconds'] for r in group):>7.0f} s")
    for spec, row in specs_rows:
        if row.get("error"):
            print(f"\n{spec.name} [{spec.config}] on {row['gpu_name']}:\n{row['error']}")
    for line in mismatches:
        print(f"\nspecialization mismatch: {line}")
    failed = [row for row in rows if not row["ok"]]
    elapsed = time.perf_counter() - t0
    print(f"\n{len(rows) - len(failed)} of {len(rows)} compiles clean, {len(failed)} failing; "
          f"{len(mismatches)} specialization mismatches; {elapsed:.0f} s")
    if opts.json:
        report = dict(triton=triton.__version__, torch=torch.__version__, archs=[gpu_name(a) for a in archs],
                      shared_limit={gpu_name(a): SHARED_LIMIT[a] for a in archs},
                      families=sorted({s.family for s in specs}), kernels=sorted({s.name for s in specs}),
                      mismatches=mismatches, seconds=round(elapsed, 1), rows=rows)
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if failed or mismatches else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

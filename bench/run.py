"""``python -m bench``: the benchmark suite.

    python -m bench [--quick] [--only attention|norm|softmax|model ...] [--out DIR] [--budget-s S]
    python -m bench --device cpu [--full] [--only ...] [--no-memory] [--out DIR]   (bench/cpu.py)

Measures the device's copy bandwidth and bf16 matmul rate, then times every selected family on every
available provider, writing into ``--out`` (default ``$OUT``, else ``bench/results``):
  bench.json             one record per measurement (skips included, with their reason), rewritten after
                         each measurement so that a run cut short still leaves valid JSON
  summary.md             the table printed at the end: ours vs the best other provider
  attention.png, attention_shapes.png, norms.png, models.png
Exit status: 0, or 1 when one of our kernels failed, or 2 when the run was interrupted (the files are
written either way).

On a machine without a GPU it runs tiny shapes through the PyTorch path: that tests the harness, not
the speed. ``--device cpu`` is the CPU benchmark instead (bench/cpu.py): our ops against torch eager at
real sizes, one thread, interleaved pairs, peak memory per case. See bench/NOTES.md for the method and
the results so far.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import torch

from bench import attention, models, norms, report
from bench.harness import (
    FAMILIES,
    REGISTRY,
    Case,
    Env,
    Interrupted,
    Sink,
    Timer,
    measure_ceilings,
    run_cases,
    sigterm_raises,
)

CASES: dict[str, Callable[[Env], list[Case]]] = {
    "attention": attention.cases,
    "norm": norms.norm_cases,
    "softmax": norms.softmax_cases,
    "model": models.cases,
}

# Share of the time budget per family, in running order; what one family leaves unused passes on.
SHARES = {"attention": 0.45, "norm": 0.2, "softmax": 0.1, "model": 0.25}
# --quick on a GPU must leave gpu_check.sh (8 minutes in all) time for the install and the tests.
QUICK_BUDGET_S = 200.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small grid (on a GPU a 200 s budget: --budget-s)")
    parser.add_argument("--only", action="append", choices=FAMILIES, metavar="FAMILY",
                        help=f"run only these families ({', '.join(FAMILIES)}); may be repeated")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join("bench", "results"),
                        help="output folder (default: $OUT, else bench/results)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"stop starting new measurements after this many seconds (default: {QUICK_BUDGET_S:g} "
                             "with --quick on a GPU, else none); what is left is recorded as skipped")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="cpu: the CPU benchmark of bench/cpu.py (its own options: python -m bench --device cpu "
                             "--help)")
    return parser.parse_args(argv)


def _cpu_argv(argv: list[str]) -> list[str] | None:
    """The arguments for bench/cpu.py when ``--device cpu`` is among ``argv``, else None."""
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv) and argv[i + 1] == "cpu":
            return argv[:i] + argv[i + 2:]
        if a == "--device=cpu":
            return argv[:i] + argv[i + 1:]
    return None


def main(argv: list[str] | None = None) -> int:
    cpu_argv = _cpu_argv(sys.argv[1:] if argv is None else list(argv))
    if cpu_argv is not None:
        from bench import cpu
        return cpu.main(cpu_argv)
    args = parse(argv)
    families = [f for f in FAMILIES if not args.only or f in args.only]
    env = Env.detect(quick=args.quick)
    budget = args.budget_s if args.budget_s is not None else (QUICK_BUDGET_S if args.quick and env.is_cuda
                                                              else math.inf)
    os.makedirs(args.out, exist_ok=True)
    sink = Sink(os.path.join(args.out, "bench.json"))
    timer = Timer(env)
    start = time.monotonic()
    interrupted = False
    print(f"device: {env.gpu} ({env.device})  grid: {'quick' if args.quick else 'full'}  families: "
          f"{', '.join(families)}  out: {args.out}", flush=True)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(env.versions.items())), flush=True)
    if not env.is_cuda:
        print("no GPU: tiny shapes through the PyTorch path; the numbers test the harness, not speed "
              "(python -m bench --device cpu measures the CPU)", flush=True)
    threads = torch.get_num_threads()
    if not env.is_cuda:
        # The CPU run only tests the harness: one thread keeps it from competing for the cores (CI
        # machines are small and shared) and avoids spin-waiting thread pools on an oversubscribed host.
        torch.set_num_threads(1)
    # The benchmarks seed torch's generator (same inputs for every provider): keep the caller's state.
    with sigterm_raises(), torch.random.fork_rng(devices=[torch.cuda.current_device()] if env.is_cuda else []):
        try:
            for rec in measure_ceilings(env, timer):
                sink.add(rec)
            print(f"ceilings: copy {env.copy_gbps:.1f} GB/s, bf16 matmul {env.matmul_tflops:.2f} TFLOP/s",
                  flush=True)
            total = sum(SHARES[f] for f in families)
            share = 0.0
            for family in families:
                share += SHARES[family] / total
                deadline = start + share * budget if math.isfinite(budget) else math.inf
                run_cases(CASES[family](env), REGISTRY.providers(family), env, timer, sink, deadline,
                          log=lambda line: print(line, flush=True))
        except (Interrupted, KeyboardInterrupt) as exc:
            interrupted = True
            print(f"\ninterrupted ({exc!r}): writing what was measured", flush=True)
        finally:
            sink.flush()
            summary = report.table(sink.records, env)
            with open(os.path.join(args.out, "summary.md"), "w") as f:
                f.write(summary)
            pngs: list[str] = []
            if not args.no_plots:
                try:
                    pngs = report.plots(sink.records, env, args.out)
                except ImportError as exc:
                    print(f"plots skipped: {exc}", flush=True)
            print("\n" + summary, flush=True)
            print(f"wrote {sink.path}, {os.path.join(args.out, 'summary.md')}"
                  + "".join(f", {p}" for p in pngs) + f" in {time.monotonic() - start:.0f} s", flush=True)
            torch.set_num_threads(threads)
    if any(r["provider"] == "ours" and r["status"] == "error" for r in sink.records):
        return 1
    return 2 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

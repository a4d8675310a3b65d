"""``python -m fused_kernels``: print the environment and self-check every op's Triton kernel against its
float64 reference (forward and every gradient) on the available device. Exit code 1 on any failure.

Without a GPU the kernels run in Triton's interpreter: the command re-executes itself with
``TRITON_INTERPRET=1``, which must be set before triton is imported.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

from ._core import backend as _backend
from .selfcheck import CASES, run_case


def row(op: str, err: str, tol: str, seconds: str, result: str, width: int) -> str:
    """One line of the table: the op name padded to ``width`` (the longest case name), numbers right-aligned."""
    return f"{op:<{width}} {err:>10} {tol:>9} {seconds:>7}  {result}"


DESCRIPTION = ("Print the environment and check every op's Triton kernel (forward and every gradient) against its "
               "float64 reference on the available device, as a PASS/FAIL table; exit status 1 on any failure. "
               "Without a GPU it re-executes itself with TRITON_INTERPRET=1, so that the kernels run in Triton's "
               "interpreter (about 30 s on 2 busy cores).")


def main() -> int:
    argparse.ArgumentParser(prog="python -m fused_kernels", description=DESCRIPTION).parse_args(sys.argv[1:])
    if not torch.cuda.is_available() and not _backend.INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fused_kernels", *sys.argv[1:]])
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton_version}")
    print(f"device: {device} ({name})  interpreter: {_backend.INTERPRET}")
    print(f"{_backend.describe()}")
    print(f"self-check: Triton kernel vs float64 reference, forward and gradients, on {device}\n")
    width = max(len(case_name) for case_name, _ in CASES)
    header = row("op", "max err", "tol", "time", "result", width)
    print(header)
    print("-" * len(header))
    failures = 0
    case: tuple[str, Callable]
    for case in CASES:
        t0 = time.perf_counter()
        try:
            err, tol = run_case(case, device)
            ok, errors, note = err <= tol, (f"{err:.2e}", f"{tol:.1e}"), ""
        except Exception as exc:  # a crash is a failure to report, not a reason to stop checking
            ok, errors, note = False, ("-", "-"), f"  {type(exc).__name__}: {exc}"[:80]
        failures += not ok
        print(row(case[0], *errors, f"{time.perf_counter() - t0:.2f}s", "PASS" if ok else "FAIL", width) + note)
    print(f"\n{len(CASES) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m kernels.aot``: every kernel configuration the launchers can choose compiles for sm_80 and
sm_90a without spills and within the shared-memory limit, and the check forgets no kernel.

The command runs in a separate process without ``TRITON_INTERPRET`` (the test session turns the
interpreter on, and compiling for a GPU fails under it) and with its own ``TRITON_CACHE_DIR``. The
kernels it must cover are found here, independently of it: every Triton kernel (a ``triton.jit``
object whose name ends in ``_kernel``) defined in a module of the ``kernels`` package. A module's
kernels belong to the family named like the module (``layer_norm``, ``softmax``, ...).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from triton.runtime.jit import KernelInterface  # noqa: E402  (JITFunction, or InterpretedFunction under the interpreter)

import kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90a")
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}  # per-block opt-in maximum (A100, H100)
TIMEOUT_S = 1500


def kernel_modules() -> dict[str, list[str]]:
    """{module name: names of the Triton kernels it defines} for every module of the package with one."""
    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.ispkg or info.name in ("aot", "__main__"):
            continue
        source = (Path(kernels.__path__[0]) / f"{info.name}.py").read_text()
        if "triton.jit" not in source and "@jit" not in source:
            continue
        module = importlib.import_module(f"kernels.{info.name}")
        names = sorted(name for name, value in vars(module).items()
                       if isinstance(value, KernelInterface) and name.endswith("_kernel")
                       and getattr(getattr(value, "fn", None), "__module__", module.__name__) == module.__name__)
        if names:
            found[info.name] = names
    return found


@pytest.fixture(scope="module")
def aot(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    report = tmp / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--json", str(report)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if not report.exists():
        pytest.fail(f"python -m kernels.aot wrote no JSON report (exit code {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc, json.loads(report.read_text())


def _describe(rows: list[dict]) -> str:
    return "\n".join(f"  {r['kernel']} [{r['config']}] {r['gpu_name']}: regs {r.get('registers')} "
                     f"spill {r.get('spill_stores')}+{r.get('spill_loads')} B, smem {r.get('shared')} B "
                     f"{'; '.join(r.get('problems', []))} {(r.get('error') or '')[:300]}" for r in rows)


def test_kernel_modules_found():
    modules = kernel_modules()
    assert "layer_norm" in modules and "softmax" in modules, modules
    assert "_layer_norm_fwd_kernel" in modules["layer_norm"] and "_softmax_bwd_kernel" in modules["softmax"]


def test_exit_code(aot):
    proc, report = aot
    failing = [r for r in report["rows"] if not r["ok"]]
    assert proc.returncode == 0, (f"python -m kernels.aot exited with {proc.returncode}; failing configurations:\n"
                                  f"{_describe(failing)}\nmismatches: {report.get('mismatches')}\n"
                                  f"{proc.stderr[-2000:]}")


def test_every_configuration_compiles_without_spills_within_shared_memory(aot):
    _, report = aot
    assert report["rows"], "no configuration was compiled"
    bad = [r for r in report["rows"]
           if r.get("error") or r["spill_stores"] or r["spill_loads"] or r["shared"] > SHARED_LIMIT[r["gpu_name"]]]
    assert not bad, f"{len(bad)} configurations fail, spill or overflow shared memory:\n{_describe(bad)}"


def test_every_kernel_family_and_arch_covered(aot):
    proc, report = aot
    assert set(ARCHS) <= set(report["archs"]), report["archs"]
    modules = kernel_modules()
    rows = report["rows"]
    families = {r["family"] for r in rows}
    assert set(modules) <= families, f"kernel families missing from the report: {set(modules) - families}"
    table = [line.split() for line in proc.stdout.splitlines()]
    missing, missing_table = [], []
    for module, names in modules.items():
        for name in names:
            for arch in ARCHS:
                if not any(r["kernel"] == name and r["gpu_name"] == arch and r["family"] == module for r in rows):
                    missing.append(f"{module}.{name} on {arch}")
                if not any(cells and cells[0] == name and arch in cells for cells in table):
                    missing_table.append(f"{name} on {arch}")
    assert not missing, f"kernels python -m kernels.aot does not compile: {missing}"
    assert not missing_table, f"kernels missing from the printed table: {missing_table}"
    assert set(report["kernels"]) >= {n for names in modules.values() for n in names}

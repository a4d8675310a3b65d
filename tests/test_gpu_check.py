"""``bench/gpu_check.sh``, the one prepared GPU run, exercised on the CPU: ``--dry-run`` runs every stage in a
cheap form (the probes at tiny shapes through the interpreter with the grid limit lowered, the pytest stages
collecting with the GPU run's selection and options, a harness-sized benchmark), and the stage machinery
(time budget, failures collected, results in at most 8 files) is checked with a stand-in interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ["environment", "install", "import", "self-check", "probe grid", "probe fp64", "probe sdpa_views",
          "tests: GPU configurations", "tests: -m gpu", "small probe (compute-sanitizer workload)", "benchmark",
          "train vit"]


def _run(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path / "out"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    environ.update(OUT=str(out), **env)
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report, out


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    proc, report, out = _run(tmp_path, "--dry-run", PYTHON=sys.executable)
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert report["dry_run"] is True
    assert [s["stage"] for s in report["stages"]] == STAGES
    status = {s["stage"]: s["status"] for s in report["stages"]}
    assert status.pop("install") == "skipped"
    assert set(status.values()) == {"passed"}, status
    # the probes ran for real (interpreter, tiny shapes, grid limit 3) and split their launches
    for line in ("PASS grid dense", "PASS grid decode", "PASS grid varlen", "PASS grid paged", "PASS grid block_mask",
                 "PASS fp64", "PASS sdpa bf16 fused-QKV views", "PASS small varlen"):
        assert line in log, line
    assert "FAIL" not in log.replace("PASS/FAIL", "")
    assert "_attn_fwd_kernel x" in log
    # the pytest stages collected the GPU run's selection with its options
    detail = {s["stage"]: s["detail"] for s in report["stages"]}
    assert "tests collected" in detail["tests: GPU configurations"] and "tests collected" in detail["tests: -m gpu"]
    assert "<Module test_attention_gpu_configs.py>" in log and "test_variants[sm90-bf16-all]" in log
    assert report["environment"]["torch"] and report["environment"]["gpu"] is None
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"gpu_check.log", "gpu_check.json", "bench.json", "summary.md"} <= set(files)


def test_failures_are_collected_and_every_stage_runs(tmp_path):
    """Every Python stage failing (the interpreter is ``false``): the script goes on to the end, lists each
    failure and exits 1."""
    proc, report, _ = _run(tmp_path, "--dry-run", PYTHON="false")
    assert proc.returncode == 1
    assert [s["stage"] for s in report["stages"]] == STAGES
    failed = [s["stage"] for s in report["stages"] if s["status"] == "failed"]
    assert failed == [s for s in STAGES if s != "install"]
    assert "!! failed: probe grid (failed, exit 1)" in proc.stdout


def test_budget_cuts_stages(tmp_path):
    """A stage gets at most what is left of the budget; with none left the remaining stages are skipped."""
    slow = tmp_path / "slowpython"
    slow.write_text("#!/bin/sh\nsleep 4\necho '{\"gpu\": null}'\n")      # 4 s per stage, a valid environment
    slow.chmod(0o755)
    proc, report, _ = _run(tmp_path, "--dry-run", PYTHON=str(slow), GPU_CHECK_BUDGET_S="30")
    status = {s["stage"]: s for s in report["stages"]}
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert status["train vit"]["status"] == "skipped" and status["train vit"]["detail"] == "no time left"
    assert status["import"]["status"] == "passed"
    assert all(s["limit_s"] <= 20 for s in report["stages"][1:])      # after the environment block
    assert report["elapsed_s"] <= 30

"""``python -m fused_kernels.aot`` for the architecture families beyond sm_80 / sm_90a (those two: tests/test_aot.py):
per target, the configuration of its column that needs the most shared memory (the bf16 attention forward at
head dim 256: the largest K / V tiles of the table) and its grid-split twin, compiled for that target and judged
against the family's limits: no spills (NVIDIA spill bytes; AMD spilled VGPRs / SGPRs and scratch), shared memory
(LDS) within the family's per-block limit, and matrix instructions where the family has them for bf16 (none on
sm_70 / sm_75, where triton's ``tl.dot`` is an FMA loop). The full per-target table, and the commands that made it,
are in docs/architectures.md.

The command runs as in tests/test_aot.py: a separate process without ``TRITON_INTERPRET``, in its own process
group, with its own ``TRITON_CACHE_DIR``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_kernels._core.launch import arch_family
from fused_kernels.aot.compile import gpu_name
from fused_kernels.ops.attention import config as cfg

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (70, 75, 86, 89, 100, 120, "gfx90a", "gfx942", "gfx1100")
TIMEOUT_S = 600


def _forward_d256(arch) -> str:
    """The "kernel config" text of ``arch``'s bf16 forward at head dim 256 (as ``aot.specs.attention_specs`` writes
    it), without dropout."""
    c = cfg.attention_config("fwd", 256, 256, torch.bfloat16, arch)
    return f"_attn_fwd_kernel bf16 d=256 M{c['BLOCK_M']} N{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']} plain"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    tmp = tmp_path_factory.mktemp("aot-archs")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    out = tmp / "aot.json"
    filters = sorted({_forward_d256(arch) for arch in TARGETS})
    cmd = [sys.executable, "-m", "fused_kernels.aot", "--arch", *map(str, TARGETS), "--family", "attention",
           "--quick", "--jobs", "2", "--json", str(out), "--filter", *filters]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-2000:]}")
    if not out.exists():
        pytest.fail(f"no JSON report (exit code {proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), json.loads(out.read_text())


def test_every_target_compiles_clean(report):
    proc, data = report
    bad = [f"{r['kernel']} [{r['config']}] {r['gpu_name']}: {'; '.join(r['problems'])} {(r.get('error') or '')[:300]}"
           for r in data["rows"] if not r["ok"]]
    assert not bad and proc.returncode == 0, "\n".join(bad) + "\n" + proc.stdout[-3000:]


def test_each_target_its_own_column(report):
    """Every target compiled its column's forward (and nothing was chosen for another column), within its family's
    limit, with matrix instructions exactly where the family has them for bf16."""
    _, data = report
    for arch in TARGETS:
        family = arch_family(arch)
        rows = [r for r in data["rows"] if r["gpu_name"] == gpu_name(arch) and r["kernel"] == "_attn_fwd_kernel"]
        assert rows, f"nothing compiled for {gpu_name(arch)}"
        want = _forward_d256(arch).removeprefix("_attn_fwd_kernel ")
        assert all(r["config"].startswith(want) for r in rows), (arch, [r["config"] for r in rows])
        for r in rows:
            assert 0 < r["shared"] <= family.shared_memory, (arch, r["config"], r["shared"])
            assert r["spill_bytes"] == 0 and r["scratch"] == 0, (arch, r["config"], r["spill_bytes"], r["scratch"])
            has_mma = r["tensor_core_instructions"] > 0
            assert has_mma == ("bf16" in family.mma_dtypes), (arch, r["config"], r["tensor_core_instructions"])

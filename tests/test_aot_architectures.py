"""``python -m fused_kernels.aot`` for the architecture families beyond sm_80 / sm_90a (those two: tests/test_aot.py):
per target, the configuration of its column with the largest K / V tiles (the bf16 attention forward at head dim
256, ``--quick``: one configuration per target), compiled for that target and judged against the family's limits:
no spills (NVIDIA spill bytes; AMD scratch), shared memory (LDS) within the family's per-block limit, and matrix
instructions where the family has them for bf16 (none on sm_70 / sm_75, where triton's ``tl.dot`` is an FMA loop).
The full per-target table, and the commands that made it, are in docs/architectures.md.

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


def _forward_d256(arch) -> str | None:
    """The "kernel config" text of ``arch``'s bf16 forward at head dim 256 (as ``aot.specs.attention_specs`` writes
    it), without dropout; None where the column has no kernel for it (the PyTorch path runs such calls)."""
    if not cfg.has_kernels(256, 256, torch.bfloat16, arch, False, backward=False):
        return None
    c = cfg.attention_config("fwd", 256, 256, torch.bfloat16, arch)
    return f"_attn_fwd_kernel bf16 d=256 M{c['BLOCK_M']} N{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']} plain"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    tmp = tmp_path_factory.mktemp("aot-archs")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    out = tmp / "aot.json"
    filters = sorted({_forward_d256(arch) for arch in TARGETS} - {None})
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


def test_command_ran(report):
    """The command compiled every target's forward; a failing configuration (exit code 1) is the per-target
    test's to report."""
    proc, data = report
    assert proc.returncode in (0, 1) and not data["mismatches"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {r["gpu_name"] for r in data["rows"]} == {gpu_name(arch) for arch in TARGETS if _forward_d256(arch)}


@pytest.mark.parametrize("arch", TARGETS, ids=str)
def test_target_compiles_its_column_clean(report, arch):
    """The target compiled its column's forward (nothing chosen for another column), without spills, within its
    family's shared memory, with matrix instructions exactly where the family has them for bf16. gfx1100 (RDNA3)
    has no kernel for it (444 B of scratch at 16 x 16, the smallest tile): nothing is compiled for it there, and
    such a call takes the PyTorch path (tests/test_architectures.py runs one)."""
    _, data = report
    family = arch_family(arch)
    rows = [r for r in data["rows"] if r["gpu_name"] == gpu_name(arch) and r["kernel"] == "_attn_fwd_kernel"]
    if arch == "gfx1100":
        assert _forward_d256(arch) is None and rows == []
        return
    assert rows, f"nothing compiled for {gpu_name(arch)}"
    want = _forward_d256(arch).removeprefix("_attn_fwd_kernel ")
    assert all(r["config"].startswith(want) for r in rows), (arch, [r["config"] for r in rows])
    for r in rows:
        assert not r.get("error"), r["error"][-2000:]
        assert 0 < r["shared"] <= family.shared_memory, (r["config"], r["shared"])
        assert r["spill_bytes"] == 0 and r["scratch"] == 0, (r["config"], r["spill_bytes"], r["scratch"])
        assert (r["tensor_core_instructions"] > 0) == ("bf16" in family.mma_dtypes), (
            r["config"], r["tensor_core_instructions"])
        assert r["ok"], r["problems"]


# Where a variant's loop state made the column's tile spill (``config._VARIANT_OVERRIDES``, triton 3.9): per target
# one such call, (arch, kernel kind, head dim, variant as aot.specs names it, heavy: ALiBi takes the lean column).
VARIANT_CASES = [(100, "fwd", 128, "prefix", False), (120, "bwd_dq", 128, "alibi", True),
                 (75, "bwd_dkdv", 64, "mask_mod", False), (70, "bwd_dkdv", 128, "prefix", False)]
_KERNELS = {"fwd": "_attn_fwd_kernel", "bwd_dq": "_attn_bwd_dq_kernel", "bwd_dkdv": "_attn_bwd_dkdv_kernel"}


def _variant_config(arch, kind, d, variant, heavy) -> str:
    c = cfg.attention_config(kind, d, d, torch.bfloat16, arch, heavy, variant=True)
    return (f"{_KERNELS[kind]} bf16 d={d} M{c['BLOCK_M']} N{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']} "
            f"{variant}")


@pytest.mark.skipif(cfg._TRITON_VERSION != (3, 9), reason="the variant entries are triton 3.9's")
def test_variant_entries_compile_clean(tmp_path):
    """Each target's variant entry compiles clean for that target with its variant (``--family variants``): no
    spills, shared memory within the family's limit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = tmp_path / "aot.json"
    filters = [_variant_config(*case) for case in VARIANT_CASES]
    archs = sorted({str(case[0]) for case in VARIANT_CASES})
    cmd = [sys.executable, "-m", "fused_kernels.aot", "--arch", *archs, "--family", "variants", "--jobs", "2",
           "--json", str(out), "--filter", *filters]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for case, text in zip(VARIANT_CASES, filters):
        arch = case[0]
        mine = [r for r in rows if r["gpu_name"] == gpu_name(arch) and f"{r['kernel']} {r['config']}".startswith(text)]
        assert mine, f"{text} was not compiled for {gpu_name(arch)}"
        for r in mine:
            assert not r.get("error") and r["spill_bytes"] == 0, (r["config"], r["spill_bytes"], r.get("error"))
            assert 0 < r["shared"] <= arch_family(arch).shared_memory, (r["config"], r["shared"])
    assert proc.returncode == 0, proc.stdout[-3000:]

"""``python -m fused_kernels.aot --quick --sass``: a representative subset of the kernel configurations the
launchers can choose (``fused_kernels.aot.specs.quick_subset``: every kernel on both archs, the configurations
that bound the others, every bf16 attention configuration at head dims 64 and 128) compiles for sm_80 and sm_90a without
spills and within the shared-memory limit, its SASS keeps the structural promises (no local memory, tensor
cores in every steady-state loop of a ``tl.dot`` kernel, at most 1.1 MUFU.EX2 per score in the attention
loops and 1.2 FMUL per score in the sm_90a forward), and the check forgets no kernel. The full compile of
every configuration (``python -m fused_kernels.aot --sass``) is a command, not a test: it takes minutes per
hundred configurations on two cores.

The command runs in a separate process without ``TRITON_INTERPRET`` (the test session turns the
interpreter on, and compiling for a GPU fails under it), in its own process group (a timeout kills it and
every compile worker it started) and with its own ``TRITON_CACHE_DIR``. The kernels it must cover are found
here, independently of it: every Triton kernel (a ``triton.jit`` object whose name ends in ``_kernel``)
defined in any module of the ``fused_kernels`` package. Each module with kernels belongs to one family of the
command (``FAMILY``); a new kernel module fails the test until it is given one.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

pytest.importorskip("triton")
from triton.runtime.jit import KernelInterface  # noqa: E402  (JITFunction, or InterpretedFunction under the interpreter)

import fused_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90a")
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}  # per-block opt-in maximum (A100, H100)
TIMEOUT_S = 1200


# The family of ``python -m fused_kernels.aot`` that compiles each module's kernels.
FAMILY = {
    "fused_kernels.ops.norms": "layer_norm",
    "fused_kernels.ops.softmax": "softmax",
    "fused_kernels.ops.attention.kernels.forward": "attention",
    "fused_kernels.ops.attention.kernels.decode": "attention",
    "fused_kernels.ops.attention.kernels.backward": "attention",
    "fused_kernels.ops.attention.kernels.paged": "paged",
    "fused_kernels.ops.attention.kernels.blockmask": "variants",
    "fused_kernels.ops.cross_entropy": "cross_entropy",
    "fused_kernels.ops.rotary": "rotary",
    "fused_kernels.ops.gated_mlp": "gated_mlp",
}


def kernel_modules() -> dict[str, list[str]]:
    """{module name: names of the Triton kernels it defines} for every module of the package with one."""
    found = {}
    for info in pkgutil.walk_packages(fused_kernels.__path__, "fused_kernels."):
        if info.ispkg or info.name.startswith("fused_kernels.aot") or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        names = sorted(name for name, value in vars(module).items()
                       if isinstance(value, KernelInterface) and name.endswith("_kernel")
                       and getattr(getattr(value, "fn", None), "__module__", module.__name__) == module.__name__)
        if names:
            found[info.name] = names
    return found


@pytest.fixture(scope="session")
def aot(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """One run for the whole session, shared by the pytest-xdist workers through a lock in their common
    temporary directory: the first worker to get here compiles, the others read its results."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):    # the workers' base directories share this session's parent
        shared = shared.parent
    with FileLock(str(shared / "aot.lock")):
        saved = shared / "aot-run.json"
        if saved.exists():
            run = json.loads(saved.read_text())
            proc = subprocess.CompletedProcess(run["args"], run["returncode"], run["stdout"], run["stderr"])
            return proc, json.loads((shared / "aot.json").read_text())
        proc, report = _run_aot(shared)
        saved.write_text(json.dumps(dict(args=proc.args, returncode=proc.returncode, stdout=proc.stdout,
                                         stderr=proc.stderr)))
        return proc, report


def _run_aot(tmp: Path) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    report = tmp / "aot.json"
    proc = subprocess.Popen([sys.executable, "-m", "fused_kernels.aot", "--quick", "--sass", "--json", str(report)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)           # the command and every compile worker
        out, err = proc.communicate()
        pytest.fail(f"python -m fused_kernels.aot --quick --sass ran past {TIMEOUT_S} s:\n{out[-3000:]}\n{err[-2000:]}")
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if not report.exists():
        pytest.fail(f"python -m fused_kernels.aot wrote no JSON report (exit code {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc, json.loads(report.read_text())


def _describe(rows: list[dict]) -> str:
    return "\n".join(f"  {r['kernel']} [{r['config']}] {r['gpu_name']}: regs {r.get('registers')} "
                     f"spill {r.get('spill_stores')}+{r.get('spill_loads')} B, smem {r.get('shared')} B "
                     f"{'; '.join(r.get('problems', []))} {(r.get('error') or '')[:300]}" for r in rows)


def test_kernel_modules_found():
    modules = kernel_modules()
    assert "_layer_norm_fwd_kernel" in modules["fused_kernels.ops.norms"], modules
    assert "_softmax_bwd_kernel" in modules["fused_kernels.ops.softmax"], modules
    assert "_attn_fwd_kernel" in modules["fused_kernels.ops.attention.kernels.forward"], modules
    unassigned = set(modules) - set(FAMILY)
    assert not unassigned, f"kernel modules with no aot family (add them to FAMILY and to the command): {unassigned}"


def test_exit_code(aot):
    proc, report = aot
    failing = [r for r in report["rows"] if not r["ok"]]
    assert proc.returncode == 0, (f"python -m fused_kernels.aot exited with {proc.returncode}; "
                                  f"failing configurations:\n{_describe(failing)}\n"
                                  f"mismatches: {report.get('mismatches')}\n"
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
    wanted = {FAMILY[m] for m in modules if m in FAMILY}
    assert wanted <= families, f"kernel families missing from the report: {wanted - families}"
    table = [line.split() for line in proc.stdout.splitlines()]
    missing, missing_table = [], []
    for module, names in modules.items():
        for name in names:
            for arch in ARCHS:
                if not any(r["kernel"] == name and r["gpu_name"] == arch and r["family"] == FAMILY.get(module)
                           for r in rows):
                    missing.append(f"{module}.{name} on {arch}")
                if not any(cells and cells[0] == name and arch in cells for cells in table):
                    missing_table.append(f"{name} on {arch}")
    assert not missing, f"kernels python -m fused_kernels.aot does not compile: {missing}"
    assert not missing_table, f"kernels missing from the printed table: {missing_table}"
    assert set(report["kernels"]) >= {n for names in modules.values() for n in names}


def test_attention_variants_covered(aot):
    """The "variants" family (``fused_kernels.aot.specs.variants_specs``): the quick subset compiles the forward,
    dK/dV and dQ kernels with every mask and score variant at once (window, prefix, documents, ALiBi, softcap, a
    score_mod and a mask_mod of ``fused_kernels.ops.attention.examples``, passed to the compile processes by module
    and name) on both archs, on the sparse block-list path."""
    _, report = aot
    rows = [r for r in report["rows"] if r["family"] == "variants"]
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        for arch in ARCHS:
            hits = [r for r in rows if r["kernel"] == name and r["gpu_name"] == arch and r["flags"] == "all"]
            assert hits, f"no 'all' variants configuration of {name} on {arch}"
            assert all(r["sparse"] and r["ok"] for r in hits), _describe(hits)


def _loops(report: dict, kernel: str | None = None) -> list[tuple[dict, dict]]:
    return [(r, loop) for r in report["rows"] if not r.get("error") and (kernel is None or r["kernel"] == kernel)
            for loop in r["sass"]["loops"]]


def test_sass_report_has_every_compile(aot):
    _, report = aot
    assert all("sass" in r for r in report["rows"] if not r.get("error"))
    assert {r["gpu_name"] for r in report["rows"]} == set(ARCHS)


def test_sass_no_local_memory(aot):
    _, report = aot
    bad = [f"{r['kernel']} [{r['config']}] {r['gpu_name']}: {r['sass']['local_memory']}" for r in report["rows"]
           if not r.get("error") and r["sass"]["local_memory"]]
    assert not bad, f"LDL/STL in the SASS of: {bad}"


def test_sass_tensor_cores_in_attention_loops(aot):
    _, report = aot
    loops = [(r, lp) for r, lp in _loops(report) if r["family"] == "attention"
             and r["dtype"] in ("fp16", "bf16") and r["unit"] == "scores" and not lp.get("straight_line")
             and lp.get("role") != "producer"]   # a warp-specialized kernel's copy loop
    assert loops
    for r, lp in loops:
        shapes = lp["tensor_core"]
        assert shapes, f"{r['kernel']} [{r['config']}] {r['gpu_name']}: a loop without tensor-core instructions"
        # warpgroup MMA on Hopper wherever the tiles have 64-row warpgroups (not the decode kernel's 16 rows,
        # nor the small d = 256 backward tiles)
        if r["gpu_name"] == "sm_90a" and r["kernel"] != "_attn_fwd_split_kernel" and r["head_dim"] <= 128 \
                and r["flags"] != "heavy":
            assert any(k.startswith("HGMMA") for k in shapes), (r["kernel"], r["config"], shapes)


@pytest.mark.parametrize("kernel, limits", [("_attn_fwd_kernel", {"ex2": 1.1, "fmul": 1.2}),
                                            ("_attn_bwd_dkdv_kernel", {"ex2": 1.1}),
                                            ("_attn_bwd_dq_kernel", {"ex2": 1.1})])
def test_sass_per_score_limits(aot, kernel, limits):
    """One exponential per score (no score work duplicated across warps); in the sm_90a forward one FMUL per
    score for the accumulator rescale plus 16 / BLOCK_N for the tensor-core row sums (the scale folded into
    the exponent): on the bf16 configurations without dropout at head dims 64 and 128, which the subset holds."""
    _, report = aot
    checked = 0
    for r, lp in _loops(report, kernel):
        if r["family"] != "attention" or r["dtype"] != "bf16" or r["flags"] == "heavy" or r["head_dim"] > 128:
            continue   # the dense attention promises (the varlen family runs the same loops without TMA)
        for key, limit in limits.items():
            if key == "fmul" and r["gpu_name"] != "sm_90a":
                continue
            value = lp[f"{key}_per_scores"]
            assert value <= limit, f"{kernel} [{r['config']}] {r['gpu_name']}: {key} per score {value} > {limit}"
            checked += 1
    assert checked >= 8, f"too few loops checked for {kernel}: {checked}"


def test_sass_hopper_forward_uses_tma_and_wide_tiles(aot):
    """The sm_90a forward at d <= 128 streams K/V with TMA and multiplies 64x128 (d=128) wgmma tiles; where it is
    warp-specialized ("plain" where this triton compiles it: ``config._WARP_SPECIALIZED``) a producer loop issues
    the copies and two consumer loops, one per warp group, do the matmuls without CTA-wide barriers."""
    _, report = aot
    rows = [r for r in report["rows"] if r["family"] == "attention" and r["kernel"] == "_attn_fwd_kernel"
            and r["gpu_name"] == "sm_90a"
            and r["dtype"] == "bf16" and r["flags"] != "heavy" and r["head_dim"] <= 128]
    assert len(rows) >= 4
    for r in rows:
        loops = r["sass"]["loops"]
        if any(lp.get("role") for lp in loops):
            producers = [lp for lp in loops if lp["role"] == "producer"]
            consumers = [lp for lp in loops if lp["role"] == "consumer"]
            assert len(producers) == 1 and producers[0]["global_loads"].get("UTMALDG"), (r["config"], producers)
            assert len(consumers) == 2 and not any(lp["global_loads"] for lp in consumers), r["config"]
            assert not any(lp["cta_barriers"] for lp in consumers), r["config"]
        else:
            consumers = loops
            for lp in loops:
                assert lp["global_loads"].get("UTMALDG"), (r["config"], lp["global_loads"])
        for lp in consumers:
            assert any(k.startswith("HGMMA.64x128x16") for k in lp["tensor_core"]), (r["config"], lp["tensor_core"])

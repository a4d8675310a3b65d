"""``python -m fused_kernels.aot --quick --sass``: a representative subset of the kernel configurations the
launchers can choose (``fused_kernels.aot.specs.quick_subset``: every kernel on both archs, the configurations
that bound the others, every bf16 attention configuration at head dims 64 and 128) compiles for sm_80 and sm_90a without
spills and within the shared-memory limit, its SASS keeps the structural promises (no local memory, tensor
cores in every steady-state loop of a ``tl.dot`` kernel, at most 1.1 MUFU.EX2 per score in the attention
loops and 1.1 FMUL per score in the sm_90a forward), and the check forgets no kernel. The full compile of
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


# Kernels only some architectures run (their launcher's contract): the warp-specialized dK/dV is sm_90a's.
ONLY_ON = {"_attn_bwd_dkdv_ws_kernel": {"sm_90a"}}

# The family of ``python -m fused_kernels.aot`` that compiles each module's kernels.
FAMILY = {
    "fused_kernels.ops.norms": "layer_norm",
    "fused_kernels.ops.softmax": "softmax",
    "fused_kernels.ops.attention.kernels.forward": "attention",
    "fused_kernels.ops.attention.kernels.decode": "attention",
    "fused_kernels.ops.attention.kernels.backward": "attention",
    "fused_kernels.ops.attention.kernels.backward_ws": "attention",
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


def _compile_or_crash(job: dict) -> dict:
    """A stand-in for ``compile_job``: the job marked ``crash`` kills its process as a compiler segfault would."""
    if job["crash"]:
        os.kill(os.getpid(), signal.SIGSEGV)
    return {"seconds": 0.0, "value": job["value"]}


def test_a_compiler_crash_fails_one_configuration():
    """A compile whose process dies (triton 3.9 segfaults on some AMD configurations) is that configuration's
    failure; every other job of the run still gets its result (two workers: the other job running when the
    pool broke runs again alone and succeeds)."""
    from fused_kernels.aot.compile import run_jobs
    jobs = [dict(cost=-i, value=i, crash=i == 2) for i in range(6)]
    results = run_jobs(jobs, 2, progress=False, compile_fn=_compile_or_crash)
    assert [r.get("value") for r in results] == [0, 1, None, 3, 4, 5]
    assert "the compiler crashed" in results[2]["error"]


def test_a_cache_hit_reports_what_the_compile_did(tmp_path):
    """A configuration compiled twice with one ``TRITON_CACHE_DIR``: the second run is triton's cache hit (no
    ptxas run) and reports the registers and spills of the first, from ptxas run as triton runs it (triton 3.9
    adds ``--regAllocOptLevel=2``: a plain ``ptxas -v`` on this one, sm_100a's bf16 d=64 GQA dK/dV, took 80
    registers and spilled 24+40 B where triton's cubin takes 90 and spills nothing)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    rows = []
    for run in ("first", "second"):
        report = tmp_path / f"{run}.json"
        proc = subprocess.run([sys.executable, "-m", "fused_kernels.aot", "--family", "attention", "--arch", "100",
                               "--filter", "_attn_bwd_dkdv_kernel bf16 d=64 M64 N64 w8 s1 plain", "--json",
                               str(report)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert report.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
        (row,) = [r for r in json.loads(report.read_text())["rows"] if r["config"].endswith(" plain")]
        rows.append(row)
    first, second = rows
    assert (first["ptxas"], second["ptxas"]) == ("compile", "cache hit")
    for key in ("registers", "spill_stores", "spill_loads", "shared"):
        assert first[key] == second[key], (key, first[key], second[key])


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
            for arch in ONLY_ON.get(name, ARCHS):
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


@pytest.mark.parametrize("kernel, limits", [("_attn_fwd_kernel", {"ex2": 1.1, "fmul": 1.1}),
                                            ("_attn_bwd_dkdv_kernel", {"ex2": 1.1}),
                                            ("_attn_bwd_dq_kernel", {"ex2": 1.1})])
def test_sass_per_score_limits(aot, kernel, limits):
    """One exponential per score (no score work duplicated across warps); in the sm_90a forward one FMUL per
    score for the accumulator rescale (FADD row sums, the scale folded into the exponent): on the bf16
    configurations without dropout at head dims 64 and 128, which the subset holds."""
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


# The SASS reader on hand-written snippets in ``nvdisasm -c`` form: the counting rules, without compiling.

def _sass(*loop: str, before: tuple[str, ...] = (), after: tuple[str, ...] = ()) -> str:
    """A one-function disassembly: ``before``, then ``loop`` as the body of a loop (label .L_x_1, closed by a
    predicated back branch), then ``after`` and EXIT; instructions get consecutive addresses."""
    lines, addr = ["\t.text._k:"], 0

    def emit(ins: str) -> None:
        nonlocal addr
        if ins.startswith("."):
            lines.append(f"{ins}:")
            return
        lines.append(f"        /*{addr:04x}*/                   {ins} ;")
        addr += 16

    for ins in (*before, ".L_x_1", *loop, "@P0 BRA `(.L_x_1)", *after, "EXIT"):
        emit(ins)
    return "\n".join(lines) + "\n"


def _loop0(text: str, num_warps: int = 8, work: int = 128 * 128, **kw) -> dict:
    from fused_kernels.aot import sass
    report = sass.analyze_text(text, num_warps, work, "scores", **kw)
    assert len(report["loops"]) == 1 and not report["loops"][0].get("straight_line"), report["loops"]
    return report["loops"][0]


def test_sass_int64_counts_only_64_bit_integer_work():
    """32-bit shifts and high-word multiplies were counted as 64-bit work (``SHF.R.U32.HI`` matched ``.HI``) and
    the native ``IADD3.64`` and carry-chain low words were missed."""
    thirty_two = ["SHF.R.U32.HI R3, RZ, 0x4, R2", "SHF.R.S32.HI R5, RZ, 0x1f, R4", "LEA.HI R6, R2, R3, RZ, 0x2",
                  "IMAD.HI.U32 R7, R2, 0x55555556, RZ", "USHF.R.U32.HI UR4, URZ, 0x4, UR5",
                  "LDG.E.64 R8, desc[UR4][R2.64]",
                  "IADD3 R9, R2, 0x10, RZ", "SHF.L.U32 R10, R2, 0x2, RZ", "FMUL R11, R2, R3"]
    sixty_four = ["IADD3 R12, P1, R2, 0x30, RZ", "IMAD.X R13, RZ, RZ, R3, P1", "LEA R14, P2, R2, R4, 0x1",
                  "LEA.HI.X R15, R2, R5, R3, 0x1, P2", "LEA.HI.X.SX32 R16, R2, R5, 0x1, P2",
                  "IMAD.WIDE.U32 R18, R2, 0x4, R20", "SHF.L.U64.HI R21, R2, 0x2, R3",
                  "ISETP.GE.AND.EX P0, PT, R3, RZ, PT, P1", "UIADD3.64 UR6, UR8, 0x80, URZ",
                  "UIADD3.X UR7, UR6, 0x40000040, URZ, UP1, !UPT"]
    loop = _loop0(_sass(*thirty_two, *sixty_four), arch=90)
    assert loop["int64_ops"] == len(sixty_four)
    assert loop["int64_uniform_ops"] == 2


def test_sass_named_barriers_apart_from_cta_barriers():
    """A barrier with a thread count below the CTA's (a warp group's 128 threads) is a named partial barrier,
    not CTA-wide; every ``BAR.`` counted as CTA-wide before."""
    bars = ["BAR.SYNC.DEFER_BLOCKING 0x0", "BAR.SYNC.DEFER_BLOCKING 0x1, 0x100", "BAR.SYNC.DEFER_BLOCKING 0x2, 0x80",
            "BAR.ARV 0x3, 0x80", "BAR.SYNC.DEFER_BLOCKING 0x4, R2", "FFMA R1, R2, R3, R1"]
    loop = _loop0(_sass(*bars), num_warps=8)                   # 256 threads: 0x100 is the whole CTA
    assert (loop["cta_barriers"], loop["named_barriers"]) == (2, 3)
    loop = _loop0(_sass(*bars), num_warps=4, cta_warps=12)     # a warp-specialized CTA of 384 threads
    assert (loop["cta_barriers"], loop["named_barriers"]) == (1, 4)


def test_sass_setmaxnreg_partitions():
    """Each warp-specialized loop gets the registers of the ``setmaxnreg`` that dominates it and its role; the
    register allocation retry loop is a wait, not a steady-state loop; the kernel's model adds the partitions."""
    text = "\n".join([
        "\t.text._k:",
        "        /*0000*/                   ISETP.NE.AND P0, PT, R0, RZ, PT ;",
        "        /*0010*/              @P0 BRA `(.L_x_5) ;",
        "        /*0020*/                   USETMAXREG.DEALLOC.CTAPOOL 0x28 ;",
        ".L_x_1:",
        "        /*0030*/                   UTMALDG.2D [UR8], [UR4] ;",
        "        /*0040*/                   SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ, [UR9], RZ ;",
        "        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x2, 0x80 ;",
        "        /*0060*/              @P1 BRA `(.L_x_1) ;",
        "        /*0070*/                   EXIT ;",
        ".L_x_5:",
        "        /*0080*/                   USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8 ;",
        "        /*0090*/                   PLOP3.LUT P2, PT, PT, PT, UP0, 0x80, 0x0 ;",
        "        /*00a0*/              @!P2 BRA `(.L_x_5) ;",
        ".L_x_2:",
        "        /*00b0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;",
        "        /*00c0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;",
        "        /*00d0*/                   MUFU.EX2 R3, R2 ;",
        "        /*00e0*/                   BAR.SYNC.DEFER_BLOCKING 0x3, 0x80 ;",
        "        /*00f0*/              @P1 BRA `(.L_x_2) ;",
        "        /*0100*/                   EXIT ;",
    ]) + "\n"
    from fused_kernels.aot import sass
    report = sass.analyze_text(text, 4, 128 * 128, "scores", 90, cta_warps=12, partition_warps=4)
    assert [(p["kind"], p["registers"]) for p in report["partitions"]] == [("dealloc", 40), ("alloc", 232)]
    loops = report["loops"]
    assert [(lp["role"], lp["setmaxnreg"], lp["named_barriers"], lp["cta_barriers"]) for lp in loops] == [
        ("producer", 40, 1, 0), ("consumer", 232, 1, 0)]
    models = [lp["model_cycles_per_1k"] for lp in loops]
    assert report["model_cycles_per_1k"]["issue"] == pytest.approx(models[0]["issue"] + models[1]["issue"], abs=0.1)
    assert report["model_cycles_per_1k"]["tensor"] == models[1]["tensor"] == 4.0   # 64*128*16 * 4/4 * 1024/16384 / 2048


def test_partition_warps_from_ttgir():
    from fused_kernels.aot.compile import _partition_warps
    head = 'module attributes {"ttg.num-ctas" = 1 : i32, "ttg.num-warps" = 4 : i32} {\n'
    assert _partition_warps(head + "partition0(%a) num_warps(4) {\n partition1(%b) num_warps(4) {") == 4
    assert _partition_warps(head + "partition0(%a) num_warps(1) {") is None        # sizes differ: unknown
    assert _partition_warps(head + "tt.func @k() {") is None                          # not warp-specialized


def test_sass_cycle_model_arithmetic():
    """The model on a known mix (8 warps, a 128 x 128 tile: 0.5 warp-instructions per 1k scores per
    instruction): 16 HGMMA.64x128x16 (bf16), 4 MUFU.EX2, 8 FFMA, 2 IADD3 + the back branch = 31 instructions."""
    mix = ["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0"] * 16 + ["MUFU.EX2 R3, R2"] * 4 \
        + ["FFMA R4, R2, R3, R4"] * 8 + ["IADD3 R9, R2, 0x10, RZ"] * 2
    model = _loop0(_sass(*mix), arch=90)["model_cycles_per_1k"]
    # issue 31 x 0.5 / 4; tensor 16 x 64*128*16 / 4 warps per MMA x 0.5 / 2048; mufu 4 x 32 x 0.5 / 16;
    # fp32 8 x 32 x 0.5 / 128
    assert model == {"issue": 3.9, "tensor": 128.0, "mufu": 4.0, "fp32": 1.0, "bound": 128.0, "limiter": "tensor"}
    model = _loop0(_sass(*mix), arch=80)["model_cycles_per_1k"]                    # half the tensor rate on sm_80
    assert (model["tensor"], model["fp32"]) == (256.0, 2.0)
    hmma = _loop0(_sass(*["HMMA.16816.F32.BF16 R4, R8, R12, R4"] * 8), arch=80)["model_cycles_per_1k"]
    assert hmma["tensor"] == 8 * 16 * 8 * 16 * 0.5 / 1024                           # per warp, 1,024 FMA / clock
    assert _loop0(_sass(*mix), arch=86)["model_cycles_per_1k"] is None                # no constants: no model


def test_sass_global_bytes_per_unit():
    """Bytes through LDG / STG by the width the opcode names, every lane active: 8 warps x 32 lanes over a
    2,048-element iteration = 1/8 per lane-access."""
    loop = _loop0(_sass("LDG.E.128 R4, desc[UR4][R2.64]", "LDG.E.128 R8, desc[UR4][R6.64]",
                        "LDG.E R12, desc[UR4][R2.64]",
                        "STG.E.U16 desc[UR4][R2.64], R4", "RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5"),
                  work=2048)
    assert loop["global_bytes_per_scores"] == {"load": (16 + 16 + 4) / 8, "store": (2 + 4) / 8}

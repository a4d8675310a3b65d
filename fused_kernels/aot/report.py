"""Judging and printing the compiled configurations: limits (spills, shared memory, tensor cores, the SASS
structural promises), the tables and the summary."""


from __future__ import annotations

from typing import Any

from .._core.launch import arch_family
from .compile import MMA_PATTERNS, gpu_name
from .specs import SHARED_LIMIT, Spec


def needs_tensor_cores(spec: Spec, arch: int | str) -> bool:
    """Whether the compiled kernel must hold matrix instructions: a ``tl.dot`` kernel (``spec.tensor_cores``:
    16-bit inputs) on an architecture where triton emits them for its dtype (``ArchFamily.mma_dtypes``; none
    below sm_80)."""
    return spec.tensor_cores and spec.meta.get("dtype", "fp16") in arch_family(arch).mma_dtypes


def evaluate(spec: Spec, arch: int | str, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(family=spec.family, kernel=spec.name, config=spec.config, arch=arch,
                               gpu_name=gpu_name(arch), options=spec.options, **spec.meta, **result)
    problems = []
    if result.get("error"):
        problems.append("compile failed")
    else:
        row["tensor_core_instructions"] = sum(row[kind] for kind in MMA_PATTERNS)
        if row["spill_bytes"]:
            if isinstance(arch, str):
                problems.append(f"spills {row['scratch']} B to scratch ({row['vgpr_spills']} VGPRs, "
                                f"{row['sgpr_spills']} SGPRs)")
            else:
                problems.append(f"spills {row['spill_stores']}+{row['spill_loads']} B")
        if row["shared"] > SHARED_LIMIT[arch]:
            problems.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[arch]} B")
        if needs_tensor_cores(spec, arch) and not row["tensor_core_instructions"]:
            problems.append("no tensor-core instructions")
        if row.get("sass"):
            problems += sass_problems(spec, row["sass"])
    row["problems"] = problems
    row["ok"] = not problems
    return row


def sass_problems(spec: Spec, report: dict[str, Any]) -> list[str]:
    """The structural promises of the SASS: no local memory (LDL/STL) anywhere; tensor-core instructions in
    every steady-state loop of a kernel built on ``tl.dot`` (a warp-specialized kernel's producer loop, which only
    issues copies, excepted); per-unit limits of ``spec.meta["sass_limits"]``
    (e.g. ``{"ex2": 1.1}``: at most 1.1 MUFU.EX2 per score) in each steady-state loop."""
    problems = []
    if report["local_memory"]:
        problems.append(f"SASS: {report['local_memory']} local-memory instructions (LDL/STL)")
    unit = report["unit"]
    for i, loop in enumerate(report["loops"]):
        if loop.get("straight_line"):
            continue
        if loop.get("role") == "producer":      # a warp-specialized kernel's copy loop: no arithmetic
            continue
        if spec.tensor_cores and not loop["tensor_core"]:
            problems.append(f"SASS loop {i}: no tensor-core instructions")
        for key, limit in spec.meta.get("sass_limits", {}).items():
            value = loop[f"{key}_per_{unit}"]
            if value > limit:
                problems.append(f"SASS loop {i}: {key.upper()} per {unit[:-1]} {value} > {limit}")
    return problems


def _short_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}x{v}" for k, v in counts.items()) or "-"


def _model_cell(model: dict[str, Any] | None) -> tuple[str, str]:
    """("issue/tensor/mufu/fp32", "bound limiter") of a cycle model, or dashes."""
    if not model:
        return "-", "-"
    return "/".join(f"{model[k]:.0f}" for k in ("issue", "tensor", "mufu", "fp32")), \
        f"{model['bound']:.0f} {model['limiter']}"


def print_sass_table(specs_rows: list[tuple[Spec, dict[str, Any]]]) -> None:
    """One line per steady-state loop: what one iteration issues, normalized per 1,024 units of work, and the
    cycle model's pipes; a warp-specialized kernel adds a line "all" for its partitions' loops together."""
    lines = []
    for spec, row in specs_rows:
        report = row.get("sass")
        if not report:
            continue
        unit = report["unit"]
        for i, loop in enumerate(report["loops"]):
            label = "body" if loop.get("straight_line") else f"loop{i}"
            moved = loop[f"global_bytes_per_{unit}"]
            int64 = f"{loop['int64_ops']}" + (f" ({loop['int64_uniform_ops']}u)" if loop["int64_uniform_ops"] else "")
            part = f"{loop['role']} {loop['setmaxnreg']}" if loop["role"] else "-"
            lines.append((f"{spec.name}", spec.config, row["gpu_name"], label, str(loop["instructions"]),
                          f"{loop[f'warp_instructions_per_1k_{unit}']:.0f}", f"{loop[f'ex2_per_{unit}']:.3g}",
                          f"{loop[f'fmul_per_{unit}']:.3g}", f"{loop[f'ffma_per_{unit}']:.3g}",
                          _short_counts(loop["wgmma_wait_depths"]), str(loop["cta_barriers"]),
                          str(loop["named_barriers"]), int64, str(report["local_memory"]),
                          f"{moved['load']:.3g}+{moved['store']:.3g}", part, *_model_cell(loop["model_cycles_per_1k"]),
                          _short_counts(loop["global_loads"]), _short_counts(loop["tensor_core"])))
        if report.get("model_cycles_per_1k"):       # the partitions' loops run at once: their sum
            specialized = [lp for lp in report["loops"] if lp["setmaxnreg"] is not None]
            per1k = sum(lp[f"warp_instructions_per_1k_{unit}"] for lp in specialized)
            regs = "/".join(str(r) for r in dict.fromkeys(lp["setmaxnreg"] for lp in specialized))
            lines.append((spec.name, spec.config, row["gpu_name"], "all", "-", f"{per1k:.0f}", *["-"] * 10,
                          f"regs {regs}", *_model_cell(report["model_cycles_per_1k"]), "-", "-"))
    if not lines:
        return
    header = ("kernel", "config", "arch", "loop", "instr", "per1k", "EX2/u", "FMUL/u", "FFMA/u", "wgmma wait",
              "BAR cta", "BAR named", "int64", "LDL/STL", "B/u ld+st", "partition", "model i/t/m/f", "model bound",
              "global loads", "tensor cores")
    widths = [max(len(h), *(len(line[c]) for line in lines)) for c, h in enumerate(header[:-1])]
    print("\nSASS steady-state loops (instr: per iteration and warp; per1k: warp-instructions per 1,024 units "
          "(scores of attention, elements of row kernels); /u: lane instructions per unit; B/u: global bytes "
          "loaded + stored per unit (LDG/STG, not TMA); int64: 64-bit integer instructions (u: uniform "
          "datapath); partition: warp-specialized role and setmaxnreg registers)")
    print("MODEL, not a measurement: SM cycles per 1,024 units on the issue / tensor / MUFU / FP32 pipes from "
          "published per-SM rates (fused_kernels.aot.sass.MODEL); bound = the largest (pipes overlapping "
          "perfectly)")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[-1])
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])


def _tc_cell(spec: Spec, row: dict[str, Any]) -> str:
    """The matrix instructions of a compile: "mma.sync 256", "wgmma 8", "mfma 64" ... or "-" (none)."""
    kinds = [f"{kind.replace('_', '.')} {row[kind]}" for kind in MMA_PATTERNS if row.get(kind)]
    return " ".join(kinds) or "-"


def print_table(specs_rows: list[tuple[Spec, dict[str, Any]]]) -> None:
    kw = max([len("kernel")] + [len(s.name) for s, _ in specs_rows])
    cw = max([len("config")] + [len(s.config) for s, _ in specs_rows])
    header = (f"{'kernel':<{kw}}  {'config':<{cw}}  {'arch':<7}  {'regs':>4}  {'spill':>6}  {'smem':>7}  "
              f"{'tensor cores':>14}  result")
    print(header)
    print("-" * len(header))
    for spec, row in specs_rows:
        if row.get("error"):
            cells = f"{'-':>4}  {'-':>6}  {'-':>7}  {'-':>14}"
        else:
            cells = (f"{row['registers']:>4}  {row['spill_bytes']:>6}  {row['shared']:>7}  "
                     f"{_tc_cell(spec, row):>14}")
        verdict = "ok" if row["ok"] else "FAIL: " + "; ".join(row["problems"])
        print(f"{spec.name:<{kw}}  {spec.config:<{cw}}  {row['gpu_name']:<7}  {cells}  {verdict}")


def print_summary(rows: list[dict[str, Any]]) -> None:
    print("\nsummary (max over configurations):")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["gpu_name"]), []).append(row)
    for (kernel, gpu), group in groups.items():
        built = [r for r in group if not r.get("error")]
        if not built:
            print(f"  {kernel:<24} {gpu:<6} no configuration compiled")
            continue
        worst = max(built, key=lambda r: r["registers"])
        spills = [r for r in built if r["spill_bytes"]]
        print(f"  {kernel:<24} {gpu:<6} {len(group):>3} configs  max regs {worst['registers']:>3} "
              f"({worst['config']})  max smem {max(r['shared'] for r in built):>6} B  "
              f"spilling configs {len(spills)}  failed {len(group) - len(built)}")


def print_targets(rows: list[dict[str, Any]]) -> None:
    """One line per target: what was compiled for it and the worst of it (the per-target table of
    docs/architectures.md)."""
    print("\nper target (max over its configurations; spills: NVIDIA spill bytes, AMD scratch bytes):")
    print(f"  {'target':<8} {'family':<8} {'configs':>7} {'clean':>6} {'max regs':>8} {'max smem':>9} "
          f"{'limit':>7} {'spilling':>8} {'failed':>6}  matrix instructions")
    for gpu in dict.fromkeys(r["gpu_name"] for r in rows):
        group = [r for r in rows if r["gpu_name"] == gpu]
        built = [r for r in group if not r.get("error")]
        arch = group[0]["arch"]
        kinds = sorted({kind.replace("_", ".") for r in built for kind in MMA_PATTERNS if r.get(kind)})
        print(f"  {gpu:<8} {arch_family(arch).name:<8} {len(group):>7} {sum(r['ok'] for r in group):>6} "
              f"{max((r['registers'] for r in built), default=0):>8} "
              f"{max((r['shared'] for r in built), default=0):>9} {SHARED_LIMIT[arch]:>7} "
              f"{sum(bool(r['spill_bytes']) for r in built):>8} {len(group) - len(built):>6}  "
              f"{', '.join(kinds) or 'none'}")

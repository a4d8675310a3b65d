"""Read what a GPU would run: the SASS of a cubin, its steady-state loops, and what each loop issues.

``python -m fused_kernels.aot --sass`` uses this on every compiled configuration. The facts come off the binary
(``nvdisasm``, bundled with triton): nothing here is an estimate.

- The disassembly is cut into basic blocks (a block ends at a branch or ``EXIT`` and starts at a branch
  target); the control-flow graph's dominators give its back edges, and each back edge its natural loop
  (the blocks that reach the edge's source without passing its header). Loops sharing a header are one loop.
- A *spin loop* is a loop of at most ``SPIN_MAX`` instructions that waits on a barrier or a synchronization
  object (``SYNCS`` mbarrier try-wait, ``NANOSLEEP``, a ``BAR``/``DEPBAR`` wait) and does no arithmetic work:
  it is counted once as part of the loop around it, never reported as a loop of its own.
- A loop's *body* is its own instructions: those of its blocks minus those of the (non-spin) loops nested in
  it. The *steady-state* loops of a kernel are its innermost non-spin loops: per iteration they issue
  ``instructions`` warp-instructions in every warp that runs them (a conditional block inside the body is
  counted as if taken: an upper bound).
- Normalized by the work one iteration does (``work`` units, e.g. BLOCK_M x BLOCK_N scores of attention or
  BLOCK_N elements of a row kernel) and by the warps that run the loop (``num_warps``):
  warp-instructions per 1,024 units = instructions x warps / work x 1024, and per-unit counts of a lane-wise
  instruction (``MUFU.EX2``, ``FMUL``, ...) = count x warps x 32 / work: 1.0 means one per score.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

SPIN_MAX = 12                       # at most this many instructions, and a wait, make a spin loop
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[A-Z0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_FUNC = re.compile(r"^\s*\.text\.(\S+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)")
_WAIT_OPS = ("SYNCS", "NANOSLEEP", "BAR", "DEPBAR", "WARPSYNC", "YIELD",
             "USETMAXREG")   # a warp-specialized partition retrying its register allocation (setmaxnreg)
_BRANCHES = ("BRA", "BRX", "JMP", "JMX")


def _is_branch(ins: Instr) -> bool:
    """A jump: BRA/JMP (and their indirect forms), or ``CALL.REL.NOINC``, the loop-exit idiom of ptxas
    (a call that never returns to its site)."""
    return ins.base in _BRANCHES or (ins.base == "CALL" and "NOINC" in ins.modifiers)
_ENDS = ("EXIT", "RET", "KILL")


@dataclass(frozen=True)
class Instr:
    addr: int
    predicate: str          # "" or "@P0", "@!P1", "@UP0", ...
    opcode: str             # full opcode with modifiers: "HGMMA.64x128x16.F32.BF16"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def modifiers(self) -> list[str]:
        return self.opcode.split(".")[1:]


@dataclass
class Loop:
    header: int                      # index of the header's first instruction
    blocks: set[int]                 # indices of its basic blocks
    instrs: list[int] = field(default_factory=list)   # its own instructions (nested loops excluded)
    spin: bool = False
    children: list[Loop] = field(default_factory=list)

    @property
    def innermost(self) -> bool:
        return not any(not c.spin for c in self.children)


def nvdisasm_path() -> str:
    """The ``nvdisasm`` bundled with the installed triton."""
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(path):
        raise FileNotFoundError(f"nvdisasm not found at {path} (triton's NVIDIA backend bundles it)")
    return path


@functools.cache
def _disassembler_archs() -> frozenset[int]:
    """The compute capabilities the bundled ``nvdisasm`` reads (its ``--binary`` choices: CUDA 13's drops
    sm_70)."""
    proc = subprocess.run([nvdisasm_path(), "--help"], capture_output=True, text=True)
    return frozenset(int(v) for v in re.findall(r"'SM(\d+)'", proc.stdout))


def readable(arch: int) -> bool:
    """Whether the bundled ``nvdisasm`` disassembles cubins of compute capability ``arch``."""
    return arch in _disassembler_archs()


def disassemble(cubin: bytes) -> str:
    """The SASS text of a cubin (``nvdisasm -c``)."""
    with tempfile.TemporaryDirectory(prefix="fused_kernels-sass-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([nvdisasm_path(), "-c", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def parse(text: str) -> dict[str, tuple[list[Instr], dict[str, int]]]:
    """{function: (instructions, {label: index of the instruction it names})} of a disassembly."""
    functions: dict[str, tuple[list[Instr], dict[str, int]]] = {}
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        if m := _FUNC.match(line):
            instrs, labels = [], {}
            functions[m.group(1)] = (instrs, labels)
        elif m := _LABEL.match(line):
            labels[m.group(1)] = len(instrs)
        elif m := _LINE.match(line):
            pred = (m.group(2) or "").strip()
            instrs.append(Instr(int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
    return functions


def _blocks(instrs: list[Instr], labels: dict[str, int]) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Basic blocks as [start, end) instruction ranges and their successor block indices."""
    leaders = {0} | {i for i in labels.values() if i < len(instrs)}
    for i, ins in enumerate(instrs):
        if _is_branch(ins) or ins.base in _ENDS:
            leaders.add(i + 1)
    starts = sorted(i for i in leaders if i < len(instrs))
    ranges = [(s, e) for s, e in zip(starts, [*starts[1:], len(instrs)])]
    block_of = {s: b for b, (s, _) in enumerate(ranges)}
    succs: list[list[int]] = []
    for b, (_, e) in enumerate(ranges):
        last = instrs[e - 1]
        out = []
        if _is_branch(last):
            for target in _TARGET.findall(last.operands):
                if target in labels and labels[target] in block_of:
                    out.append(block_of[labels[target]])
            if last.predicate and b + 1 < len(ranges):      # a predicated branch falls through
                out.append(b + 1)
        elif last.base in _ENDS:
            if last.predicate and b + 1 < len(ranges):
                out.append(b + 1)
        elif b + 1 < len(ranges):
            out.append(b + 1)
        succs.append(sorted(set(out)))
    return ranges, succs


def _dominators(n: int, succs: list[list[int]]) -> list[set[int]]:
    preds: list[list[int]] = [[] for _ in range(n)]
    for b, out in enumerate(succs):
        for s in out:
            preds[s].append(b)
    everything = set(range(n))
    dom = [everything.copy() for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in range(1, n):
            new = set.intersection(*(dom[p] for p in preds[b])) if preds[b] else set()
            new = new | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """The natural loops of a function, outermost first, with their nesting and own instructions."""
    if not instrs:
        return []
    ranges, succs = _blocks(instrs, labels)
    n = len(ranges)
    dom = _dominators(n, succs)
    preds: list[list[int]] = [[] for _ in range(n)]
    for b, out in enumerate(succs):
        for s in out:
            preds[s].append(b)
    reachable, stack = {0}, [0]
    while stack:
        for s in succs[stack.pop()]:
            if s not in reachable:
                reachable.add(s)
                stack.append(s)
    by_header: dict[int, set[int]] = {}
    for src, out in enumerate(succs):
        if src not in reachable:            # the trap loop padding the end of a function
            continue
        for h in out:
            if h in dom[src]:                                 # back edge src -> h
                body, stack = {h, src}, ([src] if src != h else [])
                while stack:
                    x = stack.pop()
                    for p in preds[x]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                by_header.setdefault(h, set()).update(body)
    loops = [Loop(header=ranges[h][0], blocks=blocks) for h, blocks in by_header.items()]
    loops.sort(key=lambda lp: -len(lp.blocks))
    roots: list[Loop] = []
    for i, loop in enumerate(loops):
        parents = [p for p in loops[:i] if loop.blocks < p.blocks]
        if parents:
            min(parents, key=lambda p: len(p.blocks)).children.append(loop)
        else:
            roots.append(loop)
    for loop in loops:
        nested = set().union(*(c.blocks for c in loop.children)) if loop.children else set()
        own = loop.blocks - nested
        loop.instrs = [i for b in sorted(own) for i in range(*ranges[b])]
        every = [instrs[i] for b in loop.blocks for i in range(*ranges[b])]
        loop.spin = (len(every) <= SPIN_MAX and any(x.base in _WAIT_OPS for x in every)
                     and not any(x.base in ("HGMMA", "HMMA", "MUFU", "FFMA", "LDG") or _tensor_core(x) for x in every))
    # A spin loop's instructions count once in the loop around it.
    for loop in loops:
        for child in loop.children:
            if child.spin:
                loop.instrs.extend(i for b in sorted(child.blocks) for i in range(*ranges[b]))
        loop.instrs.sort()
    return [lp for lp in loops if not lp.spin]


def _tensor_core(ins: Instr) -> str | None:
    """"HGMMA.64x128x16 A=smem" / "HGMMA.64x128x16 A=reg" / "HMMA.16816" / "UTCHMMA" (sm_100a tcgen05) / None."""
    if ins.base.startswith("UTC") and ins.base.endswith("MMA"):
        return ins.base
    if ins.base == "HGMMA":
        shape = ins.modifiers[0] if ins.modifiers else "?"
        first_src = ins.operands.split(",")[1].strip() if ins.operands.count(",") >= 1 else ""
        return f"HGMMA.{shape} A={'smem' if first_src.startswith('gdesc') else 'reg'}"
    if ins.base in ("HMMA", "DMMA", "IMMA"):
        return f"{ins.base}.{ins.modifiers[0] if ins.modifiers else '?'}"
    return None


def _global_load(ins: Instr) -> str | None:
    if ins.base == "LDG":
        width = next((m for m in ins.modifiers if m in ("128", "64", "U8", "S8", "U16", "S16")), "32")
        return f"LDG.{width}"
    if ins.base == "LDGSTS":
        width = next((m for m in ins.modifiers if m in ("128", "64")), "32")
        return f"LDGSTS.{width}"
    if ins.base in ("UTMALDG", "UBLKCP"):
        return ins.base
    return None


def _int64(ins: Instr) -> bool:
    """Part of 64-bit integer arithmetic: a carry into a high word (``.X``), a 32x32->64 multiply
    (``.WIDE``), a high-word shift or LEA (``SHF...HI``, ``LEA.HI``)."""
    mods = ins.modifiers
    if ins.base.startswith(("F", "H", "D", "MUFU")):
        return False
    return "X" in mods or "WIDE" in mods or (ins.base in ("LEA", "ULEA", "SHF", "USHF") and "HI" in mods)


def loop_stats(instrs: list[Instr], loop: Loop, num_warps: int, work: int, unit: str) -> dict:
    """Counts of one loop's body, raw and normalized per ``work`` units of one iteration."""
    body = [instrs[i] for i in loop.instrs]
    ops = Counter(x.opcode for x in body)
    bases = Counter(x.base for x in body)
    tc = Counter(t for x in body if (t := _tensor_core(x)))
    loads = Counter(t for x in body if (t := _global_load(x)))
    waits = Counter(x.operands.split(",")[-1].strip() for x in body if x.opcode.startswith("WARPGROUP.DEPBAR"))
    n = len(body)

    def per_unit(count: int) -> float:
        return round(count * num_warps * 32 / work, 3) if work else 0.0

    ex2 = sum(c for op, c in ops.items() if op.startswith("MUFU.EX2"))
    return {
        "start": hex(instrs[loop.instrs[0]].addr) if body else None,
        "instructions": n,
        f"warp_instructions_per_1k_{unit}": round(n * num_warps / work * 1024, 1) if work else None,
        "tensor_core": dict(sorted(tc.items())),
        f"ex2_per_{unit}": per_unit(ex2),
        f"fmul_per_{unit}": per_unit(bases["FMUL"]),
        f"ffma_per_{unit}": per_unit(bases["FFMA"]),
        "wgmma_wait_depths": dict(sorted(waits.items())),
        # BAR.SYNC id (every thread of the CTA) apart from BAR.SYNC id, count (a named barrier of `count`
        # threads: a warp-specialized consumer group syncing its own 128 threads)
        "cta_barriers": sum(1 for x in body if x.base == "BAR" and "," not in x.operands),
        "group_barriers": sum(1 for x in body if x.base == "BAR" and "," in x.operands),
        "global_loads": dict(sorted(loads.items())),
        "int64_ops": sum(1 for x in body if _int64(x)),
        "local_memory": bases["LDL"] + bases["STL"],
        "opcodes": dict(ops.most_common()),
    }


def analyze(cubin: bytes, num_warps: int, work: int, unit: str = "scores") -> dict:
    """SASS facts of the kernel in ``cubin``: whole-function counts and one entry per steady-state loop.

    ``work``: units one iteration of a steady-state loop processes (BLOCK_M x BLOCK_N scores of attention,
    BLOCK_N elements of a row kernel); in a warp-specialized kernel each consumer loop is normalized by its
    group's share of it. A function without loops reports its straight-line body under
    ``loops`` with ``straight_line: true`` (per program, normalized by ``work`` as well)."""
    functions = parse(disassemble(cubin))
    if len(functions) != 1:
        raise RuntimeError(f"expected one kernel function in the cubin, found {sorted(functions)}")
    (name, (instrs, labels)), = functions.items()
    loops = find_loops(instrs, labels)
    steady = sorted((lp for lp in loops if lp.innermost), key=lambda lp: lp.header)
    bases = Counter(x.base for x in instrs)
    report = {"function": name, "instructions": len(instrs), "num_warps": num_warps, "work_per_iteration": work,
              "unit": unit, "local_memory": bases["LDL"] + bases["STL"], "loops": []}
    # Warp-specialized (setmaxnreg in the code): each consumer warp group (num_warps warps) runs its own copy of
    # the loop over its share of the iteration's work (triton splits the rows among the groups: one loop with
    # tensor-core instructions per group); the producer's loop issues the copies (role "producer").
    specialized = bases["USETMAXREG"] > 0
    consumers = sum(1 for lp in steady if any(_tensor_core(instrs[i]) for i in lp.instrs)) if specialized else 1
    if steady:
        for loop in steady:
            role = None
            if specialized:
                role = "consumer" if any(_tensor_core(instrs[i]) for i in loop.instrs) else "producer"
            share = work // max(1, consumers) if role == "consumer" else work
            report["loops"].append({**loop_stats(instrs, loop, num_warps, share, unit), "role": role})
    else:
        everything = Loop(header=0, blocks=set(), instrs=list(range(len(instrs))))
        report["loops"].append({**loop_stats(instrs, everything, num_warps, work, unit), "straight_line": True})
    return report

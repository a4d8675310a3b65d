"""Read what a GPU would run: the SASS of a cubin, its steady-state loops, and what each loop issues.

``python -m fused_kernels.aot --sass`` uses this on every compiled configuration. The facts come off the binary
(``nvdisasm``, bundled with triton): nothing here is an estimate.

- The disassembly is cut into basic blocks (a block ends at a branch or ``EXIT`` and starts at a branch
  target); the control-flow graph's dominators give its back edges, and each back edge its natural loop
  (the blocks that reach the edge's source without passing its header). Loops sharing a header are one loop.
- A *spin loop* is a loop of at most ``SPIN_MAX`` instructions that waits on a barrier or a synchronization
  object (``SYNCS`` mbarrier try-wait, ``NANOSLEEP``, a ``BAR``/``DEPBAR`` wait, a ``setmaxnreg`` allocation
  retried until the registers are free) and does no arithmetic work and no global load:
  it is counted once as part of the loop around it, never reported as a loop of its own.
- A loop's *body* is its own instructions: those of its blocks minus those of the (non-spin) loops nested in
  it. The *steady-state* loops of a kernel are its innermost non-spin loops: per iteration they issue
  ``instructions`` warp-instructions in every warp that runs them (a conditional block inside the body is
  counted as if taken: an upper bound).
- Normalized by the work one iteration does (``work`` units, e.g. BLOCK_M x BLOCK_N scores of attention or
  BLOCK_N elements of a row kernel) and by the warps that run the loop (``num_warps``):
  warp-instructions per 1,024 units = instructions x warps / work x 1024, and per-unit counts of a lane-wise
  instruction (``MUFU.EX2``, ``FMUL``, ...) = count x warps x 32 / work: 1.0 means one per score.
- Counted with care: ``int64_ops`` only the instructions of 64-bit integer arithmetic (``_int64``: carry
  chains, ``.WIDE`` multiplies, 64-bit compares and shifts; not the 32-bit ``SHF.R.U32.HI``);
  ``cta_barriers`` only barriers every thread of the CTA waits at, ``named_barriers`` the partial ones (a
  thread count below the CTA's: one warp group's ``BAR.SYNC 0x2, 0x80`` in a warp-specialized kernel).
- Warp specialization: ``USETMAXREG`` (PTX ``setmaxnreg``) gives each loop its partition's registers
  (the nearest reallocation dominating the loop) and each loop a role (producer: loads only; consumer:
  tensor-core / MUFU work only).
- ``model_cycles_per_1k``: a *model* (``model_cycles``): per-pipe cycles per 1,024 units from published
  per-SM throughputs (``MODEL``), not a measurement.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SPIN_MAX = 12                       # at most this many instructions, and a wait, make a spin loop
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[A-Z0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_FUNC = re.compile(r"^\s*\.text\.(\S+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)")
_WAIT_OPS = ("SYNCS", "NANOSLEEP", "BAR", "DEPBAR", "WARPSYNC", "YIELD", "USETMAXREG")   # + a setmaxnreg retry
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
                     and not any(x.base in ("HGMMA", "HMMA", "MUFU", "FFMA") or _tensor_core(x) or _global_load(x)
                                 for x in every))     # a loop that loads (LDG, cp.async, TMA) is work
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


# Integer ALU opcodes whose 64-bit forms the SASS spells out (regular and uniform datapath).
_INT_ALU = frozenset({"IADD", "IADD3", "UIADD3", "IMAD", "UIMAD", "IMUL", "LEA", "ULEA", "SHF", "USHF", "ISETP",
                      "UISETP", "IMNMX", "UIMNMX", "VIADD", "VIMNMX"})
_CARRY_OUT = re.compile(r"U?P[0-6]")


def _int64(ins: Instr) -> bool:
    """Part of 64-bit integer arithmetic, decided from what the opcode computes:

    - ``.X``: the high word of a carry chain (``IADD3.X``, ``IMAD.X``, ``LEA.HI.X[.SX32]``): it adds the carry
      of a low-word instruction, which only a 64-bit add needs;
    - the low word of that chain: ``IADD3`` / ``LEA`` writing a carry-out predicate (``IADD3 R4, P0, ...``);
    - ``.EX``: the high-word compare of a 64-bit comparison (``ISETP.GE.AND.EX``, chained to the low compare);
    - ``.WIDE``: a 32 x 32 -> 64-bit multiply-add into a register pair (``IMAD.WIDE[.U32]``);
    - a 64-bit type: ``IADD3.64`` (sm_90's native 64-bit add), ``SHF.L.U64.HI`` / ``SHF.R.S64``: a funnel shift
      of a 64-bit {hi, lo} pair.

    Not 64-bit: ``SHF.R.U32.HI`` / ``SHF.R.S32.HI`` (a 32-bit shift: ``.HI`` only names which half of the
    funnel {b, a} is returned, and with the low source RZ it is ``b >> n``), ``LEA.HI`` without ``.X`` and
    ``IMAD.HI`` (the high word of a 32 x 32 product: division by a constant), memory widths (``LDG.E.64``)."""
    if ins.base not in _INT_ALU:
        return False
    mods = ins.modifiers
    if "X" in mods or "EX" in mods or "WIDE" in mods or any(m in ("64", "U64", "S64") for m in mods):
        return True
    if ins.base in ("IADD3", "UIADD3", "LEA", "ULEA"):
        operands = [o.strip() for o in ins.operands.split(",")]
        return len(operands) > 2 and bool(_CARRY_OUT.fullmatch(operands[1]))
    return False


def barrier(ins: Instr, cta_threads: int) -> str | None:
    """"cta" (every thread of the CTA waits), "named" (a partial barrier: ``BAR.SYNC id, count`` / ``BAR.ARV id,
    count`` with a thread count below the CTA's, e.g. the 128-thread barriers of one warp-specialized warp
    group) or None (not a thread barrier). ``BAR.SYNC id`` without a count waits for the whole CTA; a count
    in a register is taken as partial; ``BAR.ARV`` never waits, it only signals a named barrier."""
    if ins.base != "BAR" or not ins.modifiers or ins.modifiers[0] not in ("SYNC", "ARV", "RED"):
        return None
    operands = [o.strip() for o in ins.operands.split(",") if o.strip()]
    if ins.modifiers[0] == "ARV":
        return "named"
    count_at = 2 if ins.modifiers[0] == "RED" else 1        # BAR.RED.POPC P, id[, count]: the count after the id
    if len(operands) <= count_at:
        return "cta"
    count = operands[count_at]
    if re.fullmatch(r"0x[0-9a-f]+|\d+", count):
        return "cta" if int(count, 0) >= cta_threads else "named"
    return "named"


def _access_bytes(ins: Instr) -> tuple[str, int] | None:
    """("load" | "store", bytes per lane) of a global memory access whose width the opcode names; atomics and
    reductions (``RED``, ``ATOMG``) count as stores. TMA copies (``UTMALDG``) name no width: not counted."""
    kind = {"LDG": "load", "LDGSTS": "load", "STG": "store", "RED": "store", "ATOMG": "store"}.get(ins.base)
    if kind is None:
        return None
    mods = ins.modifiers
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return kind, size
    return kind, 4


def setmaxnreg(ins: Instr) -> tuple[str, int] | None:
    """("alloc" | "dealloc", registers per thread) of a register reallocation (PTX ``setmaxnreg.inc/.dec``:
    sm_90a ``USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8`` / ``USETMAXREG.DEALLOC.CTAPOOL 0x28``)."""
    if ins.base not in ("USETMAXREG", "SETMAXREG", "SETMAXNREG"):
        return None
    count = ins.operands.split(",")[-1].strip()
    if not re.fullmatch(r"0x[0-9a-f]+|\d+", count):
        return None
    return ("dealloc" if "DEALLOC" in ins.modifiers else "alloc"), int(count, 0)


# The model's per-SM throughput per clock (NVIDIA's published figures; no GPU measured them here).
# - issue: warp-instructions per clock: 4 SM sub-partitions, each with one warp scheduler dispatching one
#   warp-instruction per clock ("NVIDIA A100 Tensor Core GPU Architecture" whitepaper, 2020, "A100 SM
#   Architecture"; "NVIDIA H100 Tensor Core GPU Architecture" whitepaper, 2022, "H100 SM Architecture").
# - tensor: dense multiply-adds per clock by input type. A100: 312 TFLOP/s FP16/BF16, 156 TF32, 624 INT8 TOPS,
#   19.5 FP64 at 108 SMs x 1,410 MHz (whitepaper Table 1) = 1,024 / 512 / 2,048 / 64 FMA per clock per SM.
#   H100 SXM5: 989 TFLOP/s dense FP16/BF16 at 132 SMs x 1,830 MHz = 2,048 FMA per clock per SM; the H100
#   whitepaper: "doubles the A100 raw SM computational power on all previous Tensor Core [...] data types,
#   clock-for-clock" (TF32 1,024, INT8 4,096, FP64 128) and FP8 at twice FP16 (4,096).
# - mufu: MUFU results (exp2, log2, rcp, rsqrt, sin, cos) per clock per SM: 16 on compute capability 8.0 and 9.0
#   (CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table).
# - fp32: FADD / FMUL / FFMA lanes per clock per SM: 64 on 8.0, 128 on 9.0 (the same table).
MODEL: dict[int, dict[str, Any]] = {
    80: dict(issue=4, mufu=16, fp32=64, tensor=dict(f16=1024, tf32=512, i8=2048, f64=64)),
    90: dict(issue=4, mufu=16, fp32=128, tensor=dict(f16=2048, tf32=1024, i8=4096, f8=4096, f64=128)),
}
# Warp-level MMA shapes (M, N, K) by the SASS shape suffix: HMMA.16816 = m16n8k16, DMMA.884 = m8n8k4, ...
_MMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "16864": (16, 8, 64),
               "8816": (8, 8, 16), "884": (8, 8, 4), "1684": (16, 8, 4)}


def _mma_work(ins: Instr) -> tuple[str, int, bool] | None:
    """(input type, multiply-adds, warpgroup-wide) of one tensor-core instruction, or None. ``HGMMA.64xNxK``
    is one MMA for the 4 warps of a warp group (each warp issues it); ``HMMA`` / ``IMMA`` / ``DMMA`` one per
    warp."""
    mods = set(ins.modifiers)
    if ins.base == "DMMA":
        kind = "f64"
    elif mods & {"E4M3", "E5M2"}:
        kind = "f8"
    elif "TF32" in mods:
        kind = "tf32"
    elif ins.base == "IMMA" or mods & {"S8", "U8"}:
        kind = "i8"
    else:
        kind = "f16"
    shape = ins.modifiers[0] if ins.modifiers else ""
    if ins.base == "HGMMA":
        m, n, k = (int(v) for v in shape.split("x"))
        return kind, m * n * k, True
    if ins.base in ("HMMA", "IMMA", "DMMA") and shape in _MMA_SHAPES:
        m, n, k = _MMA_SHAPES[shape]
        return kind, m * n * k, False
    return None


def model_cycles(body: list[Instr], arch: int | str | None, num_warps: int, work: int) -> dict | None:
    """A static model, not a measurement: SM clock cycles per 1,024 units of work (scores of attention) that
    each pipe needs for one loop's body, and the largest as the loop's bound.

    issue = warp-instructions / 4 per clock; tensor = multiply-adds of the tensor-core instructions / the SM's
    dense rate for their input type; mufu = MUFU lane results / 16 per clock; fp32 = FADD/FMUL/FFMA lanes / the
    FP32 rate (``MODEL``). The pipes are assumed to overlap perfectly and every lane is counted active, so the
    bound is a floor: a loop whose tensor-core work waits on its softmax (``wgmma`` wait depth 0, CTA barriers)
    runs nearer the sum. Use it to rank two compiles of the same loop, not to predict TFLOP/s. None for an
    architecture without constants in ``MODEL`` or without work."""
    family = MODEL.get(arch) if isinstance(arch, int) else None
    if family is None or not work:
        return None
    scale = num_warps * 1024 / work              # per-warp instruction count -> per 1,024 units
    fma = 0.0
    for x in body:
        if (mma := _mma_work(x)) is not None and mma[0] in family["tensor"]:
            kind, madds, group_wide = mma
            fma += madds / (4 if group_wide else 1) / family["tensor"][kind]
    cycles = {
        "issue": len(body) * scale / family["issue"],
        "tensor": fma * scale,
        "mufu": sum(x.base == "MUFU" for x in body) * 32 * scale / family["mufu"],
        "fp32": sum(x.base in ("FADD", "FMUL", "FFMA") for x in body) * 32 * scale / family["fp32"],
    }
    bound = max(cycles, key=lambda k: cycles[k])
    return {**{k: round(v, 1) for k, v in cycles.items()}, "bound": round(cycles[bound], 1), "limiter": bound}


def loop_stats(instrs: list[Instr], loop: Loop, num_warps: int, work: int, unit: str,
               arch: int | str | None = None, cta_threads: int | None = None) -> dict:
    """Counts of one loop's body, raw and normalized per ``work`` units of one iteration; ``num_warps``: the
    warps that run this loop (a warp-specialized partition's own); ``cta_threads``: the CTA's threads (every
    partition), which tell a CTA-wide barrier from a named one (default ``num_warps * 32``)."""
    body = [instrs[i] for i in loop.instrs]
    ops = Counter(x.opcode for x in body)
    bases = Counter(x.base for x in body)
    tc = Counter(t for x in body if (t := _tensor_core(x)))
    loads = Counter(t for x in body if (t := _global_load(x)))
    waits = Counter(x.operands.split(",")[-1].strip() for x in body if x.opcode.startswith("WARPGROUP.DEPBAR"))
    bars = Counter(barrier(x, cta_threads or num_warps * 32) for x in body)
    moved = Counter()
    for x in body:
        if (access := _access_bytes(x)) is not None:
            moved[access[0]] += access[1]
    n = len(body)

    def per_unit(count: float) -> float:
        return round(count * num_warps * 32 / work, 3) if work else 0.0

    ex2 = sum(c for op, c in ops.items() if op.startswith("MUFU.EX2"))
    return {
        "start": hex(instrs[loop.instrs[0]].addr) if body else None,
        "instructions": n,
        "warps": num_warps,
        f"warp_instructions_per_1k_{unit}": round(n * num_warps / work * 1024, 1) if work else None,
        "tensor_core": dict(sorted(tc.items())),
        f"ex2_per_{unit}": per_unit(ex2),
        f"fmul_per_{unit}": per_unit(bases["FMUL"]),
        f"ffma_per_{unit}": per_unit(bases["FFMA"]),
        "wgmma_wait_depths": dict(sorted(waits.items())),
        "cta_barriers": bars["cta"],
        "named_barriers": bars["named"],
        "global_loads": dict(sorted(loads.items())),
        # bytes per unit through LDG / LDGSTS (load) and STG / RED / ATOMG (store), every lane active; TMA not
        # counted (its box size is not in the instruction)
        f"global_bytes_per_{unit}": {k: per_unit(moved[k]) for k in ("load", "store")},
        "int64_ops": sum(1 for x in body if _int64(x)),
        # of which on the uniform datapath (one per warp, e.g. the 64-bit wgmma descriptor adds UIADD3.64)
        "int64_uniform_ops": sum(1 for x in body if _int64(x) and x.base.startswith("U")),
        "local_memory": bases["LDL"] + bases["STL"],
        "model_cycles_per_1k": model_cycles(body, arch, num_warps, work),
        "opcodes": dict(ops.most_common()),
    }


def _role(stats: dict) -> str:
    """A warp-specialized loop's role: "producer" (global / TMA loads, no tensor-core or MUFU work), "consumer"
    (tensor-core or MUFU work, no loads) or "mixed" (both)."""
    computes = bool(stats["tensor_core"]) or any(op.startswith("MUFU") for op in stats["opcodes"])
    loads = bool(stats["global_loads"])
    return "producer" if loads and not computes else "consumer" if computes and not loads else "mixed"


def _partition_registers(instrs: list[Instr], labels: dict[str, int], headers: list[int]) -> dict[int, int | None]:
    """{loop header: registers per thread set by the nearest ``setmaxnreg`` that dominates it, or None}."""
    ranges, succs = _blocks(instrs, labels)
    dom = _dominators(len(ranges), succs)
    block_of = {i: b for b, (s, e) in enumerate(ranges) for i in range(s, e)}
    out: dict[int, int | None] = {}
    for header in headers:
        b = block_of[header]
        # the dominators of a block form a chain: the deepest one (most dominators itself) is the nearest
        chain = sorted(dom[b], key=lambda d: len(dom[d]), reverse=True)
        regs = None
        for d in chain:
            s, e = ranges[d]
            found = [r[1] for i in range(s, min(e, header) if d == b else e) if (r := setmaxnreg(instrs[i]))]
            if found:
                regs = found[-1]
                break
        out[header] = regs
    return out


def analyze(cubin: bytes, num_warps: int, work: int, unit: str = "scores", arch: int | str | None = None,
            cta_warps: int | None = None, partition_warps: int | None = None) -> dict:
    """SASS facts of the kernel in ``cubin``: whole-function counts and one entry per steady-state loop.

    ``work``: units one iteration of a steady-state loop processes (BLOCK_M x BLOCK_N scores of attention,
    BLOCK_N elements of a row kernel). A function without loops reports its straight-line body under
    ``loops`` with ``straight_line: true`` (per program, normalized by ``work`` as well). ``arch``: for the
    cycle model (``model_cycles``). ``cta_warps``: the CTA's warps with every warp-specialized partition
    (triton's metadata ``num_warps``; default ``num_warps``). ``partition_warps``: the warps of each partition
    when the kernel is warp-specialized (all the same), which normalize the loops a ``setmaxnreg`` leads to."""
    return analyze_text(disassemble(cubin), num_warps, work, unit, arch, cta_warps, partition_warps)


def analyze_text(text: str, num_warps: int, work: int, unit: str = "scores", arch: int | str | None = None,
                 cta_warps: int | None = None, partition_warps: int | None = None) -> dict:
    """``analyze`` of a disassembly's text.

    Warp-specialized kernels (a ``setmaxnreg`` in the SASS): each steady-state loop reports the registers its
    partition runs with (``setmaxnreg``) and its role (producer / consumer); ``partitions`` lists the
    reallocations in code order; the partitions' loops run at the same time, so ``model_cycles_per_1k``
    of the kernel adds their pipes' cycles (each loop normalized by the full tile's work) and takes the largest."""
    functions = parse(text)
    if len(functions) != 1:
        raise RuntimeError(f"expected one kernel function in the cubin, found {sorted(functions)}")
    (name, (instrs, labels)), = functions.items()
    loops = find_loops(instrs, labels)
    steady = sorted((lp for lp in loops if lp.innermost), key=lambda lp: lp.header)
    bases = Counter(x.base for x in instrs)
    realloc = [{"at": hex(x.addr), "kind": r[0], "registers": r[1]} for x in instrs if (r := setmaxnreg(x))]
    cta_threads = (cta_warps or num_warps) * 32
    report = {"function": name, "instructions": len(instrs), "num_warps": num_warps,
              "cta_warps": cta_warps or num_warps, "work_per_iteration": work, "unit": unit,
              "local_memory": bases["LDL"] + bases["STL"], "partitions": realloc, "loops": []}
    if steady:
        regs = _partition_registers(instrs, labels, [lp.header for lp in steady]) if realloc else {}
        for loop in steady:
            r = regs.get(loop.header)
            warps = partition_warps if r is not None and partition_warps else num_warps
            stats = loop_stats(instrs, loop, warps, work, unit, arch, cta_threads)
            report["loops"].append({**stats, "setmaxnreg": r, "role": _role(stats) if realloc else None})
        specialized = [lp for lp in report["loops"] if lp["setmaxnreg"] is not None]
        models = [lp["model_cycles_per_1k"] for lp in specialized]
        if models and all(models):
            total = {k: round(sum(m[k] for m in models), 1) for k in ("issue", "tensor", "mufu", "fp32")}
            limiter = max(total, key=lambda k: total[k])
            report["model_cycles_per_1k"] = {**total, "bound": total[limiter], "limiter": limiter}
    else:
        everything = Loop(header=0, blocks=set(), instrs=list(range(len(instrs))))
        stats = loop_stats(instrs, everything, num_warps, work, unit, arch, cta_threads)
        report["loops"].append({**stats, "setmaxnreg": None, "role": None, "straight_line": True})
    return report

"""Static byte efficiency of the memory-bound kernels, from the SASS of ``python -m fused_kernels.aot --sass``:

    python -m fused_kernels.aot --family cross_entropy rotary gated_mlp --sass --json aot.json
    python -m bench.static_bytes aot.json

For each steady-state loop (or straight-line body) of the row / elementwise kernels, the global bytes its
load and store instructions request per iteration (``LDG`` / ``STG`` / ``LDGSTS``: width x 32 lanes x warps,
every lane counted, masked or not) against the one-read-one-write count of the work it does (each element of
its inputs read once and of its outputs written once): ``minimal / issued``, 100% when nothing is read or
written twice and no lane idles. For the softmax part of the linear cross-entropy it also gives the whole-row
figure at the issue's vocabulary (131,072): the row's logits read once and gradients written once against that
plus the per-tile partials the row's statistics come from (written by the logits kernel's epilogue, read back
once), with the tiles of the configuration.
"""

from __future__ import annotations

import json
import re
import sys

# (reads, writes) of elements per unit of work, per kernel and flag set
ELEMENT_IO = {
    "_rope_kernel": (1, 1),
    "_glu_fwd_kernel": (2, 1),
    "_glu_bwd_kernel": (3, 2),
    "_ce_softmax_kernel": (1, 1),
    "_ce_stats_kernel": (1, 0),
}
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
MEMORY_OPS = ("LDG", "STG", "LDGSTS")


def issued_bytes(opcodes: dict[str, int], warps: int) -> int:
    """Global bytes a loop body's loads and stores request: width x 32 lanes x warps per instruction."""
    total = 0
    for op, count in opcodes.items():
        parts = op.split(".")
        if parts[0] not in MEMORY_OPS:
            continue
        width = next((_WIDTH[p] for p in parts[1:] if p in _WIDTH), 4)
        total += count * width * 32 * warps
    return total


def rows(report: dict) -> list[dict]:
    out = []
    for row in report["rows"]:
        io = ELEMENT_IO.get(row["kernel"])
        if io is None or not row.get("sass"):
            continue
        warps = row["options"].get("num_warps", 4)
        elt = ELEMENT_BYTES[row["dtype"]]
        for i, loop in enumerate(row["sass"]["loops"]):
            issued = issued_bytes(loop["opcodes"], warps)
            if not issued:
                continue          # the softmax kernel's partials-combining loop: accounted in whole_row below
            reads, writes = io
            loads = sum(c for op, c in loop["opcodes"].items() if op.split(".")[0] in ("LDG", "LDGSTS"))
            stores = sum(c for op, c in loop["opcodes"].items() if op.startswith("STG"))
            if row["kernel"] == "_ce_softmax_kernel" and not (loads and stores):
                # its other loops: combining the row's partials (counted in whole_row) and the zero gradient of
                # an ignored row (no logits read); the gradient pass is the loop that loads and stores
                continue
            minimal = row["work"] * elt * (reads + writes)
            out.append(dict(kernel=row["kernel"], config=row["config"], arch=row["gpu_name"], loop=i,
                            issued=issued, minimal=minimal, efficiency=minimal / issued, loads=loads, stores=stores))
    return out


def whole_row(report: dict, vocab: int = 131072) -> list[dict]:
    """The softmax part per row at ``vocab``: one read of the logits and one write of the gradients, against
    that plus the float32 partials (max, sum, and with label smoothing the logit sum) written and read once."""
    out = []
    for row in report["rows"]:
        if row["kernel"] != "_ce_softmax_kernel" or "GRAD_MODE=0" in row["config"] or "given-logits" in row["config"]:
            continue
        tiles = [r for r in report["rows"] if r["kernel"] == "_lce_logits_kernel" and r["gpu_name"] == row["gpu_name"]
                 and r["dtype"] == row["dtype"]]
        if not tiles:
            continue
        block_n = int(re.search(r" N(\d+) ", tiles[0]["config"]).group(1))
        parts = -(-vocab // block_n)
        elt = ELEMENT_BYTES[row["dtype"]]
        stats = 3 if "SMOOTH" in row["config"] else 2
        minimal = 2 * vocab * elt
        extra = 2 * stats * parts * 4 + 4 * 4            # partials written + read, target logit, loss, lse
        out.append(dict(config=row["config"], arch=row["gpu_name"], vocab=vocab, block_n=block_n,
                        efficiency=minimal / (minimal + extra)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    with open(args[0]) as f:
        report = json.load(f)
    print(f"triton {report['triton']}: bytes requested per steady-state iteration vs one read + one write")
    print(f"{'kernel':20s} {'config':58s} {'arch':7s} {'loop':4s} {'issued B':>9s} {'minimal B':>9s} {'eff':>6s}")
    for r in rows(report):
        print(f"{r['kernel']:20s} {r['config'][:58]:58s} {r['arch']:7s} {r['loop']:<4d} {r['issued']:9d} "
              f"{r['minimal']:9d} {r['efficiency']:6.1%}")
    print("\nsoftmax part of the linear cross-entropy, whole row (logits read once, gradient written once, plus "
          "the per-tile partials):")
    for r in whole_row(report):
        print(f"  {r['config'][:60]:60s} {r['arch']:7s} V={r['vocab']} BLOCK_N={r['block_n']}: {r['efficiency']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention constants and launch configurations, every tile table of the attention kernels in one place: the
dense kernels per kind, head dim, dtype family and architecture (``attention_config``), the packed varlen
kernels (``varlen_config``) and the paged kernel (``paged_config``), the dot precision, and the flash-decoding
split count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton

from ..._core.launch import ArchValue, arch_family, dtype_family, next_pow2

MAX_HEAD_DIM = 256
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Flash-decoding: used when there are at most this many queries, the GQA group's rows fit one tile
# and the keys are long enough to be worth splitting.
DECODE_MAX_L = 16
DECODE_MAX_ROWS = 64
DECODE_MIN_S = 256

# ----------------------------------------------------------------------------- configs


# A tile entry's key: (dtype family, kernel kind, head-dim bucket, dropout); its value (BLOCK_M, BLOCK_N,
# num_warps, num_stages).
TileKey = tuple[str, str, int, bool]
Tile = tuple[int, int, int, int]
# The entry meaning "no Triton kernel here": on this column every tile the compiler was given for the key spills
# or needs more shared memory than the GPU has. A call that would run it takes the PyTorch path (``has_kernels``:
# forward and backward together when gradients are wanted) and ``python -m fused_kernels.aot`` does not compile it.
NO_KERNEL: Tile = (0, 0, 0, 0)

# Tiles per kernel kind and head-dim bucket (64, 128, 256): (BLOCK_M, BLOCK_N, num_warps, num_stages) of the two
# columns every other column starts from, sm_80 (A100) and sm_90 (H100), and the same two with dropout (the
# in-kernel RNG is register-hungry; the variants' "heavy" configurations use the same column). 16-bit dtypes run
# on tensor cores; on sm_90 their d <= 128 kernels stream tiles with TMA. float32 dots are true fp32 (or tf32) and
# float64 is the correctness dtype: small tiles. Each entry is what `python -m fused_kernels.aot --sass` reads best
# among the configurations that compile without spills.
_TILES = {
    "16bit": {
        #                  sm_80               sm_90               sm_80 + dropout     sm_90 + dropout
        ("fwd", 64):       ((128, 128, 8, 3),  (128, 128, 8, 3),   (128, 32, 8, 3),    (128, 32, 8, 3)),
        ("fwd", 128):      ((128, 64, 8, 2),   (128, 128, 8, 2),   (64, 32, 8, 2),     (128, 32, 8, 2)),
        ("fwd", 256):      ((64, 64, 8, 2),    (128, 64, 8, 2),    (64, 32, 8, 2),     (64, 32, 8, 2)),
        ("decode", 64):    ((0, 64, 4, 3),     (0, 64, 4, 3),      (0, 64, 4, 3),      (0, 64, 4, 2)),
        ("decode", 128):   ((0, 64, 4, 3),     (0, 64, 4, 3),      (0, 64, 4, 3),      (0, 64, 4, 3)),
        ("decode", 256):   ((0, 32, 4, 2),     (0, 32, 4, 2),      (0, 32, 4, 2),      (0, 32, 4, 2)),
        ("bwd_dkdv", 64):  ((32, 64, 4, 1),    (64, 128, 8, 2),    (32, 32, 8, 1),     (32, 32, 4, 1)),
        ("bwd_dkdv", 128): ((64, 64, 8, 1),    (32, 128, 8, 2),    (16, 32, 4, 2),     (32, 32, 8, 1)),
        ("bwd_dkdv", 256): ((16, 32, 8, 1),    (16, 32, 8, 1),     (64, 16, 8, 1),     (64, 16, 8, 1)),
        ("bwd_dq", 64):    ((64, 32, 4, 2),    (128, 64, 8, 2),    (64, 32, 8, 2),     (64, 32, 8, 3)),
        ("bwd_dq", 128):   ((64, 32, 4, 2),    (128, 128, 8, 2),   (64, 32, 8, 2),     (64, 32, 8, 2)),
        ("bwd_dq", 256):   ((32, 32, 4, 1),    (32, 32, 4, 1),     (32, 32, 8, 1),     (32, 32, 8, 1)),
    },
    "fp32": {
        ("fwd", 64):       ((32, 32, 4, 1),    (32, 32, 4, 1),     (32, 32, 8, 1),     (32, 32, 8, 1)),
        ("fwd", 128):      ((32, 16, 8, 1),    (32, 16, 8, 1),     (32, 16, 8, 1),     (32, 16, 4, 1)),
        ("fwd", 256):      ((32, 16, 8, 1),    (32, 16, 8, 1),     (32, 16, 4, 1),     (32, 16, 4, 1)),
        ("decode", 64):    ((0, 32, 4, 1),     (0, 32, 4, 1),      (0, 32, 8, 1),      (0, 32, 8, 1)),
        ("decode", 128):   ((0, 16, 8, 1),     (0, 16, 8, 1),      (0, 16, 8, 1),      (0, 16, 8, 1)),
        ("decode", 256):   ((0, 16, 8, 1),     (0, 16, 8, 1),      (0, 16, 8, 1),      (0, 16, 8, 1)),
        ("bwd_dkdv", 64):  ((16, 32, 4, 1),    (16, 32, 4, 1),     (32, 64, 8, 1),     (32, 64, 8, 1)),
        ("bwd_dkdv", 128): ((16, 32, 8, 1),    (16, 32, 8, 1),     (16, 64, 8, 1),     (16, 16, 4, 1)),
        ("bwd_dkdv", 256): ((16, 16, 8, 1),    (16, 16, 8, 1),     (32, 16, 8, 1),     (32, 16, 8, 1)),
        ("bwd_dq", 64):    ((32, 32, 4, 1),    (32, 32, 4, 1),     (16, 32, 4, 1),     (16, 32, 4, 1)),
        ("bwd_dq", 128):   ((32, 16, 8, 1),    (32, 16, 8, 1),     (32, 16, 8, 1),     (32, 16, 8, 1)),
        ("bwd_dq", 256):   ((32, 16, 8, 1),    (32, 16, 8, 1),     (16, 16, 4, 1),     (16, 16, 4, 1)),
    },
    # fp64 backward at d=256: no Triton kernel on any column (NO_KERNEL: the PyTorch path): 16 x 16 tiles
    # need 131,072-133,120 B of shared memory (over sm_86 / sm_89 / sm_120's 101,376 B, V100's 96 KB, T4's 64 KB)
    # and spill 40-700 B where they fit (sm_80, sm_90a, sm_100a; 208-532 B of scratch on CDNA)
    "fp64": {(kind, d): (NO_KERNEL if d == 256 and kind.startswith("bwd") else (16, 16, 8 if d > 64 else 4, 1),) * 4
             for kind in ("fwd", "decode", "bwd_dkdv", "bwd_dq") for d in (64, 128, 256)},
}

_KINDS = ("fwd", "decode", "bwd_dkdv", "bwd_dq")


@dataclass(frozen=True)
class Column:
    """One architecture family's column of the tile table (``fused_kernels._core.launch.ARCH_FAMILIES`` names the
    families and their limits): the column it starts from and the entries the compiler made it change.

    ``tiles``: ``attention_config`` entries; ``tma`` (the column's own, not inherited from its base): the dense
    16-bit kernels at d <= 128 stream tiles through TMA descriptors; ``pointer_base``: the column whose tiles the
    packed varlen kernels (pointer loads only) start from, where this column's are sized for TMA; ``varlen``:
    entries of the packed kernels where the per-sequence bookkeeping changes a tile; ``decode_stages``: pipeline
    stages of the paged decode kernel, (dtype family, head-dim bucket) -> stages; ``paged``: whole tiles of the
    paged kernel ("decode" and "fwd" keys, without dropout) where its page lookups change one, ahead of
    ``decode_stages``; ``split_blocks`` (the column's
    own): the dense 16-bit dK/dV kernel walks its query blocks in three loops (causal diagonal, mask-free, tail:
    ``SPLIT_BLOCKS``) rather than one with every mask on."""

    base: str | None = None
    tiles: dict[TileKey, Tile] = field(default_factory=dict)
    tma: bool = False
    pointer_base: str | None = None
    varlen: dict[TileKey, Tile] = field(default_factory=dict)
    decode_stages: dict[tuple[str, int], int] = field(default_factory=dict)
    paged: dict[TileKey, Tile] = field(default_factory=dict)
    split_blocks: bool = True


def _base_tiles(index: int) -> dict[TileKey, Tile]:
    """Column ``index`` (0: sm_80, 1: sm_90) of ``_TILES``, with and without dropout."""
    return {(dtypes, kind, d, dropout): row[2 * dropout + index]
            for dtypes, table in _TILES.items() for (kind, d), row in table.items() for dropout in (False, True)}


# The tile table: one column per architecture family (``ARCH_FAMILIES``, and "generic" for a GPU not listed).
# Each entry that differs from the column it starts from is one ``python -m fused_kernels.aot --arch ...``
# rejected there (spills, shared memory over the family's limit); docs/architectures.md lists what was compiled
# for each column, with its registers and shared memory.
COLUMNS: dict[str, Column] = {
    "sm_80": Column(tiles=_base_tiles(0),
                    # the per-sequence bookkeeping pushed these into spills (--family varlen)
                    varlen={("16bit", "fwd", 64, True): (64, 32, 4, 2),
                            ("16bit", "bwd_dkdv", 128, True): (16, 16, 4, 2),
                            ("fp32", "fwd", 64, True): (16, 32, 4, 1),
                            ("fp32", "bwd_dkdv", 64, True): (16, 16, 8, 1),
                            # 64 x 16 spills 20+24 B here (triton 3.9)
                            ("16bit", "bwd_dkdv", 256, True): (32, 16, 8, 1)},
                    # fp32 d=128 spilled 8+4 B with 1 stage (--family paged)
                    decode_stages={("fp32", 128): 2}),
    # sm_90's 16-bit tiles are sized for TMA: with pointer loads they spill, so the packed kernels start from
    # sm_80's.
    # fp64 forward at d=256: NO_KERNEL (16 x 16 spilled 60-108 B, flash-decoding 24+20 B, on sm_90a and sm_100a)
    # fp32 d=256 dQ without dropout: 32 x 16 spilled 28+28 B (causal, sm_90a)
    "sm_90": Column(tiles={**_base_tiles(1), **{("fp64", kind, 256, dropout): NO_KERNEL for kind in ("fwd", "decode")
                                               for dropout in (False, True)},
                           ("fp32", "bwd_dq", 256, False): (16, 16, 8, 1)},
                    tma=True, pointer_base="sm_80",
                    varlen={("16bit", "bwd_dkdv", 128, False): (32, 32, 8, 1),
                            ("16bit", "bwd_dkdv", 128, True): (16, 16, 8, 1),
                            # sm_80's triton 3.9 tile (32 x 32) spills 72+124 B in the packed form here
                            ("fp32", "bwd_dq", 128, True): (32, 16, 8, 1)},
                    # 16-bit d=128 spilled 4+4 B with 3 stages (16-key tiles)
                    decode_stages={("16bit", 128): 2}),
    # 99 KB of shared memory: sm_80's d=256 forward needs 106,496 B (two stages of 64-key tiles); its dropout
    # tile (64 x 32, two stages) needs 73,728 B, its d=256 dK/dV with dropout (64 x 16) 114,688 B. sm_80's d=128
    # dK/dV with dropout spills 16+8 B here (4 warps).
    "sm_86": Column("sm_80", tiles={("16bit", "fwd", 256, False): (64, 32, 8, 2),
                                    ("16bit", "bwd_dkdv", 128, True): (16, 32, 8, 2),
                                    # sm_80's 16 x 64 spills 28+28 B in the packed form here (and needs
                                    # 86,016 B, over T4's 64 KB): the tile sm_80 had before
                                    ("fp32", "bwd_dkdv", 128, True): (16, 32, 8, 1),
                                    # the tile its descendants were compiled with (sm_80's triton 3.9
                                    # override needs 65,536 B, all of T4's shared memory)
                                    ("fp32", "bwd_dq", 128, True): (32, 16, 8, 1),
                                    ("16bit", "bwd_dkdv", 256, True): (32, 32, 8, 1),
                                    # 8+4 B spilled with 8 warps (fp32 flash-decoding with dropout, d=256)
                                    ("fp32", "decode", 256, True): (0, 16, 4, 1),
                                    # 4 warps spilled 24+36 B (--arch all: 86, 89, 120); 2 are clean
                                    ("fp64", "bwd_dkdv", 64, True): (16, 16, 2, 1),
                                    # fp64 at d=64 without dropout (causal): the dK/dV spilled 16+32 B with 4 or 8
                                    # warps at 16 x 16 (24+48 B with 2), the dQ 12+12 B with 4
                                    ("fp64", "bwd_dkdv", 64, False): (32, 16, 8, 1),
                                    ("fp64", "bwd_dq", 64, False): (16, 16, 2, 1)},
                    # --arch all, the packed form: sm_80's 16 x 16 x 4 x 2 spilled 20+16 B (16-bit d=128 dK/dV with
                    # dropout) and 32 x 16 28+28 B (fp32 d=256 dK/dV with dropout) here
                    varlen={("16bit", "bwd_dkdv", 128, True): (16, 16, 8, 1),
                            ("fp32", "bwd_dkdv", 256, True): (16, 16, 8, 1)},
                    # --arch all, the paged kernel: fp32 d=256 decode 8 warps spilled 8+8 B, the fp64 d=128 prefill
                    # with per-row page lookups 4+4 B (sm_75 and sm_70 inherit these: 24+12 B on sm_70)
                    paged={("fp32", "decode", 256, False): (0, 16, 4, 1), ("fp64", "fwd", 128, False): (16, 16, 4, 1)}),
    # sm_86's tiles (mma.sync, pointer loads: TMA was neither compiled nor measured here with them), but the d=64
    # dK/dV, whose causal form spills 40+52 B with 4 warps. Hopper's (TMA) tiles spill here (issue 28).
    # fp64 d=64 dQ with dropout spills 24+36 B with 4 warps (--arch all), as sm_86's dK/dV does: 2 warps.
    "sm_120": Column("sm_86", tiles={("16bit", "bwd_dkdv", 64, False): (32, 64, 8, 1),
                                     ("fp64", "bwd_dq", 64, True): (16, 16, 2, 1),
                                     # sm_86's 16 x 32 spills 24+24 B with dropout here; sm_80's is clean
                                     ("fp32", "bwd_dkdv", 128, True): (16, 64, 8, 1),
                                     # 8 warps spilled 12+12 B ("all", 80 registers): 4
                                     ("fp32", "fwd", 128, True): (32, 16, 4, 1),
                                     # without dropout (causal): sm_86's fp64 d=64 dK/dV is clean with 2 warps
                                     # here, its dQ's 2 warps spilled 16+32 B (8 are clean); fp64 d=128 dQ 8+16 B
                                     # with one stage; sm_80's fp32 d=128 dQ 32 x 32 spilled 72+132 B (32 x 16 is
                                     # clean here)
                                     ("fp64", "bwd_dkdv", 64, False): (16, 16, 2, 1),
                                     ("fp64", "bwd_dq", 64, False): (16, 16, 8, 1),
                                     ("fp64", "bwd_dq", 128, False): (16, 16, 8, 2),
                                     ("fp32", "bwd_dq", 128, False): (32, 16, 8, 1)},
                     # sm_80's packed fp32 d=64 dK/dV with dropout (16 x 16 x 8 warps) spills 8+8 B here: the dense
                     # tile (14,560 instructions per 1k scores)
                     varlen={("fp32", "bwd_dkdv", 64, True): (32, 64, 8, 1),
                             # the dense 4 warps spill 312+352 B in the packed form: 8, as before
                             ("fp32", "fwd", 128, True): (32, 16, 8, 1),
                             # sm_86's 16 x 16 spills 48+80 B here; 32 x 16 (sm_80's) is clean
                             ("fp32", "bwd_dkdv", 256, True): (32, 16, 8, 1),
                             # sm_80's 32 x 16 x 8 spilled 16+32 B (fp32 dQ, 4 warps 200+296 B), sm_86's 64 x 32 x 8 x 2
                             # 32+36 B (16-bit forward) here
                             ("fp32", "bwd_dq", 128, True): (16, 32, 8, 1),
                             ("16bit", "fwd", 128, True): (64, 32, 8, 1)},
                     # the paged kernel in fp64: the d=64 prefill with per-row page lookups spilled 8+8 B with 4
                     # warps, the d=128 decode 16+16 B (8 warps, one stage; 16+8 B with 4), the d=256 prefill 8-20 B
                     # with 8 warps
                     paged={("fp64", "fwd", 64, False): (16, 16, 8, 1), ("fp64", "decode", 128, False): (0, 16, 8, 2),
                            ("fp64", "fwd", 256, False): (16, 16, 4, 1)}),
    # sm_90's tiles (TMA; triton lowers tl.dot to tcgen05 here), but those that spill 28-1,136 B with tcgen05:
    # 64 x 64 dK/dV tiles of one stage (sm_90's with one stage still spill 4-8 B), 64-row dQ / d=256 forward tiles.
    "sm_100": Column("sm_90", tma=True, tiles={("16bit", "bwd_dkdv", 64, False): (64, 64, 8, 1),
                                               ("16bit", "bwd_dkdv", 128, False): (64, 64, 8, 1),
                                               ("16bit", "bwd_dq", 128, False): (64, 64, 8, 2),
                                               ("16bit", "fwd", 256, False): (64, 64, 8, 2),
                                               # --arch all: sm_90's 32 x 16 spilled 4+4 B with tcgen05's
                                               # registers (80), 4 warps 756+740 B, 32 x 32 364+424 B
                                               ("fp32", "bwd_dq", 128, True): (16, 16, 8, 1)}),
    # No tensor cores for bf16 (and none triton uses for fp16) below sm_80: 16-bit inputs run in fp32 math
    # (``upcast_16bit``) at sm_80's true-fp32 tiles, but where those spill (8-56 B) or need more than T4's 64 KB
    # of shared memory (d=256 backward: 98,304 / 100,352 B): 16 x 16 tiles. No Triton kernel for the dK/dV at
    # d=256 (66,560 B at 16 x 16, the smallest tile a dot takes, 16-bit in fp32 math and fp32, with or without
    # dropout) and with dropout in fp64 at d=128 (67,584 B): those calls take the PyTorch path on a T4.
    "sm_75": Column("sm_86", tiles={
        **{("16bit", kind, d, dropout): tile for (dtypes, kind, d, dropout), tile in _base_tiles(0).items()
           if dtypes == "fp32"},
        ("16bit", "bwd_dkdv", 64, True): (16, 16, 8, 1), ("16bit", "bwd_dkdv", 128, True): (16, 16, 8, 1),
        ("16bit", "bwd_dkdv", 256, True): NO_KERNEL, ("16bit", "bwd_dq", 64, True): (16, 16, 4, 1),
        ("16bit", "bwd_dq", 128, False): (16, 16, 8, 1), ("16bit", "bwd_dq", 256, False): (16, 16, 8, 1),
        ("fp32", "bwd_dkdv", 256, True): NO_KERNEL, ("fp64", "bwd_dkdv", 128, True): NO_KERNEL,
        ("16bit", "bwd_dkdv", 256, False): NO_KERNEL, ("fp32", "bwd_dkdv", 256, False): NO_KERNEL,
        # --arch all: 32 x 32 spilled 8+4 B (causal, and the packed form); 16 x 32 is clean
        ("16bit", "bwd_dq", 64, False): (16, 32, 4, 1),
        # 8 warps spilled 4+4 B ("all": ptxas gives them 80 registers here)
        ("fp32", "fwd", 128, True): (32, 16, 4, 1),
        # 36-100 B spilled at 16 x 16 with 4 warps, 4-16 B with 8, 44 B with 2 (ptxas gives 8 warps 80 registers
        # and 2 warps 255 here)
        ("fp64", "bwd_dkdv", 64, True): NO_KERNEL,
        # the fp64 forward at d=256 needs 98,304 B at 16 x 16 (flash-decoding and the paged kernel too)
        **{("fp64", kind, 256, dropout): NO_KERNEL for kind in ("fwd", "decode") for dropout in (False, True)},
        # without dropout (causal): the fp64 d=128 dK/dV needs 67,584 B as with it; the fp32 d=128 dQ spilled 4+4 B
        # with 8 warps; the fp64 d=64 dK/dV keeps its 4 warps (clean here, sm_86's entry is not)
        ("fp64", "bwd_dkdv", 128, False): NO_KERNEL, ("fp32", "bwd_dq", 128, False): (32, 16, 4, 1),
        ("fp64", "bwd_dkdv", 64, False): (16, 16, 4, 1)},
        # the packed 16-bit d=128 dQ spilled 4+4 B with 8 warps (64 registers), the packed d=64 dK/dV 8+4 B at 16 x 32
        # x 4 warps (causal)
        varlen={("16bit", "bwd_dq", 128, False): (16, 16, 4, 1), ("16bit", "bwd_dkdv", 64, False): (16, 32, 8, 1)},
        # the paged 16-bit d=128 prefill: 8 warps spilled 8-16 B (64 registers)
        paged={("16bit", "fwd", 128, False): (32, 16, 4, 1)}),
    # sm_75's, but the dK/dV with dropout: 4 warps at d <= 128 (8 spill 68-132 B here), 8 at d=256 (4 spill 80 B;
    # V100's 96 KB take its 66,560 B, and fp64's 67,584 B at d=128). The d=256 dK/dV without dropout keeps sm_75's
    # "no kernel": 16 x 16 x 8 warps spilled 8+4 B here (16-bit in fp32 math, 128 registers).
    "sm_70": Column("sm_75", tiles={("16bit", "bwd_dkdv", 64, True): (16, 16, 4, 1),
                                    ("16bit", "bwd_dkdv", 128, True): (16, 16, 4, 1),
                                    # --arch all: 8 warps spilled 64+64 B (fp16, "heavy": 128 registers)
                                    ("16bit", "bwd_dkdv", 256, True): (16, 16, 4, 1),
                                    ("fp32", "bwd_dkdv", 256, True): (16, 16, 8, 1),
                                    ("fp64", "bwd_dkdv", 128, True): (16, 16, 8, 1),
                                    # sm_75's "no kernel" (T4 spills it): clean here
                                    ("fp64", "bwd_dkdv", 64, True): (16, 16, 4, 1),
                                    # 8 warps spilled 8+8 B at 128 registers: 4
                                    ("fp32", "bwd_dq", 128, True): (32, 16, 4, 1),
                                    # without dropout (causal): fp32 d=64 dK/dV 16 x 32 spilled 16+32 B, d=128 8+16 B,
                                    # the fp64 d=128 forward 12+12 B with 8 warps; sm_75's "no kernel" fp64 d=128
                                    # dK/dV (67,584 B) fits V100's 96 KB
                                    ("fp32", "bwd_dkdv", 64, False): (16, 16, 4, 1),
                                    ("fp32", "bwd_dkdv", 128, False): (16, 16, 8, 1),
                                    ("fp64", "fwd", 128, False): (16, 16, 4, 1),
                                    ("fp64", "bwd_dkdv", 128, False): (16, 16, 8, 1),
                                    # sm_75's "no kernel": V100's 96 KB hold the fp64 d=256 forward's 98,304 B
                                    **{("fp64", kind, 256, dropout): (16, 16, 8, 1) for kind in ("fwd", "decode")
                                       for dropout in (False, True)}},
                    varlen={("fp64", "bwd_dkdv", 128, True): (16, 16, 4, 1),      # 104+104 B with 8 warps
                            # the dense 4 warps spill 24+20 B in the packed form: 8, as before
                            ("16bit", "bwd_dkdv", 256, True): (16, 16, 8, 1),
                            # --arch all, the packed form: 32 x 32 and 16 x 32 spilled 4+4 B (dQ, d=64), 8 warps
                            # 4+4 B (forward, d=128), 4 warps 4+4 B (dQ, fp32 d=256; sm_75's 16-bit d=128 16 x
                            # 16 x 4 spilled 4+4 B here, 8 warps are clean)
                            ("16bit", "bwd_dq", 64, False): (16, 16, 4, 1),
                            ("16bit", "fwd", 128, False): (32, 16, 4, 1),
                            ("fp32", "bwd_dq", 256, True): (16, 16, 8, 1),
                            ("16bit", "bwd_dq", 128, False): (16, 16, 8, 1),
                            # the tile it had (clean here), not sm_75's packed 8 warps
                            ("16bit", "bwd_dkdv", 64, False): (16, 32, 4, 1)}),
    # AMD CDNA: 64 KB of LDS, 64-wide waves. sm_80's tiles with 4 waves (8 put two waves of a block on a SIMD and
    # halve each one's registers: 256 VGPRs spilled up to 940 B of scratch at d=128 / 256) and without software
    # pipelining (triton's AMD stream pipeliner buffers every further stage in LDS).
    # The d=128 dK/dV at 64 x 64 spills 1-84 VGPRs into AGPRs (causal / MHA): 32 x 64, at most 2.
    "gfx90a": Column("sm_80", tiles={**{key: tile if tile == NO_KERNEL else (tile[0], tile[1], 4, 1)
                                        for key, tile in _base_tiles(0).items()},
                                     ("16bit", "bwd_dkdv", 128, False): (32, 64, 4, 1),
                                     # 64 x 16 at d=256 with dropout: 244-404 B of scratch on gfx942
                                     ("16bit", "bwd_dkdv", 256, True): (32, 16, 4, 1),
                                     # 508 B of scratch on gfx942 at 32 x 16
                                     ("fp32", "bwd_dkdv", 256, True): (16, 16, 4, 1)}),
    "gfx942": Column("gfx90a"),
    # RDNA3: 256 VGPRs a lane, 32-wide waves: sm_80's 16-bit tiles spill up to 2.5 KB of scratch, its fp32
    # (FMA-sized) ones up to 2.2 KB but at d=64 in the forward: 16 x 16 tiles, without pipelining. No Triton kernel
    # (12 B to 7 KB of scratch at every tile tried, more with 4 warps): the 16-bit backward at d >= 128, the d=256
    # forward, fp32 / fp64 above d=64, the fp64 backward with dropout; those calls take the PyTorch path
    # (docs/architectures.md). The 16-bit dK/dV in one query loop (split_blocks off): with three its d=64 MHA
    # causal form spilled 36 B of scratch at 16 x 16 (20-492 B at every other tile), in one it is clean.
    "gfx1100": Column("gfx90a", split_blocks=False, tiles={
        **{("16bit", kind, d, dropout): (16, 16, 8, 1) for kind in ("fwd", "bwd_dkdv", "bwd_dq") for d in (64, 128, 256)
           for dropout in (False, True)},
        ("16bit", "fwd", 64, False): (32, 32, 4, 1), ("16bit", "fwd", 64, True): (32, 32, 8, 1),
        # fp32 / fp64 at d=64: 8 waves (4 spilled 220 B - 2.2 KB of scratch), smaller tiles where 32 x 32 still
        # spilled 204-280 B (forward with dropout, paged prefill)
        ("fp32", "fwd", 64, False): (16, 32, 8, 1), ("fp32", "fwd", 64, True): (16, 16, 8, 1),
        ("fp32", "decode", 64, False): (0, 32, 8, 1), ("fp32", "decode", 64, True): (0, 32, 8, 1),
        ("fp32", "bwd_dkdv", 64, True): (16, 16, 8, 1), ("fp32", "bwd_dq", 64, True): (16, 16, 8, 1),
        ("fp64", "fwd", 64, False): (16, 16, 8, 1), ("fp64", "fwd", 64, True): (16, 16, 8, 1),
        ("fp64", "decode", 64, False): (0, 16, 8, 1), ("fp64", "decode", 64, True): (0, 16, 8, 1),
        # flash-decoding at d=128 with dropout: 12 B of scratch with 64-key tiles
        ("16bit", "decode", 128, True): (0, 32, 4, 1),
        # fp64 backward with dropout at d=64: 700 B - 3.4 KB of scratch with 2, 4 or 8 waves
        ("fp64", "bwd_dkdv", 64, True): NO_KERNEL, ("fp64", "bwd_dq", 64, True): NO_KERNEL,
        # and without it (causal): 748-2,136 B with 4 or 8 waves; fp32 at d=64 without dropout: 8 waves, 16 x 16
        # (sm_80's tiles with 4 spilled 1,180-2,292 B)
        ("fp64", "bwd_dkdv", 64, False): NO_KERNEL, ("fp64", "bwd_dq", 64, False): NO_KERNEL,
        ("fp32", "bwd_dkdv", 64, False): (16, 16, 8, 1), ("fp32", "bwd_dq", 64, False): (16, 16, 8, 1),
        **{("16bit", kind, d, dropout): NO_KERNEL for kind in ("bwd_dkdv", "bwd_dq") for d in (128, 256)
           for dropout in (False, True)},
        ("16bit", "fwd", 256, False): NO_KERNEL, ("16bit", "fwd", 256, True): NO_KERNEL,
        **{(dtypes, kind, d, dropout): NO_KERNEL for dtypes in ("fp32", "fp64") for kind in _KINDS for d in (128, 256)
           for dropout in (False, True)}}),
    "generic": Column("sm_75"),
}

# Entries a triton release needs changed because its compiler allocates registers differently (found with
# `python -m fused_kernels.aot --sass` under that release): (major, minor) -> {column: {key: tile}}, over the
# column's ``tiles`` (``_TILE_OVERRIDES``) and ``varlen`` (``_VARLEN_TILE_OVERRIDES``) entries.
_TILE_OVERRIDES: dict[tuple[int, int], dict[str, dict[TileKey, Tile]]] = {
    # fp32 dQ at d=128 with dropout / the heavy variants: 32 x 16 spilled 4+4 B in "all" on sm_80 (80 registers,
    # since the document ids are loaded once per program); 32 x 32 is clean and 17,712 instructions per 1k
    # scores (heavy; 32 x 16: 18,944)
    # The same tile without dropout: 32 x 16 spilled 4+4 B causal (64 registers; sm_75 too)
    (3, 9): {"sm_80": {("fp32", "bwd_dq", 128, True): (32, 32, 8, 1), ("fp32", "bwd_dq", 128, False): (32, 32, 8, 1)}},
    # fp32 forward at d=128 with dropout: the variants' register-lean tile ("all": 16 B spilled on sm_80, 528 B on
    # sm_90a otherwise)
    (3, 6): {"sm_90": {("16bit", "bwd_dkdv", 64, False): (64, 128, 8, 1),
                       # fp32 flash-decoding at d=128 without dropout: one stage spilled 24+12 B (3.6)
                       ("fp32", "decode", 128, False): (0, 16, 8, 2),
                       ("16bit", "bwd_dkdv", 128, False): (32, 128, 8, 1),
                       # 3.6 keeps 32 x 16 x 4 warps clean here (3.9 spills it 24+12 B): 6,152 instructions per 1k
                       # scores, 6,416 at the column's 64 x 16 x 8
                       ("16bit", "bwd_dkdv", 256, True): (32, 16, 4, 1),
                       ("fp32", "fwd", 128, True): (32, 16, 8, 1)},
             "sm_80": {("fp32", "bwd_dkdv", 128, True): (16, 16, 4, 1),
                       ("fp32", "fwd", 128, True): (32, 16, 4, 1),
                       # 3.6 spills the fp64 forward at d=256 (28-48 B; 3.9 compiles it clean): the PyTorch path
                       **{("fp64", kind, 256, dropout): NO_KERNEL for kind in ("fwd", "decode")
                          for dropout in (False, True)}}},
}
# Entries for the calls whose loops carry per-row state (``row_state`` of ``attention_config``: softcap, document
# ids, causal offsets aligned per row to seqlens_k) where a release's compiler spills the column's tile with it:
# (major, minor) -> {column: {key: tile}}, for the dQ and dK/dV kernels. 16-bit dQ at d=128 on 3.6: 128 x 128
# spills 24+24 B with softcap, 8+8 B with documents, 4+8 B causal-seqlens; its other forms are clean at 222
# warp-instructions per 1k scores (128 x 64: 306).
_ROW_STATE_OVERRIDES: dict[tuple[int, int], dict[str, dict[TileKey, Tile]]] = {
    (3, 6): {"sm_90": {("16bit", "bwd_dq", 128, False): (128, 64, 8, 2)}},
    # sm_75's 16-bit (fp32 math) d=128 dK/dV: 16 x 32 x 8 warps spilled 20+20 B causal-seqlens (80 registers),
    # 32-80 B with document ids; 16 x 32 x 4 is clean with row state (its plain causal form spills 8+16 B there,
    # so the others keep 8 warps); sm_70 inherits it. sm_100a's 16-bit d=64 dQ: 128 x 64 spilled 4+4 B
    # causal-seqlens (80 registers); 64 x 64 keeps two stages and tcgen05 (clean with softcap and documents too)
    (3, 9): {"sm_75": {("16bit", "bwd_dkdv", 128, False): (16, 32, 4, 1)},
             "sm_100": {("16bit", "bwd_dq", 64, False): (64, 64, 8, 2)}},
}
# Entries for the calls with an attention variant (window, prefix, document ids, ALiBi, softcap, score_mod,
# mask_mod: ``attention_config``'s ``variant``) where a release's compiler spills the column's tile with the
# variant's extra loop state, but the plain calls keep theirs: (major, minor) -> {column: {key: tile}}, after the
# row-state entries (``python -m fused_kernels.aot --family variants --arch ...``).
_VARIANT_OVERRIDES: dict[tuple[int, int], dict[str, dict[TileKey, Tile]]] = {
    (3, 9): {
        # 16-bit in fp32 math (sm_70 inherits these and is clean with them): the d=64 dK/dV's 16 x 32 x 4 spilled
        # 12-28 B (mask_mod, score_mod; 16 x 16, 32 x 32, 16 x 32 x 8 and 32 x 16 spilled others); the d=128
        # dK/dV's 16 x 32 x 8 32+48 B (mask_mod; sm_70: 4+4 B, prefix), with "all" 16 x 16 x 8 8+8 B; the d=128
        # dQ's 16 x 16 x 8 12+12 B (prefix), 32 x 16 x 8 8+4 B (ALiBi): ptxas gives 8 warps 64 registers here
        "sm_75": {("16bit", "bwd_dkdv", 64, False): (16, 64, 4, 1), ("16bit", "bwd_dkdv", 128, False): (16, 32, 4, 1),
                  ("16bit", "bwd_dkdv", 128, True): (16, 16, 4, 1), ("16bit", "bwd_dq", 128, False): (16, 16, 4, 1),
                  ("16bit", "bwd_dq", 128, True): (32, 16, 4, 1)},
        # the d=128 forward's 128 x 128 spilled 16+20 B (prefix), the dQ's 64 x 64 x 2 stages 4+4 B (window; one
        # stage: score_mod, 4 warps / 128 x 64 / 64 x 128: softcap); 64 x 32 keeps tcgen05 (32-row tiles fall back
        # to mma.sync), 948 warp-instructions per 1k scores (window)
        "sm_100": {("16bit", "fwd", 128, False): (128, 64, 8, 2), ("16bit", "bwd_dq", 128, False): (64, 32, 8, 1)},
        # the d=64 forward's 3 stages spilled 20+20 B (window), the d=128 dQ's 64 x 32 x 2 stages 16+32 B (ALiBi)
        "sm_120": {("16bit", "fwd", 64, False): (128, 128, 8, 2), ("16bit", "bwd_dq", 128, True): (64, 32, 8, 1)},
    },
}
_VARLEN_TILE_OVERRIDES: dict[tuple[int, int], dict[str, dict[TileKey, Tile]]] = {
    (3, 6): {"sm_80": {("16bit", "bwd_dkdv", 64, False): (32, 64, 8, 1),     # 12 B spilled with 4 warps
                       ("16bit", "bwd_dkdv", 128, True): (16, 16, 8, 1),     # 48 B with (16, 16, 4, 2)
                       # clean on 3.6 (3.9 spills it): 5,024 instructions per 1k scores, 8,064 at 32 x 16
                       ("16bit", "bwd_dkdv", 256, True): (64, 16, 8, 1)},
             "sm_90": {("16bit", "bwd_dkdv", 64, False): (32, 64, 4, 1),     # (as before: clean on sm_90a)
                       ("16bit", "bwd_dkdv", 128, False): (32, 32, 4, 1),    # 36 B with 8 warps
                       ("fp32", "bwd_dkdv", 128, True): (16, 16, 8, 1),      # 20 B with (16, 16, 4, 1)
                       # its tile as before: sm_80's fp32 forward override (4 warps) spills 680 B here
                       ("fp32", "fwd", 128, True): (32, 16, 8, 1)}},
}
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])

# The warp-specialized kernels per triton release: (major, minor) -> {column: {(dtype family, kind, head-dim
# bucket): tile}}. "fwd": the forward's key loop (``kernels/forward.py``, WARP_SPECIALIZE), for the calls whose key
# blocks are all full and mask-free (no causal, mask, seqlens_k, dropout or variants, S a multiple of the tile's
# BLOCK_N) and whose q, k and v take TMA; "bwd_dkdv": the dK/dV kernel of ``kernels/backward_ws.py`` (BLOCK_M
# queries a step, BLOCK_N keys a program), for MHA calls without causal, mask, seqlens_k, dropout or variants
# whose q, k, v and do take TMA. The others keep the column's tile. An entry is here only where ``python -m
# fused_kernels.aot --sass`` under that release compiles it clean: no spills, a producer / consumer split in the
# SASS (setmaxnreg), no CTA-wide barrier in the consumers' loop. triton's pass specializes only a 4-warp program
# (with 8 warps it is silently ignored), which it splits into two consumer warp groups (64 rows of the program's
# own tile each) and a producer group.
_WS_TILES: dict[tuple[str, str, int], Tile] = {
    ("16bit", "fwd", 64): (128, 128, 4, 2), ("16bit", "fwd", 128): (128, 128, 4, 2),
    ("16bit", "bwd_dkdv", 64): (64, 128, 4, 2), ("16bit", "bwd_dkdv", 128): (64, 128, 4, 2),
}
_WARP_SPECIALIZED: dict[tuple[int, int], dict[str, dict[tuple[str, str, int], Tile]]] = {
    (3, 9): {"sm_90": _WS_TILES},
    (3, 6): {"sm_90": _WS_TILES},
}


def _chain(column: str) -> list[str]:
    """``column`` and the columns it starts from, nearest first."""
    names: list[str] = []
    name: str | None = column
    while name is not None:
        names.append(name)
        name = COLUMNS[name].base
    return names


def _inherited(column: str, entries: Callable[[str], dict], key: object) -> object | None:
    """The entry of ``key`` in the nearest column along ``column``'s bases that has one (``entries(name)``: that
    column's dict of such entries), or None."""
    return next((entries(name)[key] for name in _chain(column) if key in entries(name)), None)


def _entry(column: str, key: TileKey, varlen: bool) -> Tile | None:
    """``column``'s own entry of ``key`` (this triton release's override first), or None."""
    own = COLUMNS[column].varlen if varlen else COLUMNS[column].tiles
    overrides = (_VARLEN_TILE_OVERRIDES if varlen else _TILE_OVERRIDES).get(_TRITON_VERSION, {})
    return overrides.get(column, {}).get(key, own.get(key))


def column_tile(column: str, key: TileKey, varlen: bool = False) -> Tile:
    """The tile of ``key`` in ``column``: the entry of the nearest column along its bases that has one.
    ``varlen``: the packed kernels' tile: at each column its varlen entry comes first, and a column with a
    ``pointer_base`` hands the key to that column (its own tiles are sized for TMA)."""
    for name in _chain(column):
        if varlen:
            tile = _entry(name, key, varlen=True)
            if tile is not None:
                return tile
            if COLUMNS[name].pointer_base is not None:
                return column_tile(COLUMNS[name].pointer_base, key, varlen=True)
        tile = _entry(name, key, varlen=False)
        if tile is not None:
            return tile
    raise KeyError(f"no tile for {key} in column {column!r}")


def has_kernels(head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: ArchValue, dropout: bool,
                backward: bool, varlen: bool = False) -> bool:
    """Whether a call runs on the Triton kernels on ``arch``: no ``NO_KERNEL`` entry in its column for the forward
    kernels ("fwd", "decode") and, when gradients are wanted (``backward``), the backward ones ("bwd_dkdv",
    "bwd_dq"); ``dropout`` is the tile column's (``launch._heavy``), ``varlen`` reads the packed kernels' entries.
    Otherwise the whole call (forward and backward) takes the PyTorch path."""
    family = arch_family(arch)
    if family is None:
        return True
    d = max(next_pow2(head_dim), next_pow2(head_dim_v), 64)
    kinds = _KINDS if backward else ("fwd", "decode")
    return all(column_tile(family.name, (dtype_family(dtype), kind, d, dropout), varlen) != NO_KERNEL
               for kind in kinds)


def attention_config(kind: str, head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: ArchValue,
                     dropout: bool = False, specialize: bool = False, row_state: bool = False,
                     variant: bool = False) -> dict:
    """Block sizes, warps, stages and TMA use of one kernel ``kind`` ("fwd", "decode", "bwd_dkdv", "bwd_dq").

    ``arch`` is the architecture (``_core.launch.device_arch``: a CUDA compute capability such as 80, a gfx name
    such as "gfx942") or None under the interpreter (small blocks, so that small test shapes still cross several
    blocks); its family's column of ``COLUMNS`` gives the tiles (a GPU not listed: the "generic" column). For "fwd"
    and "bwd_dq" BLOCK_M is the query block a program owns and BLOCK_N the key block of its loop; for "bwd_dkdv"
    BLOCK_N is the key block a program owns and BLOCK_M the query block of its loop; "decode" only sets BLOCK_N
    (its BLOCK_M is the GQA group's query rows). ``TMA``: the kernel streams its tiles through tensor descriptors
    (the launcher falls back to pointers where a tensor's strides or alignment do not allow it).
    ``WARP_SPECIALIZE``: a "fwd" or "bwd_dkdv" call whose blocks are all full and mask-free (``specialize``, the
    launcher's contract) takes the warp-specialized kernel where this triton release compiles it for the column
    (``_WARP_SPECIALIZED``); ``row_state`` (softcap, document ids or per-row causal offsets) takes
    ``_ROW_STATE_OVERRIDES`` first, then ``variant`` (the call has an attention variant) ``_VARIANT_OVERRIDES``. The
    configurations are compiled by ``python -m fused_kernels.aot --arch ...`` for each column's targets (no
    spills, shared memory within the family's limit: docs/architectures.md). Shared by the launcher and
    ``fused_kernels.aot``."""
    if kind not in ("fwd", "decode", "bwd_dkdv", "bwd_dq"):
        raise ValueError(f"attention_config: unknown kernel kind {kind!r}")
    family = arch_family(arch)
    if family is None:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    d = max(next_pow2(head_dim), next_pow2(head_dim_v), 64)
    dtypes = dtype_family(dtype)
    key = (dtypes, kind, d, dropout)
    tile = column_tile(family.name, key)
    tables = [table for table, on in ((_ROW_STATE_OVERRIDES, row_state), (_VARIANT_OVERRIDES, variant)) if on]
    for table in tables:
        own = table.get(_TRITON_VERSION, {})
        hit = _inherited(family.name, lambda name, own=own: own.get(name, {}), key)
        if hit is not None:
            tile = hit
            break
    bm, bn, w, st = tile
    if (bm, bn, w, st) == NO_KERNEL:
        raise RuntimeError(f"attention: no Triton kernel for {kind} at head dim {d} ({dtypes}"
                           f"{', dropout' if dropout else ''}) on {family.name}: the call takes the PyTorch path "
                           f"(has_kernels)")
    tma = COLUMNS[family.name].tma and dtypes == "16bit" and not dropout and d <= 128 and kind != "decode"
    ws = None
    if specialize and tma:
        ws = _WARP_SPECIALIZED.get(_TRITON_VERSION, {}).get(family.name, {}).get((dtypes, kind, d))
    if ws is not None:
        bm, bn, w, st = ws
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "TMA": tma,
            "WARP_SPECIALIZE": ws is not None}


def split_blocks(arch: ArchValue) -> bool:
    """Whether the 16-bit dK/dV kernel on ``arch`` takes three query loops (``Column.split_blocks``; the
    interpreter: yes)."""
    family = arch_family(arch)
    return family is None or COLUMNS[family.name].split_blocks


def varlen_config(kind: str, d: int, dv: int, dtype: torch.dtype, arch: ArchValue, dropout: bool) -> dict:
    """Tiles of the packed kernels: the column's varlen entries, else its (pointer base's) ``attention_config``
    tiles (``column_tile(..., varlen=True)``); never TMA (a sequence's packed rows are no box of a descriptor)."""
    family = arch_family(arch)
    if family is None:
        return attention_config(kind, d, dv, dtype, None, dropout)
    key = (dtype_family(dtype), kind, max(next_pow2(d), next_pow2(dv), 64), dropout)
    bm, bn, w, st = column_tile(family.name, key, varlen=True)
    if (bm, bn, w, st) == NO_KERNEL:
        raise RuntimeError(f"varlen_attention: no Triton kernel for {key} on {family.name}: the call takes the "
                           f"PyTorch path (has_kernels)")
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "TMA": False}


def paged_config(rows: int, page: int, d: int, dv: int, dtype: torch.dtype, arch: ArchValue) -> dict:
    """Tiles of the paged attention kernel for ``rows`` = G * Lq query rows per (sequence, kv head): one row
    tile of the GQA group (the flash-decoding configuration) up to ``DECODE_MAX_ROWS`` rows, else row tiles of
    the forward kernel's BLOCK_M (at most 64 at head dims above 128) with key tiles of at most 64; a column's
    ``paged`` entry replaces the dense kernel's tile, else the decode kernel's pipeline stages come from its
    ``decode_stages`` (``python -m fused_kernels.aot --family paged``). The key tile is lowered to the block
    size when the block size is a smaller power of two (>= 16), so that a key tile never spans two physical
    blocks. Shared by the launcher and ``fused_kernels.aot``."""
    kind = "decode" if rows <= DECODE_MAX_ROWS else "fwd"
    cfg = dict(attention_config(kind, d, dv, dtype, arch))
    family = arch_family(arch)
    bucket = max(next_pow2(d), next_pow2(dv), 64)
    own = None
    if family is not None:
        key = (dtype_family(dtype), kind, bucket, False)
        own = _inherited(family.name, lambda name: COLUMNS[name].paged, key)
    if own is not None:
        cfg.update(BLOCK_M=own[0], BLOCK_N=own[1], num_warps=own[2], num_stages=own[3])
    stages = cfg["num_stages"]
    if kind == "decode":
        block_m, block_n = max(16, next_pow2(rows)), cfg["BLOCK_N"]
        if family is not None and own is None:
            key = (dtype_family(dtype), bucket)
            stages = _inherited(family.name, lambda name: COLUMNS[name].decode_stages, key) or stages
    else:
        # The forward's 128 x 128 tiles (sm_90a, 16-bit, d = 128) rely on its TMA path: with pointer loads
        # they spill, and so do 128-row tiles at d = 256.
        block_m = cfg["BLOCK_M"] if max(d, dv) <= 128 else min(cfg["BLOCK_M"], 64)
        block_n = min(cfg["BLOCK_N"], 64)
    if page >= 16 and page & (page - 1) == 0:
        block_n = min(block_n, page)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PAGE=page % block_n == 0,
                num_warps=cfg["num_warps"], num_stages=stages)


def preprocess_rows(row_bytes: int, arch: ArchValue) -> int:
    """Query rows a program of the backward's preprocess kernel (``delta = rowsum(dO * O)``) takes, for rows of
    dO of ``row_bytes``: about 16 KB of O and dO a program, but 8 rows above 512 B (16 rows of fp32 at d=256
    spilled 8+8 B on sm_70 at 32 registers, triton 3.9); 32 under the interpreter."""
    if arch is None:
        return 32
    return 64 if row_bytes <= 256 else 32 if row_bytes <= 512 else 8


def decode_splits(b: int, hkv: int, l: int, h: int, s: int, device: torch.device) -> int:
    """Number of key splits of the flash-decoding path, or 0 for the main path."""
    if l > DECODE_MAX_L or (h // hkv) * l > DECODE_MAX_ROWS or s < DECODE_MIN_S:
        return 0
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = triton.cdiv(2 * sms, max(1, b * hkv))                # about two waves of programs
    else:
        splits = 4
    return max(1, min(splits, triton.cdiv(s, 128), 128))


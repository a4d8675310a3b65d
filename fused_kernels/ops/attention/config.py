"""Attention constants and launch configurations, every tile table of the attention kernels in one place: the
dense kernels per kind, head dim, dtype family and architecture (``attention_config``), the packed varlen
kernels (``varlen_config``) and the paged kernel (``paged_config``), the dot precision, and the flash-decoding
split count."""

from __future__ import annotations

import torch
import triton

from ..._core.launch import next_pow2

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


# Tiles per kernel kind and head-dim bucket (64, 128, 256): (BLOCK_M, BLOCK_N, num_warps, num_stages) for
# Ampere (sm_80), Hopper (sm_90), and the same two with dropout (the in-kernel RNG is register-hungry).
# 16-bit dtypes run on tensor cores; on Hopper their d <= 128 kernels stream tiles with TMA. float32 dots
# are true fp32 (or tf32) and float64 is the correctness dtype: small tiles. Each entry is what
# `python -m fused_kernels.aot --sass` reads best among the configurations that compile without spills.
_TILES = {
    "16bit": {
        #                  ampere              hopper              ampere + dropout    hopper + dropout
        ("fwd", 64):       ((128, 128, 8, 3),  (128, 128, 8, 3),   (128, 32, 8, 3),    (128, 32, 8, 3)),
        ("fwd", 128):      ((128, 64, 8, 2),   (128, 128, 8, 2),   (64, 32, 8, 2),     (128, 32, 8, 2)),
        ("fwd", 256):      ((64, 64, 8, 2),    (128, 64, 8, 2),    (64, 32, 8, 2),     (64, 32, 8, 2)),
        ("decode", 64):    ((0, 64, 4, 3),     (0, 64, 4, 3),      (0, 64, 4, 3),      (0, 64, 4, 2)),
        ("decode", 128):   ((0, 64, 4, 3),     (0, 64, 4, 3),      (0, 64, 4, 3),      (0, 64, 4, 3)),
        ("decode", 256):   ((0, 32, 4, 2),     (0, 32, 4, 2),      (0, 32, 4, 2),      (0, 32, 4, 2)),
        ("bwd_dkdv", 64):  ((32, 64, 4, 1),    (64, 128, 8, 2),    (32, 32, 8, 1),     (32, 32, 4, 1)),
        ("bwd_dkdv", 128): ((64, 64, 8, 1),    (32, 128, 8, 2),    (16, 32, 4, 2),     (32, 32, 8, 1)),
        ("bwd_dkdv", 256): ((16, 32, 8, 1),    (16, 32, 8, 1),     (16, 16, 8, 1),     (16, 16, 8, 1)),
        ("bwd_dq", 64):    ((64, 32, 4, 2),    (128, 64, 8, 2),    (64, 32, 8, 2),     (64, 32, 8, 3)),
        ("bwd_dq", 128):   ((64, 32, 4, 2),    (128, 64, 8, 2),    (64, 32, 8, 2),     (64, 32, 8, 2)),
        ("bwd_dq", 256):   ((32, 32, 4, 1),    (32, 32, 4, 1),     (32, 32, 8, 1),     (32, 32, 8, 1)),
    },
    "fp32": {
        ("fwd", 64):       ((32, 32, 4, 1),    (32, 32, 4, 1),     (32, 32, 8, 1),     (32, 32, 8, 1)),
        ("fwd", 128):      ((32, 16, 8, 1),    (32, 16, 8, 1),     (32, 16, 8, 1),     (32, 16, 4, 1)),
        ("fwd", 256):      ((32, 16, 8, 1),    (32, 16, 8, 1),     (32, 16, 4, 1),     (32, 16, 4, 1)),
        ("decode", 64):    ((0, 32, 4, 1),     (0, 32, 4, 1),      (0, 32, 8, 1),      (0, 32, 8, 1)),
        ("decode", 128):   ((0, 16, 8, 1),     (0, 16, 8, 1),      (0, 16, 8, 1),      (0, 16, 8, 1)),
        ("decode", 256):   ((0, 16, 8, 1),     (0, 16, 8, 1),      (0, 16, 8, 1),      (0, 16, 8, 1)),
        ("bwd_dkdv", 64):  ((16, 32, 4, 1),    (16, 32, 4, 1),     (16, 16, 4, 1),     (16, 16, 8, 1)),
        ("bwd_dkdv", 128): ((16, 32, 8, 1),    (16, 32, 8, 1),     (16, 32, 8, 1),     (16, 16, 4, 1)),
        ("bwd_dkdv", 256): ((16, 16, 8, 1),    (16, 16, 8, 1),     (32, 16, 8, 1),     (32, 16, 8, 1)),
        ("bwd_dq", 64):    ((32, 32, 4, 1),    (32, 32, 4, 1),     (16, 32, 4, 1),     (16, 32, 4, 1)),
        ("bwd_dq", 128):   ((32, 16, 8, 1),    (32, 16, 8, 1),     (32, 16, 8, 1),     (32, 16, 8, 1)),
        ("bwd_dq", 256):   ((32, 16, 8, 1),    (32, 16, 8, 1),     (16, 16, 4, 1),     (16, 16, 4, 1)),
    },
    "fp64": {key: ((16, 16, 8 if key[1] > 64 else 4, 1),) * 4
             for key in [(kind, d) for kind in ("fwd", "decode", "bwd_dkdv", "bwd_dq") for d in (64, 128, 256)]},
}


# Entries a triton release needs changed because its compiler allocates registers differently (found with
# `python -m fused_kernels.aot --sass` under that release): (major, minor) -> {(family, kind, d): {column: tile}}.
_TILE_OVERRIDES = {
    (3, 6): {("16bit", "bwd_dkdv", 64): {1: (64, 128, 8, 1)}, ("16bit", "bwd_dkdv", 128): {1: (32, 128, 8, 1)},
             ("fp32", "bwd_dkdv", 128): {2: (16, 16, 4, 1)},
             # the variants' register-lean column ("all": 16 B spilled on sm_80, 528 B on sm_90a otherwise)
             ("fp32", "fwd", 128): {2: (32, 16, 4, 1), 3: (32, 16, 8, 1)}},
}
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])


def attention_config(kind: str, head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int | None,
                     dropout: bool = False) -> dict:
    """Block sizes, warps, stages and TMA use of one kernel ``kind`` ("fwd", "decode", "bwd_dkdv", "bwd_dq").

    ``arch`` is the CUDA compute capability as an int (80, 90, ...) or None under the interpreter (small
    blocks, so that small test shapes still cross several blocks). For "fwd" and "bwd_dq" BLOCK_M is the
    query block a program owns and BLOCK_N the key block of its loop; for "bwd_dkdv" BLOCK_N is the key
    block a program owns and BLOCK_M the query block of its loop; "decode" only sets BLOCK_N (its BLOCK_M
    is the GQA group's query rows). ``TMA``: the kernel streams its tiles through tensor descriptors (the
    launcher falls back to pointers where a tensor's strides or alignment do not allow it). Every
    configuration is compiled by ``python -m fused_kernels.aot`` for sm_80 and sm_90a (no spills, shared memory
    within limits). Shared by the launcher and ``fused_kernels.aot``."""
    if kind not in ("fwd", "decode", "bwd_dkdv", "bwd_dq"):
        raise ValueError(f"attention_config: unknown kernel kind {kind!r}")
    if arch is None:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    d = max(next_pow2(head_dim), next_pow2(head_dim_v), 64)
    hopper = arch >= 90
    family = _dtype_family(dtype)
    column = 2 * dropout + hopper
    bm, bn, w, st = _TILE_OVERRIDES.get(_TRITON_VERSION, {}).get((family, kind, d), {}).get(
        column, _TILES[family][(kind, d)][column])
    tma = family == "16bit" and hopper and not dropout and d <= 128 and kind != "decode"
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "TMA": tma}


def _dtype_family(dtype: torch.dtype) -> str:
    """The tile tables' dtype column: "fp64", "fp32" or "16bit"."""
    return {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "16bit")


# Varlen tiles: the Ampere column of ``attention_config`` on every architecture (its Hopper 16-bit tiles are sized
# for TMA, which the packed path does not use: with pointer loads they spill), with these replacements where
# the per-sequence bookkeeping pushed a configuration into spills (``python -m fused_kernels.aot --family varlen``):
# (dtype family, kind, head-dim bucket, dropout[, "hopper"]) -> (BLOCK_M, BLOCK_N, num_warps, num_stages); an
# entry with "hopper" applies on sm_90+ and wins there over the one without.
_VARLEN_TILES = {
    ("16bit", "bwd_dkdv", 128, False, "hopper"): (32, 32, 8, 1),
    ("16bit", "bwd_dkdv", 128, True, "hopper"): (16, 16, 8, 1),
    ("16bit", "fwd", 64, True): (64, 32, 4, 2),
    ("16bit", "bwd_dkdv", 128, True): (16, 16, 4, 2),
    ("fp32", "fwd", 64, True): (16, 32, 4, 1),
    ("fp32", "bwd_dkdv", 64, True): (16, 16, 8, 1),
}


# Entries a triton release needs changed because its compiler allocates registers differently: the dK/dV tiles
# that spill under triton 3.6 (python -m fused_kernels.aot --family varlen; the same tile with other warps, or the
# nearest spill-free one): (major, minor) -> {_VARLEN_TILES key: tile}.
_VARLEN_TILE_OVERRIDES = {
    (3, 6): {("16bit", "bwd_dkdv", 64, False): (32, 64, 8, 1),                # 12 B spilled with 4 warps on sm_80
             ("16bit", "bwd_dkdv", 64, False, "hopper"): (32, 64, 4, 1),      # (as before: clean on sm_90a)
             ("16bit", "bwd_dkdv", 128, True): (16, 16, 8, 1),                # 48 B with (16, 16, 4, 2) on sm_80
             ("16bit", "bwd_dkdv", 128, False, "hopper"): (32, 32, 4, 1),     # 36 B with 8 warps on sm_90a
             ("fp32", "bwd_dkdv", 128, True, "hopper"): (16, 16, 8, 1),       # 20 B with (16, 16, 4, 1) on sm_90a
             # its tile as before: the fp32 forward override above (4 warps) spills 680 B here on sm_90a
             ("fp32", "fwd", 128, True, "hopper"): (32, 16, 8, 1)},
}


def varlen_config(kind: str, d: int, dv: int, dtype: torch.dtype, arch: int | None, dropout: bool) -> dict:
    """Tiles of the packed kernels (``attention_config``'s Ampere column, no TMA, ``_VARLEN_TILES``, then this
    triton release's ``_VARLEN_TILE_OVERRIDES``)."""
    if arch is None:
        return attention_config(kind, d, dv, dtype, None, dropout)
    cfg = dict(attention_config(kind, d, dv, dtype, min(arch, 80), dropout), TMA=False)
    family = _dtype_family(dtype)
    key = (family, kind, max(next_pow2(d), next_pow2(dv), 64), dropout)
    tiles = {**_VARLEN_TILES, **_VARLEN_TILE_OVERRIDES.get(_TRITON_VERSION, {})}
    tile = tiles.get((*key, "hopper")) if arch >= 90 else None
    tile = tile or tiles.get(key)
    if tile is not None:
        cfg.update(BLOCK_M=tile[0], BLOCK_N=tile[1], num_warps=tile[2], num_stages=tile[3])
    return cfg


# Pipeline stages of the decode configuration where the split kernel spills with the block-table lookups
# (``python -m fused_kernels.aot --family paged``, triton 3.9): (dtype family, head-dim bucket, Hopper) -> stages.
# fp32 d=128 on sm_80 spilled 8+4 B with 1 stage; 16-bit d=128 on sm_90a 4+4 B with 3 (16-key tiles).
_DECODE_STAGES = {("fp32", 128, False): 2, ("16bit", 128, True): 2}


def paged_config(rows: int, page: int, d: int, dv: int, dtype: torch.dtype, arch: int | None) -> dict:
    """Tiles of the paged attention kernel for ``rows`` = G * Lq query rows per (sequence, kv head): one row
    tile of the GQA group (the flash-decoding configuration) up to ``DECODE_MAX_ROWS`` rows, else row tiles of
    the forward kernel's BLOCK_M (at most 64 at head dims above 128) with key tiles of at most 64. Every
    configuration compiles without spills for sm_80 / sm_90a (``python -m fused_kernels.aot --family paged``).
    The key tile is lowered to the block size when the block size is a smaller power of two (>= 16), so that
    a key tile never spans two physical blocks. Shared by the launcher and ``fused_kernels.aot``."""
    kind = "decode" if rows <= DECODE_MAX_ROWS else "fwd"
    cfg = dict(attention_config(kind, d, dv, dtype, arch))
    stages = cfg["num_stages"]
    if kind == "decode":
        block_m, block_n = max(16, next_pow2(rows)), cfg["BLOCK_N"]
        if arch is not None:
            family = _dtype_family(dtype)
            stages = _DECODE_STAGES.get((family, max(next_pow2(d), next_pow2(dv), 64), arch >= 90), stages)
    else:
        # The forward's 128 x 128 tiles (sm_90a, 16-bit, d = 128) rely on its TMA path: with pointer loads
        # they spill, and so do 128-row tiles at d = 256.
        block_m = cfg["BLOCK_M"] if max(d, dv) <= 128 else min(cfg["BLOCK_M"], 64)
        block_n = min(cfg["BLOCK_N"], 64)
    if page >= 16 and page & (page - 1) == 0:
        block_n = min(block_n, page)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PAGE=page % block_n == 0,
                num_warps=cfg["num_warps"], num_stages=stages)


def _precision(dtype: torch.dtype, upcast: bool) -> str:
    """tl.dot input precision: true fp32 for fp32 (unless TF32 is allowed), fp64 and upcast bf16."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype == torch.float64 or upcast:
        return "ieee"
    return "tf32"  # the default; irrelevant for 16-bit inputs


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


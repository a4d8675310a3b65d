"""``_block_mask_kernel``: the empty / partial / full class of every (query block, key block) tile of a
``mask_mod`` (launched by ``ops/attention/blockmask.py``)."""

import triton
import triton.language as tl

from ...._core.launch import split_program_id


@triton.jit(do_not_specialize=["PID1_BASE"])
def _block_mask_kernel(out, args, L, S, HM, NN, MASK_MOD: tl.constexpr, HAS_ARGS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PID1_BASE=0, GRID_SPLIT: tl.constexpr = False):   # _core.launch.split_grid
    """Class of tile (pid0 // NN, pid0 % NN) for (b, h) = divmod(pid1, HM) into ``out`` (BH, NM, NN) int8."""
    tile = tl.program_id(0)
    bh = split_program_id(1, PID1_BASE, GRID_SPLIT)
    pid_m = tile // NN
    pid_n = tile % NN
    b = bh // HM
    h = bh % HM
    q_idx = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]   # (BM, 1) int32
    kv_idx = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]  # (1, BN) int32
    valid = (q_idx < L) & (kv_idx < S)
    # the mod sees indices clamped into range: out-of-range elements do not count anyway, and a mod that
    # looks its indices up in a tensor (mod_args) then never reads past its end
    q_idx = tl.minimum(q_idx, L - 1)
    kv_idx = tl.minimum(kv_idx, S - 1)
    if HAS_ARGS:
        keep = MASK_MOD(b, h, q_idx, kv_idx, args)
    else:
        keep = MASK_MOD(b, h, q_idx, kv_idx)
    kept = (keep != 0) & valid          # a mod returning a scalar broadcasts here
    n_kept = tl.sum(tl.sum(kept.to(tl.int32), axis=1), axis=0)
    n_valid = tl.sum(tl.sum(valid.to(tl.int32), axis=1), axis=0)
    cls = tl.where(n_kept == n_valid, 2, tl.where(n_kept > 0, 1, 0))
    tl.store(out + bh.to(tl.int64) * (tl.num_programs(0)) + tile, cls.to(tl.int8))

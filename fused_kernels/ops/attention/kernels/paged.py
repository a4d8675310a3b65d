"""Paged attention kernels: ``_paged_append_kernel`` scatters new keys/values into their pool slots in place;
``_paged_attn_fwd_kernel`` is the flash-decoding split kernel reading its key blocks through a block table
(the launchers and conventions: ``ops/attention/paged.py``)."""

import triton
import triton.language as tl

from ...._core.launch import split_program_id
from .common import MASK_NONE, _group_queries, _store_partial
from .forward import _fwd_block
from .mods import PLAIN, no_variant_context


@triton.jit(do_not_specialize=["PID1_BASE"])
def _paged_append_kernel(
    K_NEW,          # (B, HKV, LNEW, D) any strides, last dim contiguous
    V_NEW,          # (B, HKV, LNEW, DV) any strides, last dim contiguous
    K_CACHE,        # (NUM_BLOCKS, PAGE, HKV, D) pool, last dim contiguous
    V_CACHE,        # (NUM_BLOCKS, PAGE, HKV, DV) pool, last dim contiguous
    BLOCK_TABLE,    # (B, MAX_BLOCKS) int32/int64 physical block of each logical block
    SEQLENS,        # (B,) int32/int64 lengths before the append
    HKV, LNEW, D, DV, PAGE,
    stride_kn, stride_vn,           # (batch, head, token) strides of K_NEW / V_NEW
    stride_kc, stride_vc,           # (block, slot, head) strides of the pools
    stride_t,                       # (batch, logical block) strides of BLOCK_TABLE
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PID1_BASE=0, GRID_SPLIT: tl.constexpr = False,   # a part of a split grid (_core.launch.split_grid)
):
    """BLOCK_T new tokens of one (sequence, kv head): token t goes to position len + t, i.e. slot
    (len + t) % PAGE of physical block BLOCK_TABLE[b, (len + t) // PAGE]. Only those slots are written."""
    stride_knb, stride_knh, stride_knt = stride_kn
    stride_vnb, stride_vnh, stride_vnt = stride_vn
    stride_kcb, stride_kcp, stride_kch = stride_kc
    stride_vcb, stride_vcp, stride_vch = stride_vc
    stride_tb, stride_tn = stride_t
    pid_t = tl.program_id(0)
    bhk = split_program_id(1, PID1_BASE, GRID_SPLIT).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < LNEW
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = tl.load(SEQLENS + b).to(tl.int64) + t                                    # (BLOCK_T,) positions
    page = tl.load(BLOCK_TABLE + b * stride_tb + (pos // PAGE) * stride_tn, mask=t_ok, other=0).to(tl.int64)
    slot = pos % PAGE
    k = tl.load(K_NEW + b * stride_knb + hk * stride_knh + t[:, None] * stride_knt + offs_d[None, :],
                mask=t_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    tl.store(K_CACHE + (page * stride_kcb + slot * stride_kcp + hk * stride_kch)[:, None] + offs_d[None, :],
             k.to(K_CACHE.dtype.element_ty), mask=t_ok[:, None] & (offs_d[None, :] < D))
    v = tl.load(V_NEW + b * stride_vnb + hk * stride_vnh + t[:, None] * stride_vnt + offs_dv[None, :],
                mask=t_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    tl.store(V_CACHE + (page * stride_vcb + slot * stride_vcp + hk * stride_vch)[:, None] + offs_dv[None, :],
             v.to(V_CACHE.dtype.element_ty), mask=t_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit(do_not_specialize=["PID2_BASE"])
def _paged_attn_fwd_kernel(
    Q,              # (B, H, LQ, D) any strides, last dim contiguous
    K_CACHE,        # (NUM_BLOCKS, PAGE, HKV, D) pool, last dim contiguous
    V_CACHE,        # (NUM_BLOCKS, PAGE, HKV, DV) pool, last dim contiguous
    BLOCK_TABLE,    # (B, MAX_BLOCKS) int32/int64 physical block of each logical block
    SEQLENS,        # (B,) int32/int64 key lengths (the new queries' keys included)
    OPART,          # (B * HKV, SPLITS, GROUP * LQ, DV) partial outputs, contiguous, accumulation dtype
    LSEPART,        # (B * HKV, SPLITS, GROUP * LQ) partial lse (log2 units), contiguous
    HKV, LQ, D, DV, GROUP, SPLITS, chunk, PAGE, capacity,
    stride_q,                   # (batch, head, row) strides of Q
    stride_k, stride_v,         # (block, slot, head) strides of the pools
    stride_t,                   # (batch, logical block) strides of BLOCK_TABLE
    qk_scale,
    IS_CAUSAL: tl.constexpr, FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    SINGLE_PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    VARIANT: tl.constexpr = PLAIN,   # no variant runs here yet (the launchers pass none): the main kernel has them
    PID2_BASE=0, GRID_SPLIT: tl.constexpr = False,   # a part of a split grid (_core.launch.split_grid)
):
    """Rows [pid_m * BLOCK_M, ...) of the GROUP * LQ (query head, query) rows of one (sequence, kv head),
    head-major as the combine kernel reads them, over the keys [split * chunk, (split + 1) * chunk) of the
    sequence. SINGLE_PAGE (PAGE % BLOCK_N == 0): a key tile is BLOCK_N consecutive slots of one physical block."""
    stride_kb, stride_kp, stride_kh = stride_k
    stride_vb, stride_vp, stride_vh = stride_v
    stride_tb, stride_tn = stride_t
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    bhk = split_program_id(2, PID2_BASE, GRID_SPLIT).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok, h, i, q = _group_queries(Q, b, hk, rows, GROUP, LQ, stride_q, offs_d, D, EVEN_D=EVEN_D, UPCAST=UPCAST)
    kv_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), capacity)
    causal_offset = kv_len - LQ                            # bottom-right: key j <= i + len - LQ
    hi = kv_len
    if IS_CAUSAL:
        last_i = tl.max(tl.where(row_ok, i, 0), 0)
        hi = tl.maximum(tl.minimum(kv_len, last_i + 1 + causal_offset), 0)
    lo = split * chunk
    hi = tl.minimum(hi, lo + chunk)
    table = BLOCK_TABLE + b * stride_tb
    k_head = K_CACHE + hk * stride_kh
    v_head = V_CACHE + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M, 1], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    dims = (offs_d, offs_dv, D, DV)
    drop = (0, i, 0.0)      # no dropout
    vctx = no_variant_context()
    for start_n in range(lo, hi, BLOCK_N):
        if SINGLE_PAGE:
            page = tl.load(table + (start_n // PAGE) * stride_tn).to(tl.int64)
            slot = start_n % PAGE + offs_n                                           # (BLOCK_N,)
            k_rows = page * stride_kb + slot * stride_kp
            v_rows = page * stride_vb + slot * stride_vp
        else:
            cols = start_n + offs_n
            page = tl.load(table + (cols // PAGE) * stride_tn, mask=cols < hi, other=0).to(tl.int64)
            k_rows = page * stride_kb + (cols % PAGE) * stride_kp
            v_rows = page * stride_vb + (cols % PAGE) * stride_vp
        k_ptrs = k_head + k_rows[:, None] + offs_d[None, :]                          # (BLOCK_N, BLOCK_D)
        v_ptrs = v_head + v_rows[:, None] + offs_dv[None, :]                         # (BLOCK_N, BLOCK_DV)
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, start_n, k_ptrs, v_ptrs, None, None, None, None, i, row_ok, offs_n, dims, hi,
            causal_offset, qk_scale, drop, vctx,
            MASK_KIND=MASK_NONE, IS_CAUSAL=IS_CAUSAL, CHECK_BOUNDS=True, SAFE=True, FOLD_SCALE=FOLD_SCALE,
            EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, TMA=False, ZERO_V_TAIL=False, HAS_DROPOUT=False,
            UPCAST=UPCAST, PRECISION=PRECISION, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            VAR=VARIANT)
    _store_partial(OPART, LSEPART, acc, m_i, l_i, 0.0, bhk * SPLITS + split, rows, row_ok, GROUP * LQ, offs_dv, DV,
                   HAS_DROPOUT=False)

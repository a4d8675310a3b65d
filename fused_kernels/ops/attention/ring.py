"""Context-parallel (ring) attention over ``torch.distributed``: one sequence split across the ranks of a group.

Each rank of a group of N holds a slice of every sequence, (B, H, L_local, D) queries, keys and values. The
key/value slices travel around the ring (rank r sends to r + 1 and receives from r - 1, ``batch_isend_irecv``
posted before the step's computation so the transfer overlaps it); at each of the N steps a rank attends its
queries to the key/value slice it holds, with the fused kernel (``fused_kernels.attention``'s custom ops, which
return the log-sum-exp and take a causal offset) or, on the PyTorch path, torch's CPU flash kernel. The
partial results are merged by their log-sum-exps in float32 (float64 for float64 inputs):
``out = sum_i exp(lse_i - lse) * out_i``, ``lse = logsumexp_i lse_i``. The result is the attention of the
local queries over the whole sequence, as single-process ``fused_kernels.attention`` on the gathered sequence.

Backward (the published ring-attention backward): the key/value slices go around the ring again, now with
their dK/dV accumulators; each step's kernel backward is given the *final* output and log-sum-exp, so that
``p = exp(s - lse)`` and ``delta = rowsum(dO * O)`` are the whole sequence's and each step yields its exact
share of dQ (kept here), dK and dV (added to the travelling accumulators). After N steps the accumulators are
one hop from their owner, and one more send returns them.

Layouts (``layout=``), position p of a sequence of length T = N * L_local:
- ``"contiguous"`` (default): rank r holds positions [r * L_local, (r + 1) * L_local). With ``causal=True``
  rank r's queries see the slices of ranks < r fully, their own with the diagonal, ranks > r not at all (those
  steps are skipped), so rank N - 1 does N times the work of rank 0.
- ``"zigzag"``: the sequence is cut into 2N chunks of L_local / 2 and rank r holds chunks r and 2N - 1 - r, in
  that order. Causal work is then the same on every rank: the own step is one causal block, every other step
  is half of the queries against all keys or all queries against half of the keys. ``zigzag_shard`` /
  ``zigzag_unshard`` (and ``shard_positions``) convert between the full sequence and this layout; the caller
  lays the sequence out once (e.g. the token ids of a batch) and every layer keeps it.

Communication per rank and step: forward, the K and V slices (``B * Hkv * L_local * (D + Dv)`` elements of the
input dtype, N - 1 sends per call); backward, K and V again (N - 1 sends) plus dK and dV in the accumulation
dtype, float32 or float64 (N sends). With ``causal=True`` and the contiguous layout the ring still passes every
slice (the skipped steps save computation, not traffic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..._core import backend as _backend
from ..._core import checks as _checks
from . import grad as _grad
from .api import _check_scale
from .launch import attention_bwd, attention_fwd, kernels_run
from .torch_path import _FLASH, _FLASH_BWD

LAYOUTS = ("contiguous", "zigzag")
# Scores of one block of queries on the plain-PyTorch fallback (``_math_fwd`` / ``_math_bwd``).
MATH_BLOCK = 1 << 22
_NO_SEED = torch.zeros(1, dtype=torch.int64)


# ----------------------------------------------------------------------------- layouts


def shard_positions(seq_len: int, world_size: int, rank: int, layout: str = "contiguous",
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The global positions (int64, increasing) that ``rank`` of ``world_size`` holds of a sequence of
    ``seq_len`` tokens in ``layout``; what the positional embedding of a sharded sequence must use."""
    _check_layout(layout)
    parts = world_size * (2 if layout == "zigzag" else 1)
    if seq_len % parts:
        raise ValueError(f"shard_positions: seq_len ({seq_len}) must be divisible by {parts} "
                         f"({'2 x ' if layout == 'zigzag' else ''}{world_size} ranks) for layout {layout!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_positions: rank {rank} is not in [0, {world_size})")
    chunk = seq_len // parts
    if layout == "contiguous":
        return torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((parts - 1 - rank) * chunk, (parts - rank) * chunk, device=device)
    return torch.cat([first, second])


def zigzag_shard(x: torch.Tensor, world_size: int, rank: int, dim: int = -2) -> torch.Tensor:
    """This rank's zigzag slice (chunks ``rank`` and ``2 * world_size - 1 - rank`` of 2 x world_size) of the
    full sequence ``x`` along ``dim``."""
    pos = shard_positions(x.shape[dim], world_size, rank, "zigzag", x.device)
    return x.index_select(dim, pos)


def zigzag_unshard(local: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = -2) -> torch.Tensor:
    """The full sequence from every rank's zigzag slice along ``dim`` (an all-gather; not differentiable)."""
    n = dist.get_world_size(group)
    parts = [torch.empty(local.shape, dtype=local.dtype, device=local.device) for _ in range(n)]
    dist.all_gather(parts, local.contiguous(), group=group)
    axis = dim % local.dim()
    seq_len = local.shape[axis] * n
    full = torch.empty((*local.shape[:axis], seq_len, *local.shape[axis + 1:]), dtype=local.dtype,
                       device=local.device)
    for r, part in enumerate(parts):
        full.index_copy_(axis, shard_positions(seq_len, n, r, "zigzag", local.device), part)
    return full


def _check_layout(layout: object) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


# ----------------------------------------------------------------------------- one step


def _blocks(rank: int, src: int, causal: bool, layout: str, length: int) -> list[tuple[slice, slice, bool]]:
    """What rank ``rank``'s queries compute against the key/value slice of rank ``src``: (query rows, key
    rows, causal) blocks, top-left causal (the own slice: equal lengths, increasing positions)."""
    every = slice(None)
    if not causal:
        return [(every, every, False)]
    if src == rank:
        return [(every, every, True)]
    if layout == "contiguous":
        return [(every, every, False)] if src < rank else []
    half = length // 2                 # zigzag: chunk src is below both of ours, chunk 2N-1-src above both
    if src < rank:                     # or the reverse for src > rank
        return [(every, slice(0, half), False)]
    return [(slice(half, None), every, False)]


def _key_lengths(seqlens: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """Per batch, how many of the keys at ``positions`` (increasing) lie before the global key length."""
    if seqlens is None:
        return None
    return torch.searchsorted(positions, seqlens.to(positions.device, torch.int64)).to(torch.int32)


def _use_flash(q: torch.Tensor, v: torch.Tensor) -> bool:
    return _FLASH is not None and q.device.type == "cpu" and v.shape[-1] == q.shape[-1]


def _key_mask(lens: torch.Tensor | None, s: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, 1, 1, S) additive mask of keys past ``lens``; a batch entry with no key gets no mask (its rows are
    set to 0 / -inf by the caller), so that the flash kernel never sees a row of -inf only."""
    if lens is None:
        return None
    keep = (torch.arange(s, device=lens.device) < lens[:, None]) | (lens[:, None] == 0)
    return torch.zeros(keep.shape, dtype=dtype, device=lens.device).masked_fill(~keep, -math.inf)[:, None, None]


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    b, h, l, d = q.shape
    return q.reshape(b, hkv, h // hkv, l, d)


def _math_fwd(q, k, v, lens, causal, scale):
    """Plain PyTorch (out, lse) of one block, query rows in chunks of at most ``MATH_BLOCK`` scores: what the
    PyTorch path runs where torch's CPU flash kernel does not (other devices, a value head dim != D)."""
    b, h, l, _ = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg, kt, vc = _grouped(q.to(acc), hkv), k.to(acc)[:, :, None].transpose(-1, -2), v.to(acc)[:, :, None]
    out = torch.empty((b, h, l, dv), dtype=acc, device=q.device)
    lse = torch.empty((b, h, l), dtype=acc, device=q.device)
    step = max(1, MATH_BLOCK // max(1, b * h * s))
    for i in range(0, l, step):
        rows = slice(i, min(l, i + step))
        scores = (qg[:, :, :, rows] @ kt).reshape(b, h, -1, s) * scale
        keep = _grad._keep(l, s, rows, causal, 0, lens, q.device)
        if keep is not None:
            scores = scores.masked_fill(~keep, -math.inf)
        m = torch.logsumexp(scores, -1)
        p = torch.exp(scores - m.masked_fill(m == -math.inf, 0.0)[..., None])
        group = p.shape[2]
        out[:, :, rows] = (p.reshape(b, hkv, h // hkv, group, s) @ vc).reshape(b, h, group, dv)
        lse[:, :, rows] = m
    return out.to(q.dtype), lse


def _math_bwd(do, q, k, v, out, lse, lens, causal, scale):
    """Plain PyTorch (dq, dk, dv) of one block given the final ``out`` and ``lse`` of its rows."""
    b, h, l, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hkv
    acc = lse.dtype
    qg, kc, vc = _grouped(q.to(acc), hkv), k.to(acc)[:, :, None], v.to(acc)[:, :, None]
    dog = _grouped(do.to(acc), hkv)
    delta = (do.to(acc) * out.to(acc)).sum(-1)
    dq = torch.empty((b, h, l, d), dtype=acc, device=q.device)
    dk = torch.zeros((b, hkv, s, d), dtype=acc, device=q.device)
    dvv = torch.zeros((b, hkv, s, dv), dtype=acc, device=q.device)
    step = max(1, MATH_BLOCK // max(1, b * h * s))
    for i in range(0, l, step):
        rows = slice(i, min(l, i + step))
        n = len(range(*rows.indices(l)))
        scores = (qg[:, :, :, rows] @ kc.transpose(-1, -2)) * scale               # (B, Hkv, G, n, S)
        p = torch.exp(scores - lse[:, :, rows].reshape(b, hkv, g, n, 1))
        keep = _grad._keep(l, s, rows, causal, 0, lens, q.device)
        if keep is not None:
            p = p.masked_fill(~keep[(None,) * (4 - keep.dim())][:, :, None], 0.0)     # (B|1, 1, 1, n|1, S)
        dp = dog[:, :, :, rows] @ vc.transpose(-1, -2)
        ds = p * (dp - delta[:, :, rows].reshape(b, hkv, g, n, 1))
        dq[:, :, rows] = (ds @ kc).reshape(b, h, n, d) * scale
        dk += (ds.transpose(-1, -2) @ qg[:, :, :, rows]).sum(2) * scale
        dvv += (p.transpose(-1, -2) @ dog[:, :, :, rows]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype)


def _step_fwd(impl: str, q, k, v, lens, causal, scale):
    """(out, lse) of q over one key/value block; rows that see no key there give 0 and lse -inf."""
    if impl == "triton":
        out, lse, _ = attention_fwd(q, k, v, None, lens, scale, causal, 0, 0.0, 0)
        return out, lse
    if not _use_flash(q, v):
        return _math_fwd(q, k, v, lens, causal, scale)
    out, lse = _FLASH(q, k, v, 0.0, causal, attn_mask=_key_mask(lens, k.shape[2], q.dtype), scale=scale)
    if lens is not None and bool((lens == 0).any()):
        dead = (lens == 0)[:, None, None]
        out, lse = out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, -math.inf)
    return out, lse


def _step_bwd(impl: str, do, q, k, v, out, lse, lens, causal, scale):
    """(dq, dk, dv) of one block, given the whole sequence's ``out`` and ``lse`` (+inf on dead rows: p = 0)."""
    if impl == "triton":
        return attention_bwd(do, None, q, k, v, out, lse, None, lens, _NO_SEED, scale, causal, 0, 0.0)
    if not _use_flash(q, v):
        return _math_bwd(do, q, k, v, out, lse, lens, causal, scale)
    mask = None
    if lens is not None:   # here every masked key must stay masked: exp(-inf - lse) = 0 whatever lse is
        keep = torch.arange(k.shape[2], device=lens.device) < lens[:, None]
        mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, -math.inf)[:, None, None]
    return _FLASH_BWD(do.contiguous(), q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def _merge(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """out, lse (accumulation dtype, in place) <- the softmax-weighted merge with one partial result."""
    new = torch.logaddexp(lse, part_lse.to(lse.dtype))
    safe = new.masked_fill(new == -math.inf, 0.0)            # rows with nothing yet: weights exp(-inf) = 0
    out.mul_(torch.exp(lse - safe)[..., None]).add_(part.to(out.dtype) * torch.exp(part_lse - safe)[..., None])
    lse.copy_(new)


# ----------------------------------------------------------------------------- the ring


class _Ring:
    """The ring of a process group: global ranks of the neighbours, and one exchange of tensors."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.prev = to_global((self.rank + 1) % self.size), to_global((self.rank - 1) % self.size)

    def exchange(self, tensors: Sequence[torch.Tensor]) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
        """Post sends of ``tensors`` to the next rank and receives of as many from the previous one; returns
        (requests to wait on, the buffers being received, the buffers being sent: the caller holds them until
        the wait)."""
        recv = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]   # contiguous
        sent = [t.contiguous() for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        return dist.batch_isend_irecv(ops), recv, sent


def _wait(requests: list) -> None:
    for req in requests:
        req.wait()


class RingAttentionFunction(torch.autograd.Function):
    """Forward and backward of ring attention (see the module docstring); arguments validated by
    ``ring_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, seqlens_k, group, causal, scale, layout, impl):
        ring = _Ring(group)
        n, r = ring.size, ring.rank
        b, h, length, _ = q.shape
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros((b, h, length, v.shape[3]), dtype=acc, device=q.device)
        lse = torch.full((b, h, length), -math.inf, dtype=acc, device=q.device)
        cur = (k, v)
        for step in range(n):
            src = (r - step) % n
            pending = ring.exchange(cur) if step < n - 1 else None      # the next slice travels meanwhile
            positions = shard_positions(length * n, n, src, layout, q.device)
            for rows, cols, blk_causal in _blocks(r, src, causal, layout, length):
                o, s = _step_fwd(impl, q[:, :, rows], cur[0][:, :, cols], cur[1][:, :, cols],
                                 _key_lengths(seqlens_k, positions[cols]), blk_causal, scale)
                _merge(out[:, :, rows], lse[:, :, rows], o, s)
            if pending is not None:
                _wait(pending[0])
                cur = tuple(pending[1])
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, seqlens_k)
        ctx.ring, ctx.causal, ctx.scale, ctx.layout, ctx.impl = ring, causal, scale, layout, impl
        return out

    @staticmethod
    @once_differentiable      # the ring's backward has no derivative of its own: refuse create_graph=True
    def backward(ctx, dout):
        q, k, v, out, lse, seqlens_k = ctx.saved_tensors
        ring = ctx.ring
        n, r = ring.size, ring.rank
        length = q.shape[2]
        acc = lse.dtype
        lse = lse.masked_fill(lse == -math.inf, math.inf)   # rows that see no key at all: p = 0 in every step
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        cur = (k, v)
        grads = None                  # the accumulated (dk, dv) of the slice held, arriving from the previous rank
        for step in range(n):
            src = (r - step) % n
            pending = ring.exchange(cur) if step < n - 1 else None
            positions = shard_positions(length * n, n, src, ctx.layout, q.device)
            dk = torch.zeros(cur[0].shape, dtype=acc, device=q.device)
            dv = torch.zeros(cur[1].shape, dtype=acc, device=q.device)
            for rows, cols, blk_causal in _blocks(r, src, ctx.causal, ctx.layout, length):
                g = _step_bwd(ctx.impl, dout[:, :, rows], q[:, :, rows], cur[0][:, :, cols], cur[1][:, :, cols],
                              out[:, :, rows], lse[:, :, rows], _key_lengths(seqlens_k, positions[cols]),
                              blk_causal, ctx.scale)
                dq[:, :, rows] += g[0]
                dk[:, :, cols] += g[1]
                dv[:, :, cols] += g[2]
            if grads is not None:
                _wait(grads[0])
                dk += grads[1][0]
                dv += grads[1][1]
            # after the last step this returns them to their owner (one process: already there)
            grads = ring.exchange((dk, dv)) if n > 1 else ([], [dk, dv], [])
            if pending is not None:
                _wait(pending[0])
                cur = tuple(pending[1])
        _wait(grads[0])
        dk, dv = grads[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


# ----------------------------------------------------------------------------- public function


def _check_group(op: str, group: object) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialized: call torch.distributed.init_process_group "
                           f"first (or launch with torchrun)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{op}: this process is not a member of the group")


def _check_same_everywhere(op: str, signature: list[int], group: dist.ProcessGroup | None,
                           device: torch.device) -> None:
    """One small all-gather: every rank of the group must call with the same shapes and options (a mismatch
    would otherwise hang the ring or give wrong results silently)."""
    mine = torch.tensor(signature, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    for rank, theirs in enumerate(every):
        if not torch.equal(theirs, mine):
            raise ValueError(f"{op}: ranks disagree on (batch, heads, kv heads, L_local, head dim, value head dim, "
                             f"dtype, causal, layout, seqlens_k): this rank has {signature}, group rank {rank} "
                             f"has {theirs.tolist()}; every rank must hold an equal slice (pad the sequence to a "
                             f"multiple of the ranks)")



def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                   causal: bool = False, scale: float | None = None, seqlens_k: torch.Tensor | None = None,
                   layout: str = "contiguous", dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence split across the ranks of ``group``.

    ``q`` (B, H, L_local, D), ``k`` (B, Hkv, L_local, D), ``v`` (B, Hkv, L_local, Dv): this rank's slice of one
    sequence of length N * L_local (N ranks in ``group``, default the whole world), in ``layout``:
    ``"contiguous"`` (rank r holds positions [r * L_local, (r + 1) * L_local)) or ``"zigzag"`` (chunks r and
    2N - 1 - r of 2N; balances the causal work; see ``zigzag_shard``). Returns this rank's (B, H, L_local, Dv)
    output for the same positions, equal to ``fused_kernels.attention`` on the gathered sequence; differentiable in
    q, k, v. Every rank must call it together with the same shapes (checked with one small all-gather).

    - GQA/MQA as ``fused_kernels.attention``: Hkv divides H, only the Hkv key/value heads travel.
    - ``causal=True``: key j visible to query i when j <= i in global positions (queries and keys have the
      same length, so bottom-right and top-left alignment agree).
    - ``seqlens_k`` (B,) int: the valid *global* key length per batch entry, the same on every rank; keys at
      positions >= it are masked. A batch entry with no valid key gives output 0 and zero gradients.
    - ``dropout_p`` must be 0: dropout would need a mask drawn consistently across ranks and steps, which
      this implementation does not do.
    Runs the Triton kernels or the PyTorch path by ``fused_kernels.use_backend``, as ``fused_kernels.attention``."""
    op = "ring_attention"
    _check_group(op, group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_float_tensor(name, t, op)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (batch, heads, L_local, head_dim), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    b, h, length, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"{op}: batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != length or v.shape[2] != length:
        raise ValueError(f"{op}: q, k and v must hold the same positions: L_local is {length} for q, {k.shape[2]} "
                         f"for k, {v.shape[2]} for v")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{op}: k has {k.shape[1]} heads but v has {v.shape[1]}")
    if k.shape[3] != d:
        raise ValueError(f"{op}: k's head dim {k.shape[3]} differs from q's {d}")
    hkv = k.shape[1]
    if hkv == 0 or h % hkv:
        raise ValueError(f"{op}: k/v heads ({hkv}) must divide q heads ({h})")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    _check_layout(layout)
    if layout == "zigzag" and length % 2:
        raise ValueError(f"{op}: layout 'zigzag' needs an even L_local (two chunks per rank), got {length}")
    scale = _check_scale(op, scale, d)
    if _checks.check_probability("dropout_p", dropout_p, op) > 0:
        raise ValueError(f"{op}: dropout_p must be 0 (got {dropout_p}): ring attention has no attention dropout")
    if seqlens_k is not None:
        if not isinstance(seqlens_k, torch.Tensor) or seqlens_k.is_floating_point() or seqlens_k.dtype == torch.bool:
            raise TypeError(f"{op}: seqlens_k must be an integer tensor or None")
        if tuple(seqlens_k.shape) != (b,):
            raise ValueError(f"{op}: seqlens_k must have shape ({b},), got {tuple(seqlens_k.shape)}")
        seqlens_k = seqlens_k.to(q.device)
    signature = [b, h, hkv, length, d, v.shape[3], _checks.FLOAT_DTYPES.index(q.dtype), int(causal),
                 LAYOUTS.index(layout), int(seqlens_k is not None)]
    _check_same_everywhere(op, signature, group, q.device)
    impl = _backend.choose(q, op)
    if impl == "triton" and not kernels_run(q, v, None, 0.0, q, k, v):
        impl = "torch"       # no kernel in this device's column of the tile table
    return RingAttentionFunction.apply(q, k, v, seqlens_k, group, causal, float(scale), layout, impl)

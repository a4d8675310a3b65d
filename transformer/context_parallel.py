"""Context parallelism for the models: every self-attention layer attends over a sequence split across ranks.

Inside ``with context_parallel(group):`` each self-attention of ``transformer.layers.Attention`` (no KV cache, no
mask, causal or not) runs ``fused_kernels.distributed.ring_attention`` over ``group`` instead of
``fused_kernels.attention``.
Everything else in a transformer is position-wise, so a model fed this rank's slice of every sequence (in the
layout given here, and with the slice's *global* positions for the position embedding) computes exactly this
rank's slice of the full model's output; the backward of the ring is recorded in the graph, so only the forward
needs to run inside the block. ``shard_sequence`` cuts a (batch, seq, ...) tensor into this rank's slice.

The default layout is ``"zigzag"`` (rank r holds chunks r and 2N - 1 - r of 2N): with causal attention every rank
then does the same work. See ``fused_kernels.distributed`` for the ring itself and its communication volume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fused_kernels.distributed import LAYOUTS, shard_positions


@dataclass(frozen=True)
class Ring:
    """The process group a sequence is split over and how it is laid out."""

    group: dist.ProcessGroup | None
    layout: str


_active: Ring | None = None


def active() -> Ring | None:
    """The ring in force (inside ``context_parallel``), or None: plain attention."""
    return _active


@contextlib.contextmanager
def context_parallel(group: dist.ProcessGroup | None, layout: str = "zigzag") -> Iterator[Ring]:
    """Run the self-attention layers of the models as ring attention over ``group`` for the enclosed code."""
    global _active
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    previous, _active = _active, Ring(group, layout)
    try:
        yield _active
    finally:
        _active = previous


def shard_sequence(x: torch.Tensor, world_size: int, rank: int, layout: str = "zigzag") -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """(this rank's slice of ``x`` (batch, seq, ...) along the sequence, its global positions (seq / N,))."""
    pos = shard_positions(x.shape[1], world_size, rank, layout, x.device)
    return x.index_select(1, pos), pos

"""Context-parallel (ring) attention over ``torch.distributed`` (``ops/attention/ring.py``): ``ring_attention``
and the sequence layouts it takes (``LAYOUTS``, ``shard_positions``, ``zigzag_shard``, ``zigzag_unshard``)."""

from .ops.attention.ring import LAYOUTS, ring_attention, shard_positions, zigzag_shard, zigzag_unshard

__all__ = ["LAYOUTS", "ring_attention", "shard_positions", "zigzag_shard", "zigzag_unshard"]

"""``PagedKVCache``: the paged pools of a model's layers, a free list of blocks and the sequences by id, over
``paged_append`` / ``paged_attention`` (``ops/attention/paged.py``)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from .paged import paged_append, paged_attention


class PagedKVCache:
    """A paged KV cache for many sequences: per layer one pool (num_blocks, block_size, Hkv, D) of keys and
    one of values, a free list of physical blocks shared by the layers (every layer of a sequence uses the same
    block ids), and per sequence (any hashable id) its blocks and its length in each layer.

        cache = PagedKVCache(num_blocks=256, block_size=16, num_kv_heads=4, head_dim=64, num_layers=2)
        cache.allocate("a"); cache.allocate("b")
        cache.append(["a", "b"], k, v, layer=0)        # (2, Hkv, Lnew, D): grows the sequences' blocks
        out = cache.attention(["a", "b"], q, layer=0)  # (2, H, Lnew, D), bottom-right causal
        cache.free("a")                                # its blocks go back to the free list

    Blocks are taken when a sequence grows (``reserve``; ``append`` reserves what it writes) and returned by
    ``free``; a sequence never holds more than ``ceil(length / block_size)`` blocks. Not thread-safe."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *, num_layers: int = 1,
                 head_dim_v: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PagedKVCache: {name} must be an int >= 1, got {value!r}")
        dv = head_dim if head_dim_v is None else head_dim_v
        self.num_blocks, self.block_size, self.num_layers = num_blocks, block_size, num_layers
        self.k_caches = [torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                         for _ in range(num_layers)]
        self.v_caches = [torch.empty(num_blocks, block_size, num_kv_heads, dv, dtype=dtype, device=device)
                         for _ in range(num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))       # pop() hands out the lowest id first
        self._blocks: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, list[int]] = {}

    @property
    def device(self) -> torch.device:
        return self.k_caches[0].device

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def __contains__(self, seq: Hashable) -> bool:
        return seq in self._blocks

    def length(self, seq: Hashable, layer: int = 0) -> int:
        return self._lengths[self._known(seq)][layer]

    def _known(self, seq: Hashable) -> Hashable:
        if seq not in self._blocks:
            raise KeyError(f"PagedKVCache: unknown sequence {seq!r}")
        return seq

    def allocate(self, seq: Hashable, num_tokens: int = 0) -> None:
        """Start sequence ``seq`` (length 0) with room for ``num_tokens`` positions."""
        if seq in self._blocks:
            raise ValueError(f"PagedKVCache: sequence {seq!r} is already allocated")
        self._blocks[seq] = []
        self._lengths[seq] = [0] * self.num_layers
        try:
            self.reserve(seq, num_tokens)
        except RuntimeError:
            self.free(seq)
            raise

    def reserve(self, seq: Hashable, num_tokens: int) -> None:
        """Make room for ``num_tokens`` positions past the sequence's longest layer; RuntimeError if the
        pool has too few free blocks (nothing is taken then)."""
        blocks = self._blocks[self._known(seq)]
        need = self.blocks_for(max(self._lengths[seq]) + num_tokens) - len(blocks)
        if need > len(self._free):
            raise RuntimeError(f"PagedKVCache: {need} more blocks needed for sequence {seq!r}, "
                               f"{len(self._free)} of {self.num_blocks} free")
        blocks.extend(self._free.pop() for _ in range(max(need, 0)))

    def free(self, seq: Hashable) -> None:
        """Forget ``seq`` and return its blocks to the free list."""
        self._free.extend(reversed(self._blocks.pop(self._known(seq))))
        del self._lengths[seq]

    def tables(self, seqs: Sequence[Hashable], layer: int = 0, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table (B, max blocks) int32, cache_seqlens (B,) int32 of ``layer``, plus ``extra``) of the
        sequences ``seqs``, on the pool's device; unused table entries are 0."""
        width = max([len(self._blocks[self._known(s)]) for s in seqs] + [1])
        rows = [self._blocks[s] + [0] * (width - len(self._blocks[s])) for s in seqs]
        table = torch.tensor(rows, dtype=torch.int32).reshape(len(seqs), width).to(self.device)
        lengths = torch.tensor([self._lengths[s][layer] + extra for s in seqs], dtype=torch.int32).to(self.device)
        return table, lengths

    def append(self, seqs: Sequence[Hashable], k_new: torch.Tensor, v_new: torch.Tensor, layer: int = 0) -> None:
        """Write (B, Hkv, Lnew, D) keys/values of the sequences ``seqs`` after their cached positions in
        ``layer`` (reserving blocks as needed) and advance that layer's lengths by Lnew."""
        lnew = k_new.shape[2] if isinstance(k_new, torch.Tensor) and k_new.dim() == 4 else 0
        for s in seqs:
            self.reserve(s, self._lengths[self._known(s)][layer] + lnew - max(self._lengths[s]))
        table, lengths = self.tables(seqs, layer)
        paged_append(self.k_caches[layer], self.v_caches[layer], table, lengths, k_new, v_new, check=False)
        for s in seqs:
            self._lengths[s][layer] += lnew

    def attention(self, seqs: Sequence[Hashable], q: torch.Tensor, layer: int = 0, *, causal: bool = True,
                  scale: float | None = None) -> torch.Tensor:
        """``paged_attention`` of (B, H, Lq, D) queries over the cached keys of ``seqs`` in ``layer`` (the
        queries' own keys appended first)."""
        table, lengths = self.tables(seqs, layer)
        return paged_attention(q, self.k_caches[layer], self.v_caches[layer], table, lengths, causal=causal,
                               scale=scale, check=False)

    def layer(self, seqs: Sequence[Hashable], layer: int) -> PagedLayer:
        """A view of ``layer`` for the sequences ``seqs`` that a model's attention layer calls (``attend``)."""
        return PagedLayer(self, list(seqs), layer)


class PagedLayer:
    """One layer of a ``PagedKVCache`` for a fixed list of sequences: what ``transformer.layers.Attention``
    takes as its ``cache`` (``paged`` tells it apart from a dense ``KVCache``)."""

    paged = True

    def __init__(self, cache: PagedKVCache, seqs: list[Hashable], layer: int) -> None:
        self.cache, self.seqs, self.index = cache, seqs, layer

    @property
    def length(self) -> int:
        """The longest cached length among the sequences (the dense cache's ``length``)."""
        return max((self.cache.length(s, self.index) for s in self.seqs), default=0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Append this step's (B, Hkv, L, D) keys/values and attend the (B, H, L, D) queries over the cache."""
        self.cache.append(self.seqs, k, v, self.index)
        return self.cache.attention(self.seqs, q, self.index, causal=causal)

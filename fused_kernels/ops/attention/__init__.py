"""Fused attention (FlashAttention-2 style): forward, deterministic backward, and a flash-decoding path.

``softmax(scale * q @ k^T + mask) @ v`` without ever materializing the (L, S) score matrix: each program
keeps a block of queries in registers and streams key/value blocks through an online softmax (base-2
exponentials, fp32 accumulation, fp64 for fp64). Supports GQA/MQA natively (a query head h reads key/value
head ``h // (H // Hkv)``), bool/float masks read through broadcast strides, per-batch key lengths
(``seqlens_k``: key blocks past the length are skipped), two causal alignments, in-kernel dropout, any head
dim up to 256 (padded to a power of two with masked loads) and strided q/k/v (last dim contiguous).

Causal conventions (``j`` key index, ``i`` query index, ``L`` queries, ``S`` keys):
- ``attention(causal=True)``: **bottom-right** aligned, ``j <= i + S - L`` (the last query sees every key:
  what a KV cache and chunked prefill need);
- ``scaled_dot_product_attention(is_causal=True)``: **top-left** aligned, ``j <= i``, as torch.
They agree when ``L == S``. In the kernels both are ``j <= i + causal_offset``.

The forward saves only the output and the log-sum-exp (natural log, accumulation dtype). The backward
is atomics-free and therefore deterministic: a preprocess kernel computes ``delta = rowsum(dO * O)``
(minus the incoming lse gradient), one kernel per key block accumulates dK and dV over every query block
of every query head of its GQA group, one kernel per query block accumulates dQ.

Decoding (few queries, long cache): ``_attn_fwd_split_kernel`` packs all the queries of a GQA group
(``G * L`` rows) into one tile, splits the keys across programs, and writes a partial output and lse per
split; ``_attn_combine_kernel`` merges the splits by their lse.

Packed variable-length sequences (``varlen``): the main forward, dK/dV and dQ kernels take a
``VARLEN`` constexpr (default False, generating the same code as before when off) that reads each
program's sequence start and length from ``cu_seqlens`` pointers and offsets its base pointers by them.

    _attn_fwd_kernel, _attn_fwd_split_kernel, _attn_combine_kernel      (Triton, forward)
    _attn_bwd_preprocess_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel   (Triton, backward)
    attention_fwd / attention_bwd        (torch.library custom ops, registered autograd)
    attention, scaled_dot_product_attention   (public functions)

Files: ``config`` (every tile table, constants), ``kernels/`` (Triton only: mods, forward, decode, backward,
blockmask, paged), ``launch`` (custom ops, autograd), ``variants`` / ``sparse`` / ``blockmask`` (attention
variants and block sparsity), ``api`` (public functions and checks), ``varlen`` (packed sequences), ``paged`` and
``cache`` (paged KV cache), ``ring`` (context parallelism), ``torch_path`` (the PyTorch path), ``grad`` (double
backward, the float-mask gradient), ``examples`` (user mods).
"""

from .api import attention, attention_tiles, scaled_dot_product_attention
from .blockmask import BlockMask, block_mask
from .cache import PagedKVCache
from .paged import paged_append, paged_attention
from .varlen import varlen_attention

__all__ = [
    "BlockMask", "PagedKVCache", "attention", "attention_tiles", "block_mask", "paged_append", "paged_attention",
    "scaled_dot_product_attention", "varlen_attention",
]

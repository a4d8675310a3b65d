"""Triton kernels for transformers, each with a pure-PyTorch reference.

CUDA tensors run the Triton kernels; CPU tensors run the fastest PyTorch implementation with the same
semantics (``fused_kernels.fast_torch``: torch's flash attention, softmax and native norms), or the Triton
kernels through the interpreter when ``TRITON_INTERPRET=1`` was set before import. ``use_backend``
forces a choice. The float64-capable references (``fused_kernels.reference``) are what the tests compare with.
"""

from . import nn
from ._backend import get_backend, use_backend
from .attention import BlockMask, attention, attention_tiles, block_mask, scaled_dot_product_attention
from .layer_norm import add_layer_norm, layer_norm, rms_norm
from .paged import PagedKVCache, paged_append, paged_attention
from .softmax import softmax
from .varlen import varlen_attention

__version__ = "0.1.0"

__all__ = [
    "add_layer_norm",
    "attention",
    "attention_tiles",
    "block_mask",
    "BlockMask",
    "get_backend",
    "layer_norm",
    "nn",
    "PagedKVCache",
    "paged_append",
    "paged_attention",
    "rms_norm",
    "scaled_dot_product_attention",
    "softmax",
    "use_backend",
    "varlen_attention",
]

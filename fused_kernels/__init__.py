"""Triton kernels for transformers, each with a pure-PyTorch reference.

CUDA tensors run the Triton kernels; CPU tensors run the fastest PyTorch implementation with the same
semantics (each op's PyTorch path: torch's flash attention, softmax and native norms), or the Triton
kernels through the interpreter when ``TRITON_INTERPRET=1`` was set before import. ``use_backend``
forces a choice. The float64-capable references (``fused_kernels.reference``) are what the tests compare with.
"""

from . import nn
from ._core.backend import get_backend, use_backend
from .ops.attention import (
    BlockMask,
    PagedKVCache,
    attention,
    attention_tiles,
    block_mask,
    paged_append,
    paged_attention,
    scaled_dot_product_attention,
    varlen_attention,
)
from .ops.cross_entropy import cross_entropy, linear_cross_entropy
from .ops.gated_mlp import geglu, swiglu
from .ops.norms import add_layer_norm, layer_norm, rms_norm
from .ops.rotary import apply_rotary, apply_rotary_pos_emb, rope_cos_sin, rope_frequencies
from .ops.softmax import softmax

__version__ = "0.1.0"

__all__ = [
    "add_layer_norm",
    "apply_rotary",
    "apply_rotary_pos_emb",
    "attention",
    "attention_tiles",
    "block_mask",
    "BlockMask",
    "cross_entropy",
    "geglu",
    "get_backend",
    "layer_norm",
    "linear_cross_entropy",
    "nn",
    "PagedKVCache",
    "paged_append",
    "paged_attention",
    "rms_norm",
    "rope_cos_sin",
    "rope_frequencies",
    "scaled_dot_product_attention",
    "softmax",
    "swiglu",
    "use_backend",
    "varlen_attention",
]

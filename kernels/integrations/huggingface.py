"""Run Hugging Face ``transformers`` models on our attention kernel.

    >>> from kernels.integrations import huggingface
    >>> name = huggingface.register()                 # "kernels_triton"
    >>> model.set_attn_implementation(name)           # or from_pretrained(..., attn_implementation=name)

Our function takes the place of transformers' ``sdpa`` one with the same semantics: the same 4-D
boolean masks (padding and causal, built by transformers' ``sdpa_mask``), the same top-left causal
rule, grouped-query attention without repeating key/value heads. ``transformers`` stays an optional
dependency: it is imported only by ``register``.
"""

from __future__ import annotations

import torch

NAME = "kernels_triton"


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,            # (B, H, L, E)
    key: torch.Tensor,              # (B, Hkv, S, E)
    value: torch.Tensor,            # (B, Hkv, S, Ev)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface; returns ``((B, L, H, Ev) output, None)``."""
    from ..attention import scaled_dot_product_attention

    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME} attention does not support softcap")
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' sdpa path: the causal flag only stands in for a mask that was not built.
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and kv_length > q_length:
        # Prefill into an empty static cache: the keys past the queries are all masked (top-left rule).
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register our attention (and transformers' sdpa mask builder) under ``name``; returns ``name``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        raise ImportError("kernels.integrations.huggingface needs transformers: pip install transformers") from err
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name

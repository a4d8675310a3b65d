"""Run Hugging Face ``transformers`` models on our attention kernel.

    >>> from fused_kernels.integrations import huggingface
    >>> name = huggingface.register()                 # "fused_kernels"
    >>> model.set_attn_implementation(name)           # or from_pretrained(..., attn_implementation=name)

Our function takes the place of transformers' ``sdpa`` one with the same semantics: the same 4-D
boolean masks (padding and causal, built by transformers' ``sdpa_mask``), the same top-left causal
rule, grouped-query attention without repeating key/value heads. ``transformers`` stays an optional
dependency: it is imported only by ``register``.

Packed (padding-free) batches, e.g. from ``transformers.DataCollatorWithFlattening``: one row of
concatenated sequences. Given transformers' FlashAttention keyword arguments ``cu_seq_lens_q``,
``cu_seq_lens_k``, ``max_length_q`` and ``max_length_k`` (``return_flash_attn_kwargs=True``), or only
``position_ids`` that restart at every sequence (what transformers' flash path falls back to), the call is
one ``fused_kernels.varlen_attention`` over the packed tokens, causal per sequence when the module is causal; the
4-D block-diagonal mask transformers built for the same batch is then not read.
"""

from __future__ import annotations

import torch

NAME = "fused_kernels"


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
    from ..ops.attention import scaled_dot_product_attention

    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME} attention does not support softcap")
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed = _packed_sequences(module, query, key, position_bias, kwargs)
    if packed is not None:
        return _varlen_forward(query, key, value, *packed, causal=bool(is_causal), dropout=dropout,
                               scale=scaling), None
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


def _packed_sequences(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      position_bias: torch.Tensor | None, kwargs: dict,
                      ) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) when this call is over packed sequences, else None.

    As transformers' ``_flash_attention_forward``: the four varlen kwargs when all are given, else
    ``position_ids`` of one row (batch 1, several queries, no cache) that restart somewhere. A sliding
    window or a position bias is only in the mask, so such calls keep the masked dense path, as do
    transformers' paged-cache calls (``block_table``)."""
    if position_bias is not None or getattr(module, "sliding_window", None) is not None:
        return None
    if kwargs.get("block_table") is not None:       # continuous batching's paged decode: not a packed batch
        return None
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    given = [kwargs.get(n) for n in names]
    if all(x is not None for x in given):
        cu_q, cu_k, max_q, max_k = given
        return cu_q, cu_k, int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1 or query.shape[2] <= 1 or key.shape[2] != query.shape[2]:
        return None
    pos = position_ids.reshape(-1)
    if pos.numel() != query.shape[2]:
        return None
    # Sequences restart at the smallest position id (not always 0: RoBERTa-like models start past the pad).
    starts = (pos == pos.min()).nonzero().view(-1)
    if starts.numel() <= 1:                                    # one sequence: the dense path is the same
        return None
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    max_len = int(cu.diff().max())
    return cu, cu, max_len, max_len


def _varlen_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                    cu_k: torch.Tensor, max_q: int, max_k: int, *, causal: bool, dropout: float,
                    scale: float | None) -> torch.Tensor:
    """query (1, H, total_q, E), key/value (1, Hkv, total_k, E/Ev) -> (1, total_q, H, Ev)."""
    # Imported per call, so a patched fused_kernels.varlen_attention (the tests' spy) is the one that runs.
    from .. import varlen_attention

    if query.shape[0] != 1:
        raise ValueError(f"{NAME}: packed sequences (cu_seq_lens_*) need one row of concatenated tokens, got a "
                         f"batch of {query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))      # (total, heads, head_dim) views
    out = varlen_attention(q, k, v, cu_q.to(q.device), cu_k.to(q.device), max_q, max_k, causal=causal,
                           scale=scale, dropout_p=dropout)
    return out[None]                                                    # (1, total_q, H, Ev)


def register(name: str = NAME) -> str:
    """Register our attention (and transformers' sdpa mask builder) under ``name``; returns ``name``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        raise ImportError("fused_kernels.integrations.huggingface needs transformers: "
                          "pip install transformers") from err
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name

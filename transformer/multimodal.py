"""A multimodal transformer (the seed notes' last application): one encoder per modality, a joint decoder
driven by task queries, one head per task.

    image (B, C, H, W) -> ViT (its own patch + position embeddings)  -> (B, 1 + N, dim) + modality[0]
    text  (B, T)       -> BERT encoder (its own word + position emb.) -> (B, T, dim)     + modality[1]
    memory = [image; text]  (B, 1 + N + T, dim), padding mask [1...1; attention_mask]
    queries of the requested tasks (B, sum of n_queries, dim): each task's set attends to itself
    (block-diagonal self-attention) and every query cross-attends to the whole memory
    -> final norm -> mean over the task's queries -> that task's head -> logits (B, outputs)

Either modality may be left out (the single-modality baselines train the same model on one input).
The encoders are the ``ViT`` and ``BERT`` modules themselves and the decoder is ``DecoderBlock``s: no
attention or normalization of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fused_kernels.nn import LayerNorm

from .bert import BERT
from .config import BERTConfig, MultimodalConfig, ViTConfig
from .layers import BlockSpec, DecoderBlock, add_norm, init_weights, key_padding_mask
from .vit import ViT

IMAGE, TEXT = 0, 1


@dataclass
class MultimodalOutput:
    """``logits[task]`` (B, outputs) for every task run; ``loss`` the sum of the tasks' cross entropies
    (over the tasks whose labels were given)."""

    logits: dict[str, torch.Tensor]
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None


class Multimodal(nn.Module):
    def __init__(self, config: MultimodalConfig) -> None:
        super().__init__()
        self.config = c = config
        shared = dict(dim=c.dim, n_heads=c.n_heads, ffn_dim=c.ffn_dim, dropout=c.dropout,
                      attn_dropout=c.attn_dropout, eps=c.eps, activation=c.activation)
        self.image_encoder = ViT(ViTConfig(image_size=c.image_size, patch_size=c.patch_size,
                                           num_channels=c.num_channels, n_layers=c.image_layers, num_classes=0,
                                           **shared))
        self.text_encoder = BERT(BERTConfig(vocab_size=c.vocab_size, max_seq_len=c.max_text_len,
                                            n_layers=c.text_layers, pad_token_id=c.pad_token_id,
                                            padding_free=c.padding_free, **shared),
                                 add_pooling_layer=False)
        self.modality = nn.Embedding(2, c.dim)
        self.queries = nn.ParameterDict({t: nn.Parameter(torch.empty(c.n_queries, c.dim)) for t in c.tasks})
        spec = BlockSpec(c.dim, c.n_heads, c.ffn_dim, activation=c.activation, pre_ln=True, dropout=c.dropout,
                         attn_dropout=c.attn_dropout, eps=c.eps)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(spec) for _ in range(c.decoder_layers))
        self.decoder_norm = LayerNorm(c.dim, eps=c.eps)
        self.heads = nn.ModuleDict({t: nn.Linear(c.dim, n) for t, n in c.tasks.items()})
        init_weights(self.modality)
        init_weights(self.decoder_blocks)
        init_weights(self.heads)
        for q in self.queries.values():
            nn.init.normal_(q, std=0.02)

    def encode(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> memory (B, S, dim) and its mask (B, S), 1 = real: the image's 1 + N tokens, then the text's."""
        parts, masks = [], []
        if pixel_values is not None:
            image = self.image_encoder.forward_features(pixel_values)                     # (B, 1 + N, dim)
            parts.append(image + self.modality.weight[IMAGE])
            masks.append(torch.ones(image.shape[:2], dtype=torch.long, device=image.device))
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            text = self.text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state   # (B, T, dim)
            parts.append(text + self.modality.weight[TEXT])
            masks.append(attention_mask.long())
        if not parts:
            raise ValueError("Multimodal needs pixel_values, input_ids or both")
        if len({p.shape[0] for p in parts}) > 1:
            raise ValueError(f"pixel_values and input_ids hold different batch sizes: {[p.shape[0] for p in parts]}")
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, tasks: list[str] | None = None,
                labels: dict[str, torch.Tensor] | None = None) -> MultimodalOutput:
        """Run ``tasks`` (default: every task; with ``labels``, the labelled ones) on one encoding of the inputs.
        ``labels[task]`` (B,) class indices."""
        c = self.config
        tasks = list(tasks or (labels.keys() if labels else c.tasks))
        if unknown := [t for t in tasks if t not in c.tasks]:
            raise ValueError(f"unknown tasks {unknown}; this model has {list(c.tasks)}")
        memory, memory_mask = self.encode(pixel_values, input_ids, attention_mask)       # (B, S, dim), (B, S)
        b, q = memory.shape[0], c.n_queries
        hidden = torch.cat([self.queries[t] for t in tasks]).expand(b, -1, -1)          # (B, T * Q, dim)
        group = torch.arange(len(tasks), device=memory.device).repeat_interleave(q)     # (T * Q,)
        self_mask = group[:, None] == group[None, :]                                    # (T * Q, T * Q)
        cross_mask = key_padding_mask(memory_mask)                                      # (B, 1, 1, S)
        residual = None
        for block in self.decoder_blocks:
            hidden, residual, _ = block(hidden, residual, memory, self_mask=self_mask, memory_mask=cross_mask,
                                        causal=False)
        p = c.dropout if self.training else 0.0
        hidden, _ = add_norm(hidden, residual, self.decoder_norm, p)                     # (B, T * Q, dim)
        pooled = hidden.view(b, len(tasks), q, c.dim).mean(2)                           # (B, T, dim)
        logits = {t: self.heads[t](pooled[:, i]) for i, t in enumerate(tasks)}          # each (B, outputs)
        losses = {t: F.cross_entropy(logits[t].float(), y) for t, y in (labels or {}).items()}
        return MultimodalOutput(logits, sum(losses.values()) if losses else None, losses or None)

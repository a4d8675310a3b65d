"""ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words"): an image as a sequence of patches.

    pixels (B, C, H, W) -> patches, each flattened and linearly projected (one strided convolution)
    -> [class token; patches] + learned positions -> dropout -> pre-LN encoder blocks -> final LN
    -> head on the class token

The encoder is the shared pre-LN ``EncoderBlock`` stack passing the (hidden, residual) pair, so every
residual add fuses with the LayerNorm after it (``add_norm``), the last one with the final norm. The
sequence is 1 + (image / patch)^2 tokens: 197 for ViT-B/16 at 224 pixels, which is no multiple of any
kernel block; the attention and norm kernels mask the ragged tail. Every image of a batch has the same
size, so every sequence has the same length: there is no padding, hence no padding-free mode (the packed
path of BERT and the encoder-decoder would run the same attention with extra gathers).

Parameter names follow timm's layout (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N``,
``norm``, ``head``); ``from_huggingface`` maps transformers' ``ViTForImageClassification`` / ``ViTModel``
weights onto them, current and legacy key names alike.

    model = ViT(ViTConfig.from_preset("tiny"))
    out = model(pixel_values, labels=labels)      # out.logits (B, num_classes), out.loss
    feats = model.forward_features(pixel_values)  # (B, 1 + num_patches, dim)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fused_kernels.nn import LayerNorm
from transformer.config import ViTConfig
from transformer.hf.vit import convert_vit_state_dict, vit_config_from_huggingface
from transformer.layers import BlockSpec, EncoderBlock, PatchEmbedding, add_norm, init_weights
from transformer.outputs import ClassificationOutput


class ViT(nn.Module):
    """Vision Transformer classifier; ``config.num_classes == 0`` drops the head (``nn.Identity``), so
    ``forward(...).logits`` is then the final class-token feature (B, dim)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbedding(c.image_size, c.patch_size, c.num_channels, c.dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, c.dim))
        spec = BlockSpec(c.dim, c.n_heads, c.ffn_dim, activation=c.activation, pre_ln=True, dropout=c.dropout,
                         attn_dropout=c.attn_dropout, eps=c.eps, qkv_bias=c.qkv_bias)
        self.blocks = nn.ModuleList(EncoderBlock(spec) for _ in range(c.n_layers))
        self.norm = LayerNorm(c.dim, eps=c.eps)
        self.head = nn.Linear(c.dim, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) linear/conv weights, zero biases, unit norms; truncated normal(0, 0.02) class
        token and positions (as transformers' ViT initialises them)."""
        init_weights(self)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> class token + patch embeddings + positions, after dropout: (B, 1 + N, dim)."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))   # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                              # (B, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.pos_embed                             # (B, 1 + N, dim)
        return F.dropout(x, self.config.dropout, self.training)

    def forward_features(self, pixel_values: torch.Tensor, output_attentions: bool = False,
                         ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, H, W) -> encoder output after the final norm, (B, 1 + num_patches, dim); with
        ``output_attentions`` also the per-layer attention weights, each (B, H, 1 + N, 1 + N)."""
        hidden, residual = self.embed(pixel_values), None
        attentions = []
        for block in self.blocks:
            hidden, residual, w = block(hidden, residual, need_weights=output_attentions)
            attentions.append(w)
        p = self.config.dropout if self.training and residual is not None else 0.0
        out, _ = add_norm(hidden, residual, self.norm, p)                          # (B, 1 + N, dim)
        return (out, attentions) if output_attentions else out

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_attentions: bool = False) -> ClassificationOutput:
        """(B, C, H, W) -> ``.logits`` (B, num_classes) from the class token; with ``labels`` (B,) class
        indices, also ``.loss``, the mean cross entropy."""
        feats = self.forward_features(pixel_values, output_attentions)
        feats, attentions = feats if output_attentions else (feats, None)
        logits = self.head(feats[:, 0])                                             # (B, num_classes)
        loss = None
        if labels is not None:
            if self.config.num_classes <= 0:
                raise ValueError("ViT: labels given but the model has no classification head (num_classes=0)")
            loss = F.cross_entropy(logits.float(), labels)
        return ClassificationOutput(logits=logits, loss=loss, attentions=attentions)

    # --- Hugging Face interop -------------------------------------------------------------------------

    @staticmethod
    def config_from_huggingface(hf_config: Any, with_head: bool = True) -> ViTConfig:
        """transformers ``ViTConfig`` -> ours (``with_head=False``: no classifier, ``num_classes=0``)."""
        return vit_config_from_huggingface(hf_config, with_head)

    @classmethod
    def from_huggingface(cls, hf_model: nn.Module) -> ViT:
        """A ``ViT`` with the weights of a transformers ``ViTForImageClassification`` (head included) or
        ``ViTModel`` (no head: ``num_classes=0``); same outputs as the Hugging Face model."""
        classifier = getattr(hf_model, "classifier", None)
        with_head = isinstance(classifier, nn.Linear)
        model = cls(cls.config_from_huggingface(hf_model.config, with_head=with_head))
        p = next(hf_model.parameters())
        model.to(device=p.device, dtype=p.dtype)
        model.load_huggingface_state_dict(hf_model.state_dict())
        return model

    def load_huggingface_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a transformers ViT state dict (``ViTForImageClassification``: ``vit.``-prefixed, plus
        ``classifier``; ``ViTModel``: unprefixed), in the current key names or the legacy ones
        (``encoder.layer.N.attention.attention.query``, ``...intermediate.dense``, ...). Strict: a
        missing, unexpected or wrongly shaped entry raises, naming them all. The q/k/v projections are
        concatenated into our fused ``qkv_proj``."""
        converted = convert_vit_state_dict(state_dict, self.state_dict())
        self.load_state_dict(converted, strict=True)

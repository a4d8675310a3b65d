"""Hugging Face ViT checkpoints -> ``transformer.vit.ViT``: the configuration and the state-dict key maps
(``ViT.from_huggingface`` / ``ViT.load_huggingface_state_dict`` call these)."""

from __future__ import annotations

import re
from typing import Any

import torch

from transformer.config import ViTConfig

# transformers' ``hidden_act`` -> ours.
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# Legacy transformers ViT key names -> current ones (transformers 5's own renaming for "ViTModel", in
# ``conversion_mapping.py``). Applied in order and chained, as transformers applies them, so
# ``encoder.layer.0.attention.output.dense`` becomes ``layers.0.attention.o_proj`` and is no longer
# seen by the ``output.dense`` rule that serves the feed-forward's second layer.
_HF_LEGACY_RENAMES = (
    (r"encoder\.layer\.", "layers."),
    (r"attention\.query", "q_proj"),
    (r"attention\.key", "k_proj"),
    (r"attention\.value", "v_proj"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"output\.dense", "mlp.fc2"),
)

# Checkpoint entries with no counterpart here, skipped on purpose: ``ViTModel``'s pooler (dense + tanh
# on the class token, which ``ViTForImageClassification`` does not use) and the mask token of masked
# image modelling.
_HF_IGNORED = re.compile(r"^(pooler\.dense\.(weight|bias)|embeddings\.mask_token)$")


def vit_config_from_huggingface(hf_config: Any, with_head: bool = True) -> ViTConfig:
    """transformers ``ViTConfig`` -> ours (``with_head=False``: no classifier, ``num_classes=0``)."""
    def square(name: str) -> int:
        v = getattr(hf_config, name)
        if isinstance(v, (list, tuple)):
            if len(v) != 2 or v[0] != v[1]:
                raise ValueError(f"ViT.from_huggingface: only square {name} is supported, got {v}")
            v = v[0]
        return int(v)

    act = hf_config.hidden_act
    if not isinstance(act, str) or act not in _HF_ACTIVATIONS:
        raise ValueError(f"ViT.from_huggingface: unsupported hidden_act {act!r}; "
                         f"supported: {sorted(_HF_ACTIVATIONS)}")
    return ViTConfig(
        image_size=square("image_size"), patch_size=square("patch_size"), num_channels=hf_config.num_channels,
        dim=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers, n_heads=hf_config.num_attention_heads,
        ffn_dim=hf_config.intermediate_size, num_classes=hf_config.num_labels if with_head else 0,
        dropout=float(hf_config.hidden_dropout_prob), attn_dropout=float(hf_config.attention_probs_dropout_prob),
        eps=hf_config.layer_norm_eps, activation=_HF_ACTIVATIONS[act], qkv_bias=bool(hf_config.qkv_bias))


def convert_vit_state_dict(state_dict: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
    """A transformers ViT state dict (``ViTForImageClassification``: ``vit.``-prefixed, plus ``classifier``;
    ``ViTModel``: unprefixed; current or legacy key names) -> ours, checked against ``ours`` (the model's state
    dict): a missing, unexpected or wrongly shaped entry raises a ValueError naming them all. The q/k/v
    projections are concatenated into the fused ``qkv_proj``."""
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    qkv: dict[str, dict[str, torch.Tensor]] = {}           # our qkv key -> {"q"|"k"|"v": tensor}
    for key, value in state_dict.items():
        name = _hf_current_name(key.removeprefix("vit."))
        if _HF_IGNORED.match(name):
            continue
        m = re.fullmatch(r"layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", name)
        if m:
            qkv.setdefault(f"blocks.{m[1]}.attn.qkv_proj.{m[3]}", {})[m[2]] = value
            continue
        target = _hf_to_ours(name)
        if target is None:
            unexpected.append(key)
        else:
            converted[target] = value
    incomplete = []
    for target, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            incomplete.append(f"{target} (has only {''.join(sorted(parts))} of q, k, v)")
            continue
        converted[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    missing = sorted(set(ours) - set(converted))
    unexpected += sorted(set(converted) - set(ours))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
              for k, v in converted.items() if k in ours and v.shape != ours[k].shape]
    if missing or unexpected or shapes or incomplete:
        problems = [f"{what}: {items}" for what, items in
                    (("missing (our names)", missing), ("unexpected", unexpected),
                     ("shape mismatch", shapes), ("incomplete q/k/v", incomplete)) if items]
        raise ValueError("ViT.load_huggingface_state_dict: checkpoint does not match the model; "
                         + "; ".join(problems))
    return converted


def _hf_current_name(name: str) -> str:
    """A transformers ViT key (without ``vit.``) in its current form, legacy renames applied."""
    for pattern, repl in _HF_LEGACY_RENAMES:
        name = re.sub(pattern, repl, name, count=1)
    return name


_HF_TO_OURS = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.out_proj.\2"),
    (r"layers\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.ln1.\2"),
    (r"layers\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.ln2.\2"),
    (r"layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.ffn.fc\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
)


def _hf_to_ours(name: str) -> str | None:
    for pattern, repl in _HF_TO_OURS:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None

"""Hugging Face BERT checkpoints -> ``transformer.bert``: the configuration and the state-dict key maps
(``BERT*.from_huggingface`` / ``transformer.bert.load_huggingface_state_dict`` call these)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from transformer.config import BERTConfig

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                   "silu": "silu", "swish": "silu"}


def config_from_huggingface(hf_config: Any) -> BERTConfig:
    """``BERTConfig`` from a transformers ``BertConfig``; raises on variants this model does not build."""
    act = hf_config.hidden_act
    if not isinstance(act, str) or act not in _HF_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_HF_ACTIVATIONS)}")
    pos_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if pos_type != "absolute":
        raise ValueError(f"only absolute position embeddings are supported, got {pos_type!r}")
    if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
    return BERTConfig(
        vocab_size=hf_config.vocab_size, max_seq_len=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size, dim=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads, ffn_dim=hf_config.intermediate_size,
        dropout=hf_config.hidden_dropout_prob, attn_dropout=hf_config.attention_probs_dropout_prob,
        eps=hf_config.layer_norm_eps, activation=_HF_ACTIVATIONS[act],
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        num_labels=hf_config.num_labels, classifier_dropout=getattr(hf_config, "classifier_dropout", None),
    )


# Hugging Face name (after the "bert." prefix is stripped) -> ours; "{i}" is the layer index.
_ENCODER_KEYS = {
    "embeddings.word_embeddings.weight": "word_embed.weight",
    "embeddings.position_embeddings.weight": "pos_embed.weight",
    "embeddings.token_type_embeddings.weight": "type_embed.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
    "encoder.layer.{i}.attention.output.dense.weight": "blocks.{i}.attn.out_proj.weight",
    "encoder.layer.{i}.attention.output.dense.bias": "blocks.{i}.attn.out_proj.bias",
    "encoder.layer.{i}.attention.output.LayerNorm.weight": "blocks.{i}.ln1.weight",
    "encoder.layer.{i}.attention.output.LayerNorm.bias": "blocks.{i}.ln1.bias",
    "encoder.layer.{i}.intermediate.dense.weight": "blocks.{i}.ffn.fc1.weight",
    "encoder.layer.{i}.intermediate.dense.bias": "blocks.{i}.ffn.fc1.bias",
    "encoder.layer.{i}.output.dense.weight": "blocks.{i}.ffn.fc2.weight",
    "encoder.layer.{i}.output.dense.bias": "blocks.{i}.ffn.fc2.bias",
    "encoder.layer.{i}.output.LayerNorm.weight": "blocks.{i}.ln2.weight",
    "encoder.layer.{i}.output.LayerNorm.bias": "blocks.{i}.ln2.bias",
    "pooler.dense.weight": "pooler.weight",
    "pooler.dense.bias": "pooler.bias",
}
_HEAD_KEYS = {
    "cls.predictions.transform.dense.weight": "mlm.transform.weight",
    "cls.predictions.transform.dense.bias": "mlm.transform.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm.norm.bias",
    "cls.predictions.bias": "mlm.bias",
    "cls.seq_relationship.weight": "nsp.weight",
    "cls.seq_relationship.bias": "nsp.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
    "qa_outputs.weight": "qa_outputs.weight",
    "qa_outputs.bias": "qa_outputs.bias",
}
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)")
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def convert_bert_state_dict(hf: Mapping[str, torch.Tensor], encoder_prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face BERT tensors -> our names. ``encoder_prefix``: where our ``BERT`` sits ("" or "bert.").

    Accepts the old TensorFlow-era ``LayerNorm.gamma/beta`` names; skips the ``position_ids`` /
    ``token_type_ids`` buffers; raises on any key it cannot place (strict)."""
    sd: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    tied_decoder = None
    for key, value in hf.items():
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        key = key.removeprefix("bert.")
        if key.endswith(("position_ids", "embeddings.token_type_ids")):
            continue
        if key == "cls.predictions.decoder.weight":
            tied_decoder = value
            continue
        if key == "cls.predictions.decoder.bias":   # the same tensor as cls.predictions.bias
            key = "cls.predictions.bias"
        if m := _QKV.fullmatch(key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
            continue
        if key in _HEAD_KEYS:
            sd[_HEAD_KEYS[key]] = value
            continue
        m = _LAYER.match(key)
        generic = _LAYER.sub("encoder.layer.{i}.", key, count=1) if m else key
        if generic in _ENCODER_KEYS:
            ours = _ENCODER_KEYS[generic].replace("{i}", m[1]) if m else _ENCODER_KEYS[generic]
            sd[encoder_prefix + ours] = value
        else:
            unknown.append(key)
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {i}: attention {kind} needs query, key and value; got only {sorted(parts)}")
        sd[f"{encoder_prefix}blocks.{i}.attn.qkv_proj.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)                # (3 * dim, ...)
    if unknown:
        raise ValueError(f"unexpected Hugging Face BERT weights (no place for them in this model): {unknown}")
    if tied_decoder is not None:
        emb = sd.get(encoder_prefix + "word_embed.weight")
        if emb is None or tied_decoder.shape != emb.shape or not torch.equal(tied_decoder, emb):
            raise ValueError("cls.predictions.decoder.weight differs from the word embeddings: this model ties "
                             "them, so an untied masked-LM decoder cannot be loaded")
    return sd

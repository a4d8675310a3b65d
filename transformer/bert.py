"""BERT (Devlin et al., 2018): a post-LN transformer encoder pre-trained by masked-language modelling and
next-sentence prediction, then fine-tuned with a small head per task. Built only on the shared layers:
attention on ``fused_kernels.attention``, every LayerNorm on our kernels.

    config = BERTConfig.from_preset("tiny")
    model = BERTForSequenceClassification(config)
    out = model(input_ids, attention_mask=attention_mask, labels=labels)     # out.logits, out.loss

    hf = transformers.BertForQuestionAnswering.from_pretrained(...)
    model = BERTForQuestionAnswering.from_huggingface(hf)                    # same outputs, our kernels

Input embedding = word + position + token-type (segment A/B) embeddings, LayerNorm, dropout. Each block
is post-LN (``x = LN(x + attn(x)); x = LN(x + ffn(x))``, the residual add fused into the norm). The
pooler, tanh(Linear(hidden of the first, [CLS], token)), summarises the sequence for the sentence-level
heads (NSP, sequence classification): through self-attention the [CLS] state is a learned weighted mix
of every token, so a loss on it trains the whole encoder.

Parameter names are ours (nanoGPT style); ``from_huggingface`` maps Hugging Face's with the key maps of
``transformer.hf.bert``, fusing the separate query/key/value projections into one ``qkv_proj``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fused_kernels
from fused_kernels.nn import LayerNorm

from .config import BERTConfig
from .hf.bert import config_from_huggingface, convert_bert_state_dict
from .layers import _ACTIVATIONS, BlockSpec, EncoderBlock, Packing, init_weights, key_padding_mask, repad, unpad
from .outputs import ClassificationOutput, PreTrainingOutput, QuestionAnsweringOutput

__all__ = [
    "BERT",
    "BERTForPreTraining",
    "BERTForQuestionAnswering",
    "BERTForSequenceClassification",
    "BERTForTokenClassification",
    "BERTOutput",
    "MLMCollator",
    "config_from_huggingface",
]

IGNORE_INDEX = -100  # label value that the losses skip (F.cross_entropy's default ignore_index)


@dataclass
class BERTOutput:
    """What ``BERT.forward`` returns (field names as Hugging Face's ``BertModel`` output).

    ``last_hidden_state`` (B, L, dim): the encoder output per token. ``pooler_output`` (B, dim):
    tanh(Linear(first token)), or None for an encoder built with ``add_pooling_layer=False``.
    ``attentions``: per block (B, H, L, L) weights when ``output_attentions=True``, else None."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    attentions: list[torch.Tensor] | None = None


class BERT(nn.Module):
    """The BERT encoder: embeddings, post-LN ``EncoderBlock`` stack, optional pooler.

    ``add_pooling_layer=False`` drops the pooler (as Hugging Face does for token classification, QA and
    masked-LM models), so their checkpoints load strictly: no pooler weights are expected."""

    def __init__(self, config: BERTConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.word_embed = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.dim)
        self.type_embed = nn.Embedding(config.type_vocab_size, config.dim)
        self.embed_norm = LayerNorm(config.dim, eps=config.eps)
        spec = BlockSpec(config.dim, config.n_heads, config.ffn_dim, activation=config.activation, pre_ln=False,
                         dropout=config.dropout, attn_dropout=config.attn_dropout, eps=config.eps)
        self.blocks = nn.ModuleList(EncoderBlock(spec) for _ in range(config.n_layers))
        self.pooler = nn.Linear(config.dim, config.dim) if add_pooling_layer else None
        init_weights(self)
        with torch.no_grad():   # the padding row starts at zero, as in the original and Hugging Face
            self.word_embed.weight[config.pad_token_id].zero_()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, output_attentions: bool = False) -> BERTOutput:
        """input_ids (B, L) int; token_type_ids (B, L) segment ids (default all 0); attention_mask (B, L)
        1 = real token, 0 = padding (default: all real). Padded positions still get (meaningless)
        outputs; nothing at a real position depends on them. With ``config.padding_free`` (and a mask, no
        attention weights asked for) the blocks run on the packed real tokens and padded positions get 0."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        if l > self.config.max_seq_len:
            raise ValueError(f"sequence length {l} exceeds max_seq_len {self.config.max_seq_len}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(l, device=input_ids.device)
        x = self.word_embed(input_ids) + self.pos_embed(pos) + self.type_embed(token_type_ids)   # (B, L, dim)
        x = F.dropout(self.embed_norm(x), self.config.dropout, self.training)                 # (B, L, dim)
        attentions = [] if output_attentions else None
        if self.config.padding_free and attention_mask is not None and not output_attentions:
            # Positions were added above in the padded layout, so each token keeps its own position.
            packing = Packing.from_mask(attention_mask)
            x = unpad(x, packing)                                                             # (1, total, dim)
            for block in self.blocks:
                x, _, _ = block(x, packing=packing)                                           # (1, total, dim)
            x = repad(x, packing)                                                             # (B, L, dim)
        else:
            mask = key_padding_mask(attention_mask)                                           # (B, 1, 1, L)
            for block in self.blocks:
                x, _, w = block(x, attn_mask=mask, need_weights=output_attentions)            # (B, L, dim)
                if attentions is not None:
                    attentions.append(w)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None      # (B, dim)
        return BERTOutput(x, pooled, attentions)

    @classmethod
    def from_huggingface(cls, hf_model: nn.Module) -> BERT:
        """A ``BERT`` with the weights of a transformers ``BertModel`` (or of the encoder inside any
        ``Bert*`` head model)."""
        encoder = hf_model if not hasattr(hf_model, "bert") else hf_model.bert
        config = config_from_huggingface(encoder.config)
        model = cls(config, add_pooling_layer=getattr(encoder, "pooler", None) is not None)
        load_huggingface_state_dict(model, encoder.state_dict())
        return model


class MLMHead(nn.Module):
    """Masked-LM head: transform (Linear + activation + LayerNorm), then the decoder, whose weight is the
    word embedding matrix (tied: passed in at call time, so it is stored once) plus its own bias."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.transform = nn.Linear(config.dim, config.dim)
        self.act = _ACTIVATIONS[config.activation]
        self.norm = LayerNorm(config.dim, eps=config.eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transformed(hidden), embedding, self.bias)  # (B, L, vocab)

    def transformed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's input: transform, activation, LayerNorm (..., dim)."""
        return self.norm(self.act(self.transform(hidden)))


class BERTForPreTraining(nn.Module):
    """BERT with the two pre-training heads: masked-LM over every position and next-sentence prediction
    (is segment B the continuation of segment A?) on the pooled [CLS] state."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BERT(config)
        self.mlm = MLMHead(config)
        self.nsp = nn.Linear(config.dim, 2)
        init_weights(self.mlm)
        init_weights(self.nsp)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None, *, return_logits: bool = True) -> PreTrainingOutput:
        """labels (B, L): original ids at the masked positions, -100 elsewhere (``MLMCollator`` makes them);
        next_sentence_label (B,): 0 = B follows A, 1 = random. ``loss`` is the sum of the losses whose
        labels are given (mlm + nsp with both), None with neither. ``return_logits=False`` with labels and
        ``config.fused_loss``: the masked-LM loss through ``fused_kernels.linear_cross_entropy`` on the labelled
        positions only (``.mlm_logits`` None): neither the (B, L, vocab) logits nor the head's work on the
        unmasked positions."""
        out = self.bert(input_ids, token_type_ids, attention_mask)
        nsp_logits = self.nsp(out.pooler_output)                                    # (B, 2)
        mlm_loss = nsp_loss = None
        if labels is not None and not return_logits and self.config.fused_loss:
            mlm_logits = None
            picked = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)          # (masked,)
            h = self.mlm.transformed(out.last_hidden_state.flatten(0, 1).index_select(0, picked))
            mlm_loss = fused_kernels.linear_cross_entropy(
                h, self.bert.word_embed.weight, labels.flatten().index_select(0, picked), self.mlm.bias,
                out_dtype=torch.promote_types(h.dtype, torch.float32))                  # float32, float64 stays
        else:
            mlm_logits = self.mlm(out.last_hidden_state, self.bert.word_embed.weight)   # (B, L, vocab)
        if labels is not None and mlm_loss is None:
            wide = torch.promote_types(mlm_logits.dtype, torch.float32)          # float64 stays float64
            mlm_loss = F.cross_entropy(mlm_logits.flatten(0, 1).to(wide), labels.flatten(), ignore_index=IGNORE_INDEX)
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label.flatten())
        loss = None
        for part in (mlm_loss, nsp_loss):
            if part is not None:
                loss = part if loss is None else loss + part
        return PreTrainingOutput(mlm_logits, nsp_logits, loss, mlm_loss, nsp_loss)

    @classmethod
    def from_huggingface(cls, hf_model: nn.Module) -> BERTForPreTraining:
        """Load a transformers ``BertForPreTraining`` (its decoder must be tied to the word embeddings)."""
        return _from_huggingface(cls, hf_model)


def _classifier_dropout(config: BERTConfig) -> float:
    return config.dropout if config.classifier_dropout is None else config.classifier_dropout


class BERTForSequenceClassification(nn.Module):
    """pooled [CLS] -> dropout -> Linear(num_labels).

    Loss: cross entropy for integer labels (B,); mean squared error when ``num_labels == 1`` (regression,
    labels (B,) or (B, 1)); binary cross entropy with logits for float labels (B, num_labels) when
    ``num_labels > 1`` (multi-label), as Hugging Face chooses."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BERT(config)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.dim, config.num_labels)
        init_weights(self.classifier)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool = False) -> ClassificationOutput:
        out = self.bert(input_ids, token_type_ids, attention_mask, output_attentions)
        logits = self.classifier(self.dropout(out.pooler_output))                   # (B, num_labels)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.reshape(-1).float())
            elif labels.is_floating_point():
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return ClassificationOutput(logits, loss, out.attentions)

    @classmethod
    def from_huggingface(cls, hf_model: nn.Module) -> BERTForSequenceClassification:
        """Load a transformers ``BertForSequenceClassification``."""
        return _from_huggingface(cls, hf_model)


class BERTForTokenClassification(nn.Module):
    """Per-token dropout -> Linear(num_labels) (e.g. named entities); loss: cross entropy, -100 skipped
    (label sub-word continuations and padding -100). No pooler, as Hugging Face's."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BERT(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.dim, config.num_labels)
        init_weights(self.classifier)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool = False) -> ClassificationOutput:
        out = self.bert(input_ids, token_type_ids, attention_mask, output_attentions)
        logits = self.classifier(self.dropout(out.last_hidden_state))               # (B, L, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return ClassificationOutput(logits, loss, out.attentions)

    @classmethod
    def from_huggingface(cls, hf_model: nn.Module) -> BERTForTokenClassification:
        """Load a transformers ``BertForTokenClassification``."""
        return _from_huggingface(cls, hf_model)


class BERTForQuestionAnswering(nn.Module):
    """Extractive QA: Linear(dim, 2) per token gives the start and end logits of the answer span.

    Loss: mean of the start and end cross entropies; positions outside [0, L) (e.g. an answer truncated
    away) are clamped to L and ignored, as Hugging Face does. No pooler."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BERT(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.dim, 2)
        init_weights(self.qa_outputs)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None) -> QuestionAnsweringOutput:
        out = self.bert(input_ids, token_type_ids, attention_mask)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)  # (B, L) each
        loss = None
        if start_positions is not None and end_positions is not None:
            l = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, l)
            end = end_positions.reshape(-1).clamp(0, l)
            loss = (F.cross_entropy(start_logits.float(), start, ignore_index=l)
                    + F.cross_entropy(end_logits.float(), end, ignore_index=l)) / 2
        return QuestionAnsweringOutput(start_logits, end_logits, loss)

    @classmethod
    def from_huggingface(cls, hf_model: nn.Module) -> BERTForQuestionAnswering:
        """Load a transformers ``BertForQuestionAnswering``."""
        return _from_huggingface(cls, hf_model)


# ----------------------------------------------------------------------------------------------------
# Masked-LM data collator


class MLMCollator:
    """Pads a batch and applies BERT's masked-LM corruption.

    Of the real, non-special tokens each is picked with probability ``mlm_probability`` (15%); a picked
    token becomes ``[MASK]`` with probability ``mask_fraction`` (80%), a random non-special token with
    ``random_fraction`` (10%), and stays unchanged otherwise (10%) - so the model cannot assume that
    every unmasked token is correct, nor that [MASK] (absent at fine-tuning time) is all it must
    predict. ``labels`` hold the original id at picked positions and -100 elsewhere.

    ``batch``: a sequence of token-id lists or 1-D tensors, or of mappings with ``input_ids`` and
    optionally ``token_type_ids`` and ``next_sentence_label``. Returns a dict of (B, L) long tensors
    ``input_ids``, ``attention_mask`` (1 real / 0 pad), ``labels`` (and ``token_type_ids``,
    ``next_sentence_label`` (B,) when the items have them): ``model(**batch)`` takes it as is.

    Randomness comes only from ``generator`` (constructor, or per call; default: torch's global one),
    so a generator seeded the same gives the same batch. Special tokens (pad, mask, cls, sep and any in
    ``special_token_ids``) are never picked and never drawn as random replacements. Building NSP
    sentence pairs is left to the dataset: pass items that already hold both segments, their
    ``token_type_ids`` and the label."""

    def __init__(self, vocab_size: int, mask_token_id: int, pad_token_id: int = 0, cls_token_id: int | None = None,
                 sep_token_id: int | None = None, special_token_ids: Sequence[int] = (),
                 mlm_probability: float = 0.15, mask_fraction: float = 0.8, random_fraction: float = 0.1,
                 pad_to_multiple_of: int | None = None, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
            raise ValueError(f"mask_fraction ({mask_fraction}) and random_fraction ({random_fraction}) must be "
                             f">= 0 and sum to at most 1")
        self.vocab_size, self.mask_token_id, self.pad_token_id = vocab_size, mask_token_id, pad_token_id
        special = {pad_token_id, mask_token_id, *special_token_ids}
        special |= {t for t in (cls_token_id, sep_token_id) if t is not None}
        if any(not 0 <= t < vocab_size for t in special):
            raise ValueError(f"special token ids {sorted(special)} must lie in [0, {vocab_size})")
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[self.special_ids] = False
        self.random_ids = keep.nonzero().flatten()          # replacement tokens: never a special token
        if self.random_ids.numel() == 0 and random_fraction > 0:
            raise ValueError("random_fraction > 0 needs at least one non-special token in the vocabulary")
        self.mlm_probability, self.mask_fraction, self.random_fraction = mlm_probability, mask_fraction, random_fraction
        self.pad_to_multiple_of, self.generator = pad_to_multiple_of, generator

    def _pad(self, seqs: list[torch.Tensor], value: int) -> torch.Tensor:
        length = max((len(s) for s in seqs), default=0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(seqs), length), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s
        return out

    def __call__(self, batch: Sequence[Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        gen = generator if generator is not None else self.generator
        items = [dict(x) if isinstance(x, Mapping) else {"input_ids": x} for x in batch]
        ids = [torch.as_tensor(x["input_ids"], dtype=torch.long).flatten() for x in items]
        input_ids = self._pad(ids, self.pad_token_id)                                  # (B, L)
        attention_mask = self._pad([torch.ones_like(s) for s in ids], 0)               # (B, L)
        eligible = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)

        picked = eligible & (torch.rand(input_ids.shape, generator=gen) < self.mlm_probability)
        labels = torch.where(picked, input_ids, IGNORE_INDEX)
        u = torch.rand(input_ids.shape, generator=gen)                                 # the 80/10/10 split
        to_mask = picked & (u < self.mask_fraction)
        to_random = picked & (u >= self.mask_fraction) & (u < self.mask_fraction + self.random_fraction)
        random_tokens = self.random_ids[torch.randint(len(self.random_ids), input_ids.shape, generator=gen)]
        corrupted = torch.where(to_mask, self.mask_token_id, torch.where(to_random, random_tokens, input_ids))

        out = {"input_ids": corrupted, "attention_mask": attention_mask, "labels": labels}
        if all("token_type_ids" in x for x in items):
            out["token_type_ids"] = self._pad([torch.as_tensor(x["token_type_ids"], dtype=torch.long).flatten()
                                               for x in items], 0)
        if all("next_sentence_label" in x for x in items):
            out["next_sentence_label"] = torch.as_tensor([int(x["next_sentence_label"]) for x in items])
        return out


# ----------------------------------------------------------------------------------------------------
# Hugging Face interop


def load_huggingface_state_dict(model: nn.Module, hf_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load Hugging Face BERT weights (any ``Bert*`` class's state dict, old or new key names) into
    ``model`` (a ``BERT`` or one of the heads here), strictly: every tensor of ``model`` must be given
    with its shape and nothing may be left over, else ValueError naming the keys."""
    prefix = "" if isinstance(model, BERT) else "bert."
    sd = convert_bert_state_dict(hf_state_dict, prefix)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    shapes = [f"{k}: {tuple(sd[k].shape)} vs ours {tuple(ours[k].shape)}"
              for k in sorted(set(sd) & set(ours)) if sd[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"cannot load Hugging Face weights into {type(model).__name__}: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {shapes}")
    model.load_state_dict(sd, strict=True)


def _from_huggingface(cls: type[nn.Module], hf_model: nn.Module) -> Any:
    model = cls(config_from_huggingface(hf_model.config))
    load_huggingface_state_dict(model, hf_model.state_dict())
    return model

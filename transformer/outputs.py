"""What the models' forward passes return: small dataclasses with named fields (``loss`` is set when
labels are passed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LMOutput:
    """Language modelling (GPT) and translation (EncoderDecoder): next-token logits (B, L, vocab)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    attentions: list | None = None


@dataclass
class PreTrainingOutput:
    """BERT pre-training: masked-LM logits (B, L, vocab) and next-sentence logits (B, 2)."""

    mlm_logits: torch.Tensor
    nsp_logits: torch.Tensor
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None


@dataclass
class ClassificationOutput:
    """Sequence (B, num_labels), token (B, L, num_labels) or image (B, num_classes) classification."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    attentions: list | None = None


@dataclass
class QuestionAnsweringOutput:
    """Extractive QA: start and end logits over the tokens, (B, L) each."""

    start_logits: torch.Tensor
    end_logits: torch.Tensor
    loss: torch.Tensor | None = None

"""The models of the seed notes, built only on ``kernels``: the original encoder-decoder, BERT, GPT-2, ViT,
and parameter-efficient fine-tuning (LoRA, BitFit)."""

from .bert import (
    BERT,
    BERTForPreTraining,
    BERTForQuestionAnswering,
    BERTForSequenceClassification,
    BERTForTokenClassification,
    MLMCollator,
)
from .config import BERTConfig, EncoderDecoderConfig, GPTConfig, ViTConfig
from .encoder_decoder import EncoderDecoder
from .gpt import GPT
from .lora import apply_bitfit, apply_lora, load_lora, merge_lora, save_lora, unmerge_lora
from .vit import ViT

__all__ = [
    "BERT", "BERTConfig", "BERTForPreTraining", "BERTForQuestionAnswering", "BERTForSequenceClassification",
    "BERTForTokenClassification", "EncoderDecoder", "EncoderDecoderConfig", "GPT", "GPTConfig", "MLMCollator",
    "ViT", "ViTConfig", "apply_bitfit", "apply_lora", "load_lora", "merge_lora", "save_lora", "unmerge_lora",
]

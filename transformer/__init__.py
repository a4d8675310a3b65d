"""The models of the seed notes, built only on ``fused_kernels``: the original encoder-decoder, BERT, GPT-2, ViT,
and parameter-efficient fine-tuning (LoRA, BitFit)."""

from .bert import (
    BERT,
    BERTForPreTraining,
    BERTForQuestionAnswering,
    BERTForSequenceClassification,
    BERTForTokenClassification,
    MLMCollator,
)
from .config import BERTConfig, EncoderDecoderConfig, GPTConfig, MultimodalConfig, ViTConfig
from .encoder_decoder import EncoderDecoder
from .gpt import GPT
from .lora import apply_bitfit, apply_lora, load_lora, merge_lora, save_lora, unmerge_lora
from .multimodal import Multimodal, MultimodalOutput
from .vit import ViT

__all__ = [
    "BERT", "BERTConfig", "BERTForPreTraining", "BERTForQuestionAnswering", "BERTForSequenceClassification",
    "BERTForTokenClassification", "EncoderDecoder", "EncoderDecoderConfig", "GPT", "GPTConfig", "MLMCollator",
    "Multimodal", "MultimodalConfig", "MultimodalOutput", "ViT", "ViTConfig", "apply_bitfit", "apply_lora",
    "load_lora", "merge_lora", "save_lora", "unmerge_lora",
]

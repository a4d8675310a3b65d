"""Fine-tuning from a Hugging Face model directory (``save_pretrained`` output, read offline):
``python -m transformer finetune bert --init path/to/bert-model --method lora``.

The model's weights go through our ``from_huggingface`` converters; its tokenizer is read by
``load_tokenizer`` (``data/tokenizer.py``, ``HFTokenizer``) and saved with the run.
Supported: BERT encoders for the ``bert`` / ``bert-cls`` tasks, GPT-2 for ``gpt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import BERTConfig, Config, GPTConfig


def is_hf_directory(path: str | Path) -> bool:
    """A ``save_pretrained`` directory: a config.json with a ``model_type`` (ours has ``task``)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        content = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return "model_type" in content and "task" not in content


def load_hf_model(directory: str | Path, config_class: type[Config]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(our config as a dict, our weights) of the Hugging Face model in ``directory``, named as the
    task's model names them (BERT heads hold the encoder under ``bert.``)."""
    import transformers

    if config_class is BERTConfig:
        from ..bert import BERT
        model = BERT.from_huggingface(transformers.AutoModel.from_pretrained(str(directory)))
        return model.config.to_dict(), {f"bert.{k}": v for k, v in model.state_dict().items()}
    if config_class is GPTConfig:
        from ..gpt import GPT
        model = GPT.from_huggingface(transformers.AutoModelForCausalLM.from_pretrained(str(directory)))
        return model.config.to_dict(), model.state_dict()
    raise ValueError(f"fine-tuning from a Hugging Face directory supports BERT and GPT-2 tasks, not a "
                     f"{config_class.__name__} model")

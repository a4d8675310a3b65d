"""The built-in tasks; importing this module registers them."""

from . import bert, gpt, multimodal, seq2seq, vit  # noqa: F401

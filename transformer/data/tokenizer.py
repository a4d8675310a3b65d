"""Tokenizers saved next to a checkpoint as ``tokenizer.json``.

- ``CharTokenizer``: one id per character seen in the training text (nanoGPT's character-level recipe),
  plus the special tokens; characters never seen map to ``[UNK]``.
- ``BPETokenizer``: byte-level BPE trained with the ``tokenizers`` library: every string round-trips.
- ``HFTokenizer``: a Hugging Face model's own tokenizer, when fine-tuning that model.

Ours put the special tokens first, in ``SPECIALS`` order, so ``[PAD]`` is id 0 in every vocabulary (the
models' default ``pad_token_id``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]")
FILENAME = "tokenizer.json"
HF_SUBDIR = "hf_tokenizer"


class Tokenizer:
    """Common interface: ``encode``/``decode``, ``vocab_size``, special ids as attributes
    (``pad_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``, ``bos_id``, ``eos_id``)."""

    kind: str
    pad_id, unk_id, cls_id, sep_id, mask_id, bos_id, eos_id = range(len(SPECIALS))

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def special_ids(self) -> list[int]:
        return list(range(len(SPECIALS)))

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer: every vocabulary entry must be one character")
        self._ids = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        n = len(SPECIALS)
        return "".join(self.chars[i - n] if i >= n else ("" if skip_special else SPECIALS[i]) for i in map(int, ids))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILENAME
        path.write_text(json.dumps({"kind": self.kind, "specials": list(SPECIALS), "chars": "".join(self.chars)}))
        return path


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, backend) -> None:          # a tokenizers.Tokenizer
        self.backend = backend
        for i, tok in enumerate(SPECIALS):
            if backend.token_to_id(tok) != i:
                raise ValueError(f"BPETokenizer: special token {tok} must have id {i}")

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int = 1024) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = HFTokenizer(models.BPE(unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        lines = text.splitlines(keepends=True) if isinstance(text, str) else text
        backend.train_from_iterator(lines, trainer=trainer)
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILENAME
        path.write_text(json.dumps({"kind": self.kind, "specials": list(SPECIALS),
                                    "tokenizer": json.loads(self.backend.to_str())}))
        return path


class HFTokenizer(Tokenizer):
    """A transformers tokenizer (fine-tuning a Hugging Face model) behind the same interface; its special
    tokens keep their own ids. Saved with the run under ``hf_tokenizer/``."""

    kind = "hf"

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        ids = {name: getattr(backend, f"{name}_token_id", None) for name in ("pad", "unk", "cls", "sep", "mask",
                                                                             "bos", "eos")}
        missing = [n for n in ("pad", "cls", "sep") if ids[n] is None]
        if missing:
            raise ValueError(f"the Hugging Face tokenizer has no {missing} token(s)")
        ids["bos"] = ids["bos"] if ids["bos"] is not None else ids["cls"]
        ids["eos"] = ids["eos"] if ids["eos"] is not None else ids["sep"]
        ids["unk"] = ids["unk"] if ids["unk"] is not None else ids["pad"]
        ids["mask"] = ids["mask"] if ids["mask"] is not None else ids["unk"]
        for name, value in ids.items():
            setattr(self, f"{name}_id", value)

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    @property
    def special_ids(self) -> list[int]:
        return sorted(set(self.backend.all_special_ids))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        from transformers import AutoTokenizer
        return cls(AutoTokenizer.from_pretrained(str(directory)))

    def save(self, directory: str | Path) -> Path:
        self.backend.save_pretrained(str(Path(directory) / HF_SUBDIR))
        path = Path(directory) / FILENAME
        path.write_text(json.dumps({"kind": self.kind, "specials": list(SPECIALS), "path": HF_SUBDIR}))
        return path


def train_tokenizer(kind: str, text: str, vocab_size: int = 1024) -> Tokenizer:
    """``kind`` "char" or "bpe" (``vocab_size`` applies to BPE only)."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"tokenizer must be 'char' or 'bpe', got {kind!r}")


def saved_or_trained(directory: str | Path | None, kind: str, text: str, vocab_size: int = 1024) -> Tokenizer:
    """The tokenizer saved in ``directory`` (an earlier run: the model's vocabulary wins over ``kind``), or
    a new one trained on ``text``."""
    return load_tokenizer(directory) if directory is not None else train_tokenizer(kind, text, vocab_size)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer a training run saved in ``directory``; a clear error when it is missing or corrupt."""
    path = Path(directory) / FILENAME
    if not path.is_file() and (Path(directory) / "tokenizer_config.json").is_file():
        return HFTokenizer.load(directory)                # a Hugging Face directory (slow tokenizer)
    try:
        spec = json.loads(path.read_text())
        if "kind" not in spec and "model" in spec:
            return HFTokenizer.load(directory)            # a Hugging Face directory (its fast tokenizer file)
        if spec.get("kind") == "hf":
            return HFTokenizer.load(Path(directory) / spec["path"])
        if spec.get("specials") != list(SPECIALS):
            raise ValueError(f"special tokens {spec.get('specials')} differ from {list(SPECIALS)}")
        if spec["kind"] == "char":
            return CharTokenizer(spec["chars"])
        if spec["kind"] == "bpe":
            from tokenizers import Tokenizer as Backend
            return BPETokenizer(Backend.from_str(json.dumps(spec["tokenizer"])))
        raise ValueError(f"unknown tokenizer kind {spec['kind']!r}")
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer in {directory}: expected {path}") from None
    except Exception as e:              # json, key and tokenizers' own errors: all mean a bad file
        raise ValueError(f"cannot read the tokenizer {path}: {e}") from e

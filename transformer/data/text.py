"""English text that ships with Python (the pydoc topic help), or any text file, split for training."""

from __future__ import annotations

from pathlib import Path

DEFAULT = "pydoc"


def load_text(data: str | None = None) -> str:
    """``None`` or ``"pydoc"``: the help text of every ``pydoc_data.topics`` topic (about 0.7 MB of
    English prose and code examples, in every CPython); otherwise the path of a UTF-8 text file."""
    if data in (None, DEFAULT):
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k].strip() for k in sorted(topics))
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data!r}: not a built-in dataset ({DEFAULT!r}) nor a text file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--data {data!r}: the file is empty")
    return text


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """First (1 - val_fraction) of the text for training, the rest held out (nanoGPT's split)."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]

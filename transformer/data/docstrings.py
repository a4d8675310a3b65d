"""A real text classification dataset that needs no download: which part of the Python standard library
does a docstring come from?

Each example is the first paragraph of the docstring of a public function, class or method of one of the
modules in ``FAMILIES``, labelled with the module's family (text processing, numbers, files, networking,
concurrency, data structures, dates and times, file formats). Collection rules:

- a module's public names are its ``__all__``, else its names without a leading underscore; of these,
  functions and classes are kept, and of a class also the methods and properties it defines itself;
- the first paragraph of the docstring (up to the first blank line, whitespace collapsed), skipping a
  leading call-signature paragraph such as ``sqrt(x)``; paragraphs of fewer than 3 words are dropped;
- a text that occurs under two different families is dropped (ambiguous), a repeat within one family
  kept once;
- a module that fails to import (a Python built without ``ssl``, a missing ``zoneinfo``) is skipped.

Deterministic on a given Python version; the docstrings themselves change between versions, so the
number of examples and the split differ slightly from one CPython to the next (on 3.11: about 2000
examples, 8 classes, the largest holding about a fifth).

``data`` may instead be the path of a UTF-8 TSV file, one ``label<TAB>text`` example per line (blank
lines skipped; the text may contain further tabs), deduplicated by the same rule.

The train / test split is stratified (each class keeps ``TEST_FRACTION`` of its examples for testing),
drawn with a fixed seed: the same data always gives the same split, whatever the training seed.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DEFAULT = "docstrings"
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MIN_WORDS = 3

FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "shlex", "html", "builtins.str"),
    "numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"),
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "tempfile", "stat", "fnmatch", "filecmp", "io"),
    "network": ("socket", "http.client", "http.server", "urllib.request", "urllib.parse", "email.message",
                "email.utils", "smtplib", "ftplib", "ipaddress", "ssl"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "concurrent.futures", "queue", "subprocess", "sched"),
    "data-structures": ("collections", "heapq", "bisect", "array", "itertools", "functools", "operator", "copy",
                        "enum"),
    "time": ("datetime", "time", "calendar", "zoneinfo"),
    "formats": ("json", "csv", "pickle", "configparser", "xml.etree.ElementTree", "tomllib", "base64", "struct",
                "zlib", "gzip", "zipfile", "tarfile"),
}

_SIGNATURE = re.compile(r"[\w.]+\(.*\)(\s*->.*)?")


@dataclass
class ClassificationData:
    """``labels``: class names, index = label id; ``train`` / ``test``: (text, label id) pairs."""

    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def load_classification(data: str | None = None) -> ClassificationData:
    """``None`` or ``"docstrings"``: the standard-library docstrings; otherwise a ``label<TAB>text`` file."""
    if data in (None, DEFAULT):
        pairs = stdlib_docstrings()
    else:
        pairs = read_tsv(data)
    pairs = deduplicate(pairs)
    labels = sorted({label for label, _ in pairs})
    if len(labels) < 2:
        raise ValueError(f"--data {data!r}: a classification dataset needs at least 2 labels, got {labels}")
    index = {label: i for i, label in enumerate(labels)}
    train, test = stratified_split([(text, index[label]) for label, text in pairs])
    return ClassificationData(labels, train, test)


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(family, first docstring paragraph) for every public function, class and method of ``FAMILIES``."""
    pairs = []
    for family, modules in FAMILIES.items():
        for name in modules:
            owner = _resolve(name)
            if owner is None:
                continue
            objects = [owner] if inspect.isclass(owner) else list(_public_members(owner))
            for obj in objects:
                for doc in _docstrings(obj):
                    if (text := first_paragraph(doc)) is not None:
                        pairs.append((family, text))
    return pairs


def first_paragraph(doc: str | None) -> str | None:
    """The docstring's first paragraph with whitespace collapsed (a leading signature skipped), or None."""
    if not doc:
        return None
    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    while paragraphs and _SIGNATURE.fullmatch(paragraphs[0]):
        paragraphs.pop(0)
    if not paragraphs or len(paragraphs[0].split()) < MIN_WORDS:
        return None
    return paragraphs[0]


def read_tsv(path: str) -> list[tuple[str, str]]:
    """(label, text) pairs of a ``label<TAB>text`` file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--data {path!r}: not a built-in dataset ({DEFAULT!r}) nor a label<TAB>text file")
    pairs = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab or not label.strip() or not text.strip():
            raise ValueError(f"--data {path!r} line {n}: expected 'label<TAB>text', got {line[:60]!r}")
        pairs.append((label.strip(), " ".join(text.split())))
    if not pairs:
        raise ValueError(f"--data {path!r}: the file holds no examples")
    return pairs


def deduplicate(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each text once, sorted by (label, text); a text found under two labels is dropped."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    for label, text in pairs:
        labels_of[text].add(label)
    return sorted((next(iter(labels)), text) for text, labels in labels_of.items() if len(labels) == 1)


def stratified_split(examples: list[tuple[str, int]], test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Per class, a seeded shuffle then ``round(n * test_fraction)`` examples (at least 1 of a class with
    2 or more) held out; both halves come back in a seeded shuffled order."""
    rng = random.Random(seed)
    by_label: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for example in sorted(examples):
        by_label[example[1]].append(example)
    train, test = [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_test = max(1, round(len(group) * test_fraction)) if len(group) > 1 else 0
        test += group[:n_test]
        train += group[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _resolve(name: str) -> object | None:
    """A module, or a class inside one (``builtins.str``); None when it cannot be imported."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def _public_members(module: object):
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name, None)
        if inspect.isroutine(obj) or inspect.isclass(obj):
            yield obj


def _docstrings(obj: object):
    """The object's own docstring and, for a class, those of the methods and properties it defines (not
    inherited ones: ``__doc__`` read directly, where ``inspect.getdoc`` would fall back to the base's)."""
    yield getattr(obj, "__doc__", None)
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (classmethod, staticmethod)):
                member = member.__func__
            if inspect.isroutine(member) or isinstance(member, property):
                yield member.__doc__

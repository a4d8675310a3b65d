"""Translation pairs, offline: English number phrases -> French, German or Spanish, or a TSV file.

The built-in datasets spell integers in ``[0, NUMBERS)`` (0..999,999) with ``num2words``:

    numbers-fr   80080 -> ("eighty thousand and eighty", "quatre-vingt mille quatre-vingts")
    numbers-de   80080 -> ("eighty thousand and eighty", "achtzigtausendachtzig")
    numbers-es   80080 -> ("eighty thousand and eighty", "ochenta mil ochenta")

Held out: ``HELD_OUT`` numbers drawn uniformly from ``[SMALL, NUMBERS)`` with ``SPLIT_SEED`` (fixed,
independent of any training seed) are never drawn for training, so held-out exact match measures
whether the model learned to compose the parts (French "quatre-vingt mille" but "quatre-vingts", "deux
cent mille" but "deux cents") rather than a lookup table. The numbers below ``SMALL`` are all
trained on: they are the words every larger number is built from.

Training numbers are drawn on the fly: a digit count uniform in 1..6, then a number uniform among
those with that many digits, so that short numbers are not drowned out by the 900,000 six-digit ones.

Any other ``data`` is the path of a UTF-8 file of ``source<TAB>target`` lines (blank lines skipped,
repeated pairs kept once), of which a fixed, seeded 10% is held out.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path

import torch

Pair = tuple[str, str]

LANGUAGES = {"numbers-fr": "fr", "numbers-de": "de", "numbers-es": "es"}
DEFAULT = "numbers-fr"
DIGITS = 6
NUMBERS = 10 ** DIGITS      # the integers 0..999,999
SMALL = 1_000               # 0..999 are never held out
HELD_OUT = 1_000
SPLIT_SEED = 1234           # fixed: the held-out set must not move with the training seed
TSV_HELD_OUT_FRACTION = 0.1


class PairData(ABC):
    """Training pairs drawn at random, and a fixed list of held-out pairs."""

    held: list[Pair]

    @abstractmethod
    def sample(self, generator: torch.Generator, n: int) -> list[Pair]:
        """``n`` training pairs; all randomness from ``generator``."""

    @abstractmethod
    def tokenizer_text(self) -> list[str]:
        """Training-side text (both languages) to build the shared vocabulary from."""


@lru_cache(maxsize=1 << 17)
def spell(n: int, language: str) -> Pair:
    """(English words, ``language`` words) for ``n``; cached, num2words takes most of a millisecond."""
    from num2words import num2words
    return num2words(n, lang="en"), num2words(n, lang=language)


def held_out_numbers() -> list[int]:
    """The held-out numbers, in a fixed random order (so any prefix is a fair sample)."""
    return random.Random(SPLIT_SEED).sample(range(SMALL, NUMBERS), HELD_OUT)


def sample_numbers(generator: torch.Generator, n: int, exclude: set[int]) -> list[int]:
    """``n`` numbers with a digit count uniform in 1..DIGITS, none of them in ``exclude``."""
    out: list[int] = []
    while len(out) < n:
        digits = torch.randint(1, DIGITS + 1, (n,), generator=generator)
        low = torch.where(digits == 1, 0, 10 ** (digits - 1))
        drawn = low + (torch.rand(n, generator=generator, dtype=torch.float64) * (10 ** digits - low)).long()
        out += [x for x in drawn.tolist() if x not in exclude]
    return out[:n]


class NumberPairs(PairData):
    def __init__(self, language: str) -> None:
        self.language = language
        self.held_numbers = held_out_numbers()
        self._held_set = set(self.held_numbers)
        self.held = [spell(n, language) for n in self.held_numbers]

    def sample(self, generator: torch.Generator, n: int) -> list[Pair]:
        return [spell(x, self.language) for x in sample_numbers(generator, n, self._held_set)]

    def tokenizer_text(self) -> list[str]:
        # 0..999 and the round thousands hold every word and every form ("cents"/"cent") in the range.
        numbers = [n for n in [*range(SMALL), *range(SMALL, NUMBERS, SMALL)] if n not in self._held_set]
        return [side for n in numbers for side in spell(n, self.language)]


class TsvPairs(PairData):
    def __init__(self, path: str | Path) -> None:
        pairs = list(dict.fromkeys(read_tsv(path)))        # a repeated line must not sit on both sides
        order = list(range(len(pairs)))
        random.Random(SPLIT_SEED).shuffle(order)
        n_held = max(1, round(len(pairs) * TSV_HELD_OUT_FRACTION))
        held = set(order[:n_held])
        self.train = [p for i, p in enumerate(pairs) if i not in held]
        self.held = [pairs[i] for i in order[:n_held]]

    def sample(self, generator: torch.Generator, n: int) -> list[Pair]:
        return [self.train[i] for i in torch.randint(len(self.train), (n,), generator=generator).tolist()]

    def tokenizer_text(self) -> list[str]:
        return [side for pair in self.train for side in pair]


def read_tsv(path: str | Path) -> list[Pair]:
    """``source<TAB>target`` pairs from a UTF-8 file; ValueError naming the first malformed line."""
    pairs = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(f"--data {str(path)!r} line {i}: expected 'source<TAB>target' with both sides "
                             f"non-empty, got {line!r}")
        pairs.append((fields[0].strip(), fields[1].strip()))
    if len(pairs) < 2:
        raise ValueError(f"--data {str(path)!r}: needs at least 2 'source<TAB>target' lines (a training and a "
                         f"held-out pair), found {len(pairs)}")
    return pairs


def load_pairs(data: str | None = None) -> PairData:
    """A built-in dataset (``None``: ``DEFAULT``) or a TSV file."""
    data = data or DEFAULT
    if data in LANGUAGES:
        return NumberPairs(LANGUAGES[data])
    if not Path(data).is_file():
        raise FileNotFoundError(f"--data {data!r}: not a built-in dataset ({', '.join(LANGUAGES)}) nor a "
                                "'source<TAB>target' file")
    return TsvPairs(data)

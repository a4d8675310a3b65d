"""Digit images paired with number phrases: a task pair that needs both modalities.

Each example is one of scikit-learn's 8x8 digit images (``digits.py``, its fixed train/test split) and
a number from 0 to 99 spelled out by ``num2words`` in English, French, German or Spanish ("ninety-seven",
"quatre-vingt-dix-sept", "siebenundneunzig", "noventa y siete"). Labels:

- ``match``: does the phrase's last digit equal the digit in the image? (half the examples do)
- ``digit``: which digit is in the image? (the image alone answers it)
- ``sum``: the last digit of (image digit + phrase number): neither modality alone answers it.

The 400 phrases form a closed vocabulary, all seen in training: what is held out are the 360 test
images, each paired with two phrases drawn once with ``PAIR_SEED`` (fixed, not the training seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .digits import DigitsSplit, load_digits_split

LANGUAGES = ("en", "fr", "de", "es")
NUMBERS = 100
PAIR_SEED = 4321
PAIRS_PER_TEST_IMAGE = 2
TASKS = {"match": 2, "digit": 10, "sum": 10}


@lru_cache(maxsize=1)
def phrases() -> tuple[tuple[str, ...], ...]:
    """``phrases()[language_index][n]``: ``n`` spelled in that language."""
    from num2words import num2words
    return tuple(tuple(num2words(n, lang=lang) for n in range(NUMBERS)) for lang in LANGUAGES)


@dataclass
class Examples:
    images: torch.Tensor        # (B, 1, 8, 8)
    texts: list[str]            # B phrases
    labels: dict[str, torch.Tensor]   # task -> (B,)


def draw(images: torch.Tensor, digits: torch.Tensor, generator: torch.Generator) -> Examples:
    """Pair each image with a random phrase: in half the pairs the phrase ends in the image's digit."""
    b = len(digits)
    matched = torch.rand(b, generator=generator) < 0.5
    tens = torch.randint(0, NUMBERS // 10, (b,), generator=generator)
    other = (digits + torch.randint(1, 10, (b,), generator=generator)) % 10      # any last digit but the image's
    numbers = tens * 10 + torch.where(matched, digits, other)                    # (B,)
    language = torch.randint(0, len(LANGUAGES), (b,), generator=generator)
    table = phrases()
    texts = [table[lang][n] for lang, n in zip(language.tolist(), numbers.tolist())]
    labels = {"match": matched.long(), "digit": digits.clone(), "sum": (digits + numbers) % 10}
    return Examples(images, texts, labels)


def held_out(split: DigitsSplit | None = None) -> Examples:
    """The fixed evaluation pairs: every test image, ``PAIRS_PER_TEST_IMAGE`` times."""
    split = split or load_digits_split()
    images = split.test_images.repeat(PAIRS_PER_TEST_IMAGE, 1, 1, 1)
    digits = split.test_labels.repeat(PAIRS_PER_TEST_IMAGE)
    return draw(images, digits, torch.Generator().manual_seed(PAIR_SEED))


def all_phrases() -> list[str]:
    return [p for lang in phrases() for p in lang]

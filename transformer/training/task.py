"""The contract between a training job and the trainer.

A task is built from a dataset (``data``: a built-in name or a path) and, when one exists, the directory
of an earlier run (``directory``), from which it reloads what it saved there (its tokenizer), so that
evaluation, generation, resuming and fine-tuning see exactly the vocabulary the model was trained with.

Batches are dicts of CPU tensors whose first dimension is the batch: the trainer moves them to the
device and, under DDP, gives each rank its slice of the same global batch. All randomness in a batch
comes from the ``generator`` passed in, so a step's batch depends only on (seed, step): resuming and
changing the number of processes do not change the data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import Config

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    from . import tasks  # noqa: F401  (registers the built-in tasks)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


class Task(ABC):
    name: ClassVar[str]                       # the CLI name: gpt, bert, seq2seq, vit, ...
    config_class: ClassVar[type[Config]]
    default_preset: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}   # this task's defaults for TrainArgs fields (steps, lr, ...)
    unit: ClassVar[str] = "tok"               # what the throughput counts: "tok" or "img"
    finetune_task: ClassVar[str | None] = None  # the task `finetune <name>` runs (default: this one)

    def __init__(self, data: str | None = None, directory: str | Path | None = None, **options: Any) -> None:
        self.data = data
        self.options = options

    def spec(self) -> dict[str, Any]:
        """What rebuilds this task (JSON): stored in config.json as ``task_spec``."""
        return {"data": self.data, **self.options}

    def save(self, directory: Path) -> None:
        """Write what ``__init__(directory=...)`` reloads (the tokenizer); nothing by default."""
        return None

    @abstractmethod
    def model_config(self, preset: str, **overrides: Any) -> Config:
        """The preset with what the data fixes (vocabulary size, classes, image size) filled in."""

    @abstractmethod
    def build_model(self, config: Config) -> nn.Module:
        ...

    @abstractmethod
    def train_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """One training batch drawn with ``generator`` only (CPU tensors, batch first)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(scalar loss, units in the batch for the throughput); default ``model(**batch).loss``."""
        out = model(**batch)
        first = next(iter(batch.values()))
        return out.loss, (first.numel() if self.unit == "tok" else first.shape[0])

    @abstractmethod
    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        """Held-out metrics, deterministic (same model -> same numbers): ``val_loss`` plus the task's own
        (``accuracy``, ``exact_match``, ``bleu``, ...). ``max_batches`` bounds the cost of the periodic
        evaluations during training; the final one passes None (the whole held-out split)."""

    def loss_labels(self, config: Config) -> tuple[str, str]:
        """What the training loss and ``val_loss`` are, for the legend of loss.png (they may differ: a
        label-smoothed training loss against a plain held-out cross entropy)."""
        return "training loss", "held-out loss"

    def examples(self, model: nn.Module, n: int = 4) -> list[str]:
        """A few real, human-readable outputs (generated text, translations, predictions)."""
        return []


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device

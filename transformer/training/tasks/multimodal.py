"""The multimodal model on digit images paired with number phrases (``python -m transformer train multimodal``).

``modalities`` ("both", "image" or "text") trains the same model on both inputs or on one only: the
single-modality baselines the joint model is compared with. The phrases are tokenized per character.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import MultimodalConfig
from ...data.digit_phrases import TASKS, Examples, all_phrases, draw, held_out
from ...data.digits import IMAGE_SIZE, ascii_digit, load_digits_split, random_shift
from ...data.tokenizer import saved_or_trained
from ...multimodal import Multimodal
from ..task import Task, model_device, register

MODALITIES = ("both", "image", "text")


@register
class MultimodalTask(Task):
    name = "multimodal"
    config_class = MultimodalConfig
    default_preset = "digits-words"
    unit = "img"
    defaults = dict(steps=2000, batch_size=128, lr=3e-3, warmup=100, weight_decay=0.05, eval_every=500,
                    eval_batches=None, eval_batch_size=360)

    def __init__(self, data: str | None = None, directory: str | Path | None = None, modalities: str = "both",
                 shift: int = 1) -> None:
        if data not in (None, "digit-phrases"):
            raise ValueError(f"multimodal: --data must be 'digit-phrases' (the built-in pairs), got {data!r}")
        if modalities not in MODALITIES:
            raise ValueError(f"multimodal: modalities must be one of {MODALITIES}, got {modalities!r}")
        super().__init__(data, modalities=modalities, shift=shift)
        self.modalities, self.shift = modalities, shift
        self.split = load_digits_split()
        self.tokenizer = saved_or_trained(directory, "char", "".join(all_phrases()))
        self.held = held_out(self.split)

    def save(self, directory: Path) -> None:
        self.tokenizer.save(directory)

    def model_config(self, preset: str, **overrides: Any) -> MultimodalConfig:
        longest = max(len(p) for p in all_phrases())
        fixed = dict(image_size=IMAGE_SIZE, num_channels=1, vocab_size=self.tokenizer.vocab_size,
                     max_text_len=longest, tasks=dict(TASKS), pad_token_id=self.tokenizer.pad_id)
        return MultimodalConfig.from_preset(preset, **{**overrides, **fixed})

    def build_model(self, config: MultimodalConfig) -> nn.Module:
        return Multimodal(config)

    def _batch(self, examples: Examples) -> dict[str, torch.Tensor]:
        ids = [self.tokenizer.encode(t) for t in examples.texts]
        width = max(map(len, ids))
        input_ids = torch.tensor([row + [self.tokenizer.pad_id] * (width - len(row)) for row in ids])   # (B, T)
        batch = {f"labels_{t}": y for t, y in examples.labels.items()}
        if self.modalities != "text":
            batch["pixel_values"] = examples.images                                           # (B, 1, 8, 8)
        if self.modalities != "image":
            batch["input_ids"], batch["attention_mask"] = input_ids, (input_ids != self.tokenizer.pad_id).long()
        return batch

    def train_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self.split.train_labels), (batch_size,), generator=generator)
        images = random_shift(self.split.train_images[idx], self.shift, generator)
        return self._batch(draw(images, self.split.train_labels[idx], generator))

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        labels = {t: batch[f"labels_{t}"] for t in TASKS}
        inputs = {k: v for k, v in batch.items() if not k.startswith("labels_")}
        return model(**inputs, labels=labels)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self._forward(model, batch).loss, len(batch["labels_match"])

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        """Summed cross entropy and each task's accuracy over the fixed held-out pairs."""
        device, n = model_device(model), len(self.held.texts)
        totals = {"val_loss": 0.0, **{f"{t}_accuracy": 0.0 for t in TASKS}}
        count = 0
        for i, start in enumerate(range(0, n, batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            part = slice(start, start + batch_size)
            batch = self._batch(Examples(self.held.images[part], self.held.texts[part],
                                         {t: y[part] for t, y in self.held.labels.items()}))
            out = self._forward(model, {k: v.to(device) for k, v in batch.items()})
            m = len(batch["labels_match"])
            totals["val_loss"] += out.loss.item() * m
            for t in TASKS:
                totals[f"{t}_accuracy"] += (out.logits[t].argmax(-1).cpu() == batch[f"labels_{t}"]).sum().item()
            count += m
        return {k: v / count for k, v in totals.items()}

    def loss_labels(self, config: MultimodalConfig) -> tuple[str, str]:
        return ("training loss: sum of the heads' cross entropies", "held-out loss: sum of the heads' cross entropies")

    def examples(self, model: nn.Module, n: int = 4) -> list[str]:
        device = model_device(model)
        batch = self._batch(Examples(self.held.images[:n], self.held.texts[:n],
                                     {t: y[:n] for t, y in self.held.labels.items()}))
        logits = self._forward(model, {k: v.to(device) for k, v in batch.items()}).logits
        lines = []
        for i in range(n):
            predicted = ", ".join(f"{t} {logits[t][i].argmax().item()} (true {self.held.labels[t][i].item()})"
                                  for t in TASKS)
            lines += [*ascii_digit(self.held.images[i]), f"\"{self.held.texts[i]}\": {predicted}"]
        return lines

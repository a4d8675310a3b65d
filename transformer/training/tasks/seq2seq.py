"""Translation with the encoder-decoder: English number phrases -> French by default (``data.numbers``).

One tokenizer (byte-level BPE by default) is trained on both sides of the training pairs, so source and
target share one vocabulary and one embedding table (``share_embeddings``), tied to the output layer.
Targets end with ``[EOS]``; the model shifts the labels right behind ``[BOS]`` (teacher forcing) and
ignores the ``[PAD]`` (0) labels in its loss.

Held-out metrics: ``val_loss`` (teacher-forced cross entropy per target token, without the training
label smoothing), ``exact_match`` (greedy translation equals the reference string), ``bleu`` (sacreBLEU
corpus score, 0-100) and ``chrf`` (sacreBLEU chrF, 0-100). BLEU counts word n-grams up to 4, so it is
0 where the references are single words (German numbers are one compound: ``numbers-de``); chrF,
on character n-grams, still measures those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import EncoderDecoderConfig
from ...data.numbers import load_pairs
from ...data.tokenizer import Tokenizer, saved_or_trained
from ...encoder_decoder import EncoderDecoder
from ..plot import smoothed_minimum
from ..task import Task, model_device, register

PAD, BOS, EOS = Tokenizer.pad_id, Tokenizer.bos_id, Tokenizer.eos_id
TRANSLATE_BATCH = 64


def exact_match(hypotheses: list[str], references: list[str]) -> float:
    """Fraction of hypotheses equal to their reference string."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"exact_match needs equally many hypotheses and references (at least one), got "
                         f"{len(hypotheses)} and {len(references)}")
    return sum(h == r for h, r in zip(hypotheses, references)) / len(references)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacreBLEU corpus BLEU (0-100) against one reference per sentence."""
    import sacrebleu
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """sacreBLEU corpus chrF (0-100) against one reference per sentence."""
    import sacrebleu
    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


@register
class Seq2SeqTask(Task):
    name = "seq2seq"
    config_class = EncoderDecoderConfig
    default_preset = "small"
    # 800 steps of 64 pairs: about 135 CPU-seconds on one core; held-out exact match 100% (seed 0) and
    # 99.8% (seed 1). Periodic evaluations look at the first 500 held-out numbers, the final one at all 1000.
    defaults = dict(steps=800, batch_size=64, lr=2e-3, warmup=60, weight_decay=0.01, eval_every=200,
                    eval_batches=2, eval_batch_size=250)

    def __init__(self, data: str | None = None, directory: str | Path | None = None, tokenizer: str = "bpe",
                 vocab_size: int = 512, max_len: int = 64) -> None:
        """``tokenizer`` "bpe" (``vocab_size`` at most) or "char"; sequences are cut to ``max_len`` tokens
        (targets keep their final ``[EOS]``), which is also the model's position table (``max_seq_len``)."""
        super().__init__(data, tokenizer=tokenizer, vocab_size=vocab_size, max_len=max_len)
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (a token and [EOS]), got {max_len}")
        self.max_len = max_len
        self.pairs = load_pairs(data)
        self.tokenizer = saved_or_trained(directory, tokenizer, "\n".join(self.pairs.tokenizer_text()), vocab_size)
        self.held_pairs = self.pairs.held
        self._held = [self._encode_pair(p) for p in self.held_pairs]

    def _encode_pair(self, pair: tuple[str, str]) -> tuple[list[int], list[int]]:
        source, target = pair
        return self.tokenizer.encode(source)[:self.max_len], self.tokenizer.encode(target)[:self.max_len - 1] + [EOS]

    def save(self, directory: Path) -> None:
        self.tokenizer.save(directory)

    def model_config(self, preset: str, **overrides: Any) -> EncoderDecoderConfig:
        fixed = dict(vocab_size=self.tokenizer.vocab_size, share_embeddings=True, pad_token_id=PAD,
                     bos_token_id=BOS, eos_token_id=EOS, max_seq_len=self.max_len)
        clash = {k: v for k, v in overrides.items() if k in fixed and v != fixed[k]}
        if clash:
            raise ValueError(f"seq2seq: model overrides {clash} contradict what the tokenizer and the max_len "
                             f"option fix: {fixed}")
        return EncoderDecoderConfig.from_preset(preset, **{**overrides, **fixed})

    def build_model(self, config: EncoderDecoderConfig) -> nn.Module:
        return EncoderDecoder(config)

    @staticmethod
    def _collate(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded sources (B, S) with their 1/0 mask, and labels (B, T) padded with [PAD]."""
        sources, mask = _pad([s for s, _ in pairs])
        return {"input_ids": sources, "attention_mask": mask, "labels": _pad([t for _, t in pairs])[0]}

    def train_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        return self._collate([self._encode_pair(p) for p in self.pairs.sample(generator, batch_size)])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        # Throughput counts the positions both stacks process: source plus target. The loss without the logits
        # (fused_kernels.linear_cross_entropy) unless the config turns fused_loss off.
        return model(**batch, return_logits=False).loss, batch["input_ids"].numel() + batch["labels"].numel()

    def _translate_ids(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       num_beams: int = 1) -> list[str]:
        """Decode a source batch; the step budget (2 * source length + 8, within the position table)
        bounds the cost of a model that never emits [EOS]."""
        budget = min(self.max_len - 1, 2 * input_ids.shape[1] + 8)
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=budget, num_beams=num_beams)
        texts = []
        for row in out[:, 1:].tolist():                     # drop the [BOS] generate starts with
            texts.append(self.tokenizer.decode(row[:row.index(EOS)] if EOS in row else row))
        return texts

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        """Over the held-out pairs in their fixed order; ``max_batches`` keeps only the first batches."""
        device = model_device(model)
        n = len(self._held) if max_batches is None else min(len(self._held), max_batches * batch_size)
        nll, tokens, hypotheses = 0.0, 0, []
        for start in range(0, n, batch_size):
            batch = {k: v.to(device) for k, v in self._collate(self._held[start:min(n, start + batch_size)]).items()}
            logits = model(**batch).logits
            nll += F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=PAD,
                                   reduction="sum").item()
            tokens += int((batch["labels"] != PAD).sum())
            hypotheses += self._translate_ids(model, batch["input_ids"], batch["attention_mask"])
        references = [target for _, target in self.held_pairs[:n]]
        return {"val_loss": nll / tokens, "exact_match": exact_match(hypotheses, references),
                "bleu": bleu(hypotheses, references), "chrf": chrf(hypotheses, references)}

    def loss_labels(self, config: EncoderDecoderConfig) -> tuple[str, str]:
        held = "held-out loss: cross entropy per target token (teacher forcing, no smoothing)"
        if not config.label_smoothing:
            return "training loss: cross entropy per target token", held
        floor = smoothed_minimum(config.label_smoothing, config.vocab_size)
        return (f"training loss: cross entropy per target token, label smoothing {config.label_smoothing:g} "
                f"(its minimum: {floor:.2f})", held)

    def examples(self, model: nn.Module, n: int = 4) -> list[str]:
        pairs = self.held_pairs[:n]
        outputs = self.translate(model, [source for source, _ in pairs])
        return [f"{source} -> {output}  (reference: {target})" for (source, target), output in zip(pairs, outputs)]

    def translate(self, model: nn.Module, sentences: list[str], num_beams: int = 1) -> list[str]:
        """Translate source sentences (greedy, or beam search with ``num_beams`` > 1), in eval mode."""
        sources = []
        for i, sentence in enumerate(sentences):
            ids = self.tokenizer.encode(sentence.strip())
            if not ids or len(ids) > self.max_len:
                raise ValueError(f"sentence {i} has {len(ids)} tokens; translate needs 1 to {self.max_len} "
                                 f"(max_len): {sentence!r}")
            sources.append(ids)
        device, was_training = model_device(model), model.training
        model.eval()
        try:
            outputs: list[str] = []
            for start in range(0, len(sources), TRANSLATE_BATCH):
                input_ids, mask = _pad(sources[start:start + TRANSLATE_BATCH])
                outputs += self._translate_ids(model, input_ids.to(device), mask.to(device), num_beams)
        finally:
            model.train(was_training)
        return outputs


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-padded with [PAD] (B, L) and the 1/0 mask of their real tokens (B, L)."""
    ids = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask

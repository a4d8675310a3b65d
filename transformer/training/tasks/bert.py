"""BERT: pre-training by masked-LM + next-sentence prediction (``bert``), and fine-tuning a sequence
classifier on top of it (``bert-cls``).

``bert`` data: ``load_text`` (the pydoc help text by default, or a UTF-8 file) cut into sentences by
``split_sentences``; the first 90% of the sentences train, the last 10% are held out (in reading order, so
that held-out pairs still have true continuations). The tokenizer (byte-level BPE of ``bpe_vocab`` tokens
by default, or characters) is trained on the training sentences only.

A pre-training example is BERT's: segment A is a run of consecutive sentences, segment B is the run that
follows it (label 0, "is next") or, with probability 1/2, a run starting at a random sentence outside A
and its continuation (label 1); ``[CLS] A [SEP] B [SEP]``, token types 0 up to the first ``[SEP]`` and 1
after, at most the model's ``max_seq_len`` tokens; then ``MLMCollator``'s 15% masked-LM corruption.

The yardstick of the masked-LM loss is ``unigram_entropy``: the cross entropy of the held-out tokens under
the training split's token frequencies, i.e. the loss of a model that ignores the context. A masked-LM
loss well below it means the model uses the context around a mask.

``bert-cls`` data: ``transformer.data.docstrings`` (which part of the standard library a docstring comes
from, or a ``label<TAB>text`` file); ``[CLS] text [SEP]`` padded per batch. Fine-tuning from a ``bert``
run reloads its tokenizer (``directory``) and the trainer copies the encoder weights (``bert.*``, shared
by ``BERTForPreTraining`` and ``BERTForSequenceClassification``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...bert import IGNORE_INDEX, BERTForPreTraining, BERTForSequenceClassification, MLMCollator
from ...config import BERTConfig
from ...data.docstrings import load_classification
from ...data.text import load_text
from ...data.tokenizer import Tokenizer, saved_or_trained
from ..task import Task, model_device, register

VAL_FRACTION = 0.1
EVAL_SEED = 1234          # held-out pairs and masks: the same at every evaluation
EXAMPLE_SEED = 0          # which tokens examples() masks
NSP_RANDOM = 0.5          # probability that segment B is a random run (label 1)
TOP_K = 3                 # predictions shown per mask in examples()

_UNDERLINE = re.compile(r"\s*([*=\-~^#])\1{2,}\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])|(?<=[.!?][\"”')])\s+(?=[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Paragraphs (split at blank lines; heading underlines such as ``*****`` dropped), whitespace collapsed,
    each cut after ``.``, ``!`` or ``?`` (optionally closed by a quote or parenthesis) followed by a space
    and a capital letter. Code and grammar blocks have no such ends and stay one "sentence" each; an
    abbreviation before a capital ("e.g. Python") is cut too, harmless for pair sampling."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line for line in paragraph.splitlines() if line.strip() and not _UNDERLINE.fullmatch(line)]
        flat = " ".join(" ".join(lines).split())
        sentences += [s for s in _SENTENCE_END.split(flat) if s]
    return sentences


def unigram_entropy(train_ids: Sequence[int] | torch.Tensor, heldout_ids: Sequence[int] | torch.Tensor,
                    vocab_size: int, special_ids: Sequence[int]) -> float:
    """Cross entropy (nats per token) of the held-out tokens under the training tokens' unigram
    distribution with add-one smoothing over the non-special vocabulary: p(t) = (count(t) + 1) / (N + V).
    Special tokens are left out of both the counts and the held-out tokens."""
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    train = torch.as_tensor(train_ids, dtype=torch.long).flatten()
    held = torch.as_tensor(heldout_ids, dtype=torch.long).flatten()
    train, held = train[~torch.isin(train, special)], held[~torch.isin(held, special)]
    if held.numel() == 0:
        raise ValueError("unigram_entropy: the held-out split has no non-special tokens")
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    counts[special] = 0.0
    log_p = counts.log() - math.log(train.numel() + vocab_size - len(special))
    return -log_p[held].mean().item()


def _configured(task: str, max_len: int | None) -> int:
    if max_len is None:
        raise RuntimeError(f"{task} task: call model_config() or build_model() first (sequences are cut to the "
                           f"model's max_seq_len)")
    return max_len


def _check_vocab(task: str, config: BERTConfig, tokenizer: Tokenizer) -> None:
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{task} task: the model's vocab_size {config.vocab_size} is smaller than the "
                         f"tokenizer's {tokenizer.vocab_size}")


@register
class BERTPretrainTask(Task):
    name = "bert"
    config_class = BERTConfig
    default_preset = "mini"
    finetune_task = "bert-cls"
    # 600 steps of 64 pairs of up to 64 BPE tokens with the 2-layer, 128-wide "mini" BERT: about 150 s of
    # one CPU core (under 2 minutes on 2 cores), masked-LM loss ~5.4 nats against a unigram entropy of 5.93.
    # The loss is compute-bound there: 4 layers, width 64, batch 32 or a peak rate of 3e-3 end within 0.05
    # nats of it at the same cost; 3e-3 without dropout stalls at the unigram level.
    defaults = dict(preset="mini", steps=600, batch_size=64, lr=2e-3, warmup=30, weight_decay=0.01,
                    eval_every=200, eval_batches=4, eval_batch_size=64)

    def __init__(self, data: str | None = None, directory: str | Path | None = None, tokenizer: str = "bpe",
                 bpe_vocab: int = 1024, **options: Any) -> None:
        if options:
            raise ValueError(f"bert task: unknown options {sorted(options)}; it takes tokenizer and bpe_vocab")
        sentences = split_sentences(load_text(data))
        if len(sentences) < 20:
            raise ValueError(f"--data {data!r}: {len(sentences)} sentences; pre-training pairs need at least 20")
        cut = int(len(sentences) * (1 - VAL_FRACTION))
        self.train_sentences, self.val_sentences = sentences[:cut], sentences[cut:]
        self.tokenizer = saved_or_trained(directory, tokenizer, "\n".join(self.train_sentences), bpe_vocab)
        super().__init__(data, tokenizer=self.tokenizer.kind, bpe_vocab=bpe_vocab)
        self.train_ids = [self.tokenizer.encode(s) for s in self.train_sentences]
        self.val_ids = [self.tokenizer.encode(s) for s in self.val_sentences]
        tok = self.tokenizer
        self.collator = MLMCollator(tok.vocab_size, tok.mask_id, tok.pad_id, tok.cls_id, tok.sep_id, tok.special_ids)
        self._max_len: int | None = None          # the model's max_seq_len, known once it is configured
        self._eval_pairs: list[dict[str, Any]] | None = None
        self.unigram_entropy = unigram_entropy([t for s in self.train_ids for t in s],
                                               [t for s in self.val_ids for t in s], tok.vocab_size, tok.special_ids)

    def save(self, directory: Path) -> None:
        self.tokenizer.save(directory)

    def model_config(self, preset: str, **overrides: Any) -> BERTConfig:
        config = BERTConfig.from_preset(preset, **{"vocab_size": self.tokenizer.vocab_size, **overrides})
        self._set_max_len(config.max_seq_len)
        return config

    def build_model(self, config: BERTConfig) -> BERTForPreTraining:
        _check_vocab(self.name, config, self.tokenizer)
        self._set_max_len(config.max_seq_len)
        return BERTForPreTraining(config)

    def _set_max_len(self, max_len: int) -> None:
        if max_len < 5:
            raise ValueError(f"bert task: max_seq_len {max_len} leaves no room for [CLS] A [SEP] B [SEP]")
        if max_len != self._max_len:
            self._max_len, self._eval_pairs = max_len, None

    @property
    def max_len(self) -> int:
        """Pairs are cut to the configured model's ``max_seq_len`` (a DDP-wrapped model hides its config)."""
        return _configured(self.name, self._max_len)

    def train_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        starts = torch.randint(len(self.train_ids) - 1, (batch_size,), generator=generator).tolist()
        pairs = [make_pair(self.train_ids, i, self.max_len, generator, self.tokenizer)[0] for i in starts]
        return self.collator(pairs, generator=generator)

    def _held_out_pairs(self) -> list[dict[str, Any]]:
        """Pairs whose segment A starts at every held-out sentence not already inside an earlier A."""
        if self._eval_pairs is None:
            g = torch.Generator().manual_seed(EVAL_SEED)
            self._eval_pairs, i = [], 0
            while i < len(self.val_ids) - 1:
                pair, i = make_pair(self.val_ids, i, self.max_len, g, self.tokenizer)
                self._eval_pairs.append(pair)
        return self._eval_pairs

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        """``mlm_loss`` (nats per masked token), ``nsp_loss``, ``val_loss`` = their sum (the training loss),
        ``mlm_accuracy``, ``nsp_accuracy`` and the context-free yardstick ``unigram_entropy``, on the fixed
        held-out pairs (the first ``max_batches`` batches of them, or all) masked by a generator seeded
        with ``EVAL_SEED``."""
        pairs = self._held_out_pairs()
        if max_batches is not None:
            pairs = pairs[:batch_size * max_batches]
        g = torch.Generator().manual_seed(EVAL_SEED)
        device = model_device(model)
        mlm_sum = nsp_sum = 0.0
        mlm_hits = nsp_hits = masked = 0
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in self.collator(pairs[start:start + batch_size], generator=g).items()}
            labels, nsp_labels = batch.pop("labels"), batch.pop("next_sentence_label")
            out = model(**batch)
            picked = labels != IGNORE_INDEX
            logits = out.mlm_logits[picked].float()                              # (masked, vocab)
            mlm_sum += F.cross_entropy(logits, labels[picked], reduction="sum").item()
            mlm_hits += (logits.argmax(-1) == labels[picked]).sum().item()
            masked += int(picked.sum())
            nsp_sum += F.cross_entropy(out.nsp_logits.float(), nsp_labels, reduction="sum").item()
            nsp_hits += (out.nsp_logits.argmax(-1) == nsp_labels).sum().item()
        mlm_loss, nsp_loss = mlm_sum / max(masked, 1), nsp_sum / len(pairs)
        return {"val_loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss, "nsp_loss": nsp_loss,
                "mlm_accuracy": mlm_hits / max(masked, 1), "nsp_accuracy": nsp_hits / len(pairs),
                "unigram_entropy": self.unigram_entropy}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The pre-training loss without the masked-LM logits (``fused_kernels.linear_cross_entropy`` on the
        masked positions) unless the config turns ``fused_loss`` off."""
        return model(**batch, return_logits=False).loss, batch["input_ids"].numel()

    def loss_labels(self, config: BERTConfig) -> tuple[str, str]:
        return ("training loss: masked-LM + next-sentence cross entropy",
                "held-out loss: masked-LM + next-sentence cross entropy")

    def examples(self, model: nn.Module, n: int = 4) -> list[str]:
        """Fill-mask on ``n`` evenly spaced held-out sentences: about 15% of their tokens (at least one)
        replaced by [MASK], each shown with the model's top predictions and the truth."""
        g = torch.Generator().manual_seed(EXAMPLE_SEED)
        candidates = [s for s in self.val_ids if 8 <= len(s) <= self.max_len - 2] or self.val_ids
        out = []
        for k in range(n):
            ids = candidates[k * len(candidates) // n][: self.max_len - 2]
            n_mask = max(1, round(0.15 * len(ids)))
            where = sorted(torch.randperm(len(ids), generator=g)[:n_mask].tolist())
            masked = list(ids)
            for i in where:
                masked[i] = self.tokenizer.mask_id
            x = torch.tensor([[self.tokenizer.cls_id, *masked, self.tokenizer.sep_id]], device=model_device(model))
            probs = model(x).mlm_logits[0, 1:-1].float().softmax(-1)               # (len, vocab)
            lines = [self.tokenizer.decode(masked, skip_special=False)]
            for i in where:
                p, top = probs[i].topk(TOP_K)
                guesses = ", ".join(f"{self._piece(t)} {q:.2f}" for q, t in zip(p.tolist(), top.tolist()))
                lines.append(f"  [MASK] truth {self._piece(ids[i])}: {guesses}")
            out.append("\n".join(lines))
        return out

    def _piece(self, token: int) -> str:
        return repr(self.tokenizer.decode([token], skip_special=False))


def make_pair(sentences: list[list[int]], start: int, max_len: int, generator: torch.Generator,
              tokenizer: Tokenizer) -> tuple[dict[str, Any], int]:
    """One NSP example whose segment A starts at sentence ``start`` (< len(sentences) - 1), and the index
    of the sentence after A.

    A takes sentences while they fit a target length drawn between a quarter and three quarters of the
    budget (``max_len`` - 3 special tokens; at least one sentence, and never the last one, so a true
    continuation exists). B is, with label 0, the sentences that follow A, or with label 1 (probability
    ``NSP_RANDOM``) the sentences from a random start outside A and its continuation, taken until the
    budget is full. An overlong pair loses tokens from the longer segment (from the front of A, the back
    of B, which keeps the A/B boundary intact) until both fit."""
    n, budget = len(sentences), max_len - 3
    target = int(torch.randint(max(budget // 4, 1), max(3 * budget // 4, 2), (1,), generator=generator))
    a, end = list(sentences[start]), start + 1
    while end < n - 1 and len(a) + len(sentences[end]) <= target:
        a += sentences[end]
        end += 1
    label = int(torch.rand((), generator=generator) < NSP_RANDOM)
    b_start = end
    if label == 1 and n - (end - start + 1) > 0:
        b_start = int(torch.randint(n - (end - start + 1), (1,), generator=generator))
        if b_start >= start:                     # skip the excluded run [start, end]
            b_start += end - start + 1
    elif label == 1:                             # nothing outside A and its continuation: keep the truth
        label = 0
    b, i = [], b_start
    while i < n and (not b or len(a) + len(b) < budget):
        b += sentences[i]
        i += 1
    if len(a) + len(b) > budget:                 # BERT's rule: trim the longer segment until both fit
        keep_a = min(len(a), max(budget // 2, budget - len(b)))
        a, b = a[len(a) - keep_a:], b[: budget - keep_a]
    input_ids = [tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id]
    token_type_ids = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "next_sentence_label": label}, end


@register
class BERTClassifyTask(Task):
    name = "bert-cls"
    config_class = BERTConfig
    default_preset = "mini"
    # Full fine-tuning of the "mini" BERT: 400 steps of 32 (about 8 epochs), ~45 s of one CPU core. LoRA and
    # BitFit train far fewer weights and want a higher peak rate (--lr 3e-3 and 5e-3 in the report).
    defaults = dict(preset="mini", steps=400, batch_size=32, lr=1e-3, warmup=40, weight_decay=0.01,
                    eval_every=100, eval_batches=4, eval_batch_size=64)

    def __init__(self, data: str | None = None, directory: str | Path | None = None, tokenizer: str = "bpe",
                 bpe_vocab: int = 1024, **options: Any) -> None:
        if options:
            raise ValueError(f"bert-cls task: unknown options {sorted(options)}; it takes tokenizer and bpe_vocab")
        self.dataset = load_classification(data)
        train_text = "\n".join(text for text, _ in self.dataset.train)
        self.tokenizer = saved_or_trained(directory, tokenizer, train_text, bpe_vocab)
        super().__init__(data, tokenizer=self.tokenizer.kind, bpe_vocab=bpe_vocab)
        self.labels = self.dataset.labels
        self.train_ids = [self.tokenizer.encode(text) for text, _ in self.dataset.train]
        self.test_ids = [self.tokenizer.encode(text) for text, _ in self.dataset.test]
        self.train_labels = torch.tensor([label for _, label in self.dataset.train])
        self.test_labels = torch.tensor([label for _, label in self.dataset.test])
        self.majority = int(torch.bincount(self.train_labels, minlength=len(self.labels)).argmax())
        self._max_len: int | None = None          # the model's max_seq_len, known once it is configured

    def save(self, directory: Path) -> None:
        self.tokenizer.save(directory)

    def model_config(self, preset: str, **overrides: Any) -> BERTConfig:
        """The preset (or a pre-training run's config in ``overrides``) with this data's number of labels."""
        config = BERTConfig.from_preset(preset, **{"vocab_size": self.tokenizer.vocab_size, **overrides,
                                                   "num_labels": len(self.labels)})
        self._max_len = config.max_seq_len
        return config

    def build_model(self, config: BERTConfig) -> BERTForSequenceClassification:
        _check_vocab(self.name, config, self.tokenizer)
        if config.num_labels != len(self.labels):
            raise ValueError(f"bert-cls task: the model's num_labels {config.num_labels} differs from the "
                             f"data's {len(self.labels)} labels {self.labels}")
        self._max_len = config.max_seq_len
        return BERTForSequenceClassification(config)

    @property
    def max_len(self) -> int:
        return _configured(self.name, self._max_len)

    def _batch(self, ids: list[list[int]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[CLS] text [SEP]`` (the text cut to fit ``max_len``), padded to the longest in the batch."""
        seqs = [[self.tokenizer.cls_id, *s[: self.max_len - 2], self.tokenizer.sep_id] for s in ids]
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def train_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(self.train_ids), (batch_size,), generator=generator)
        return self._batch([self.train_ids[i] for i in picks.tolist()], self.train_labels[picks])

    def _predict(self, model: nn.Module, batch_size: int,
                 max_batches: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Probabilities (n, classes), true labels (n,) and the summed loss over the first ``max_batches``
        batches of the test split (its fixed shuffled order), or all of it."""
        n = len(self.test_ids) if max_batches is None else min(len(self.test_ids), batch_size * max_batches)
        device = model_device(model)
        probs, loss = [], 0.0
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = self._batch(self.test_ids[start:stop], self.test_labels[start:stop])
            logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            loss += F.cross_entropy(logits.float(), batch["labels"].to(device), reduction="sum").item()
            probs.append(logits.float().softmax(-1).cpu())
        return torch.cat(probs), self.test_labels[:n], loss

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        """``val_loss`` (cross entropy per example), ``accuracy``, ``macro_f1`` (the mean over classes of
        F1, so small classes count as much as large ones) and ``majority_accuracy``: the accuracy of always
        answering the training split's most frequent class, on the same held-out examples."""
        probs, labels, loss = self._predict(model, batch_size, max_batches)
        pred = probs.argmax(-1)
        f1 = []
        for c in range(len(self.labels)):
            tp = ((pred == c) & (labels == c)).sum().item()
            denominator = (pred == c).sum().item() + (labels == c).sum().item()
            f1.append(2 * tp / denominator if denominator else 1.0)
        return {"val_loss": loss / len(labels), "accuracy": (pred == labels).float().mean().item(),
                "macro_f1": sum(f1) / len(f1), "majority_accuracy": (labels == self.majority).float().mean().item()}

    def loss_labels(self, config: BERTConfig) -> tuple[str, str]:
        return "training loss: cross entropy per example", "held-out loss: cross entropy per example"

    def examples(self, model: nn.Module, n: int = 4) -> list[str]:
        """``n`` evenly spaced held-out texts with the predicted class (its probability) and the true one."""
        picks = [k * len(self.test_ids) // n for k in range(n)]
        device = model_device(model)
        batch = self._batch([self.test_ids[i] for i in picks], self.test_labels[picks])
        probs = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        probs = probs.float().softmax(-1).cpu()
        out = []
        for row, i in zip(probs, picks):
            text, label = self.dataset.test[i]
            guess = int(row.argmax())
            out.append(f"predicted {self.labels[guess]} ({row[guess]:.2f}), true {self.labels[label]}: "
                       f"{text[:100]}{'...' if len(text) > 100 else ''}")
        return out

"""Causal language modelling (nanoGPT's recipe): a GPT trained to predict the next token of a text.

Data: ``transformer.data.text.load_text`` (the pydoc help text by default, or any UTF-8 file), split
90 / 10 in reading order. The tokenizer is character level (``tokenizer="char"``, nanoGPT's
shakespeare_char) or byte-level BPE (``tokenizer="bpe"``, ``bpe_vocab`` tokens). It is trained on the
training split only: nothing about the held-out text leaks into the vocabulary, and a character that
only the held-out split has maps to ``[UNK]`` (on tiny Shakespeare and on the pydoc text the training
split already holds every character, so the vocabulary is the same as nanoGPT's whole-text one).

A training example is a random window of ``max_seq_len + 1`` consecutive tokens; the model reads the
first ``max_seq_len`` and every position is scored against the token that follows it (nanoGPT's
``get_batch`` and loss), so the losses compare with nanoGPT's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import GPTConfig
from ...data.text import load_text, split_text
from ...data.tokenizer import saved_or_trained
from ...gpt import GPT
from ...serving import serve, unsupported_options
from ..task import Task, model_device, register

EVAL_SEED = 1234          # the fixed windows of the periodic (max_batches) evaluations
EXAMPLE_SEED = 0          # sampling seed of examples(): the same model gives the same text
PROMPT_CHARS = 32         # examples(): length of the held-out prompt, in characters
_LINE_START = re.compile(r"\n(?=\w)")


@register
class GPTTask(Task):
    name = "gpt"
    config_class = GPTConfig
    default_preset = "char-64"
    # nanoGPT's CPU recipe (4 layers, 128 dims, context 64, weight decay 0.1) with a larger batch and peak rate:
    # 600 steps of 32 x 64 characters cost about 2 minutes of one CPU core and reach a held-out loss of 1.51
    # on the pydoc text (its unigram entropy is 3.25 nats per character).
    defaults = dict(preset="char-64", steps=600, batch_size=32, lr=2e-3, warmup=50, weight_decay=0.1,
                    eval_every=200, eval_batches=10, eval_batch_size=64)

    def __init__(self, data: str | None = None, directory: str | Path | None = None, tokenizer: str = "char",
                 bpe_vocab: int = 1024, **options: Any) -> None:
        if options:
            raise ValueError(f"gpt task: unknown options {sorted(options)}; it takes tokenizer and bpe_vocab")
        train_text, self.val_text = split_text(load_text(data))
        self.tokenizer = saved_or_trained(directory, tokenizer, train_text, bpe_vocab)
        # the saved tokenizer wins over the option, and spec() records what is actually used
        super().__init__(data, tokenizer=self.tokenizer.kind, bpe_vocab=bpe_vocab)
        self.train_ids = torch.tensor(self.tokenizer.encode(train_text), dtype=torch.long)
        self.val_ids = torch.tensor(self.tokenizer.encode(self.val_text), dtype=torch.long)
        self.block_size: int | None = None      # the model's context, known once the model is configured

    def save(self, directory: Path) -> None:
        self.tokenizer.save(directory)

    def model_config(self, preset: str, **overrides: Any) -> GPTConfig:
        config = GPTConfig.from_preset(preset, **{"vocab_size": self.tokenizer.vocab_size, **overrides})
        self.block_size = config.max_seq_len
        return config

    def build_model(self, config: GPTConfig) -> GPT:
        if config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"gpt task: the model's vocab_size {config.vocab_size} is smaller than the "
                             f"tokenizer's {self.tokenizer.vocab_size}")
        self.block_size = config.max_seq_len
        return GPT(config)

    def _context(self) -> int:
        """The window length: the context of the model this task configured (a DDP-wrapped model hides it)."""
        if self.block_size is None:
            raise RuntimeError("gpt task: call model_config() or build_model() first (windows are max_seq_len "
                               "tokens long)")
        return self.block_size

    def train_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        x, y = _random_windows(self.train_ids, self._context(), batch_size, generator, "training")
        return {"input_ids": x, "targets": y}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        targets = batch["targets"]   # position_ids: a context-parallel slice of the sequences (trainer._shard)
        loss = _token_loss(model, batch["input_ids"], targets, reduction="mean", position_ids=batch.get("position_ids"))
        return loss, targets.numel()

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        """``val_loss`` (nats per token), ``val_ppl`` and ``bits_per_char`` (the loss in bits spread over
        the characters the tokens stand for on average, so char and BPE models compare). With
        ``max_batches``: that many batches of random windows drawn by a generator seeded with
        ``EVAL_SEED`` (the same windows at every call); without: the whole held-out split, cut into
        non-overlapping windows of the model's context (the last partial window left out)."""
        t = self._context()
        if max_batches is None:
            n = (len(self.val_ids) - 1) // t
            if n == 0:
                raise ValueError(f"gpt task: the held-out split ({len(self.val_ids)} tokens) is shorter than one "
                                 f"window of {t + 1} tokens")
            x = self.val_ids[:n * t].view(n, t)
            y = self.val_ids[1:n * t + 1].view(n, t)
        else:
            g = torch.Generator().manual_seed(EVAL_SEED)
            x, y = _random_windows(self.val_ids, t, batch_size * max_batches, g, "held-out")
        device = model_device(model)
        total = 0.0
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            total += _token_loss(model, xb, yb, reduction="sum").item()
        loss = total / y.numel()
        chars_per_token = len(self.val_text) / len(self.val_ids)
        return {"val_loss": loss, "val_ppl": math.exp(loss), "bits_per_char": loss / math.log(2) / chars_per_token}

    def loss_labels(self, config: GPTConfig) -> tuple[str, str]:
        return "training loss: cross entropy per token", "held-out loss: cross entropy per token (held-out text)"

    def examples(self, model: nn.Module, n: int = 4, max_new_tokens: int = 200) -> list[str]:
        """``n`` continuations of prompts from the held-out text, each the start of the first line after an
        evenly spaced offset that begins with a word character (not indentation nor a table rule); "▌"
        marks where the model takes over."""
        out = []
        for i in range(n):
            line = _LINE_START.search(self.val_text, i * len(self.val_text) // n)
            start = line.end() if line else 0
            prompt = self.val_text[start:start + PROMPT_CHARS]
            text = self.generate(model, prompt, max_new_tokens, temperature=0.8, top_k=20, seed=EXAMPLE_SEED + i)
            out.append(f"{prompt}▌{text[len(prompt):]}")
        return out

    def generate(self, model: nn.Module, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 20, seed: int = 0) -> str:
        """``prompt`` followed by ``max_new_tokens`` sampled tokens (greedy when ``temperature`` is 0).

        Sampling draws from torch's global generator (``GPT.sample``), so it runs inside
        ``torch.random.fork_rng`` seeded with ``seed``: reproducible, and the caller's RNG state is left
        as it was. Continuations longer than the context slide the window (the model sees its last
        ``max_seq_len`` tokens), as nanoGPT's sampler. An empty prompt starts from a newline."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        device = model_device(model)
        ids = torch.tensor([self.tokenizer.encode(prompt or "\n")], dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                new = _sample(model, ids, max_new_tokens, temperature, top_k)
        finally:
            model.train(was_training)
        return prompt + self.tokenizer.decode(new[0].tolist())

    def generate_batch(self, model: nn.Module, prompts: list[str], max_new_tokens: int = 200,
                       temperature: float = 0.8, top_k: int | None = 20, seed: int = 0,
                       max_batch: int = 8) -> list[str]:
        """The continuations (new text only) of many prompts, in order, served together with continuous batching
        on the paged KV cache (``transformer.serving.serve``); greedy when ``temperature`` is 0, which gives
        what ``generate`` gives each prompt alone. Every prompt + ``max_new_tokens`` must fit the context (no
        sliding window here). An empty prompt starts from a newline. A model with ``window`` or ALiBi, which the
        paged cache does not support, generates each prompt alone on the dense cache instead (greedily the same
        tokens)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        device = model_device(model)
        ids = [torch.tensor(self.tokenizer.encode(p or "\n"), dtype=torch.long, device=device) for p in prompts]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                kw: dict[str, Any] = dict(do_sample=temperature > 0, temperature=temperature if temperature > 0
                                          else 1.0, top_k=top_k)
                if unsupported_options(getattr(model, "config", None)):
                    outs = [model.generate(i[None], max_new_tokens, **kw)[0] for i in ids]
                else:
                    outs = serve(model, ids, max_new_tokens, max_batch=max_batch, **kw)
        finally:
            model.train(was_training)
        return [self.tokenizer.decode(o[len(i):].tolist()) for o, i in zip(outs, ids)]


def _random_windows(ids: torch.Tensor, t: int, n: int, generator: torch.Generator,
                    split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` windows of ``t + 1`` tokens at random starts: inputs (n, t) and next-token targets (n, t)."""
    if len(ids) <= t:
        raise ValueError(f"gpt task: the {split} split has {len(ids)} tokens, fewer than one window of {t + 1} "
                         f"(the model's max_seq_len + 1): use more text or a shorter context")
    starts = torch.randint(len(ids) - t, (n,), generator=generator)
    windows = ids.unfold(0, t + 1, 1)[starts]                                # (n, t + 1), a gather of a view
    return windows[:, :-1], windows[:, 1:]


def _token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Cross entropy of every position's prediction against its target, in float32: the model's own loss
    (``fused_kernels.linear_cross_entropy`` without the (B, T, vocab) logits unless the config turns
    ``fused_loss`` off)."""
    return model(x, targets=y, loss_reduction=reduction, position_ids=position_ids, return_logits=False).loss


def _sample(model: GPT, ids: torch.Tensor, max_new_tokens: int, temperature: float,
            top_k: int | None) -> torch.Tensor:
    """(B, L) prompt -> (B, max_new_tokens) new tokens: the KV-cached ``GPT.generate`` while the sequence
    fits the context, then one full forward over the last ``max_seq_len`` tokens per further token."""
    t = model.config.max_seq_len
    kw: dict[str, Any] = dict(do_sample=temperature > 0, temperature=temperature, top_k=top_k)
    cached = min(max_new_tokens, max(t - ids.shape[1], 0))
    tokens = model.generate(ids, cached, **kw) if cached else ids
    for _ in range(max_new_tokens - cached):
        logits = model(tokens[:, -t:]).logits[:, -1]                         # (B, vocab)
        tokens = torch.cat([tokens, GPT.sample(logits, **kw)[:, None]], dim=1)
    return tokens[:, ids.shape[1]:]

"""Continuous batching for GPT over the paged KV cache (``fused_kernels.PagedKVCache``): many prompts of different
lengths, no padding anywhere.

The scheduler keeps up to ``max_batch`` sequences running. A new prompt takes a free slot when the pool has
room for its whole worst case (prompt + ``max_new_tokens`` positions, so that a running sequence never
waits for blocks): it is prefilled alone (its exact length, no padding), and from then on it decodes together
with every other running sequence, one token per step, each query over its own cache through the block table
(bottom-right causal per sequence). A sequence that has produced ``max_new_tokens`` tokens or
``eos_token_id`` frees its blocks at once, and the next waiting prompt takes its slot in the same step.

    outs = serve(model, [ids_a, ids_b, ids_c], max_new_tokens=20, max_batch=2)   # prompt + new tokens each

The batch of a decode step changes as sequences come and go; the positions of each sequence are its own
(0 .. its length - 1), so every sequence gets the tokens it would get alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fused_kernels import PagedKVCache

if TYPE_CHECKING:
    from transformer.gpt import GPT


def unsupported_options(config: Any) -> list[str]:
    """The GPTConfig options in force that the paged path cannot honour, as ``name=value`` ('' list: none):
    ``fused_kernels.PagedKVCache.attention`` has no sliding window nor ALiBi."""
    return [f"{name}={getattr(config, name)!r}" for name, default in (("window", None), ("positions", "learned"))
            if getattr(config, name, default) != default]


def _step(model: GPT, cache: PagedKVCache, seqs: list[int], ids: torch.Tensor,
          positions: torch.Tensor) -> torch.Tensor:
    """(B, L) tokens of the sequences ``seqs`` at ``positions`` (B, L) through the model, their keys/values
    appended to the paged cache -> next-token logits (B, vocab)."""
    layers = [cache.layer(seqs, i) for i in range(len(model.blocks))]
    hidden, _ = model._hidden_states(ids, None, positions, layers)                      # (B, L, dim)
    return model.lm_head(hidden[:, -1])                                                  # (B, vocab)


@torch.no_grad()
def serve(model: GPT, prompts: Sequence[torch.Tensor | Sequence[int]], max_new_tokens: int, *, max_batch: int = 8,
          block_size: int = 16, num_blocks: int | None = None, do_sample: bool = False, temperature: float = 1.0,
          top_k: int | None = None, top_p: float | None = None,
          eos_token_id: int | None = None) -> list[torch.Tensor]:
    """Continue every prompt (1-D token ids, any lengths >= 1) by up to ``max_new_tokens`` tokens with
    continuous batching; -> per prompt, in input order, a 1-D tensor: the prompt then its new tokens (ending
    at the first ``eos_token_id`` when given, so lengths differ).

    ``max_batch``: sequences decoded together. ``block_size`` / ``num_blocks``: the paged pool (default: room
    for ``max_batch`` of the longest requests). Sampling as ``GPT.sample``; greedy by default, which gives the
    tokens of ``model.generate`` on each prompt alone. Runs in the model's current mode (call ``eval()``)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    cfg = model.config
    variants = unsupported_options(cfg)
    if variants:
        # fused_kernels.PagedKVCache.attention has no window / alibi_slopes (yet): refuse rather than attend wrongly
        raise ValueError(f"serve (the paged KV cache) does not support GPTConfig {', '.join(variants)}: generate "
                         f"with GPT.generate on a (batch, seq) tensor (a dense KV cache) instead")
    w = model.wte.weight
    ids = [torch.as_tensor(p, dtype=torch.long, device=w.device).reshape(-1) for p in prompts]
    for i, p in enumerate(ids):
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty")
        if p.numel() + max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"prompt {i} ({p.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len {model.config.max_seq_len}")
    if max_new_tokens == 0 or not ids:
        return [p.clone() for p in ids]
    worst = [-(-(p.numel() + max_new_tokens - 1) // block_size) for p in ids]     # the last token is not cached
    if num_blocks is None:
        num_blocks = max_batch * max(worst)
    if max(worst) > num_blocks:
        raise ValueError(f"a prompt needs {max(worst)} blocks of {block_size} positions, the pool has {num_blocks}")
    cache = PagedKVCache(num_blocks, block_size, cfg.n_heads, cfg.dim // cfg.n_heads, num_layers=len(model.blocks),
                         dtype=w.dtype, device=w.device)
    sample_kw: dict[str, Any] = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    new: dict[int, list[int]] = {}                # prompt index -> its new tokens
    out: list[torch.Tensor | None] = [None] * len(ids)
    waiting = deque(range(len(ids)))
    committed = 0                                 # worst-case blocks of the running sequences

    def record(seq: int, token: int) -> bool:
        """Add a new token; True (and the blocks freed) when the sequence is done."""
        nonlocal committed
        new[seq].append(token)
        if len(new[seq]) < max_new_tokens and token != eos_token_id:
            return False
        out[seq] = torch.cat([ids[seq], torch.tensor(new.pop(seq), dtype=torch.long, device=w.device)])
        cache.free(seq)
        committed -= worst[seq]
        return True

    while waiting or new:
        while waiting and len(new) < max_batch and committed + worst[waiting[0]] <= num_blocks:
            seq = waiting.popleft()
            committed += worst[seq]
            cache.allocate(seq)
            new[seq] = []
            prompt = ids[seq][None]                                                      # (1, L)
            positions = torch.arange(prompt.shape[1], device=w.device)[None]
            record(seq, int(model.sample(_step(model, cache, [seq], prompt, positions), **sample_kw)[0]))
        if not new:
            continue
        running = list(new)
        last = torch.tensor([new[s][-1] for s in running], dtype=torch.long, device=w.device)[:, None]   # (B, 1)
        positions = torch.tensor([cache.length(s) for s in running], device=w.device)[:, None]       # (B, 1)
        tokens = model.sample(_step(model, cache, running, last, positions), **sample_kw).tolist()
        for seq, token in zip(running, tokens):
            record(seq, token)
    return out  # type: ignore[return-value]

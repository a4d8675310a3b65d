"""GPT-2 on our kernels: a decoder-only language model, with KV-cache generation and Hugging Face loading.

Architecture (Radford et al. 2019): token embeddings + learned position embeddings, a stack of pre-LN
causal self-attention blocks (``transformer.layers.EncoderBlock`` with ``causal=True``), a final
LayerNorm ``ln_f``, and an LM head tied to the token embeddings (``GPTConfig.tie_embeddings``; untied
gives ``lm_head`` its own weight). Attention runs on ``fused_kernels.attention`` and every residual add +
LayerNorm is one ``fused_kernels.add_layer_norm``: the blocks pass the (hidden, residual) pre-LN pair along
the stack, and the last block's residual add fuses into ``ln_f``.

    model = GPT(GPTConfig.from_preset("tiny"))
    out = model(ids, labels=ids)                   # .logits (B, L, vocab), .loss (next-token CE)
    new = model.generate(ids, max_new_tokens=20)   # (B, L + 20): prompt + new tokens

Generation is split as gpt-fast splits it: ``prefill`` runs the prompt once and fills one
``KVCache`` per block, ``decode_one_token`` feeds a single token over the caches (the attention
kernel's decoding path: L = 1 query over a long cache, bottom-right causal), and ``sample`` turns
the last logits into the next token. ``use_cache=False`` recomputes the whole sequence every step;
it is the slow check that the cache is right (both give the same tokens). A list of prompts of different
lengths runs on the paged KV cache with continuous batching instead (``transformer.serving``).

Variants (``GPTConfig.window``, ``GPTConfig.positions="alibi"``, e.g. the preset ``"sliding-alibi-tiny"``):
sliding-window attention and ALiBi run in every block through the shared ``transformer.layers.Attention``
(``fused_kernels.attention``'s ``window`` / ``alibi_slopes``); an ALiBi model has no ``wpe``. Dense KV-cache
generation is exact with both; the paged serving path (a list of prompts) and Hugging Face GPT-2 weights
(learned positions, full attention) raise a ValueError naming the option.

Llama-style decoders (``GPTConfig`` ``positions="rope"``, ``mlp="swiglu"``, ``norm="rmsnorm"``, ``n_kv_heads``;
presets ``llama-tiny`` / ``llama-small``): rotary embeddings on q and k in every block (cos / sin built once per
forward from the positions, ``fused_kernels.rope_cos_sin``), the gated feed-forward ``fused_kernels.nn.GatedMLP``,
RMSNorm, grouped-query attention (the KV cache holds ``n_kv_heads`` heads). ``GPT.from_huggingface`` also loads
transformers' Llama and Qwen2 causal LMs (q / k / v projections concatenated into ``qkv_proj``).

The loss: ``forward(ids, labels=...)`` (HF's shifted convention) or ``targets=...`` (each position's own
target, what the training task passes). With ``return_logits=False`` and ``config.fused_loss`` the loss is one
``fused_kernels.linear_cross_entropy`` of the final hidden states against the LM head: the (B, L, vocab)
logits never exist (``LMOutput.logits`` is None).

Parameter names follow nanoGPT (``wte``, ``wpe``, ``blocks.{i}``, ``ln_f``, ``lm_head``) so that
Hugging Face GPT-2 weights load with the short key map in ``_HF_BLOCK_KEYS`` (plus the Conv1D
transposes: HF stores those weights as (in, out)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fused_kernels
from transformer.config import GPTConfig
from transformer.hf.gpt import (  # the checkpoint conversions, re-exported beside the model
    LLAMA_LIKE,
    config_from_huggingface,
    convert_huggingface_state_dict,
    convert_llama_state_dict,
    llama_config_from_huggingface,
)
from transformer.layers import BlockSpec, EncoderBlock, KVCache, add_norm, init_weights, key_padding_mask, make_norm
from transformer.outputs import LMOutput
from transformer.serving import serve

IGNORE_INDEX = -100  # label value left out of the loss (HF's convention)


class GPT(nn.Module):
    """GPT-2 language model: ``forward`` for training and scoring, ``generate`` for decoding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # window w: the w most recent positions, itself included: w - 1 to the left, none to the right
        spec = BlockSpec(dim=config.dim, n_heads=config.n_heads, ffn_dim=config.ffn_dim,
                         activation=config.activation, pre_ln=True, dropout=config.dropout,
                         attn_dropout=config.attn_dropout, eps=config.eps, bias=config.bias, qkv_bias=config.qkv_bias,
                         window=None if config.window is None else (config.window - 1, 0),
                         alibi=config.positions == "alibi", n_kv_heads=config.n_kv_heads, norm=config.norm,
                         mlp=config.mlp)
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        # ALiBi and RoPE: positions enter in attention (distance biases, rotated q / k), no table
        self.wpe = nn.Embedding(config.max_seq_len, config.dim) if config.positions == "learned" else None
        self.blocks = nn.ModuleList(EncoderBlock(spec) for _ in range(config.n_layers))
        self.ln_f = make_norm(config.norm, config.dim, config.eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one tensor: the output layer is the embedding's inverse

    def reset_parameters(self) -> None:
        """GPT-2 init: normal(0, 0.02) everywhere, and the projections that end a residual branch
        (attention ``out_proj``, feed-forward ``fc2``) at 0.02 / sqrt(2 * n_layers), so that the sum of the
        2 * n_layers branch outputs on the residual stream keeps a depth-independent variance."""
        init_weights(self, std=0.02)
        std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, std=std)
            nn.init.normal_(block.ffn.down_proj.weight if hasattr(block.ffn, "down_proj") else block.ffn.fc2.weight,
                            std=std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Distinct parameters (the tied head counted once); ``non_embedding`` leaves out the position
        embeddings (and the token embeddings when the head is untied), as nanoGPT reports model size."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    # ------------------------------------------------------------------------------------------ forward

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, caches: list[KVCache] | None = None,
                       need_weights: bool = False) -> tuple[torch.Tensor, list | None]:
        """Embeddings -> blocks -> ln_f: (B, L) ids -> (B, L, dim), and the attention weights if asked.

        With ``caches`` the ids continue the cached sequence: positions start at the cache length and
        ``attention_mask`` covers cache + new tokens, (B, cache length + L)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        offset = caches[0].length if caches else 0
        if position_ids is None:
            if offset + l > self.config.max_seq_len:
                raise ValueError(f"sequence of {offset + l} tokens exceeds max_seq_len={self.config.max_seq_len}")
            position_ids = torch.arange(offset, offset + l, device=input_ids.device)      # (L,)
        elif position_ids.shape[-1] != l:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match input_ids {(b, l)}")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, offset + l):
            raise ValueError(f"attention_mask must be (batch, cached + new tokens) = {(b, offset + l)}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = key_padding_mask(attention_mask)                                            # (B, 1, 1, S)
        x = self.wte(input_ids)                                                            # (B, L, dim)
        if self.wpe is not None:       # (ALiBi: the blocks' biases depend on distances only, not position_ids)
            x = x + self.wpe(position_ids)
        p = self.config.dropout if self.training else 0.0
        if p > 0:
            x = F.dropout(x, p)
        rope = self.rope_tables(position_ids, x.dtype) if self.config.positions == "rope" else None
        hidden, residual, weights = x, None, []
        for i, block in enumerate(self.blocks):
            hidden, residual, w = block(hidden, residual, causal=True, attn_mask=mask,
                                        cache=caches[i] if caches else None, need_weights=need_weights, rope=rope)
            weights.append(w)
        out, _ = add_norm(hidden, residual, self.ln_f, p)                                 # (B, L, dim)
        return out, (weights if need_weights else None)

    def rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin (B or 1, L, rotary_dim) of the positions (L,) or (B, L), in ``dtype`` (transformers' Llama:
        angles in float32, the tables cast to the activations' dtype)."""
        c = self.config
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]
        return fused_kernels.rope_cos_sin(pos, c.rotary_dim, c.rope_theta, c.rope_scaling,
                                          max_position_embeddings=c.max_seq_len, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                output_attentions: bool = False, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                return_logits: bool = True) -> LMOutput:
        """(B, L) token ids -> ``LMOutput`` with ``.logits`` (B, L, vocab).

        ``labels`` (B, L): next-token cross entropy, HF GPT-2's convention: the labels are the input ids
        themselves and are shifted inside (position t's logits are scored against ``labels[:, t + 1]``),
        entries equal to -100 are ignored, the loss is the mean over the scored tokens. Pass
        ``labels=input_ids`` with padding set to -100.
        ``attention_mask`` (B, L), 1 = real token, 0 = padding: padded keys are never attended to
        (on top of the causal mask). ``position_ids`` (B, L) or (L,), default 0..L-1 as HF; left-padded
        batches may pass ``attention_mask.cumsum(-1) - 1`` so that each sequence starts at position 0.
        ``output_attentions``: also return each block's attention weights (B, H, L, L) in ``.attentions``.
        ``targets`` (B, L), instead of ``labels``: position t scored against ``targets[:, t]`` (no shift; -100
        ignored), reduced by ``loss_reduction`` ("mean", "sum" or "none": (B, L)). ``return_logits=False`` with
        ``config.fused_loss``: the loss through ``fused_kernels.linear_cross_entropy``, ``.logits`` None."""
        if labels is not None and targets is not None:
            raise ValueError("pass labels (shifted inside) or targets (unshifted), not both")
        hidden, weights = self._hidden_states(input_ids, attention_mask, position_ids,
                                              need_weights=output_attentions)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)}")
            scored, goal = hidden[:, :-1], labels[:, 1:]                                   # (B, L-1, ...)
        elif targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets {tuple(targets.shape)} must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)}")
            scored, goal = hidden, targets
        else:
            return LMOutput(logits=self.lm_head(hidden), loss=None, attentions=weights)    # (B, L, vocab)
        goal = goal.to(hidden.device)
        if not return_logits and self.config.fused_loss:
            loss = fused_kernels.linear_cross_entropy(scored, self.lm_head.weight, goal, ignore_index=IGNORE_INDEX,
                                                      reduction=loss_reduction,
                                                      out_dtype=torch.promote_types(scored.dtype, torch.float32))
            return LMOutput(logits=None, loss=loss, attentions=weights)
        logits = self.lm_head(hidden)                                                      # (B, L, vocab)
        # float32 for half-precision logits, float64 stays float64
        scored_logits = (logits[:, :-1] if labels is not None else logits)
        scored_logits = scored_logits.to(torch.promote_types(scored_logits.dtype, torch.float32))
        loss = F.cross_entropy(scored_logits.reshape(-1, scored_logits.shape[-1]), goal.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(goal.shape)
        return LMOutput(logits=logits, loss=loss, attentions=weights)

    # --------------------------------------------------------------------------------------- generation

    def setup_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """One empty ``KVCache`` per block, room for ``max_len`` positions, in the model's dtype and device."""
        w = self.wte.weight
        head_dim = self.config.dim // self.config.n_heads
        heads = self.config.n_kv_heads or self.config.n_heads
        return [KVCache(batch, heads, max_len, head_dim, dtype=w.dtype, device=w.device) for _ in self.blocks]

    def prefill(self, input_ids: torch.Tensor, caches: list[KVCache], attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (B, L) once, filling the (empty) caches; -> next-token logits (B, vocab)."""
        hidden, _ = self._hidden_states(input_ids, attention_mask, position_ids, caches)
        return self.lm_head(hidden[:, -1])                                                 # (B, vocab)

    def decode_one_token(self, token: torch.Tensor, caches: list[KVCache], attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One step: token (B, 1) after the cached sequence; ``attention_mask`` (B, cached + 1).
        -> next-token logits (B, vocab). The single query attends over the whole cache."""
        hidden, _ = self._hidden_states(token, attention_mask, position_ids, caches)
        return self.lm_head(hidden[:, -1])                                                 # (B, vocab)

    @staticmethod
    def sample(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None) -> torch.Tensor:
        """Next-token logits (B, vocab) -> token ids (B,).

        Greedy (argmax) unless ``do_sample``. Sampling divides the logits by ``temperature``, keeps the
        ``top_k`` largest, then the smallest set of most likely tokens whose probability reaches ``top_p``
        (nucleus; the most likely token is always kept), and draws from the renormalized distribution with
        ``torch.multinomial`` on torch's default generator (``torch.manual_seed`` reproduces a draw)."""
        if not do_sample:
            return logits.argmax(dim=-1)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False)")
        logits = logits.float() / temperature                                              # (B, vocab)
        keep = torch.ones_like(logits, dtype=torch.bool)
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {top_k}")
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            keep &= logits >= kth
        if top_p is not None:
            if not 0.0 < top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {top_p}")
            sorted_logits, order = torch.sort(logits.masked_fill(~keep, float("-inf")), dim=-1, descending=True)
            probs = fused_kernels.softmax(sorted_logits, dim=-1)                                 # (B, vocab) sorted
            before = probs.cumsum(-1) - probs               # mass of the strictly more likely tokens
            keep &= torch.zeros_like(keep).scatter(-1, order, before < top_p)
        probs = fused_kernels.softmax(logits, dim=-1, mask=keep)                                 # (B, vocab)
        return torch.multinomial(probs, num_samples=1).squeeze(-1)                         # (B,)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | list[torch.Tensor], max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, use_cache: bool = True,
                 attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                 max_batch: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Continue the prompts (B, L) by ``max_new_tokens`` tokens -> (B, L + max_new_tokens), prompt first.

        A list of 1-D prompts of different lengths runs on the paged KV cache with continuous batching
        (``transformer.serving.serve``, at most ``max_batch`` sequences at once, default all): no padding,
        -> a list of 1-D tensors, prompt then new tokens, each ending at its first ``eos_token_id``.

        With the cache: one prefill over the prompt, then one ``decode_one_token`` per new token. Without
        (``use_cache=False``): the whole sequence is recomputed each step; the tokens are the same.
        ``attention_mask`` (B, L) marks real prompt tokens (1) against padding (0): for left-padded
        batches, padded positions are never attended to and positions count from each sequence's first
        real token, so a padded prompt continues as it would alone. Once a sequence has produced
        ``eos_token_id`` it keeps emitting ``pad_token_id`` (default: ``eos_token_id``); generation stops
        early when every sequence has finished, the rest filled with that token. Runs in the model's
        current mode: call ``model.eval()`` first, or dropout stays on."""
        if isinstance(input_ids, (list, tuple)):
            if attention_mask is not None or not use_cache:
                raise ValueError("a list of prompts runs on the paged KV cache: no attention_mask, use_cache=True")
            return serve(self, input_ids, max_new_tokens, max_batch=max_batch or max(1, len(input_ids)),
                         do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_token_id=eos_token_id)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, seq), got shape {tuple(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        b, l = input_ids.shape
        total = l + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt ({l}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        tokens = input_ids.new_empty(b, total)                                             # (B, total)
        tokens[:, :l] = input_ids
        if max_new_tokens == 0:
            return tokens
        mask = positions = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, l):
                raise ValueError(f"attention_mask must be {(b, l)}, got {tuple(attention_mask.shape)}")
            mask = torch.ones(b, total, dtype=torch.long, device=input_ids.device)         # (B, total)
            mask[:, :l] = attention_mask.long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)                                 # (B, total)
        fill = pad_token_id if pad_token_id is not None else eos_token_id
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        sample_kw: dict[str, Any] = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)

        def window(t: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
            return None if t is None else t[:, start:end]

        caches = self.setup_caches(b, total) if use_cache else None
        if caches is not None:
            logits = self.prefill(input_ids, caches, window(mask, 0, l), window(positions, 0, l))
        for t in range(l, total):
            if caches is None:
                hidden, _ = self._hidden_states(tokens[:, :t], window(mask, 0, t), window(positions, 0, t))
                logits = self.lm_head(hidden[:, -1])                                       # (B, vocab)
            nxt = self.sample(logits, **sample_kw)                                         # (B,)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, fill), nxt)
                finished |= nxt == eos_token_id
            tokens[:, t] = nxt
            if eos_token_id is not None and bool(finished.all()):
                tokens[:, t + 1:] = fill
                break
            if caches is not None and t + 1 < total:
                logits = self.decode_one_token(tokens[:, t:t + 1], caches, window(mask, 0, t + 1),
                                               window(positions, t, t + 1))
        return tokens

    # ---------------------------------------------------------------------------------- Hugging Face

    @classmethod
    def from_huggingface(cls, hf_model: nn.Module, **overrides: Any) -> GPT:
        """Convert a transformers ``GPT2LMHeadModel`` (or ``GPT2Model``), or a Llama / Qwen2 / Mistral causal LM
        (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` or their base models), into a ``GPT``
        with the same outputs: config from the HF config (``overrides`` replace fields of ours, e.g. dropout),
        weights through ``load_huggingface_state_dict``; same dtype and device as ``hf_model``."""
        model_type = getattr(hf_model.config, "model_type", "gpt2")
        if model_type in LLAMA_LIKE:
            config = llama_config_from_huggingface(hf_model.config, **overrides)
        else:
            config = config_from_huggingface(hf_model.config, **overrides)
        ref = next(hf_model.parameters())
        model = cls(config).to(device=ref.device, dtype=ref.dtype)
        model.load_huggingface_state_dict(hf_model.state_dict())
        return model

    def load_huggingface_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load HF GPT-2 weights: current keys (``transformer.h.0.attn.c_attn.weight``, ``lm_head.weight``)
        or the old ones of GPT2Model / early checkpoints (``h.0.attn.c_attn.weight``, no prefix). The
        causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` are ignored; Conv1D weights (in, out) are
        transposed; ``c_attn`` is already the fused q|k|v projection. A tied head takes ``wte``'s weight
        (an ``lm_head.weight`` in the dict is ignored). Strict: any missing or unexpected key raises a
        ValueError listing them all; so does a model with ``window`` or ALiBi, which GPT-2 weights were not
        trained for. A Llama-style model (``positions="rope"``) takes Llama / Qwen2 / Mistral keys
        (``convert_llama_state_dict``)."""
        if self.config.positions == "rope":
            self._load_checked(convert_llama_state_dict(state_dict, self.config), "Llama")
            return
        c = self.config
        gpt2 = dict(window=(None,), positions=("learned",), mlp=("gelu",), norm=("layernorm",),
                    n_kv_heads=(None, c.n_heads))
        variants = [f"{name}={getattr(c, name)!r}" for name, allowed in gpt2.items() if getattr(c, name) not in allowed]
        if variants:
            raise ValueError(f"GPT.load_huggingface_state_dict: Hugging Face GPT-2 has learned positions, full causal "
                             f"attention, a GELU MLP and LayerNorm; this model has {', '.join(variants)}")
        self._load_checked(convert_huggingface_state_dict(state_dict, tied=self.config.tie_embeddings), "GPT-2")

    def _load_checked(self, ours: dict[str, torch.Tensor], family: str) -> None:
        """Load converted weights strictly: every key of ours present, nothing else (a tied head takes wte's)."""
        expected = set(self.state_dict())
        if self.config.tie_embeddings:
            expected.discard("lm_head.weight")
        missing, unexpected = sorted(expected - set(ours)), sorted(set(ours) - expected)
        if missing or unexpected:
            raise ValueError(f"GPT.load_huggingface_state_dict ({family}): missing keys {missing}; unexpected keys "
                             f"{unexpected} (after mapping the HF names)")
        if self.config.tie_embeddings:
            ours["lm_head.weight"] = ours["wte.weight"]
        self.load_state_dict(ours, strict=True)

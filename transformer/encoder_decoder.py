"""The original Transformer ("Attention Is All You Need"): an encoder-decoder for translation.

    model = EncoderDecoder(EncoderDecoderConfig.from_preset("tiny"))
    out = model(src, tgt_in, attention_mask=src_mask, labels=tgt_out)     # .logits (B, T, V), .loss
    ids = model.eval().generate(src, attention_mask=src_mask, max_new_tokens=20, num_beams=4)

The encoder reads the whole (padded) source; its final output is the memory every decoder block
cross-attends to. The decoder predicts target token t+1 from target tokens <= t (causal self-attention)
and the memory. Source and target share one token table (a joint vocabulary), which is also the output
projection (``tie_embeddings``); where the table is narrower than the model (``embed_dim < dim``) a
projection up follows the embedding and a projection down precedes the tied output layer, so one matrix
can serve as both. Positions are the fixed sinusoids, in the paper's interleaved layout or Marian's
concatenated one.

Padding-free training (``config.padding_free``): a teacher-forced ``forward`` with a source mask packs the
real source tokens and the real target tokens (the target mask is ``decoder_attention_mask``, else every
position up to the last counted label), runs every block on the packed tokens (``fused_kernels.varlen_attention``:
per-sequence self-attention, causal in the decoder; cross-attention from each target to its own source) and
re-pads the logits (zeros at padded target positions, which the loss ignores).

Generation (``generate``): greedy or beam search over a per-block ``DecoderCache``: the self-attention
cache grows by one position per step, the cross-attention keys/values are computed once per source.
``from_huggingface`` converts a ``transformers`` ``MarianMTModel`` (post-LN, concat sinusoids, swish).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import fused_kernels
from fused_kernels.nn import LayerNorm

from .config import EncoderDecoderConfig
from .layers import (
    BlockSpec,
    DecoderBlock,
    DecoderCache,
    EncoderBlock,
    KVCache,
    Packing,
    SinusoidalPositions,
    add_norm,
    embedding_scale,
    key_padding_mask,
    repad,
    unpad,
)
from .outputs import LMOutput

IGNORE_INDEX = -100


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Teacher forcing: decoder inputs are the labels delayed by one step behind the decoder start token."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 0] = start_token_id
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


def _target_mask(decoder_input_ids: torch.Tensor, labels: torch.Tensor | None, pad_token_id: int) -> torch.Tensor:
    """(B, T) mask of the target positions a padding-free pass must keep when no decoder mask is given: all
    up to the last position whose label counts in the loss. Later positions feed nothing (causal) and are
    not scored, so dropping them changes no loss or gradient; without labels every position is kept."""
    b, t = decoder_input_ids.shape
    if labels is None:
        return torch.ones(b, t, dtype=torch.bool, device=decoder_input_ids.device)
    counted = (labels != pad_token_id) & (labels != IGNORE_INDEX)                   # (B, T)
    pos = torch.arange(1, t + 1, device=labels.device)
    length = (counted * pos).amax(1)                                                 # (B,) last counted + 1
    return pos[None] <= length[:, None]


class EncoderDecoder(nn.Module):
    """Encoder-decoder Transformer; pre-LN or post-LN (``config.pre_ln``), on the shared blocks."""

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        embed_dim = c.embed_dim or c.dim
        spec = BlockSpec(dim=c.dim, n_heads=c.n_heads, ffn_dim=c.ffn_dim, activation=c.activation, pre_ln=c.pre_ln,
                         dropout=c.dropout, attn_dropout=c.attn_dropout, activation_dropout=c.activation_dropout,
                         eps=c.eps)
        self.embed = nn.Embedding(c.vocab_size, embed_dim)              # target (and shared source) tokens
        if not c.share_embeddings:
            self.src_embed = nn.Embedding(c.source_vocab_size or c.vocab_size, embed_dim)
        self.positions = SinusoidalPositions(c.max_seq_len, c.dim, c.positions)
        self.embed_scale = embedding_scale(c.dim, c.scale_embedding)
        # Factorized embedding (embed_dim != dim): up after the table, down before the tied output layer.
        factorized = embed_dim != c.dim
        self.proj_in = nn.Linear(embed_dim, c.dim, bias=False) if factorized else nn.Identity()
        self.proj_out = nn.Linear(c.dim, embed_dim, bias=False) if factorized and c.tie_embeddings else nn.Identity()
        self.encoder_blocks = nn.ModuleList(EncoderBlock(spec) for _ in range(c.n_encoder_layers))
        self.decoder_blocks = nn.ModuleList(DecoderBlock(spec) for _ in range(c.n_decoder_layers))
        # Pre-LN stacks end with a LayerNorm (the blocks' outputs are un-normalized residual streams).
        self.encoder_norm = LayerNorm(c.dim, eps=c.eps) if c.pre_ln else nn.Identity()
        self.decoder_norm = LayerNorm(c.dim, eps=c.eps) if c.pre_ln else nn.Identity()
        # Tied: the output layer is ``embed.weight`` itself (F.linear), so the state dict holds it once.
        self.lm_head = nn.Identity() if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(c.vocab_size))
        else:
            self.final_logits_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linear weights and zero biases (the paper's setup, as in tensor2tensor/fairseq);
        token embeddings N(0, embed_dim^-1/2), so that after the sqrt(dim) scale they are about unit size."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=m.embedding_dim ** -0.5)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------ model

    def _source_table(self) -> nn.Embedding:
        return self.embed if self.config.share_embeddings else self.src_embed

    def _embed(self, table: nn.Embedding, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.proj_in(table(ids) * self.embed_scale)                     # (B, L, dim)
        x = x + self.positions(ids.shape[1], offset).to(x.dtype)            # (B, L, dim)
        return F.dropout(x, self.config.dropout, self.training)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S), 1/0 padding mask (B, S) -> the memory (B, S, dim) the decoder attends to.

        Rows of padded source positions hold values that nothing reads (they are masked as keys); zeros
        with ``config.padding_free``."""
        if self.config.padding_free and attention_mask is not None:
            memory, packing = self._encode_packed(input_ids, attention_mask)
            return repad(memory, packing)                                   # (B, S, dim)
        mask = key_padding_mask(attention_mask)                             # (B, 1, 1, S) or None
        hidden, residual = self._embed(self._source_table(), input_ids), None
        for block in self.encoder_blocks:
            hidden, residual, _ = block(hidden, residual, attn_mask=mask)
        if self.config.pre_ln:
            hidden, _ = add_norm(hidden, residual, self.encoder_norm, self.config.dropout if self.training else 0.0)
        return hidden                                                       # (B, S, dim)

    def _encode_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        """-> the memory of the real source tokens (1, total_src, dim) and its packing."""
        packing = Packing.from_mask(attention_mask)
        # Embedded (positions included) in the padded layout, then packed: each token keeps its position.
        hidden, residual = unpad(self._embed(self._source_table(), input_ids), packing), None   # (1, total, dim)
        for block in self.encoder_blocks:
            hidden, residual, _ = block(hidden, residual, packing=packing)
        if self.config.pre_ln:
            hidden, _ = add_norm(hidden, residual, self.encoder_norm, self.config.dropout if self.training else 0.0)
        return hidden, packing

    def _forward_packed(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, decoder_mask: torch.Tensor) -> torch.Tensor:
        """The padding-free teacher-forced pass -> logits (B, T, vocab), zeros at padded target positions."""
        hidden, packing = self._decoder_packed(input_ids, decoder_input_ids, attention_mask, decoder_mask)
        # The vocabulary projection is the widest matmul: done on real tokens only, then re-padded.
        return repad(self.output_logits(hidden), packing)                   # (B, T, vocab)

    def _decoder_packed(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, decoder_mask: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        """The padding-free teacher-forced pass up to the decoder output: (1, total_tgt, dim) and its packing."""
        memory, memory_packing = self._encode_packed(input_ids, attention_mask)        # (1, total_src, dim)
        packing = Packing.from_mask(decoder_mask)
        hidden, residual = unpad(self._embed(self.embed, decoder_input_ids), packing), None   # (1, total_tgt, dim)
        for block in self.decoder_blocks:
            hidden, residual, _ = block(hidden, residual, memory, packing=packing, memory_packing=memory_packing)
        if self.config.pre_ln:
            hidden, _ = add_norm(hidden, residual, self.decoder_norm, self.config.dropout if self.training else 0.0)
        return hidden, packing

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor | None,
               attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
               cache: list[DecoderCache] | None = None) -> torch.Tensor:
        """Target ids (B, T) and memory (B, S, dim) -> next-token logits (B, T, vocab).

        ``attention_mask`` is the source padding mask (B, S). ``decoder_attention_mask`` (B, cached + T)
        masks padded target positions on top of the causal mask. With ``cache`` (from ``init_cache``) this
        is the decode-step API: the ids are the new positions only (all the prompt once, then one token per
        step), positions continue where the cache ends, and ``memory`` may be None once the cross-attention
        caches are filled."""
        return self.output_logits(self._decoder_hidden(decoder_input_ids, memory, attention_mask,
                                                       decoder_attention_mask, cache))  # (B, T, vocab)

    def _decoder_hidden(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None,
                        cache: list[DecoderCache] | None) -> torch.Tensor:
        """``decode`` up to the decoder output (B, T, dim), before the vocabulary projection."""
        offset = cache[0].self_attn.length if cache else 0
        total = offset + decoder_input_ids.shape[1]
        if decoder_attention_mask is not None and decoder_attention_mask.shape[1] != total:
            raise ValueError(f"decoder_attention_mask covers {decoder_attention_mask.shape[1]} positions, expected "
                             f"{total} (cached + new)")
        self_mask = key_padding_mask(decoder_attention_mask)               # (B, 1, 1, offset + T) or None
        memory_mask = key_padding_mask(attention_mask)                      # (B, 1, 1, S) or None
        hidden, residual = self._embed(self.embed, decoder_input_ids, offset), None
        for i, block in enumerate(self.decoder_blocks):
            hidden, residual, _ = block(hidden, residual, memory, self_mask=self_mask, memory_mask=memory_mask,
                                        cache=cache[i] if cache else None)
        if self.config.pre_ln:
            hidden, _ = add_norm(hidden, residual, self.decoder_norm, self.config.dropout if self.training else 0.0)
        return hidden                                                       # (B, T, dim)

    def output_layer(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the vocabulary projection multiplies: (input (..., d), weight (vocab, d), bias or None), so that
        ``output_logits(hidden) == F.linear(*output_layer(hidden))``."""
        if self.config.tie_embeddings:
            return self.proj_out(hidden), self.embed.weight, self.final_logits_bias
        return hidden, self.lm_head.weight, self.final_logits_bias

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, T, dim) -> logits (B, T, vocab): the tied table (after ``proj_out``) or lm_head."""
        if self.config.tie_embeddings:
            logits = F.linear(self.proj_out(hidden), self.embed.weight)    # (B, T, vocab)
        else:
            logits = self.lm_head(hidden)                                   # (B, T, vocab)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, return_logits: bool = True) -> LMOutput:
        """Teacher-forced pass: source (B, S), target inputs (B, T) -> logits (B, T, vocab).

        ``labels`` (B, T) are the next tokens; pad and -100 labels are ignored; the loss is cross entropy
        with ``config.label_smoothing`` (torch's: that mass spread uniformly over the vocabulary). Without
        ``decoder_input_ids`` they are the labels shifted right behind the decoder start token.
        ``return_logits=False`` with labels and ``config.fused_loss``: the loss through
        ``fused_kernels.linear_cross_entropy`` on the decoder output, no (B, T, vocab) logits (``.logits`` None)."""
        c = self.config
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, c.bos_token_id, c.pad_token_id)
        if labels is not None and not return_logits and c.fused_loss:
            return LMOutput(logits=None, loss=self._fused_loss(input_ids, decoder_input_ids, attention_mask,
                                                               decoder_attention_mask, labels))
        if c.padding_free and attention_mask is not None:
            decoder_mask = decoder_attention_mask
            if decoder_mask is None:
                decoder_mask = _target_mask(decoder_input_ids, labels, c.pad_token_id)
            logits = self._forward_packed(input_ids, decoder_input_ids, attention_mask, decoder_mask)
        else:
            memory = self.encode(input_ids, attention_mask)                 # (B, S, dim)
            logits = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)
        loss = None
        if labels is not None:
            targets = labels.masked_fill(labels == c.pad_token_id, IGNORE_INDEX)
            wide = torch.promote_types(logits.dtype, torch.float32)             # float64 stays float64
            loss = F.cross_entropy(logits.to(wide).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   label_smoothing=c.label_smoothing)
        return LMOutput(logits=logits, loss=loss)

    def _fused_loss(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None,
                    labels: torch.Tensor) -> torch.Tensor:
        """The teacher-forced loss of ``forward`` through ``linear_cross_entropy`` (float32), on the real target
        tokens only when the pass is padding-free."""
        c = self.config
        targets = labels.masked_fill(labels == c.pad_token_id, IGNORE_INDEX)
        if c.padding_free and attention_mask is not None:
            decoder_mask = decoder_attention_mask
            if decoder_mask is None:
                decoder_mask = _target_mask(decoder_input_ids, labels, c.pad_token_id)
            hidden, packing = self._decoder_packed(input_ids, decoder_input_ids, attention_mask, decoder_mask)
            hidden, targets = hidden[0], targets.reshape(-1).index_select(0, packing.indices)   # real tokens
        else:
            memory = self.encode(input_ids, attention_mask)                 # (B, S, dim)
            hidden = self._decoder_hidden(decoder_input_ids, memory, attention_mask, decoder_attention_mask, None)
        x, weight, bias = self.output_layer(hidden)
        return fused_kernels.linear_cross_entropy(x, weight, targets.to(x.device), bias, ignore_index=IGNORE_INDEX,
                                                  label_smoothing=c.label_smoothing,
                                                  out_dtype=torch.promote_types(x.dtype, torch.float32))

    # ------------------------------------------------------------------------------------- generation

    def init_cache(self, batch: int, max_len: int, memory_len: int) -> list[DecoderCache]:
        """Empty caches for ``batch`` rows: self-attention for up to ``max_len`` target positions,
        cross-attention for ``memory_len`` source positions (filled by the first ``decode`` call)."""
        c, w = self.config, self.embed.weight
        head_dim = c.dim // c.n_heads

        def kv(n: int) -> KVCache:
            return KVCache(batch, c.n_heads, n, head_dim, dtype=w.dtype, device=w.device)

        return [DecoderCache(kv(max_len), kv(memory_len)) for _ in self.decoder_blocks]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, num_beams: int = 1, length_penalty: float = 1.0,
                 eos_token_id: int | None = None, use_cache: bool = True,
                 return_scores: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Translate a source batch (B, S): greedy (``num_beams=1``) or beam search. Call ``.eval()`` first.

        Returns (B, 1 + n) token ids that start with the decoder start token (``config.bos_token_id``),
        n <= max_new_tokens; a sequence that ended (with ``eos_token_id``, default ``config.eos_token_id``;
        -1 never ends) is padded with ``config.pad_token_id`` after its eos. Decoding stops early once
        every sequence has ended. A hypothesis scores sum(log p) / n_generated^length_penalty (eos
        counted). ``use_cache=False`` recomputes the whole prefix every step (the reference for the KV
        cache). ``return_scores=True`` also returns the scores (B,) of the returned sequences."""
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        args = (input_ids, attention_mask, max_new_tokens)
        if num_beams == 1:
            tokens, scores = self.greedy_search(*args, length_penalty=length_penalty, eos_token_id=eos_token_id,
                                                use_cache=use_cache)
        else:
            tokens, scores = self.beam_search(*args, num_beams=num_beams, length_penalty=length_penalty,
                                              eos_token_id=eos_token_id, use_cache=use_cache)
        return (tokens, scores) if return_scores else tokens

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
               eos_token_id: int | None) -> tuple[torch.Tensor, int | None]:
        """Check the step budget against the position table; encode the source once."""
        if max_new_tokens < 1 or max_new_tokens + 1 > self.config.max_seq_len:
            raise ValueError(f"max_new_tokens must be in [1, {self.config.max_seq_len - 1}] (the position table), "
                             f"got {max_new_tokens}")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        return self.encode(input_ids, attention_mask), eos                   # (B, S, dim)

    def _next_logits(self, tokens: torch.Tensor, memory: torch.Tensor, attention_mask: torch.Tensor | None,
                     cache: list[DecoderCache] | None) -> torch.Tensor:
        """Logits (N, vocab) of the token after ``tokens`` (N, t): one cached step, or the whole prefix."""
        if cache is not None:
            return self.decode(tokens[:, -1:], memory, attention_mask, cache=cache)[:, -1]
        return self.decode(tokens, memory, attention_mask)[:, -1]

    @torch.no_grad()
    def greedy_search(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      max_new_tokens: int = 32, length_penalty: float = 1.0, eos_token_id: int | None = None,
                      use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The most likely next token at every step -> (tokens (B, 1 + n), scores (B,)); see ``generate``."""
        memory, eos = self._start(input_ids, attention_mask, max_new_tokens, eos_token_id)
        c, b = self.config, memory.shape[0]
        tokens = torch.full((b, 1), c.bos_token_id, dtype=torch.long, device=memory.device)
        cache = self.init_cache(b, max_new_tokens, memory.shape[1]) if use_cache else None
        logp_sum = torch.zeros(b, dtype=torch.float32, device=memory.device)
        length = torch.zeros(b, dtype=torch.long, device=memory.device)
        finished = torch.zeros(b, dtype=torch.bool, device=memory.device)
        for _ in range(max_new_tokens):
            logp = self._next_logits(tokens, memory, attention_mask, cache).float().log_softmax(-1)   # (B, V)
            nxt = logp.argmax(-1)                                                               # (B,)
            logp_sum += torch.where(finished, 0.0, logp.gather(1, nxt[:, None]).squeeze(1))
            length += (~finished).long()
            nxt = nxt.masked_fill(finished, c.pad_token_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)                                  # (B, t + 1)
            if eos is not None:
                finished |= nxt == eos
                if bool(finished.all()):
                    break
        return tokens, logp_sum / length.float() ** length_penalty

    @torch.no_grad()
    def beam_search(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 32, num_beams: int = 4, length_penalty: float = 1.0,
                    eos_token_id: int | None = None, use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search -> (best hypothesis per source (B, 1 + n), its score (B,)); see ``generate``.

        A source stops once its ``num_beams`` finished hypotheses all score at least as well as the best
        live beam at the current length (Hugging Face's default ``early_stopping=False`` rule); with one
        beam that is exactly greedy search. Rows are B * num_beams. The first step runs once per source
        (every beam starts from the same start token); its top tokens seed the beams, and ``reorder``
        then expands the caches to B * num_beams rows. Every later step reorders the rows (tokens and
        caches) by the beams the survivors came from. Per source, 2 * num_beams candidates are ranked so
        that num_beams live ones remain after removing eos; an eos candidate among the top num_beams moves
        its hypothesis into the finished pool."""
        memory, eos = self._start(input_ids, attention_mask, max_new_tokens, eos_token_id)
        k = num_beams
        if k < 1:
            raise ValueError(f"num_beams must be >= 1, got {k}")
        c, b, device = self.config, memory.shape[0], memory.device
        tokens = torch.full((b, 1), c.bos_token_id, dtype=torch.long, device=device)     # (rows, t)
        scores = torch.zeros(b, 1, dtype=torch.float32, device=device)                   # (B, live beams)
        cache = self.init_cache(b, max_new_tokens, memory.shape[1]) if use_cache else None
        mem, mask = memory, attention_mask                                               # per row
        pools: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(b)]           # finished hypotheses
        done = [False] * b
        for step in range(max_new_tokens):
            n = scores.shape[1]                                             # 1 at the first step, then k
            logp = self._next_logits(tokens, mem, mask, cache).float().log_softmax(-1)            # (B * n, V)
            vocab = logp.shape[1]
            cand = (scores.reshape(-1, 1) + logp).view(b, n * vocab)                               # (B, n * V)
            top, idx = cand.topk(min(2 * k, n * vocab), dim=1)                                     # (B, 2k)
            beam, tok = idx // vocab, idx % vocab
            norm = float(step + 1) ** length_penalty                        # generated tokens, eos included
            top_l, beam_l, tok_l = top.tolist(), beam.tolist(), tok.tolist()
            rows, new_tok, new_scores = [], [], []
            for s in range(b):
                live: list[tuple[int, int, float]] = []
                if not done[s]:
                    for rank, (score, bm, t) in enumerate(zip(top_l[s], beam_l[s], tok_l[s])):
                        if score == -math.inf or len(live) == k:
                            break
                        if t == eos:
                            if rank < k:
                                hyp = torch.cat([tokens[s * n + bm], tokens.new_tensor([t])])
                                pools[s] = sorted(pools[s] + [(score / norm, hyp)], key=lambda h: -h[0])[:k]
                            continue
                        live.append((s * n + bm, t, score))
                    best_live = live[0][2] / norm if live else -math.inf
                    done[s] = len(pools[s]) == k and pools[s][-1][0] >= best_live
                if done[s]:
                    live = []
                live += [(s * n, c.pad_token_id, -math.inf)] * (k - len(live))   # placeholders, never chosen
                for row, t, score in live:
                    rows.append(row)
                    new_tok.append(t)
                    new_scores.append(score)
            if all(done):
                break
            index = torch.tensor(rows, device=device)                                              # (B * k,)
            tokens = torch.cat([tokens[index], torch.tensor(new_tok, device=device)[:, None]], dim=1)
            scores = torch.tensor(new_scores, dtype=torch.float32, device=device).view(b, k)
            if cache is not None:
                for layer_cache in cache:
                    layer_cache.reorder(index)
            if step == 0:                                                   # rows now are B * k
                mem = memory.repeat_interleave(k, dim=0)                    # (B * k, S, dim)
                mask = None if attention_mask is None else attention_mask.repeat_interleave(k, dim=0)
        else:
            # Out of steps: the live beams (max_new_tokens generated tokens each) compete with the pool.
            norm = float(max_new_tokens) ** length_penalty
            for s in range(b):
                if not done[s]:
                    for j in range(k):
                        score = scores[s, j].item()
                        if score != -math.inf:
                            pools[s].append((score / norm, tokens[s * k + j]))
        best = [max(pool, key=lambda h: h[0]) if pool else (-math.inf, tokens[s * tokens.shape[0] // b])
                for s, pool in enumerate(pools)]
        out = torch.full((b, max(len(h) for _, h in best)), c.pad_token_id, dtype=torch.long, device=device)
        for s, (_, hyp) in enumerate(best):
            out[s, : len(hyp)] = hyp
        return out, torch.tensor([score for score, _ in best], device=device)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, output_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              length_penalty: float = 1.0, eos_token_id: int | None = None) -> torch.Tensor:
        """Score (B,) of ``generate``'s outputs (B, 1 + n) by one teacher-forced pass: sum of the log
        probabilities of the generated tokens up to and including the first eos, over n_generated^length_penalty."""
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        logits = self(input_ids, output_ids[:, :-1], attention_mask).logits                   # (B, n, V)
        target = output_ids[:, 1:]                                                              # (B, n)
        logp = logits.float().log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)        # (B, n)
        is_eos = (target == eos).long() if eos is not None else torch.zeros_like(target)
        valid = (is_eos.cumsum(1) - is_eos) == 0                            # up to and including the first eos
        return (logp * valid).sum(1) / valid.sum(1).float() ** length_penalty

    # ------------------------------------------------------------------------------------ conversion

    @classmethod
    def from_huggingface(cls, hf_model: nn.Module, **overrides) -> EncoderDecoder:
        """Convert a ``transformers`` ``MarianMTModel`` (same weights, same outputs).

        Marian is post-LN with no final norms, has the "concat" sinusoid layout (checked against ours, not
        loaded), separate q/k/v projections (fused here into ``qkv_proj`` / ``kv_proj``) and an output
        bias buffer ``final_logits_bias``. ``label_smoothing`` is 0 so ``.loss`` matches Hugging Face's;
        ``overrides`` change any config field (e.g. ``label_smoothing=0.1`` to fine-tune)."""
        hf = getattr(hf_model, "config", None)
        if getattr(hf, "model_type", None) != "marian" or not hasattr(hf_model, "lm_head"):
            raise TypeError(f"from_huggingface expects a transformers MarianMTModel, got {type(hf_model).__name__}")
        if (hf.encoder_attention_heads, hf.encoder_ffn_dim) != (hf.decoder_attention_heads, hf.decoder_ffn_dim):
            raise ValueError("EncoderDecoder uses one head count and one ffn width for both stacks; this Marian "
                             f"model has encoder ({hf.encoder_attention_heads}, {hf.encoder_ffn_dim}) and decoder "
                             f"({hf.decoder_attention_heads}, {hf.decoder_ffn_dim})")
        activations = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
                       "gelu_pytorch_tanh": "gelu_tanh"}
        if hf.activation_function not in activations:
            raise ValueError(f"unsupported Marian activation_function {hf.activation_function!r}")
        eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, (list, tuple)) else hf.eos_token_id
        share = bool(hf.share_encoder_decoder_embeddings)
        vocab = hf.vocab_size if share else hf.decoder_vocab_size
        fields = dict(
            vocab_size=vocab, source_vocab_size=None if share else hf.vocab_size, share_embeddings=share,
            max_seq_len=hf.max_position_embeddings, dim=hf.d_model, embed_dim=None, n_heads=hf.encoder_attention_heads,
            n_encoder_layers=hf.encoder_layers, n_decoder_layers=hf.decoder_layers, ffn_dim=hf.encoder_ffn_dim,
            dropout=float(hf.dropout), attn_dropout=float(hf.attention_dropout),
            activation_dropout=float(hf.activation_dropout), eps=1e-5,
            activation=activations[hf.activation_function],
            pre_ln=False,          # MarianEncoderLayer/DecoderLayer are post-LN (normalize_before is not read)
            scale_embedding=bool(hf.scale_embedding), positions="concat",
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)), final_logits_bias=True,
            label_smoothing=0.0, pad_token_id=hf.pad_token_id, bos_token_id=hf.decoder_start_token_id,
            eos_token_id=eos,
        )
        config = EncoderDecoderConfig(**{**fields, **overrides})
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        model = cls(config)

        def take(key: str) -> torch.Tensor:
            if key not in sd:
                raise KeyError(f"from_huggingface: the Marian state dict has no {key!r}")
            return sd.pop(key)

        def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
            if a.shape != b.shape or not torch.equal(a, b):
                raise ValueError(f"from_huggingface: {what} are not tied in this checkpoint; convert it with the "
                                 "matching setting (tie_word_embeddings / share_encoder_decoder_embeddings)")

        def cat(*keys: str) -> torch.Tensor:
            return torch.cat([take(k) for k in keys])

        for side in ("encoder", "decoder"):
            table = model.positions.table
            pos = take(f"model.{side}.embed_positions.weight")
            if pos.shape != table.shape or not torch.allclose(pos.float(), table, atol=1e-5):
                raise ValueError(f"from_huggingface: model.{side}.embed_positions are not the 'concat' sinusoids "
                                 f"{tuple(table.shape)}; they are fixed and not loaded")
        dec_embed = take("model.decoder.embed_tokens.weight")
        enc_embed = take("model.encoder.embed_tokens.weight")
        out: dict[str, torch.Tensor] = {"embed.weight": dec_embed}
        if share:
            shared = take("model.shared.weight")
            same(shared, dec_embed, "model.shared and the decoder embeddings")
            same(shared, enc_embed, "model.shared and the encoder embeddings")
        else:
            sd.pop("model.shared.weight", None)
            out["src_embed.weight"] = enc_embed
        lm_head = take("lm_head.weight")
        if config.tie_embeddings:
            same(lm_head, dec_embed, "lm_head and the decoder embeddings")
        else:
            out["lm_head.weight"] = lm_head
        out["final_logits_bias"] = take("final_logits_bias").reshape(-1)
        for kind in ("weight", "bias"):
            for i in range(hf.encoder_layers):
                h, o = f"model.encoder.layers.{i}.", f"encoder_blocks.{i}."
                out[o + f"attn.qkv_proj.{kind}"] = cat(*(h + f"self_attn.{p}_proj.{kind}" for p in "qkv"))
                out[o + f"attn.out_proj.{kind}"] = take(h + f"self_attn.out_proj.{kind}")
                out[o + f"ln1.{kind}"] = take(h + f"self_attn_layer_norm.{kind}")
                out[o + f"ffn.fc1.{kind}"] = take(h + f"fc1.{kind}")
                out[o + f"ffn.fc2.{kind}"] = take(h + f"fc2.{kind}")
                out[o + f"ln2.{kind}"] = take(h + f"final_layer_norm.{kind}")
            for i in range(hf.decoder_layers):
                h, o = f"model.decoder.layers.{i}.", f"decoder_blocks.{i}."
                out[o + f"self_attn.qkv_proj.{kind}"] = cat(*(h + f"self_attn.{p}_proj.{kind}" for p in "qkv"))
                out[o + f"self_attn.out_proj.{kind}"] = take(h + f"self_attn.out_proj.{kind}")
                out[o + f"ln1.{kind}"] = take(h + f"self_attn_layer_norm.{kind}")
                out[o + f"cross_attn.q_proj.{kind}"] = take(h + f"encoder_attn.q_proj.{kind}")
                out[o + f"cross_attn.kv_proj.{kind}"] = cat(h + f"encoder_attn.k_proj.{kind}",
                                                            h + f"encoder_attn.v_proj.{kind}")
                out[o + f"cross_attn.out_proj.{kind}"] = take(h + f"encoder_attn.out_proj.{kind}")
                out[o + f"ln2.{kind}"] = take(h + f"encoder_attn_layer_norm.{kind}")
                out[o + f"ffn.fc1.{kind}"] = take(h + f"fc1.{kind}")
                out[o + f"ffn.fc2.{kind}"] = take(h + f"fc2.{kind}")
                out[o + f"ln3.{kind}"] = take(h + f"final_layer_norm.{kind}")
        if sd:
            raise ValueError(f"from_huggingface: Marian weights with no place in EncoderDecoder: {sorted(sd)}")
        expected = model.state_dict()
        bad = [f"{k}: {tuple(v.shape)} vs ours {tuple(expected[k].shape)}"
               for k, v in out.items() if k in expected and v.shape != expected[k].shape]
        missing, unexpected = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
        if bad or missing or unexpected:
            raise ValueError(f"from_huggingface: converted weights do not fit: shape mismatches {bad}, "
                             f"missing {missing}, unexpected {unexpected}")
        model.load_state_dict(out, strict=True)
        return model.to(dec_embed.dtype)

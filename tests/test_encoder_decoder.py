"""EncoderDecoder (the original Transformer) on our kernels: presets and variants, Triton path vs
PyTorch path, mask semantics (source padding, causality, target padding), the decode-step API over
the KV caches, greedy and beam-search translation, Hugging Face MarianMTModel equivalence (logits, loss,
greedy generate) and a short copy/reverse learning run.

Shapes stay tiny (B <= 2, L <= 8): under the Triton interpreter one attention program costs tens of
milliseconds. The default backend runs the Triton kernels (through the interpreter on CPU);
``fused_kernels.use_backend("torch")`` runs the PyTorch ops (each op's PyTorch path). Search-logic tests
(beam vs greedy, cache vs recompute) run on the PyTorch ops: they test the search, and the decode step they repeat is
checked on the Triton path by ``test_decode_steps_over_cache_equal_full_decode``."""

import contextlib

import pytest
import torch
from torch import nn

import fused_kernels
from transformer.config import EncoderDecoderConfig
from transformer.encoder_decoder import EncoderDecoder, shift_right

BACKENDS = ["auto", "torch"]          # "auto": the Triton kernels (interpreter on CPU); "torch": the PyTorch ops


def _backend(name: str):
    return contextlib.nullcontext() if name == "auto" else fused_kernels.use_backend(name)


def _tiny(seed: int = 0, lively: bool = False, **overrides) -> EncoderDecoder:
    """The tiny preset without dropout, in eval mode. ``lively``: untied output layer and linear weights
    re-drawn wider, so that an untrained model's greedy output does not collapse into one repeated token
    (random tied models mostly copy their last input token)."""
    torch.manual_seed(seed)
    if lively:
        overrides = {"tie_embeddings": False, **overrides}
    cfg = EncoderDecoderConfig.from_preset("tiny", **{"dropout": 0.0, **overrides})
    model = EncoderDecoder(cfg).eval()
    if lively:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.5)
    return model


def _ids(b: int, l: int, vocab: int = 64, seed: int = 1, low: int = 3) -> torch.Tensor:
    return torch.randint(low, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


def _padded_source(b: int = 2, s: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ids and mask; the last row is right-padded after 4 tokens."""
    src = _ids(b, s, seed=seed)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, 4:] = 0
    return src.masked_fill(mask == 0, 0), mask


# ---------------------------------------------------------------------------------- presets, config


def test_parameter_counts_of_big_presets_on_meta():
    with torch.device("meta"):
        base = EncoderDecoder(EncoderDecoderConfig.from_preset("transformer-base"))
        big = EncoderDecoder(EncoderDecoderConfig.from_preset("transformer-big"))
        untied = EncoderDecoder(EncoderDecoderConfig.from_preset("transformer-base", tie_embeddings=False))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    # base: 37000 x 512 shared table + 6 x 3,152,384 (encoder) + 6 x 4,204,032 (decoder): the paper's "65M"
    assert count(base) == 37000 * 512 + 6 * 3_152_384 + 6 * 4_204_032 == 63_082_496
    assert count(big) == 37000 * 1024 + 6 * 12_596_224 + 6 * 16_796_672 == 214_245_376
    assert count(untied) == count(base) + 37000 * 512
    assert all(p.device.type == "meta" for p in base.parameters())


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_preset_forward_backward_state_dict(preset):
    torch.manual_seed(0)
    cfg = EncoderDecoderConfig.from_preset(preset)
    model = EncoderDecoder(cfg)                                # training mode, dropout on
    src, tgt = _ids(1, 5, cfg.vocab_size), _ids(1, 4, cfg.vocab_size, seed=2)
    # tiny on the Triton kernels; the wider preset on the PyTorch ops (its Triton path is the same code)
    with _backend("auto" if preset == "tiny" else "torch"):
        out = model(src, labels=tgt)                           # decoder inputs: labels shifted right
        out.loss.backward()
    assert out.logits.shape == (1, 4, cfg.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), "a parameter got no gradient"
    assert grads["embed.weight"].abs().sum() > 0

    clone = EncoderDecoder(EncoderDecoderConfig.from_dict(cfg.to_dict()))
    clone.load_state_dict(model.state_dict(), strict=True)
    model.eval(), clone.eval()
    with fused_kernels.use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(clone(src, tgt).logits, model(src, tgt).logits, rtol=0, atol=0)


def test_config_variants_and_state_dict_keys():
    plain = _tiny()
    keys = set(plain.state_dict())
    assert "embed.weight" in keys and not any(k.startswith(("lm_head", "src_embed", "proj_")) for k in keys)
    assert "decoder_blocks.0.cross_attn.kv_proj.weight" in keys and "encoder_norm.weight" not in keys
    pre = _tiny(pre_ln=True)
    assert {"encoder_norm.weight", "decoder_norm.weight"} <= set(pre.state_dict())
    fact = _tiny(embed_dim=16)
    assert fact.embed.weight.shape == (64, 16)
    assert fact.proj_in.weight.shape == (32, 16) and fact.proj_out.weight.shape == (16, 32)
    untied = _tiny(tie_embeddings=False, share_embeddings=False, source_vocab_size=48, final_logits_bias=True)
    assert untied.lm_head.weight.shape == (64, 32) and untied.src_embed.weight.shape == (48, 32)
    assert untied.final_logits_bias.shape == (64,) and "final_logits_bias" in untied.state_dict()
    with pytest.raises(ValueError, match="positions"):
        EncoderDecoderConfig.from_preset("tiny", positions="rotary")
    with pytest.raises(ValueError, match="source_vocab_size"):
        EncoderDecoderConfig.from_preset("tiny", source_vocab_size=10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        plain.generate(_ids(1, 3), max_new_tokens=64)


def test_shift_right_and_loss_ignores_pad_and_minus_100():
    labels = torch.tensor([[5, 6, 2, -100], [7, 2, 0, 0]])
    assert shift_right(labels, 1, 0).tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    model = _tiny(label_smoothing=0.0)
    src = _ids(2, 5)
    with fused_kernels.use_backend("torch"), torch.no_grad():
        out = model(src, labels=labels)
        logp = out.logits.log_softmax(-1)
        keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
        want = -logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)[keep].mean()
        torch.testing.assert_close(out.loss, want)
        smooth = EncoderDecoder(EncoderDecoderConfig.from_dict({**model.config.to_dict(), "label_smoothing": 0.1}))
        smooth.load_state_dict(model.state_dict())
        eps, v = 0.1, model.config.vocab_size
        want_smooth = ((1 - eps) * -logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
                       - eps / v * logp.sum(-1))[keep].mean()
        torch.testing.assert_close(smooth.eval()(src, labels=labels).loss, want_smooth)


# ------------------------------------------------------------------------- Triton path vs reference


@pytest.mark.parametrize("variant", [
    dict(),                                                           # post-LN, tied (the paper)
    dict(pre_ln=True, embed_dim=16, positions="concat"),              # pre-LN, factorized tied embedding
    dict(tie_embeddings=False, share_embeddings=False, final_logits_bias=True, activation="silu"),
], ids=["post_ln", "pre_ln_factorized", "untied_unshared"])
def test_triton_path_matches_reference(variant):
    model = _tiny(**variant)
    if model.final_logits_bias is not None:
        model.final_logits_bias.normal_()
    src, mask = _padded_source(b=2, s=6)
    tgt = _ids(2, 5, seed=3)

    def run():
        model.zero_grad()
        out = model(src, tgt, attention_mask=mask, labels=tgt)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = run()
    with fused_kernels.use_backend("torch"):
        ref_logits, ref_grads = run()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# -------------------------------------------------------------------------------------------- masks


def test_padded_source_tokens_change_nothing():
    model = _tiny()
    src, mask = _padded_source()
    tgt = _ids(2, 4, seed=3)
    other = src.clone()
    other[1, 4:] = _ids(1, 3, seed=9)[0]                      # different tokens under the padding
    with torch.no_grad():
        a, b = model(src, tgt, mask).logits, model(other, tgt, mask).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        unmasked = model(other, tgt).logits                  # without the mask the padding is read
    assert (unmasked[1] - a[1]).abs().max() > 1e-3


def test_future_target_tokens_never_change_past_logits():
    model = _tiny(pre_ln=True)
    src, mask = _padded_source()
    tgt = _ids(2, 6, seed=3)
    changed = tgt.clone()
    changed[:, 3:] = _ids(2, 3, seed=7)
    with torch.no_grad():
        a, b = model(src, tgt, mask).logits, model(src, changed, mask).logits
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=1e-6)
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3


def test_padded_target_tokens_change_nothing():
    model = _tiny()
    src, mask = _padded_source()
    tgt = _ids(2, 5, seed=3)
    dmask = torch.ones(2, 5, dtype=torch.long)
    dmask[1, :2] = 0                                          # left-padded target row
    changed = tgt.clone()
    changed[1, :2] = _ids(1, 2, seed=8)[0]
    with fused_kernels.use_backend("torch"), torch.no_grad():
        a = model(src, tgt, mask, decoder_attention_mask=dmask).logits
        b = model(src, changed, mask, decoder_attention_mask=dmask).logits
        unmasked = model(src, changed, mask).logits
    torch.testing.assert_close(a[:, 2:], b[:, 2:], rtol=0, atol=1e-6)
    assert (unmasked[1, 2:] - a[1, 2:]).abs().max() > 1e-3


def test_every_decoder_block_attends_to_the_final_encoder_output():
    model = _tiny(n_encoder_layers=2, n_decoder_layers=3)
    src, mask = _padded_source()
    seen = []
    hooks = [block.cross_attn.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
             for block in model.decoder_blocks]
    with fused_kernels.use_backend("torch"), torch.no_grad():
        model(src, _ids(2, 3), mask)
        memory = model.encode(src, mask)
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for m in seen:
        torch.testing.assert_close(m, memory, rtol=0, atol=0)


# ------------------------------------------------------------------------------- decode, generation


def test_decode_steps_over_cache_equal_full_decode():
    """Decode-step API on the Triton path: prefill 2 positions, then 1 + 1, against one full decode."""
    model = _tiny(pre_ln=True)
    src, mask = _padded_source()
    tgt = _ids(2, 4, seed=3)
    with torch.no_grad():
        memory = model.encode(src, mask)
        full = model.decode(tgt, memory, mask)
        cache = model.init_cache(2, max_len=4, memory_len=src.shape[1])
        steps = [model.decode(tgt[:, :2], memory, mask, cache=cache),
                 model.decode(tgt[:, 2:3], None, mask, cache=cache),      # cross-attention from the cache
                 model.decode(tgt[:, 3:4], None, mask, cache=cache)]
    assert cache[0].self_attn.length == 4 and cache[0].cross_attn.length == src.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def _eos_from_greedy(model, src, mask, step=3):
    """An eos id that greedy decoding first emits in row 0 at ``step`` or later: the searches then really
    stop early, after a few tokens."""
    tokens = model.generate(src, mask, max_new_tokens=8, eos_token_id=-1)[0].tolist()
    return next(t for i, t in enumerate(tokens) if i >= step and t not in tokens[1:i])


@pytest.mark.parametrize("pre_ln, seed", [(False, 1), (True, 2)], ids=["post_ln", "pre_ln"])
def test_greedy_cached_equals_uncached_and_beam_width_1(pre_ln, seed):
    model = _tiny(seed=seed, lively=True, pre_ln=pre_ln)
    src, mask = _padded_source()
    with fused_kernels.use_backend("torch"):
        eos = _eos_from_greedy(model, src, mask)
        cached, s_cached = model.generate(src, mask, max_new_tokens=8, eos_token_id=eos, return_scores=True)
        recompute = model.generate(src, mask, max_new_tokens=8, eos_token_id=eos, use_cache=False)
        beam1, s_beam1 = model.beam_search(src, mask, max_new_tokens=8, num_beams=1, eos_token_id=eos)
    assert cached[:, 0].eq(model.config.bos_token_id).all()
    assert (cached[0] == eos).any(), "row 0 should end early"
    first_eos = int((cached[0] == eos).nonzero()[0])
    assert cached[0, first_eos + 1:].eq(model.config.pad_token_id).all()
    assert torch.equal(cached, recompute)
    assert torch.equal(beam1, cached)                         # the beam-search code path, width 1
    torch.testing.assert_close(s_beam1, s_cached)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_scores_at_least_greedy_and_match_rescoring(length_penalty):
    model = _tiny(seed=2, lively=True, pre_ln=True)
    src, mask = _padded_source()
    with fused_kernels.use_backend("torch"):
        eos = _eos_from_greedy(model, src, mask, step=4)
        greedy, g_score = model.generate(src, mask, max_new_tokens=8, length_penalty=length_penalty,
                                         eos_token_id=eos, return_scores=True)
        beam, b_score = model.generate(src, mask, max_new_tokens=8, num_beams=4, length_penalty=length_penalty,
                                       eos_token_id=eos, return_scores=True)
        uncached = model.generate(src, mask, max_new_tokens=8, num_beams=4, length_penalty=length_penalty,
                                  eos_token_id=eos, use_cache=False)
        # The searches' own scores equal a teacher-forced rescoring of their outputs: the cache reorder
        # followed the chosen beams.
        torch.testing.assert_close(model.score(src, greedy, mask, length_penalty, eos), g_score, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.score(src, beam, mask, length_penalty, eos), b_score, rtol=0, atol=1e-5)
    assert torch.equal(beam, uncached)
    assert (b_score >= g_score - 1e-6).all()
    assert beam[:, 0].eq(model.config.bos_token_id).all()
    for row in beam:                                          # pad only after an eos
        hits = (row == eos).nonzero()
        if len(hits):
            assert row[int(hits[0]) + 1:].eq(model.config.pad_token_id).all()


def test_learns_to_reverse_short_sequences():
    torch.manual_seed(0)
    cfg = EncoderDecoderConfig.from_preset("tiny", dropout=0.0, label_smoothing=0.0)
    model = EncoderDecoder(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(3, 11, (8, 4), generator=gen)                        # 8 fixed pairs
    labels = torch.cat([src.flip(1), torch.full((8, 1), cfg.eos_token_id)], dim=1)
    losses = []
    with fused_kernels.use_backend("torch"):
        for _ in range(40):
            loss = model(src, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5, losses
    with fused_kernels.use_backend("torch"):
        out = model.eval().generate(src, max_new_tokens=labels.shape[1])
    assert torch.equal(out[:, 1:], labels)                   # it translates its training pairs


# ------------------------------------------------------------------------------------ Hugging Face


def _marian(share: bool = True, tie: bool = True, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MarianConfig(
        vocab_size=40, decoder_vocab_size=40 if share else 36, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32, activation_function="swish", scale_embedding=True, dropout=0.0,
        pad_token_id=39 if share else 35, decoder_start_token_id=39 if share else 35, eos_token_id=0,
        forced_eos_token_id=None, share_encoder_decoder_embeddings=share, tie_word_embeddings=tie,
        init_std=0.3)
    torch.manual_seed(seed)
    hf = transformers.MarianMTModel(cfg)
    hf.set_attn_implementation("eager")
    with torch.no_grad():                                     # non-trivial norms and output bias too
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        hf.final_logits_bias.normal_(0.0, 0.5)
    return hf.eval()


def test_marian_sinusoids_equal_concat_layout():
    from transformer.layers import sinusoidal_table
    hf = _marian()
    hf_table = hf.model.encoder.embed_positions.weight.detach()
    torch.testing.assert_close(sinusoidal_table(32, 16, "concat"), hf_table, rtol=0, atol=1e-6)
    assert not torch.allclose(sinusoidal_table(32, 16, "interleaved"), hf_table, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_huggingface_marian_logits_and_loss(backend):
    hf = _marian()
    model = EncoderDecoder.from_huggingface(hf).eval()
    c = model.config
    assert (c.positions, c.activation, c.pre_ln, c.bos_token_id, c.pad_token_id) == ("concat", "silu", False, 39, 39)
    src, mask = _padded_source(s=7)
    src = src.clamp(max=38).masked_fill(mask == 0, 39)
    labels = _ids(2, 5, vocab=39, seed=4)
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=mask, labels=labels)
        want_enc = hf.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state
        with _backend(backend):
            got = model(src, attention_mask=mask, labels=labels)      # decoder inputs: shift_right(labels)
            enc = model.encode(src, mask)
    real = mask.bool()
    torch.testing.assert_close(enc[real], want_enc[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)


def test_from_huggingface_marian_untied_unshared():
    hf = _marian(share=False, tie=False, seed=1)
    model = EncoderDecoder.from_huggingface(hf).eval()
    assert model.src_embed.weight.shape == (40, 16) and model.lm_head.weight.shape == (36, 16)
    src, mask = _padded_source(s=6)
    src = src.clamp(max=38)
    tgt = _ids(2, 4, vocab=35, seed=5)
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        want = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = model(src, tgt, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_huggingface_marian_greedy_generate(backend):
    hf = _marian(seed=3)
    model = EncoderDecoder.from_huggingface(hf).eval()
    src, mask = _padded_source(s=6)
    src = src.clamp(max=38).masked_fill(mask == 0, 39)
    new = 6 if backend == "torch" else 4
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        probe = model.generate(src, mask, max_new_tokens=new, eos_token_id=-1)
    eos = int(probe[0, 2])                                    # row 0 ends early: pad handling is compared too
    with torch.no_grad():
        want = hf.generate(input_ids=src, attention_mask=mask, num_beams=1, do_sample=False, max_new_tokens=new,
                           decoder_start_token_id=39, eos_token_id=eos, pad_token_id=39)
        with _backend(backend):
            got = model.generate(src, mask, max_new_tokens=new, eos_token_id=eos)
    assert torch.equal(got, want), (got, want)
    assert (got[0] == eos).any()


def test_from_huggingface_rejects_what_it_cannot_load():
    hf = _marian()
    with pytest.raises(TypeError, match="MarianMTModel"):
        EncoderDecoder.from_huggingface(nn.Linear(2, 2))
    with torch.no_grad():
        hf.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach().clone() + 1.0)   # break the tie
    with pytest.raises(ValueError, match="not tied"):
        EncoderDecoder.from_huggingface(hf)
    hf = _marian()
    with torch.no_grad():
        hf.model.encoder.embed_positions.weight.mul_(2.0)
    with pytest.raises(ValueError, match="sinusoids"):
        EncoderDecoder.from_huggingface(hf)

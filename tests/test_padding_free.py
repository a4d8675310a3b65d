"""Padding-free training (``config.padding_free``): the packed run (unpad, ``fused_kernels.varlen_attention``,
repad) gives the padded run's loss and parameter gradients, on batches whose lengths differ a lot.

Train mode with dropout 0, so both runs compute the same function. The reference is always the padded
run on the PyTorch path; the packed run goes through the PyTorch path and, for the tiny configs, through
the Triton kernels (the interpreter on a CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fused_kernels
from transformer.bert import BERTForPreTraining
from transformer.config import BERTConfig, EncoderDecoderConfig
from transformer.encoder_decoder import EncoderDecoder
from transformer.layers import Packing, repad, unpad

LENGTHS = (3, 17, 1, 30)
TOL = dict(rtol=1e-4, atol=1e-5)


def _mask(lengths: tuple[int, ...], width: int | None = None) -> torch.Tensor:
    width = width or max(lengths)
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()          # (B, L)


def _twins(cls, config, **kw):
    """The same weights with padding_free off and on."""
    torch.manual_seed(0)
    padded = cls(dataclasses.replace(config, padding_free=False), **kw)
    packed = cls(dataclasses.replace(config, padding_free=True), **kw)
    packed.load_state_dict(padded.state_dict())
    return padded.train(), packed.train()


def _loss_and_grads(model, batch, part: str = "loss"):
    model.zero_grad(set_to_none=True)
    loss = getattr(model(**batch), part)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want_loss, **TOL)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------ helpers


def test_packing_unpad_repad_roundtrip():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]])    # right, empty, left padding
    packing = Packing.from_mask(mask)
    assert packing.cu_seqlens.tolist() == [0, 2, 2, 5]
    assert packing.cu_seqlens.dtype == torch.int32
    assert packing.max_seqlen == 3 and packing.total == 5
    x = torch.randn(3, 4, 6, requires_grad=True)
    packed = unpad(x, packing)
    assert packed.shape == (1, 5, 6)
    torch.testing.assert_close(packed[0], x[mask.bool()])
    back = repad(packed, packing)
    torch.testing.assert_close(back, x * mask[..., None])
    back.sum().backward()
    torch.testing.assert_close(x.grad, mask[..., None].float().expand(3, 4, 6))


# --------------------------------------------------------------------------------------------- BERT


def _bert_batch(config: BERTConfig, lengths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = _mask(lengths)
    b, l = mask.shape
    ids = torch.randint(5, config.vocab_size, (b, l), generator=g) * mask               # pad id 0
    types = (torch.arange(l)[None] >= (torch.tensor(lengths)[:, None] // 2)).long() * mask
    picked = (torch.rand(b, l, generator=g) < 0.3) & mask.bool()
    picked[:, 0] |= mask[:, 0].bool()                                                   # every real row scores
    labels = torch.where(picked, torch.randint(5, config.vocab_size, (b, l), generator=g), -100)
    nsp = torch.randint(0, 2, (b,), generator=g)
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsp)


def _bert_config(preset: str = "tiny") -> BERTConfig:
    return BERTConfig.from_preset(preset, dropout=0.0, attn_dropout=0.0)


@pytest.mark.parametrize("preset", ["tiny", "mini"])
def test_bert_pretraining_loss_and_grads_match_padded(preset):
    config = _bert_config(preset)
    padded, packed = _twins(BERTForPreTraining, config)
    batch = _bert_batch(config, LENGTHS)
    with fused_kernels.use_backend("torch"):
        want = _loss_and_grads(padded, batch)
        got = _loss_and_grads(packed, batch)
    _assert_same(got, want)


def test_bert_padding_free_on_triton_kernels(triton_backend):
    config = _bert_config()
    padded, packed = _twins(BERTForPreTraining, config)
    batch = _bert_batch(config, LENGTHS)
    with fused_kernels.use_backend("torch"):
        want = _loss_and_grads(padded, batch)
    got = _loss_and_grads(packed, batch)                     # the Triton varlen path (interpreter on CPU)
    _assert_same(got, want)


def test_bert_padding_free_runs_varlen_and_zeroes_padding(monkeypatch):
    config = _bert_config()
    _, packed = _twins(BERTForPreTraining, config)
    calls = []
    real = fused_kernels.varlen_attention

    def spy(*args, **kwargs):
        calls.append(args[3].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_kernels, "varlen_attention", spy)
    batch = _bert_batch(config, LENGTHS)
    with fused_kernels.use_backend("torch"):
        hidden = packed.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).last_hidden_state
    assert calls == [[0, 3, 20, 21, 51]] * config.n_layers                       # one call per layer
    assert hidden[~batch["attention_mask"].bool()].abs().max() == 0


def test_bert_padding_free_falls_back_without_mask_or_with_weights():
    config = _bert_config()
    padded, packed = _twins(BERTForPreTraining, config)
    batch = _bert_batch(config, (5, 5))
    with fused_kernels.use_backend("torch"), torch.no_grad():
        out = packed.bert(batch["input_ids"], output_attentions=True)
        want = padded.bert(batch["input_ids"], output_attentions=True)
    assert len(out.attentions) == config.n_layers
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state)


def test_bert_empty_and_length_one_rows():
    """A fully padded-out row (length 0) packs to an empty sequence; its outputs are zeros, the masked-LM
    loss (which scores no position of that row) and its gradients are those of the padded run."""
    config = _bert_config()
    padded, packed = _twins(BERTForPreTraining, config)
    batch = _bert_batch(config, (1, 0, 7, 1))
    batch.pop("next_sentence_label")                     # NSP would score the empty row's [CLS] position
    with fused_kernels.use_backend("torch"):
        want = _loss_and_grads(padded, batch)
        got = _loss_and_grads(packed, batch)
        hidden = packed.bert(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    _assert_same(got, want)
    assert hidden[1].abs().max() == 0


# ---------------------------------------------------------------------------------- encoder-decoder


def _seq2seq_batch(config: EncoderDecoderConfig, src_lengths, tgt_lengths) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    src_mask, tgt_mask = _mask(src_lengths), _mask(tgt_lengths)
    src = torch.randint(3, config.vocab_size, src_mask.shape, generator=g) * src_mask
    labels = torch.randint(3, config.vocab_size, tgt_mask.shape, generator=g) * tgt_mask   # pad id 0
    return dict(input_ids=src, attention_mask=src_mask, labels=labels)


def _seq2seq_config(preset: str = "tiny", **kw) -> EncoderDecoderConfig:
    return EncoderDecoderConfig.from_preset(preset, dropout=0.0, attn_dropout=0.0, activation_dropout=0.0, **kw)


@pytest.mark.parametrize("pre_ln", [False, True])
@pytest.mark.parametrize("decoder_mask", [False, True])
def test_seq2seq_translation_loss_and_grads_match_padded(pre_ln, decoder_mask):
    config = _seq2seq_config(pre_ln=pre_ln)
    padded, packed = _twins(EncoderDecoder, config)
    batch = _seq2seq_batch(config, LENGTHS, (5, 2, 20, 9))
    if decoder_mask:
        batch["decoder_attention_mask"] = _mask((5, 2, 20, 9))
    with fused_kernels.use_backend("torch"):
        want = _loss_and_grads(padded, batch)
        got = _loss_and_grads(packed, batch)
    _assert_same(got, want)


def test_seq2seq_padding_free_on_triton_kernels(triton_backend):
    config = _seq2seq_config()
    padded, packed = _twins(EncoderDecoder, config)
    batch = _seq2seq_batch(config, (3, 11, 1), (4, 1, 7))
    with fused_kernels.use_backend("torch"):
        want = _loss_and_grads(padded, batch)
    got = _loss_and_grads(packed, batch)
    _assert_same(got, want)


def test_seq2seq_cross_attention_packs_both_sides(monkeypatch):
    config = _seq2seq_config()
    _, packed = _twins(EncoderDecoder, config)
    calls = []
    real = fused_kernels.varlen_attention

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k, kwargs["causal"]))
        return real(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    monkeypatch.setattr(fused_kernels, "varlen_attention", spy)
    batch = _seq2seq_batch(config, LENGTHS, (5, 2, 20, 9))
    with fused_kernels.use_backend("torch"), torch.no_grad():
        logits = packed(**batch).logits
    src, tgt = [0, 3, 20, 21, 51], [0, 5, 7, 27, 36]
    enc = [(src, src, 30, 30, False)] * config.n_encoder_layers
    dec = [(tgt, tgt, 20, 20, True), (tgt, src, 20, 30, False)] * config.n_decoder_layers
    assert calls == enc + dec
    assert logits[~_mask((5, 2, 20, 9)).bool()].abs().max() == 0


def test_seq2seq_empty_source_and_target_rows():
    config = _seq2seq_config()
    padded, packed = _twins(EncoderDecoder, config)
    batch = _seq2seq_batch(config, (4, 0, 1, 6), (3, 2, 1, 0))   # row 1: no source; row 3: no target
    with fused_kernels.use_backend("torch"):
        want = _loss_and_grads(padded, batch)
        got = _loss_and_grads(packed, batch)
    _assert_same(got, want)


def test_seq2seq_encode_and_generate_with_padding_free():
    config = _seq2seq_config()
    padded, packed = _twins(EncoderDecoder, config)
    batch = _seq2seq_batch(config, (4, 9), (3, 3))
    mask = batch["attention_mask"].bool()
    with fused_kernels.use_backend("torch"), torch.no_grad():
        memory = packed.eval().encode(batch["input_ids"], batch["attention_mask"])
        want = padded.eval().encode(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(memory[mask], want[mask], **TOL)
        assert memory[~mask].abs().max() == 0
        ids = packed.greedy_search(batch["input_ids"], batch["attention_mask"], max_new_tokens=4)
        want_ids = padded.greedy_search(batch["input_ids"], batch["attention_mask"], max_new_tokens=4)
    assert torch.equal(ids[0], want_ids[0])


# --------------------------------------------------------------------------------------- multimodal


def test_multimodal_text_encoder_padding_free():
    """The text encoder packs its tokens; the memory's padded text rows (zeros now) are masked as keys."""
    from transformer.config import MultimodalConfig
    from transformer.multimodal import Multimodal

    config = MultimodalConfig.from_preset("tiny", vocab_size=40, max_text_len=32, dropout=0.0)
    padded, packed = _twins(Multimodal, config)
    mask = _mask((3, 17, 1, 30))
    g = torch.Generator().manual_seed(3)
    batch = dict(pixel_values=torch.randn(4, 1, 8, 8, generator=g),
                 input_ids=torch.randint(7, 40, mask.shape, generator=g) * mask, attention_mask=mask,
                 labels={"match": torch.tensor([0, 1, 1, 0]), "digit": torch.tensor([3, 7, 1, 0])})
    with fused_kernels.use_backend("torch"):
        want = _loss_and_grads(padded, batch)
        got = _loss_and_grads(packed, batch)
    _assert_same(got, want)

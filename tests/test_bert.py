"""BERT encoder and heads (transformer/bert.py): every head trains on the tiny preset, the Triton path
(interpreter) equals the PyTorch path, converted Hugging Face models give Hugging Face's numbers,
padding is invisible to real tokens, and the masked-LM collator corrupts 15% / 80-10-10 as specified."""

import math

import pytest
import torch

import fused_kernels
from transformer.bert import (
    BERT,
    BERTForPreTraining,
    BERTForQuestionAnswering,
    BERTForSequenceClassification,
    BERTForTokenClassification,
    MLMCollator,
    load_huggingface_state_dict,
)
from transformer.config import BERTConfig

HEADS = [BERT, BERTForPreTraining, BERTForSequenceClassification, BERTForTokenClassification,
         BERTForQuestionAnswering]
HF_NAMES = {BERT: "BertModel", BERTForPreTraining: "BertForPreTraining",
            BERTForSequenceClassification: "BertForSequenceClassification",
            BERTForTokenClassification: "BertForTokenClassification",
            BERTForQuestionAnswering: "BertForQuestionAnswering"}


def _batch(vocab: int, b: int = 2, l: int = 8, pad_from: int | None = 5, seed: int = 0):
    """Random ids (no pad id 0), two segments, and (if pad_from) row 1 padded from position pad_from."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, l), generator=g)
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, l // 2:] = 1
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
        ids[-1, pad_from:] = 0
        token_type_ids[-1, pad_from:] = 0
    return ids, token_type_ids, mask


def _labels(cls, ids: torch.Tensor, mask: torch.Tensor, num_labels: int, seed: int = 1) -> dict:
    """Labels for each head, -100 (ignored) at padded positions."""
    g = torch.Generator().manual_seed(seed)
    b, l = ids.shape
    if cls is BERTForPreTraining:
        picked = (torch.rand(ids.shape, generator=g) < 0.4) & mask.bool()
        picked[:, 1] = True
        return dict(labels=torch.where(picked, ids, -100), next_sentence_label=torch.tensor([0, 1]))
    if cls is BERTForSequenceClassification:
        return dict(labels=torch.randint(num_labels, (b,), generator=g))
    if cls is BERTForTokenClassification:
        return dict(labels=torch.where(mask.bool(), torch.randint(num_labels, (b, l), generator=g), -100))
    if cls is BERTForQuestionAnswering:   # position 100 is out of range: clamped and ignored
        return dict(start_positions=torch.tensor([1, 100]), end_positions=torch.tensor([3, 4]))
    return {}


def _loss(cls, out, seed: int = 2) -> torch.Tensor:
    """A scalar that depends on every output (random projections: a plain sum of a LayerNorm output has
    no gradient)."""
    if cls is BERT:
        g = torch.Generator().manual_seed(seed)
        return ((out.last_hidden_state * torch.randn(out.last_hidden_state.shape, generator=g)).sum()
                + (out.pooler_output * torch.randn(out.pooler_output.shape, generator=g)).sum())
    return out.loss


def _outputs(cls, out) -> dict[str, torch.Tensor]:
    if cls is BERT:
        return {"hidden": out.last_hidden_state, "pooled": out.pooler_output}
    if cls is BERTForPreTraining:
        return {"mlm": out.mlm_logits, "nsp": out.nsp_logits, "loss": out.loss}
    if cls is BERTForQuestionAnswering:
        return {"start": out.start_logits, "end": out.end_logits, "loss": out.loss}
    return {"logits": out.logits, "loss": out.loss}


# ----------------------------------------------------------------------------------------------------
# Presets: forward, backward, state dict round trip


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_tiny_preset_forward_backward_state_dict(cls):
    # dropout on for the pre-training model (its in-kernel paths run too), off elsewhere to save interpreter time
    overrides = {} if cls is BERTForPreTraining else dict(dropout=0.0, attn_dropout=0.0)
    config = BERTConfig.from_preset("tiny", num_labels=3, **overrides)
    torch.manual_seed(0)
    model = cls(config).train()
    ids, tt, mask = _batch(config.vocab_size)
    out = model(ids, tt, mask, **_labels(cls, ids, mask, config.num_labels))
    loss = _loss(cls, out)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: gradient {p.grad}"

    clone = cls(BERTConfig.from_dict(config.to_dict()))
    clone.load_state_dict(model.state_dict(), strict=True)
    model.eval(), clone.eval()
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        want, got = _outputs(cls, model(ids, tt, mask)), _outputs(cls, clone(ids, tt, mask))
    for key in want:
        if want[key] is not None:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_output_shapes_tiny():
    config = BERTConfig.from_preset("tiny", num_labels=5)
    ids, tt, mask = _batch(config.vocab_size, l=6)
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        out = BERT(config).eval()(ids, tt, mask, output_attentions=True)
        assert out.last_hidden_state.shape == (2, 6, 32) and out.pooler_output.shape == (2, 32)
        assert len(out.attentions) == config.n_layers and out.attentions[0].shape == (2, 4, 6, 6)
        pre = BERTForPreTraining(config).eval()(ids, tt, mask)
        assert pre.mlm_logits.shape == (2, 6, config.vocab_size) and pre.nsp_logits.shape == (2, 2)
        assert pre.loss is None
        assert BERTForSequenceClassification(config).eval()(ids).logits.shape == (2, 5)
        assert BERTForTokenClassification(config).eval()(ids).logits.shape == (2, 6, 5)
        qa = BERTForQuestionAnswering(config).eval()(ids)
        assert qa.start_logits.shape == qa.end_logits.shape == (2, 6)
    # the heads without a pooler have no pooler weights (Hugging Face's layout)
    assert not any("pooler" in k for k in BERTForTokenClassification(config).state_dict())
    assert not any("pooler" in k for k in BERTForQuestionAnswering(config).state_dict())


def test_mlm_decoder_is_tied_to_word_embeddings():
    config = BERTConfig.from_preset("tiny")
    model = BERTForPreTraining(config)
    assert not any(k.startswith("mlm.decoder") for k in model.state_dict())   # stored once
    with torch.no_grad():
        model.bert.word_embed.weight[5].add_(1.0)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        out = model.eval()(ids)
    h = model.mlm.norm(model.mlm.act(model.mlm.transform(model.bert(ids).last_hidden_state)))
    torch.testing.assert_close(out.mlm_logits[..., 5], h @ model.bert.word_embed.weight[5] + model.mlm.bias[5])


def test_small_preset_forward_backward():
    config = BERTConfig.from_preset("small", dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    model = BERT(config)
    ids, tt, mask = _batch(config.vocab_size, b=1, l=4, pad_from=None)
    out = model(ids, tt, mask)
    _loss(BERT, out).backward()
    assert out.last_hidden_state.shape == (1, 4, 256)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# BertModel with pooler: 109,482,240 parameters (the published "110M" BERT-base).
BASE_COUNTS = {BERT: 109_482_240, BERTForPreTraining: 110_106_428,
               BERTForSequenceClassification: 109_483_778, BERTForTokenClassification: 108_893_186,
               BERTForQuestionAnswering: 108_893_186}


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_bert_base_parameter_counts(cls):
    """Built on the meta device only (never run): the standard sizes have the published shapes."""
    with torch.device("meta"):
        model = cls(BERTConfig.from_preset("bert-base"))
    assert sum(p.numel() for p in model.parameters()) == BASE_COUNTS[cls]


@pytest.mark.parametrize("preset", ["bert-base", "bert-large"])
def test_big_presets_match_huggingface_parameter_counts(preset):
    transformers = pytest.importorskip("transformers")
    config = BERTConfig.from_preset(preset)
    hf_config = transformers.BertConfig(hidden_size=config.dim, num_hidden_layers=config.n_layers,
                                        num_attention_heads=config.n_heads, intermediate_size=config.ffn_dim)
    with torch.device("meta"):
        for cls in (BERT, BERTForPreTraining):
            ours = sum(p.numel() for p in cls(config).parameters())
            theirs = sum(p.numel() for p in getattr(transformers, HF_NAMES[cls])(hf_config).parameters())
            assert ours == theirs, (preset, cls.__name__)


# ----------------------------------------------------------------------------------------------------
# Triton path (interpreter) vs PyTorch path


def test_triton_path_matches_reference_float64():
    config = BERTConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = BERTForPreTraining(config).double().eval()
    with torch.no_grad():   # non-trivial norms, so a swapped weight/bias or ln1/ln2 shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ids, tt, mask = _batch(config.vocab_size)
    labels = _labels(BERTForPreTraining, ids, mask, 2)
    results = {}
    for backend in ("auto", "torch"):
        model.zero_grad()
        with fused_kernels.use_backend(backend):
            out = model(ids, tt, mask, **labels)
            out.loss.backward()
        results[backend] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (tri, tri_grads), (ref, ref_grads) = results["auto"], results["torch"]
    real = mask.bool()
    torch.testing.assert_close(tri.mlm_logits[real], ref.mlm_logits[real], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(tri.nsp_logits, ref.nsp_logits, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(tri.loss, ref.loss, rtol=1e-9, atol=1e-10)
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], rtol=1e-8, atol=1e-9, msg=name)


# ----------------------------------------------------------------------------------------------------
# Mask semantics


def test_padded_tokens_change_nothing_for_real_tokens():
    config = BERTConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = BERT(config).eval()
    ids, tt, mask = _batch(config.vocab_size, pad_from=4)
    other_ids, other_tt = ids.clone(), tt.clone()
    other_ids[-1, 4:] = torch.tensor([7, 9, 11, 13])
    other_tt[-1, 4:] = 1
    real = mask.bool()
    with torch.no_grad():
        a = model(ids, tt, mask)
        b = model(other_ids, other_tt, mask)
        c = model(other_ids, other_tt)                      # the same change, unmasked
    torch.testing.assert_close(b.last_hidden_state[real], a.last_hidden_state[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, rtol=0, atol=1e-6)
    # the test can fail: without the mask the same change reaches the real tokens
    assert (c.last_hidden_state[-1, :4] - a.last_hidden_state[-1, :4]).abs().max() > 1e-3
    # and an all-ones mask is the same as no mask
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        d = model(ids, tt, torch.ones_like(mask))
        e = model(ids, tt)
    torch.testing.assert_close(d.last_hidden_state, e.last_hidden_state, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Hugging Face equivalence


def _hf_model(cls, **config_kwargs):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=32, type_vocab_size=2, num_labels=3 if cls is not BERTForQuestionAnswering
              else 2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    kw.update(config_kwargs)
    hf_config = transformers.BertConfig(**kw)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = getattr(transformers, HF_NAMES[cls])(hf_config).eval()
    with torch.no_grad():   # move every weight off its init (unit norms, zero biases) so a misplaced one shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


def _hf_outputs(cls, out) -> dict[str, torch.Tensor]:
    if cls is BERT:
        return {"hidden": out.last_hidden_state, "pooled": out.pooler_output}
    if cls is BERTForPreTraining:
        return {"mlm": out.prediction_logits, "nsp": out.seq_relationship_logits, "loss": out.loss}
    if cls is BERTForQuestionAnswering:
        return {"start": out.start_logits, "end": out.end_logits, "loss": out.loss}
    return {"logits": out.logits, "loss": out.loss}


PER_TOKEN = {"hidden", "mlm", "start", "end"}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_huggingface_equivalence(cls, backend):
    hf = _hf_model(cls)
    model = cls.from_huggingface(hf).eval()
    assert model.config.dim == 32 and model.config.n_layers == 2 and model.config.dropout == 0.1
    ids, tt, mask = _batch(64)
    labels = _labels(cls, ids, mask, hf.config.num_labels)
    with torch.no_grad():
        want = _hf_outputs(cls, hf(input_ids=ids, token_type_ids=tt, attention_mask=mask, **labels))
        with fused_kernels.use_backend(backend):
            got = _outputs(cls, model(ids, tt, mask, **labels))
    real = mask.bool()
    for key, w in want.items():
        g = got[key]
        assert g is not None and w is not None, key
        if key in PER_TOKEN or (key == "logits" and cls is BERTForTokenClassification):
            g, w = g[real], w[real]     # padded positions' outputs are meaningless
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"{cls.__name__}.{key}")


@pytest.mark.parametrize("num_labels,kind", [(1, "regression"), (3, "multi_label")])
def test_huggingface_sequence_classification_losses(num_labels, kind):
    hf = _hf_model(BERTForSequenceClassification, num_labels=num_labels)
    model = BERTForSequenceClassification.from_huggingface(hf).eval()
    ids, tt, mask = _batch(64)
    g = torch.Generator().manual_seed(3)
    labels = torch.randn(2, generator=g) if kind == "regression" else (torch.rand(2, 3, generator=g) > 0.5).float()
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        want = hf(input_ids=ids, token_type_ids=tt, attention_mask=mask, labels=labels)
        got = model(ids, tt, mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)


def test_huggingface_attention_weights():
    hf = _hf_model(BERT)
    model = BERT.from_huggingface(hf).eval()
    ids, tt, mask = _batch(64)
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        want = hf(input_ids=ids, token_type_ids=tt, attention_mask=mask, output_attentions=True).attentions
        got = model(ids, tt, mask, output_attentions=True).attentions
    real = mask.bool()
    for w_got, w_want in zip(got, want, strict=True):
        # (B, H, L, S) -> real query rows only: (n_real, H, S)
        torch.testing.assert_close(w_got.transpose(1, 2)[real], w_want.transpose(1, 2)[real], rtol=1e-4, atol=1e-5)
        assert w_got[-1, :, :, 5:].abs().max() == 0      # padded keys get no weight


def test_bert_from_huggingface_head_model_takes_its_encoder():
    hf = _hf_model(BERTForTokenClassification)          # no pooler
    encoder = BERT.from_huggingface(hf)
    assert encoder.pooler is None
    torch.testing.assert_close(encoder.word_embed.weight, hf.bert.embeddings.word_embeddings.weight)


def test_huggingface_old_layernorm_names_load():
    """TensorFlow-era checkpoints name the norms ``LayerNorm.gamma`` / ``LayerNorm.beta``."""
    hf = _hf_model(BERTForPreTraining)
    new = BERTForPreTraining.from_huggingface(hf)
    old_sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in hf.state_dict().items()}
    assert any(k.endswith("LayerNorm.gamma") for k in old_sd)
    old_sd["bert.embeddings.position_ids"] = torch.arange(32)[None]      # an old buffer: ignored
    old = BERTForPreTraining(new.config)
    load_huggingface_state_dict(old, old_sd)
    for k, v in new.state_dict().items():
        assert torch.equal(old.state_dict()[k], v), k
    # the fused projection is query | key | value, in that order
    layer = hf.bert.encoder.layer[1].attention.self
    qkv = new.bert.blocks[1].attn.qkv_proj.weight
    assert torch.equal(qkv, torch.cat([layer.query.weight, layer.key.weight, layer.value.weight]))


def test_huggingface_strict_loading_errors():
    hf = _hf_model(BERTForSequenceClassification)
    config = BERTForSequenceClassification.from_huggingface(hf).config
    with pytest.raises(ValueError, match=r"missing \[.*nsp\.weight.*unexpected \[.*classifier\.weight"):
        load_huggingface_state_dict(BERTForPreTraining(config), hf.state_dict())
    with pytest.raises(ValueError, match=r"unexpected Hugging Face BERT weights.*classifier_extra"):
        sd = dict(hf.state_dict(), **{"classifier_extra.weight": torch.zeros(1)})
        load_huggingface_state_dict(BERTForSequenceClassification.from_huggingface(hf), sd)
    with pytest.raises(ValueError, match=r"shape mismatches \['bert\.pos_embed\.weight: \(32, 32\) vs ours \(64, 32\)"):
        load_huggingface_state_dict(BERTForSequenceClassification(BERTConfig.from_preset("tiny")), hf.state_dict())
    pre = _hf_model(BERTForPreTraining)
    sd = pre.state_dict()
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1.0     # untied
    with pytest.raises(ValueError, match="untied"):
        load_huggingface_state_dict(BERTForPreTraining.from_huggingface(pre), sd)


def test_huggingface_unsupported_config():
    hf = _hf_model(BERT, hidden_act="tanh")
    with pytest.raises(ValueError, match="hidden_act"):
        BERT.from_huggingface(hf)


# ----------------------------------------------------------------------------------------------------
# Masked-LM collator

PAD, CLS, SEP, MASK, VOCAB = 0, 1, 2, 3, 1000
SPECIAL = (PAD, CLS, SEP, MASK)


def _corpus(n: int = 64, seed: int = 0) -> list[list[int]]:
    """[CLS] a [SEP] b [SEP] with random lengths, so the batch gets padded."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        la, lb = torch.randint(20, 150, (2,), generator=g).tolist()
        a = torch.randint(4, VOCAB, (la,), generator=g).tolist()
        b = torch.randint(4, VOCAB, (lb,), generator=g).tolist()
        seqs.append([CLS, *a, SEP, *b, SEP])
    return seqs


def _collator(**kw) -> MLMCollator:
    return MLMCollator(VOCAB, mask_token_id=MASK, pad_token_id=PAD, cls_token_id=CLS, sep_token_id=SEP, **kw)


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_collator_statistics():
    seqs = _corpus()
    batch = _collator()(seqs, generator=torch.Generator().manual_seed(0))
    original = torch.full_like(batch["input_ids"], PAD)
    for i, s in enumerate(seqs):
        original[i, : len(s)] = torch.tensor(s)
    real = batch["attention_mask"].bool()
    assert torch.equal(real.sum(1), torch.tensor([len(s) for s in seqs]))
    special = torch.isin(original, torch.tensor(SPECIAL))
    eligible = real & ~special
    picked = batch["labels"] != -100

    n = int(eligible.sum())
    assert n > 10_000
    assert _within(int(picked.sum()), n, 0.15)
    assert not (picked & ~eligible).any()                      # never a special token, never padding
    assert torch.equal(batch["labels"][picked], original[picked])
    ids = batch["input_ids"]
    assert torch.equal(ids[~picked], original[~picked])        # nothing else changes

    k = int(picked.sum())
    masked = picked & (ids == MASK)
    kept = picked & (ids == original)
    randomized = picked & (ids != MASK) & (ids != original)
    assert _within(int(masked.sum()), k, 0.8)
    assert _within(int(kept.sum()), k, 0.1 + 0.1 / (VOCAB - len(SPECIAL)))   # a random draw may hit the original
    assert _within(int(randomized.sum()), k, 0.1 * (1 - 1 / (VOCAB - len(SPECIAL))))
    assert not torch.isin(ids[randomized], torch.tensor(SPECIAL)).any()     # random tokens are never special


def test_collator_probability_is_configurable():
    batch = _collator(mlm_probability=0.5, mask_fraction=1.0, random_fraction=0.0)(
        _corpus(16), generator=torch.Generator().manual_seed(1))
    picked = batch["labels"] != -100
    eligible = batch["attention_mask"].bool() & ~torch.isin(batch["labels"].where(picked, batch["input_ids"]),
                                                            torch.tensor(SPECIAL))
    assert _within(int(picked.sum()), int(eligible.sum()), 0.5)
    assert (batch["input_ids"][picked] == MASK).all()


def test_collator_is_reproducible_with_a_generator():
    seqs = _corpus(8)
    collate = _collator()
    a = collate(seqs, generator=torch.Generator().manual_seed(7))
    b = collate(seqs, generator=torch.Generator().manual_seed(7))
    c = collate(seqs, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])
    # a generator given to the constructor is used (and advanced) across calls
    stateful = _collator(generator=torch.Generator().manual_seed(7))
    assert torch.equal(stateful(seqs)["input_ids"], a["input_ids"])
    assert not torch.equal(stateful(seqs)["input_ids"], a["input_ids"])


def test_collator_pads_pairs_and_feeds_the_model():
    config = BERTConfig.from_preset("tiny", dropout=0.0, attn_dropout=0.0)
    collate = MLMCollator(config.vocab_size, mask_token_id=MASK, pad_token_id=PAD, cls_token_id=CLS,
                          sep_token_id=SEP, mlm_probability=0.5, pad_to_multiple_of=4)
    items = [{"input_ids": [CLS, 10, 11, SEP, 12, SEP], "token_type_ids": [0, 0, 0, 0, 1, 1], "next_sentence_label": 0},
             {"input_ids": torch.tensor([CLS, 20, SEP, 21, 22, 23, 24, SEP]),
              "token_type_ids": [0, 0, 0, 1, 1, 1, 1, 1], "next_sentence_label": 1}]
    batch = collate(items, generator=torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0] * 2, [1] * 8]
    assert batch["token_type_ids"].tolist()[0] == [0, 0, 0, 0, 1, 1, 0, 0]
    assert batch["next_sentence_label"].tolist() == [0, 1]
    assert (batch["labels"][0, 6:] == -100).all() and (batch["input_ids"][0, 6:] == PAD).all()
    torch.manual_seed(0)
    with fused_kernels.use_backend("torch"):
        out = BERTForPreTraining(config)(**batch)
    assert torch.isfinite(out.loss) and out.mlm_loss is not None and out.nsp_loss is not None
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)


def test_collator_rejects_bad_settings():
    with pytest.raises(ValueError, match="mlm_probability"):
        _collator(mlm_probability=1.5)
    with pytest.raises(ValueError, match="sum to at most 1"):
        _collator(mask_fraction=0.9, random_fraction=0.2)
    with pytest.raises(ValueError, match="special token ids"):
        MLMCollator(10, mask_token_id=12)

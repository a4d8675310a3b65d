"""Tiny Hugging Face BERT, GPT-2 and ViT built from configs (no download) give the same outputs with our
attention as with transformers' sdpa, padding masks included."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernels.integrations import huggingface  # noqa: E402


@pytest.fixture(scope="module")
def name():
    return huggingface.register()


def _compare(model, name, **inputs):
    model = model.eval()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(**inputs)
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    with torch.no_grad():
        got = model(**inputs)
    return got, want


def test_register_returns_name(name):
    assert name == huggingface.NAME
    assert name in transformers.AttentionInterface._global_mapping


def test_bert_with_padding(name):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    ids = torch.randint(0, 50, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 6:] = 0
    got, want = _compare(model, name, input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[valid], want.last_hidden_state[valid], rtol=1e-4, atol=1e-5)


def test_gpt2_causal_with_padding(name):
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0                                           # left padding
    got, want = _compare(model, name, input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(got.logits[valid], want.logits[valid], rtol=1e-4, atol=1e-5)
    got, want = _compare(model, name, input_ids=ids)          # no mask: the causal flag path
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)


def test_vit(name):
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg)
    got, want = _compare(model, name, pixel_values=torch.randn(2, 3, 16, 16))
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-4, atol=1e-5)

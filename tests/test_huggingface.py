"""Tiny Hugging Face BERT, GPT-2 and ViT built from configs (no download) give the same outputs with our
attention as with transformers' sdpa, padding masks included."""

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_kernels.integrations import huggingface  # noqa: E402


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


# ------------------------------------------------------------------- packed (padding-free) batches

PACK_LENGTHS = (3, 17, 1, 30)


def _tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).train()


def _padded(seqs):
    """The right-padded batch of the same sequences (the reference: padding masks are what sdpa is sure of)."""
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_llama_packed_batch_matches_padded_batch(name, monkeypatch, flash_kwargs):
    """A DataCollatorWithFlattening batch (one row of concatenated sequences) runs fused_kernels.varlen_attention
    in every layer and gives the loss and gradients of the padded batch of the same sequences."""
    import fused_kernels

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 100, (n,), generator=g) for n in PACK_LENGTHS]
    features = [{"input_ids": s.tolist()} for s in seqs]
    packed = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs,
                                                     return_tensors="pt")(features)
    assert packed["input_ids"].shape == (1, sum(PACK_LENGTHS))
    assert ("cu_seq_lens_q" in packed) == flash_kwargs
    model = _tiny_llama()
    model.set_attn_implementation("sdpa")
    want = _loss_and_grads(model, _padded(seqs))
    model.set_attn_implementation(name)
    calls = []
    real = fused_kernels.varlen_attention

    def spy(*args, **kwargs):
        calls.append(args[3].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_kernels, "varlen_attention", spy)
    with fused_kernels.use_backend("torch"):
        got = _loss_and_grads(model, dict(packed))
    cu = [0, 3, 20, 21, 51]
    assert calls == [cu] * model.config.num_hidden_layers
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert got[1].keys() == want[1].keys()
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_unpacked_position_ids_keep_the_dense_path(name, monkeypatch):
    """One sequence (position ids that never restart) is not a packed batch: no varlen call."""
    import fused_kernels

    monkeypatch.setattr(fused_kernels, "varlen_attention", lambda *a, **k: pytest.fail("varlen path taken"))
    model = _tiny_llama().eval()
    model.set_attn_implementation(name)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(9)[None])


def test_llama_packed_batch_on_triton_kernels(name, triton_backend):
    """The same check through the Triton varlen path (the interpreter on a CPU), a smaller batch."""
    import fused_kernels

    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 100, (n,), generator=g) for n in (5, 1, 12)]
    packed = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(
        [{"input_ids": s.tolist()} for s in seqs])
    model = _tiny_llama()
    model.set_attn_implementation("sdpa")
    with fused_kernels.use_backend("torch"):
        want = _loss_and_grads(model, _padded(seqs))
    model.set_attn_implementation(name)
    got = _loss_and_grads(model, dict(packed))
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert got[1].keys() == want[1].keys()
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_register_shows_why_transformers_did_not_import(monkeypatch):
    """transformers installed but failing to import (a broken dependency, or too old for AttentionInterface):
    the error is transformers' own, not "pip install transformers"; only a missing package says that."""
    import builtins

    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("transformers"):
            raise ImportError("cannot import name 'Tokenizer' from 'tokenizers' (simulated)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ImportError, match="installed but importing what it needs failed: ImportError: cannot "
                                          "import name 'Tokenizer' from 'tokenizers'"):
        huggingface.register()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "transformers", None)   # import and find_spec then see no transformers
    with pytest.raises(ImportError, match="needs transformers: pip install transformers"):
        huggingface.register()

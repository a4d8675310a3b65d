"""``fused_kernels.integrations.huggingface.apply`` on tiny random transformers models (no download): Llama, Qwen2,
Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3, GPT-2, BERT, RoBERTa and ViT. The patched model's loss and every
parameter gradient equal the unpatched model's (fp32, 1e-5), its outputs without labels too, the logits are never
materialized when labels are given (the LM head's output has no elements), and the report names what was swapped.
Run on the PyTorch path (what CPU tensors run) and, for a subset, on the Triton kernels through the interpreter."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import fused_kernels

transformers = pytest.importorskip("transformers")

from fused_kernels.integrations import huggingface  # noqa: E402

T = transformers
DECODER = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)


def _configs():
    return {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**DECODER)),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**DECODER)),
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config(**DECODER, head_dim=16)),
        "mistral": (T.MistralForCausalLM, T.MistralConfig(**DECODER, sliding_window=5)),
        "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(**DECODER, head_dim=16, sliding_window=5,
                                                       attn_logit_softcapping=20.0, final_logit_softcapping=8.0,
                                                       query_pre_attn_scalar=16)),
        "gemma3": (T.Gemma3ForCausalLM, T.Gemma3TextConfig(**DECODER, head_dim=16, sliding_window=5,
                                                           final_logit_softcapping=8.0, query_pre_attn_scalar=16)),
        "phi3": (T.Phi3ForCausalLM, T.Phi3Config(**{**DECODER, "num_key_value_heads": 4}, resid_pdrop=0.0,
                                                 embd_pdrop=0.0, partial_rotary_factor=0.5, pad_token_id=0)),
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "bert": (T.BertForMaskedLM, T.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=96,
                                                 max_position_embeddings=64, hidden_dropout_prob=0.0,
                                                 attention_probs_dropout_prob=0.0)),
        "roberta": (T.RobertaForMaskedLM, T.RobertaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=96,
                                                          max_position_embeddings=70, hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0)),
        "vit": (T.ViTForImageClassification, T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=96, num_labels=5)),
    }


# What apply must report per model: {kind: count}
EXPECTED = {
    "llama": dict(norms=5, rotary=1, gated_mlp=2, attention=1, loss=1),
    "qwen2": dict(norms=5, rotary=1, gated_mlp=2, attention=1, loss=1),
    "qwen3": dict(norms=9, rotary=1, gated_mlp=2, attention=1, loss=1),       # + q_norm / k_norm per layer
    "mistral": dict(norms=5, rotary=1, gated_mlp=2, attention=1, loss=1),
    "gemma2": dict(norms=9, rotary=1, gated_mlp=2, attention=1, loss=1),      # four norms per layer
    "gemma3": dict(norms=13, rotary=1, gated_mlp=2, attention=1, loss=1),     # + q_norm / k_norm
    "phi3": dict(norms=5, rotary=1, gated_mlp=2, attention=1, loss=1),
    "gpt2": dict(norms=5, attention=1, loss=1),
    "bert": dict(norms=6, attention=1, loss=1),                                # embeddings + 2 per layer + head
    "roberta": dict(norms=6, attention=1, loss=1),
    "vit": dict(norms=5, attention=1),
}
KERNEL_SUBSET = ("llama", "gemma2", "phi3", "gpt2", "bert")


@pytest.fixture(autouse=True)
def _restore_modeling_functions():
    """apply() replaces ``apply_rotary_pos_emb`` module-wide: put transformers' own back after each test."""
    saved = {name: mod.apply_rotary_pos_emb for name, mod in list(sys.modules.items())
             if name.startswith("transformers.models.") and hasattr(mod, "apply_rotary_pos_emb")}
    yield
    for name, fn in saved.items():
        sys.modules[name].apply_rotary_pos_emb = fn


def _inputs(name, config):
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g), labels=torch.tensor([1, 4]))
    ids = torch.randint(3, 97, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0                                           # right padding in the second row
    labels = ids.masked_fill(mask == 0, -100)
    if name in ("bert", "roberta"):                           # masked LM: a few labelled positions
        labels = torch.full_like(ids, -100)
        labels[0, [2, 5]], labels[1, 3] = ids[0, [2, 5]], ids[1, 3]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _run(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _check(name, backend):
    cls, config = _configs()[name]
    torch.manual_seed(0)
    ours_model = cls(config).eval()
    theirs = copy.deepcopy(ours_model)
    inputs = _inputs(name, config)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    with fused_kernels.use_backend(backend):
        want, want_grads = _run(theirs, inputs)
        with torch.no_grad():
            want_plain = theirs(**no_labels)
        report = huggingface.apply(ours_model)
        head_sizes = []
        head = ours_model.get_output_embeddings() if name != "vit" else None
        if head is not None:
            head.register_forward_hook(lambda m, i, o: head_sizes.append(o.numel()))
        got, got_grads = _run(ours_model, inputs)
        with_labels = list(head_sizes)
        with torch.no_grad():
            got_plain = ours_model(**no_labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert set(got_grads) == set(want_grads) and got_grads
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-5, atol=1e-5, msg=key)
    out_key = "logits"
    valid = inputs["attention_mask"].bool() if "attention_mask" in inputs else slice(None)
    torch.testing.assert_close(getattr(got_plain, out_key)[valid], getattr(want_plain, out_key)[valid],
                               rtol=1e-5, atol=1e-5)
    if name != "vit":
        assert got.logits is None                             # the loss came without logits
        # with labels the head's output is empty (causal LMs) or the head is not called (masked LMs); without
        # labels it gives the logits
        assert all(n == 0 for n in with_labels) and head_sizes[-1] == got_plain.logits.numel() > 0
    counts = {kind: report.count(kind) for kind in report.swapped}
    assert counts == EXPECTED[name], str(report)
    return report


@pytest.mark.parametrize("name", list(EXPECTED))
def test_apply_matches_unpatched_model(name):
    report = _check(name, "torch")
    assert str(report).startswith("fused_kernels.integrations.huggingface.apply(")


@pytest.mark.parametrize("name", KERNEL_SUBSET)
def test_apply_on_the_kernels(name):
    _check(name, "triton")


def test_apply_twice_and_unknown_models():
    cls, config = _configs()["llama"]
    model = cls(config)
    first = huggingface.apply(model)
    assert huggingface.apply(model) is first
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    report = huggingface.apply(plain)
    assert report.count("norms") == 1 and any("attention" in k for k in report.kept)
    assert isinstance(plain[1], fused_kernels.nn.LayerNorm)
    with pytest.raises(TypeError):
        huggingface.apply("model")


def test_num_items_in_batch_and_shift_labels():
    """transformers' trainer passes num_items_in_batch (sum / count over the whole batch); shift_labels skips the
    shift: both as ForCausalLMLoss."""
    cls, config = _configs()["qwen2"]
    torch.manual_seed(0)
    model = cls(config).eval()
    ref = copy.deepcopy(model)
    huggingface.apply(model)
    inputs = _inputs("qwen2", config)
    for extra in (dict(num_items_in_batch=torch.tensor(40)),
                  dict(shift_labels=torch.roll(inputs["labels"], -1, 1))):
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs, **extra).loss, ref(**inputs, **extra).loss, rtol=1e-5,
                                       atol=1e-5)

"""The Llama-style GPT (``positions="rope"``, ``mlp="swiglu" | "geglu"``, ``norm="rmsnorm"``, ``n_kv_heads``,
``tie_embeddings``), ``GPT.from_huggingface`` for Llama / Qwen2 / Mistral (tiny random transformers configs: logits
equal to 1e-5 in fp32, the loss equal, greedy generation equal), and every model's training loss through
``fused_kernels.linear_cross_entropy`` (``return_logits=False``) against the same model with ``fused_loss=False``:
loss and every parameter gradient, GPT, BERT (masked LM) and the encoder-decoder, on the Triton kernels (the
interpreter) and the PyTorch path."""

from __future__ import annotations

import pytest
import torch

import fused_kernels
from transformer import GPT, BERTConfig, BERTForPreTraining, EncoderDecoder, EncoderDecoderConfig, GPTConfig

transformers = pytest.importorskip("transformers")


def _ids(b, l, vocab, seed=0, low=0):
    return torch.randint(low, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


def _tiny_llama(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("llama-tiny", **overrides))


# ----------------------------------------------------------------------------- the model


def test_llama_presets():
    tiny, small = GPTConfig.from_preset("llama-tiny"), GPTConfig.from_preset("llama-small")
    for c in (tiny, small):
        assert (c.positions, c.mlp, c.norm, c.bias) == ("rope", "swiglu", "rmsnorm", False)
        assert c.n_kv_heads < c.n_heads
    model = _tiny_llama()
    assert model.wpe is None and isinstance(model.ln_f, torch.nn.RMSNorm)
    block = model.blocks[0]
    assert isinstance(block.ffn, fused_kernels.nn.GatedMLP) and isinstance(block.ln1, torch.nn.RMSNorm)
    assert block.attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64) and block.attn.qkv_proj.bias is None
    assert model.lm_head.weight is not model.wte.weight
    tied = GPT(small)
    assert tied.lm_head.weight is tied.wte.weight


@pytest.mark.parametrize("options", [dict(), dict(n_kv_heads=1, partial_rotary_factor=0.5, mlp="geglu"),
                                     dict(norm="layernorm", positions="rope", rope_scaling={"rope_type": "linear",
                                                                                             "factor": 2.0})])
def test_triton_path_matches_pytorch_path_float64(options):
    """Logits, loss and every gradient of the same weights on the kernels (interpreter) and on the PyTorch path."""
    model = _tiny_llama(**options).double()
    ids = _ids(2, 9, 96)
    results = {}
    for backend in ("triton", "torch"):
        model.zero_grad()
        with fused_kernels.use_backend(backend):
            out = model(ids, labels=ids)
            out.loss.backward()
        results[backend] = [out.logits.detach(), out.loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_kv_cache_generation_matches_recompute(backend):
    model = _tiny_llama(n_kv_heads=2, partial_rotary_factor=0.5).eval()
    ids = _ids(2, 5, 96, seed=3)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0                                           # a left-padded row
    with fused_kernels.use_backend(backend), torch.no_grad():
        a = model.generate(ids, 6, attention_mask=mask)
        b = model.generate(ids, 6, attention_mask=mask, use_cache=False)
    assert torch.equal(a, b)
    assert model.setup_caches(2, 11)[0].k.shape == (2, 2, 11, 16)        # n_kv_heads heads in the cache


def test_rope_is_relative():
    """Shifting every position by the same amount leaves a RoPE model's logits unchanged (no position table)."""
    model = _tiny_llama().double().eval()
    ids = _ids(1, 7, 96, seed=4)
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        a = model(ids).logits
        b = model(ids, position_ids=torch.arange(7) + 13).logits
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_config_errors():
    for bad in (dict(n_kv_heads=3), dict(mlp="relu_glu"), dict(norm="batchnorm"), dict(partial_rotary_factor=0.0),
                dict(partial_rotary_factor=0.05)):
        with pytest.raises(ValueError):
            GPTConfig.from_preset("llama-tiny", **bad)
    with pytest.raises(ValueError, match="paged KV cache"):
        _tiny_llama(positions="learned").generate([torch.tensor([1, 2, 3])], 2)


# ----------------------------------------------------------------------------- Hugging Face checkpoints

HF_MODELS = {
    "llama": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_parameters={"rope_type": "llama3", "factor": 4.0,
                                                                           "low_freq_factor": 1.0,
                                                                           "high_freq_factor": 4.0,
                                                                           "original_max_position_embeddings": 16,
                                                                           "rope_theta": 500.0})),
    "llama-tied": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True)),
    "qwen2": lambda: (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64)),
    "mistral": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4)),
}


def _hf(name):
    cls, config = HF_MODELS[name]()
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("name", list(HF_MODELS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_from_huggingface_logits_loss_and_generation(name, backend):
    hf = _hf(name)
    ours = GPT.from_huggingface(hf).eval()
    ids = _ids(2, 11, 100, seed=1, low=1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, labels=ids)
        want_tokens = hf.generate(ids[:, :4], attention_mask=mask[:, :4], max_new_tokens=8, do_sample=False,
                                  pad_token_id=0)
        with fused_kernels.use_backend(backend):
            got = ours(ids, labels=ids)
            fused = ours(ids, labels=ids, return_logits=False)
            tokens = ours.generate(ids[:, :4], 8)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert fused.logits is None
    assert torch.equal(tokens, want_tokens)


def test_from_huggingface_config_and_errors():
    ours = GPT.from_huggingface(_hf("qwen2"))
    c = ours.config
    assert (c.n_kv_heads, c.qkv_bias, c.bias, c.tie_embeddings, c.rope_theta) == (1, True, False, False, 10000.0)
    assert ours.blocks[0].attn.qkv_proj.bias is not None and ours.blocks[0].attn.out_proj.bias is None
    assert GPT.from_huggingface(_hf("mistral")).config.window == 4
    assert GPT.from_huggingface(_hf("llama")).config.rope_scaling["rope_type"] == "llama3"
    cls, config = HF_MODELS["llama"]()
    config.mlp_bias = True                  # o_proj without a bias but the MLP with one: not expressible
    with pytest.raises(ValueError, match="attention_bias"):
        GPT.from_huggingface(cls(config))
    model = _tiny_llama()
    with pytest.raises(ValueError, match="missing keys"):
        model.load_huggingface_state_dict({"model.embed_tokens.weight": torch.zeros(96, 64)})


# ----------------------------------------------------------------------------- the fused training loss


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _compare_losses(model, run, rtol=1e-9, atol=1e-10):
    """``run(model)`` with the fused loss and with ``fused_loss=False``: same loss, same gradients."""
    results = []
    for fused in (True, False):
        model.config.fused_loss = fused
        model.zero_grad()
        loss = run(model)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    model.config.fused_loss = True
    torch.testing.assert_close(results[0][0], results[1][0], rtol=rtol, atol=atol)
    for a, b in zip(results[0][1], results[1][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("preset", ["llama-tiny", "tiny"])
def test_gpt_training_loss_is_linear_cross_entropy(backend, preset):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, dropout=0.0, attn_dropout=0.0)).double()
    ids, targets = _ids(2, 8, 96, seed=5), _ids(2, 8, 96, seed=6)
    targets[0, 2] = -100
    calls = []
    with fused_kernels.use_backend(backend):
        real = fused_kernels.linear_cross_entropy

        def spy(*args, **kwargs):
            calls.append(args[0].shape)
            return real(*args, **kwargs)

        fused_kernels.linear_cross_entropy = spy
        try:
            _compare_losses(model, lambda m: m(ids, targets=targets, return_logits=False).loss)
            _compare_losses(model, lambda m: m(ids, labels=ids, return_logits=False).loss)
            _compare_losses(model, lambda m: m(ids, targets=targets, return_logits=False,
                                               loss_reduction="sum").loss)
        finally:
            fused_kernels.linear_cross_entropy = real
    assert calls == [(2, 8, model.config.dim), (2, 7, model.config.dim), (2, 8, model.config.dim)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bert_masked_lm_loss_is_linear_cross_entropy(backend):
    torch.manual_seed(0)
    model = BERTForPreTraining(BERTConfig.from_preset("tiny", dropout=0.0, attn_dropout=0.0)).double()
    ids = _ids(2, 10, 128, seed=7, low=5)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 1], labels[1, 7] = 17, 40, 99
    with fused_kernels.use_backend(backend):
        _compare_losses(model, lambda m: m(ids, labels=labels, next_sentence_label=torch.tensor([0, 1]),
                                           return_logits=False).loss)
        out = model(ids, labels=labels, return_logits=False)
    assert out.mlm_logits is None and out.mlm_loss is not None


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("options", [dict(), dict(padding_free=True, tie_embeddings=False, final_logits_bias=True)])
def test_translation_loss_is_linear_cross_entropy(backend, options):
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig.from_preset("tiny", dropout=0.0, label_smoothing=0.1,
                                                            **options)).double()
    if model.final_logits_bias is not None:
        model.final_logits_bias.normal_()
    src, tgt = _ids(2, 7, 64, seed=8, low=3), _ids(2, 6, 64, seed=9, low=3)
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    tgt[1, 4:] = model.config.pad_token_id                   # padded targets: ignored
    with fused_kernels.use_backend(backend):
        _compare_losses(model, lambda m: m(src, attention_mask=mask, labels=tgt, return_logits=False).loss)
        assert model(src, attention_mask=mask, labels=tgt, return_logits=False).logits is None


# ----------------------------------------------------------------------------- training


def test_llama_tiny_trains_with_the_cli(tmp_path):
    """``python -m transformer train gpt --preset llama-tiny``: the existing CLI runs the preset (2 steps), and the
    task's loss (linear cross-entropy) falls by more than a nat in 40 steps on the pydoc text."""
    from transformer.training.cli import main
    from transformer.training.tasks.gpt import GPTTask

    with fused_kernels.use_backend("torch"):
        assert main(["train", "gpt", "--preset", "llama-tiny", "--steps", "2", "--eval-batches", "1", "--out",
                     str(tmp_path / "run"), "--no-progress"]) == 0
        assert (tmp_path / "run" / "metrics.json").is_file()
        task = GPTTask()
        torch.manual_seed(0)
        model = task.build_model(task.model_config("llama-tiny"))
        before = task.evaluate(model, 32, max_batches=2)["val_loss"]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(40):
            loss, _ = task.loss(model, task.train_batch(torch.Generator().manual_seed(step), 16))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        assert task.evaluate(model, 32, max_batches=2)["val_loss"] < before - 1.0
        text = task.generate(model, "def main(", max_new_tokens=20, seed=0)
        assert text.startswith("def main(") and len(text) > len("def main(")

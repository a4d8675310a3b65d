"""GPT (GPT-2) on our kernels: presets, Triton path vs PyTorch path, masks and causality, the loss
convention, KV-cache generation against full recomputation, sampling, Hugging Face equivalence and
weight loading (new and old key names), GPT-2 init and a short convergence run.

Everything runs the tiny preset with B <= 2, L <= 16: under the Triton interpreter each LayerNorm row
and attention block iteration costs milliseconds. The default backend runs the Triton kernels (through
the interpreter on CPU); ``fused_kernels.use_backend("torch")`` runs the PyTorch ops (each op's PyTorch path)."""

import contextlib
import importlib

import pytest
import torch
from torch import nn

import fused_kernels
from transformer.config import GPTConfig
from transformer.gpt import GPT, config_from_huggingface, convert_huggingface_state_dict

BACKENDS = ["auto", "torch"]          # "auto": the Triton kernels (interpreter on CPU); "torch": the PyTorch ops


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded CI machine every parallel region
    waits for its descheduled sibling thread (seconds over this file): run single-threaded here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _backend(name: str):
    return contextlib.nullcontext() if name == "auto" else fused_kernels.use_backend(name)


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float32, lively: bool = False, **overrides) -> GPT:
    """The tiny preset without dropout, in eval mode. ``lively`` re-draws the weights wider (std 0.3) so
    that greedy decoding of an untrained model does not collapse to one repeated token."""
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("tiny", **{"dropout": 0.0, "attn_dropout": 0.0, **overrides})
    model = GPT(cfg).to(dtype).eval()
    if lively:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.3)
    return model


def _ids(b: int = 2, l: int = 8, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- presets, init


def test_parameter_counts_of_big_presets_on_meta():
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.from_preset("gpt2"))
        medium = GPT(GPTConfig.from_preset("gpt2-medium"))
        untied = GPT(GPTConfig.from_preset("gpt2", tie_embeddings=False))
    assert gpt2.num_parameters() == 124_439_808
    assert medium.num_parameters() == 354_823_168
    assert untied.num_parameters() == 124_439_808 + 50257 * 768
    assert gpt2.num_parameters(non_embedding=True) == 124_439_808 - 1024 * 768


@pytest.mark.parametrize("preset", ["tiny", "small-char"])
def test_preset_forward_backward_state_dict(preset):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg)
    ids = _ids(1, 6, cfg.vocab_size)
    out = model(ids, labels=ids)
    assert out.logits.shape == (1, 6, cfg.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.wte.weight.grad.abs().sum() > 0
    clone = GPT(cfg)
    clone.load_state_dict(model.state_dict())
    assert clone.lm_head.weight is clone.wte.weight          # tying survives a state-dict load
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, out.logits, rtol=0, atol=0)


def test_gpt2_init_scales_residual_projections():
    model = GPT(GPTConfig.from_preset("small-char"))        # 4 layers: residual std 0.02 / sqrt(8)
    block = model.blocks[1]
    assert block.attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.ffn.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.05)
    assert block.ffn.fc2.weight.std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.qkv_proj.bias == 0) and torch.all(block.ln1.weight == 1)
    assert model.lm_head.weight is model.wte.weight


def test_untied_head_has_its_own_weight():
    model = _tiny(tie_embeddings=False)
    assert model.lm_head.weight is not model.wte.weight
    assert "lm_head.weight" in dict(model.named_parameters())
    assert model.num_parameters() == _tiny().num_parameters() + 96 * 32


# ---------------------------------------------------------------------- Triton path vs PyTorch path


def test_triton_path_matches_reference_float64():
    model = _tiny(dtype=torch.float64)
    ids = _ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for name in BACKENDS:
        model.zero_grad()
        with _backend(name):
            out = model(ids, labels=labels, attention_mask=mask)
            out.loss.backward()
        results[name] = (out.logits.detach(), out.loss.detach(), [p.grad.clone() for p in model.parameters()])
    (lt, st, gt), (lr, sr, gr) = results["auto"], results["torch"]
    torch.testing.assert_close(lt, lr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st, sr, rtol=1e-10, atol=1e-10)
    for a, b in zip(gt, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------ masks, causality, loss


def test_future_tokens_never_change_past_logits():
    model = _tiny()
    ids = _ids(1, 10)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % 96
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_padded_tokens_change_nothing_for_real_tokens():
    model = _tiny()
    ids = _ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0                                          # left padding
    mask[1, 5:] = 0                                          # right padding
    changed = torch.where(mask.bool(), ids, (ids + 11) % 96)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=positions).logits
        b = model(changed, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[:1, 3:]).logits                    # the left-padded row without its padding
        unmasked = model(changed, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[0, 3:], alone[0], rtol=1e-5, atol=1e-5)
    assert (unmasked[real] - a[real]).abs().max() > 1e-3   # the mask is what hides them


def test_loss_is_shifted_next_token_cross_entropy_ignoring_minus_100():
    model = _tiny()
    ids = _ids(2, 7)
    labels = ids.clone()
    labels[0, 4] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 96)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    want = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, want)
    assert keep.sum() == 11
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, 1:])


def test_output_attentions_are_causal_distributions():
    model = _tiny()
    with torch.no_grad():
        out = model(_ids(1, 5), output_attentions=True)
    assert len(out.attentions) == 2
    w = out.attentions[0]
    assert w.shape == (1, 4, 5, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 5))
    assert torch.all(w.triu(1) == 0)


def test_too_long_input_raises():
    model = _tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)


# ----------------------------------------------------------------------------------------- generation


def test_generate_greedy_cache_equals_recompute_on_triton_path():
    model = _tiny(lively=True)
    ids = _ids(2, 5)
    with_cache = model.generate(ids, max_new_tokens=5)
    without = model.generate(ids, max_new_tokens=5, use_cache=False)
    assert with_cache.shape == (2, 10)
    assert torch.equal(with_cache[:, :5], ids)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[:, 5:].flatten().tolist())) > 2   # not a degenerate repeated token
    with torch.no_grad():                                       # greedy: each token is the argmax so far
        logits = model(with_cache[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), with_cache[:, 5:])


@pytest.mark.parametrize("kwargs", [dict(temperature=1.3), dict(temperature=0.8, top_k=10, top_p=0.9)])
def test_generate_sampling_cache_equals_recompute(kwargs):
    model = _tiny(lively=True)
    ids = _ids(2, 4)
    with fused_kernels.use_backend("torch"):
        torch.manual_seed(123)
        with_cache = model.generate(ids, max_new_tokens=8, do_sample=True, **kwargs)
        torch.manual_seed(123)
        without = model.generate(ids, max_new_tokens=8, do_sample=True, use_cache=False, **kwargs)
        torch.manual_seed(123)
        again = model.generate(ids, max_new_tokens=8, do_sample=True, **kwargs)
        greedy = model.generate(ids, max_new_tokens=8)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, again)
    assert not torch.equal(with_cache, greedy)


def test_decode_step_over_long_cache_takes_the_flash_decoding_path(monkeypatch):
    """One token after 269 cached ones: the Triton kernel splits the keys (flash-decoding) and gives the
    reference's logits, equal to the last position of a full forward."""
    attention_module = importlib.import_module("fused_kernels.ops.attention.api")   # where attention() looks it up
    splits = []
    real = attention_module.decode_splits
    monkeypatch.setattr(attention_module, "decode_splits", lambda *a: splits.append(real(*a)) or splits[-1])
    model = _tiny(n_layers=1, max_seq_len=300)
    ids = _ids(1, 270)
    with torch.no_grad():
        with fused_kernels.use_backend("torch"):
            full = model(ids).logits[:, -1]
            caches = model.setup_caches(1, 270)
            model.prefill(ids[:, :-1], caches)
            ref = model.decode_one_token(ids[:, -1:], caches)
        for c in caches:
            c.length -= 1                                   # drop the step, decode it again on Triton
        splits.clear()
        got = model.decode_one_token(ids[:, -1:], caches)
    assert splits and splits[0] > 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)


def test_generate_left_padded_batch_continues_each_prompt_as_alone():
    model = _tiny(lively=True)
    ids = _ids(2, 6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    padded = ids.clone()
    padded[1, :2] = 0
    with fused_kernels.use_backend("torch"):
        batch = model.generate(padded, max_new_tokens=5, attention_mask=mask)
        batch_nc = model.generate(padded, max_new_tokens=5, attention_mask=mask, use_cache=False)
        alone = model.generate(ids[1:, 2:], max_new_tokens=5)
        full = model.generate(ids[:1], max_new_tokens=5)
    assert torch.equal(batch, batch_nc)
    assert torch.equal(batch[1, 6:], alone[0, 4:])
    assert torch.equal(batch[0], full[0])


def test_generate_keeps_emitting_eos_or_pad_after_eos():
    model = _tiny(lively=True)
    ids = _ids(2, 4)
    with fused_kernels.use_backend("torch"):
        free = model.generate(ids, max_new_tokens=6)
        new0 = free[0, 4:].tolist()
        # eos: a token row 0 first produces at new step k >= 1, so that row 0 runs k steps before finishing
        k = next(i for i in range(1, 5) if new0[i] not in new0[:i])
        eos, stop0 = new0[k], 4 + k + 1
        out = model.generate(ids, max_new_tokens=6, eos_token_id=eos)
        padded = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
        nc = model.generate(ids, max_new_tokens=6, eos_token_id=eos, use_cache=False)
    assert out.shape == (2, 10)
    assert torch.equal(out[0, :stop0], free[0, :stop0])
    assert torch.all(out[0, stop0:] == eos)
    assert torch.all(padded[0, stop0:] == 0) and padded[0, stop0 - 1] == eos
    assert torch.equal(out, nc)
    row1 = free[1, 4:].tolist()                             # row 1 is untouched until its own eos
    stop = row1.index(eos) + 1 if eos in row1 else len(row1)
    assert torch.equal(out[1, 4:4 + stop], free[1, 4:4 + stop])
    assert torch.all(out[1, 4 + stop:] == eos)


def test_sample_filters():
    torch.manual_seed(0)
    logits = torch.randn(2, 96) * 3
    greedy = GPT.sample(logits)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(GPT.sample(logits, do_sample=True, top_k=1), greedy)
    assert torch.equal(GPT.sample(logits, do_sample=True, top_p=1e-6), greedy)
    top3 = logits.topk(3, dim=-1).indices
    big = logits.repeat(50, 1)                             # 100 draws at once
    draws = GPT.sample(big, do_sample=True, top_k=3).view(50, 2)
    assert all(set(draws[:, r].tolist()) <= set(top3[r].tolist()) for r in range(2))
    assert len(set(draws[:, 0].tolist())) > 1
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    n_nucleus = int((sorted_p.cumsum(-1) < 0.5).sum(-1)[0]) + 1   # smallest prefix with mass >= 0.5
    draws = GPT.sample(big, do_sample=True, top_p=0.5).view(50, 2)
    assert set(draws[:, 0].tolist()) <= set(order[0, :n_nucleus].tolist())
    with pytest.raises(ValueError, match="temperature"):
        GPT.sample(logits, do_sample=True, temperature=0.0)


# ------------------------------------------------------------------------------------ Hugging Face

transformers_cfg = dict(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)


def _hf_model(**overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**{**transformers_cfg, **overrides})
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():                                   # non-trivial norms and biases
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_from_huggingface_matches_hf(backend, padding):
    hf = _hf_model()
    ours = GPT.from_huggingface(hf).eval()
    ids = _ids(2, 9, vocab=50)
    mask = None
    if padding is not None:
        mask = torch.ones(2, 9, dtype=torch.long)
        if padding == "left":
            mask[0, :3] = 0
        else:
            mask[1, 6:] = 0
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, labels=labels)
        with _backend(backend):
            got = ours(ids, labels=labels, attention_mask=mask)
    real = torch.ones(2, 9, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got.logits[real], want.logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


def test_from_huggingface_config_and_generation():
    hf = _hf_model(n_inner=48, activation_function="gelu_new", layer_norm_epsilon=1e-6)
    ours = GPT.from_huggingface(hf).eval()
    cfg = ours.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_dim, cfg.vocab_size, cfg.max_seq_len) == (32, 2, 4, 48, 50, 64)
    assert cfg.activation == "gelu_tanh" and cfg.eps == 1e-6 and cfg.tie_embeddings
    assert config_from_huggingface(_hf_model().config).ffn_dim == 128          # n_inner None -> 4 * n_embd
    ids = _ids(1, 4, vocab=50)
    with fused_kernels.use_backend("torch"), torch.no_grad():
        want = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        got = ours.generate(ids, max_new_tokens=6)
    assert torch.equal(got, want)


def test_from_huggingface_gpt2model_and_old_key_names():
    hf = _hf_model()
    old = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):                                      # the causal-mask buffers of older transformers
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ours = GPT(config_from_huggingface(hf.config)).eval()
    ours.load_huggingface_state_dict(old)
    from_model = GPT.from_huggingface(hf.transformer).eval()   # GPT2Model: no prefix, no lm_head
    ids = _ids(1, 6, vocab=50)
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        want = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_model(ids).logits, want, rtol=1e-4, atol=1e-4)
    conv = convert_huggingface_state_dict(hf.state_dict())
    assert torch.equal(conv["blocks.0.attn.qkv_proj.weight"], hf.transformer.h[0].attn.c_attn.weight.t())
    assert "lm_head.weight" not in conv


def test_huggingface_loading_is_strict():
    hf = _hf_model()
    sd = hf.state_dict()
    ours = GPT(config_from_huggingface(hf.config))
    broken = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    broken["transformer.h.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.fc1\.bias.*transformer\.h\.0\.attn\.extra\.weight"):
        ours.load_huggingface_state_dict(broken)
    untied = GPT(config_from_huggingface(hf.config, tie_embeddings=False))
    with pytest.raises(ValueError, match="lm_head.weight"):
        untied.load_huggingface_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"})


def test_from_huggingface_untied_head():
    hf = _hf_model(tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.normal_(0, 0.5)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    ours = GPT.from_huggingface(hf).eval()
    assert not ours.config.tie_embeddings
    ids = _ids(1, 5, vocab=50)
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_unsupported_huggingface_options_raise():
    hf = _hf_model()
    hf.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        config_from_huggingface(hf.config)


# ------------------------------------------------------------------------------------------- training


def test_training_step_triton_equals_reference():
    """One SGD step through the Triton kernels lands on the reference step's weights. (SGD, not Adam: Adam's
    first step is ~lr * sign(grad), which turns rounding noise in gradients that are 0 in exact arithmetic,
    such as the key biases', into full-size differences.)"""
    ids = _ids(2, 8)
    results = {}
    for name in BACKENDS:
        model = _tiny(seed=3).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with _backend(name):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            after = model(ids, labels=ids).loss
        results[name] = (loss.detach(), after.detach(), [p.detach().clone() for p in model.parameters()])
    (l_t, a_t, p_t), (l_r, a_r, p_r) = results["auto"], results["torch"]
    torch.testing.assert_close(l_t, l_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_t, a_r, rtol=1e-5, atol=1e-5)
    assert a_t < l_t                                          # the step went downhill
    moved = 0.0
    for a, b, p0 in zip(p_t, p_r, _tiny(seed=3).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        moved = max(moved, (a - p0).abs().max().item())
    assert moved > 1e-3


def test_tiny_model_learns_a_repeated_sequence():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", dropout=0.0, attn_dropout=0.0)).train()
    ids = torch.arange(12).repeat(1, 2) % 96                # (1, 24): a pattern that repeats
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    with fused_kernels.use_backend("torch"):
        for _ in range(30):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[0] > 4.0                                   # ~ln(96) at init
    assert losses[-1] < 0.5 * losses[0]

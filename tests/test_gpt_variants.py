"""GPT with sliding-window attention and ALiBi (``GPTConfig.window``, ``GPTConfig.positions="alibi"``): config
checks, the ALiBi slopes, the shared attention layer against a hand-written reference, what the window lets a
token see, KV-cache generation against full recomputation, the paths that refuse the options, state-dict round
trips and a short training run of the preset.

The PyTorch path (``fused_kernels.use_backend("torch")``) runs everything but one test, which checks the Triton kernels
(the interpreter on CPU) on a one-layer model: the models here are tiny, but the interpreter is slow."""

import io
import math

import pytest
import torch

import fused_kernels
from transformer import context_parallel
from transformer.config import GPTConfig
from transformer.gpt import GPT
from transformer.layers import Attention, Packing, alibi_slopes
from transformer.serving import serve

PRESET = "sliding-alibi-tiny"          # window 8, ALiBi, 6 heads, 2 layers, context 64


@pytest.fixture(autouse=True)
def _torch_backend_one_thread():
    """Tiny tensors gain nothing from intra-op threads (and a loaded 2-core CI machine makes them wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with fused_kernels.use_backend("torch"):
        yield
    torch.set_num_threads(threads)


def _model(seed: int = 0, dtype: torch.dtype = torch.float32, lively: bool = True, **overrides) -> GPT:
    """The preset in eval mode; ``lively`` redraws the weights wider (std 0.3) so that an untrained model's
    attention is far from uniform and greedy decoding does not collapse to one repeated token."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset(PRESET, **overrides)).to(dtype).eval()
    if lively:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                    m.weight.normal_(0.0, 0.3)
    return model


def _ids(b: int = 2, l: int = 20, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- config


def test_preset_config_and_round_trip():
    cfg = GPTConfig.from_preset(PRESET)
    assert (cfg.window, cfg.positions, cfg.n_heads) == (8, "alibi", 6)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig().window is None and GPTConfig().positions == "learned"    # GPT-2 unchanged
    small = GPTConfig.from_preset("sliding-alibi-small")
    assert small.window < small.max_seq_len and small.positions == "alibi"


@pytest.mark.parametrize("window", [0, -1, -8, True, 2.5, "8", (7, 0)])
def test_bad_window_raises(window):
    with pytest.raises(ValueError, match=r"window must be None .* int >= 1"):
        GPTConfig.from_preset("tiny", window=window)


@pytest.mark.parametrize("positions", ["RoPE", "ALiBi", None, "sinusoidal"])
def test_bad_positions_raise(positions):
    with pytest.raises(ValueError, match=r"positions must be one of \('learned', 'alibi', 'rope'\)"):
        GPTConfig.from_preset("tiny", positions=positions)


def test_window_longer_than_context_is_allowed_and_is_full_attention():
    ids = _ids(2, 12)
    with torch.no_grad():
        full = _model(positions="learned", window=None)(ids).logits
        wide = _model(positions="learned", window=1000)(ids).logits
    torch.testing.assert_close(wide, full, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- ALiBi


def _paper_slopes(n: int) -> list[float]:
    """The ALiBi paper's reference code (ofirpress/attention_with_linear_biases), verbatim in spirit."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8, 12, 16, 20, 32])
def test_alibi_slopes_are_the_papers(n):
    slopes = alibi_slopes(n)
    assert slopes.dtype == torch.float32 and slopes.shape == (n,)
    torch.testing.assert_close(slopes, torch.tensor(_paper_slopes(n), dtype=torch.float32), rtol=1e-6, atol=0)
    assert len(set(slopes.tolist())) == n                                     # every head its own slope
    if n == 8:
        assert slopes.tolist() == [2.0 ** -(i + 1) for i in range(8)]         # the paper's 1/2 ... 1/256


def test_alibi_model_has_no_position_table_and_slopes_stay_float32():
    model = _model(lively=False)
    assert model.wpe is None
    keys = set(model.state_dict())
    assert not any(k.startswith("wpe") or "alibi" in k for k in keys)        # non-persistent buffers
    learned = GPT(GPTConfig.from_preset(PRESET, positions="learned"))
    assert set(learned.state_dict()) - keys == {"wpe.weight"}
    assert model.num_parameters() == model.num_parameters(non_embedding=True) == learned.num_parameters() - 64 * 48
    for dtype in (torch.bfloat16, torch.float64, torch.float32):
        model.to(dtype)
        for block in model.blocks:
            assert block.attn.alibi_slopes.dtype == torch.float32
            assert torch.equal(block.attn.alibi_slopes, alibi_slopes(6))     # exact again after bf16
    with torch.device("meta"):
        meta = GPT(GPTConfig.from_preset(PRESET))
    meta.to_empty(device="cpu")                                               # the buffer is rebuilt, not blank
    assert torch.equal(meta.blocks[0].attn.alibi_slopes, alibi_slopes(6))


def test_alibi_ignores_position_ids():
    model = _model()
    ids = _ids(2, 10)
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, position_ids=torch.arange(10) + 30).logits
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- the attention layer


def _reference_attention(attn: Attention, x: torch.Tensor, window: tuple[int, int] | None, alibi: bool,
                         causal: bool, past: torch.Tensor | None = None) -> torch.Tensor:
    """The layer written out: softmax(q k^T / sqrt(d) - slope_h |i + off - j|) over the band, @ v, in float64.
    ``past`` (B, P, dim): earlier tokens whose keys/values are cached (x then holds the new ones)."""
    full = x if past is None else torch.cat([past, x], dim=1)
    b, s, dim = full.shape
    l = x.shape[1]
    h, d = attn.n_heads, attn.head_dim
    qkv = attn.qkv_proj(full).double().view(b, s, 3, h, d).permute(2, 0, 3, 1, 4)   # 3 x (B, H, S, D)
    q, k, v = qkv[0][:, :, s - l:], qkv[1], qkv[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)                           # (B, H, L, S)
    i = torch.arange(l)[:, None] + (s - l)
    j = torch.arange(s)[None, :]
    if alibi:
        scores = scores - alibi_slopes(h).double()[:, None, None] * (i - j).abs()
    keep = torch.ones(l, s, dtype=torch.bool)
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    out = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v           # (B, H, L, D)
    return attn.out_proj(out.transpose(1, 2).reshape(b, l, dim).to(x.dtype))


@pytest.mark.parametrize("window, alibi, causal", [((3, 0), True, True), ((3, 0), False, True),
                                                   (None, True, True), ((2, 3), True, False),
                                                   ((-1, 2), False, False), (None, True, False)])
def test_attention_layer_matches_written_out_reference(window, alibi, causal):
    torch.manual_seed(0)
    attn = Attention(24, 3, window=window, alibi=alibi).double()
    with torch.no_grad():
        attn.qkv_proj.weight.normal_(0.0, 0.5)
        x = torch.randn(2, 11, 24, dtype=torch.float64)
        ref = _reference_attention(attn, x, window, alibi, causal)
        fused, _ = attn(x, causal=causal)
        explicit, w = attn(x, causal=causal, need_weights=True)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 11, dtype=torch.float64))


def test_attention_layer_with_cache_matches_reference_and_reads_only_the_window(monkeypatch):
    """Prefill 9 tokens into a KVCache, then 1 and 3 more tokens: each call equals the written-out layer over
    everything so far, and fused_kernels.attention is handed only the keys the new queries can see."""
    from transformer.layers import KVCache
    torch.manual_seed(0)
    attn = Attention(24, 3, window=(3, 0), alibi=True).double()
    seen = []
    real = fused_kernels.attention
    monkeypatch.setattr(fused_kernels, "attention",
                        lambda q, k, v, **kw: seen.append(k.shape[2]) or real(q, k, v, **kw))
    x = torch.randn(1, 13, 24, dtype=torch.float64)
    cache = KVCache(1, 3, 13, 8, dtype=torch.float64, device="cpu")
    with torch.no_grad():
        for start, end in ((0, 9), (9, 10), (10, 13)):
            got, _ = attn(x[:, start:end], causal=True, cache=cache)
            ref = _reference_attention(attn, x[:, start:end], (3, 0), True, True, past=x[:, :start])
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert seen == [9, 4, 6]                        # window 4: left 3 + the new queries


def test_attention_layer_bad_options_raise():
    for window in ((1,), (1, 2, 3), (-2, 0), (0.5, 0), (True, 0), "3"):
        with pytest.raises(ValueError, match="window must be None or"):
            Attention(8, 2, window=window)
    with pytest.raises(ValueError, match="cross-attention"):
        Attention(8, 2, cross=True, alibi=True)
    with pytest.raises(ValueError, match="cross-attention"):
        Attention(8, 2, cross=True, window=(2, 0))
    assert Attention(8, 2, window=[-1, -1]).window is None                    # no window, as kernels reads it
    assert Attention(8, 2, window=[2, 0]).window == (2, 0)


# ------------------------------------------------------------------------------------------ the window


def test_window_restricts_what_a_token_sees():
    """One layer: the logits at t move when token t - 7 changes (inside a window of 8) and stay put, exactly,
    when token t - 8 changes. Two layers see 2 * 7 back: t - 14 matters, t - 15 does not."""
    t = 30
    for layers, reach in ((1, 7), (2, 14)):
        for positions in ("alibi", "learned"):
            model = _model(n_layers=layers, positions=positions)
            ids = _ids(1, t + 1)
            with torch.no_grad():
                base = model(ids).logits[0, t]
                for back, moves in ((reach, True), (reach + 1, False), (reach + 5, False), (0, True)):
                    other = ids.clone()
                    other[0, t - back] = (other[0, t - back] + 1) % 96
                    changed = model(other).logits[0, t]
                    if moves:
                        assert (changed - base).abs().max() > 1e-3, (layers, positions, back)
                    else:
                        assert torch.equal(changed, base), (layers, positions, back)


def test_output_attentions_are_zero_outside_the_window():
    model = _model()
    with torch.no_grad():
        out = model(_ids(2, 20), output_attentions=True)
    i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
    outside = (j > i) | (j <= i - 8)
    for w in out.attentions:
        assert w.shape == (2, 6, 20, 20)
        assert torch.all(w[..., outside] == 0)
        assert torch.all(w[..., ~outside] > 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 6, 20))


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_matches_explicit_weights_path(padded):
    """fused_kernels.attention(window=, alibi_slopes=) against the explicit softmax of the weights path, float64."""
    model = _model(dtype=torch.float64)
    ids = _ids(2, 20)
    mask = None
    if padded:
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[0, :5] = 0                                                        # left padding
    with torch.no_grad():
        fused = model(ids, attention_mask=mask).logits
        explicit = model(ids, attention_mask=mask, output_attentions=True).logits
    torch.testing.assert_close(fused, explicit, rtol=1e-9, atol=1e-9)


def test_fused_gradients_match_explicit_weights_path():
    """The backward of fused_kernels.attention with window and ALiBi: every parameter's gradient equals the one
    through the explicit softmax (float64)."""
    ids = _ids(2, 16)
    grads = []
    for explicit in (False, True):
        model = _model(dtype=torch.float64).train()
        model.zero_grad()
        model(ids, labels=ids, output_attentions=explicit).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-8, atol=1e-10, msg=name)
    assert grads[0]["blocks.0.attn.qkv_proj.weight"].abs().max() > 1e-4


def test_triton_path_matches_torch_path():
    """The Triton kernels (interpreter on CPU) on a one-layer model, 12 tokens: window and ALiBi forward."""
    model = _model(n_layers=1)
    ids = _ids(1, 12)
    with torch.no_grad():
        ref = model(ids).logits
        with fused_kernels.use_backend("auto"):
            got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("overrides", [dict(), dict(positions="learned"), dict(window=None)],
                         ids=["window-alibi", "window-learned", "alibi-only"])
def test_cached_generation_equals_recompute(overrides):
    """Prompt of 5, 25 new tokens: well past the window of 8. Greedy tokens equal, and the logits of every
    cached decoding step are those of a full forward over the sequence so far."""
    model = _model(**overrides)
    ids = _ids(2, 5)
    with torch.no_grad():
        with_cache = model.generate(ids, max_new_tokens=25)
        without = model.generate(ids, max_new_tokens=25, use_cache=False)
        assert torch.equal(with_cache, without)
        assert len(set(with_cache[:, 5:].flatten().tolist())) > 3             # not one repeated token
        full = model(with_cache).logits                                      # (2, 30, vocab)
        caches = model.setup_caches(2, 30)
        steps = [model.prefill(with_cache[:, :5], caches)]
        for t in range(5, 29):
            steps.append(model.decode_one_token(with_cache[:, t:t + 1], caches))
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:29], rtol=1e-4, atol=1e-4)


def test_left_padded_generation_continues_each_prompt_as_alone():
    model = _model()
    ids = _ids(2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        batch = model.generate(ids, max_new_tokens=12, attention_mask=mask)
        alone = model.generate(ids[1:, 3:], max_new_tokens=12)
    assert torch.equal(batch[1, 7:], alone[0, 4:])


def test_generation_stays_within_max_seq_len():
    model = _model()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(_ids(1, 60), max_new_tokens=5)


# ------------------------------------------------------------------------------- paths that refuse


@pytest.mark.parametrize("overrides, option", [(dict(), "window=8"), (dict(window=None), "positions='alibi'"),
                                               (dict(positions="learned"), "window=8")])
def test_paged_serving_and_huggingface_weights_refuse_the_variants(overrides, option):
    model = _model(**overrides)
    with pytest.raises(ValueError, match=f"paged KV cache.*{option}"):
        serve(model, [torch.tensor([1, 2, 3])], max_new_tokens=2)
    with pytest.raises(ValueError, match="paged KV cache"):
        model.generate([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], max_new_tokens=2)
    with pytest.raises(ValueError, match=f"Hugging Face GPT-2 .*{option}"):
        model.load_huggingface_state_dict(model.state_dict())


def test_packed_and_context_parallel_attention_refuse_the_variants():
    attn = Attention(8, 2, window=(3, 0), alibi=True)
    x = torch.randn(1, 6, 8)
    packing = Packing.from_mask(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"padding-free.*window=\(3, 0\) and alibi_slopes"):
        attn(x, causal=True, packing=packing)
    with context_parallel.context_parallel(None), pytest.raises(ValueError, match="ring.*window"):
        attn(x, causal=True)
    with context_parallel.context_parallel(None), pytest.raises(ValueError, match="ring.*alibi"):
        Attention(8, 2, alibi=True)(x, causal=True)


# ------------------------------------------------------------------------------ weights and training


def test_state_dict_round_trip():
    model = _model(seed=0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    other = _model(seed=1)
    ids = _ids(2, 16)
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, model(ids).logits)
        buffer.seek(0)
        other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        assert torch.equal(other(ids).logits, model(ids).logits)


def test_preset_trains_and_loss_goes_down():
    """30 AdamW steps on a pattern longer than the window (period 12 > 8): loss from ~ln(96) to half; then
    bf16 autocast gives nearly the same loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(PRESET)).train()
    ids = (torch.arange(12).repeat(2, 3) * 7) % 96                          # (2, 36)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(ids, labels=ids).loss.item()
    with torch.no_grad():
        fp32 = model(ids, labels=ids).loss.item()
    assert bf16 == pytest.approx(fp32, rel=0.1, abs=0.05)


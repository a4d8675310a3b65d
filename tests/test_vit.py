"""ViT: every cheap preset runs forward + backward and survives a state-dict round trip; the Triton path
(interpreter) equals the PyTorch path; odd token counts (10, 17, 50: no multiple of a kernel block,
as 197 is for 224/16); tiny random Hugging Face ViTs (current and legacy key names) give the same
outputs after ``from_huggingface``, through both backends."""

import re

import pytest
import torch
import torch.nn.functional as F

import fused_kernels
from transformer.config import ViTConfig
from transformer.vit import ViT


def _model(seed: int = 0, dtype: torch.dtype = torch.float32, **cfg) -> ViT:
    torch.manual_seed(seed)
    name = cfg.pop("preset", "tiny")
    return ViT(ViTConfig.from_preset(name, **cfg)).to(dtype)


def _pixels(cfg: ViTConfig, batch: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g).to(dtype)


@pytest.mark.parametrize("preset", ["tiny", "digits"])
def test_preset_forward_backward_state_dict(preset, tmp_path):
    model = _model(preset=preset).train()
    cfg = model.config
    batch = 2 if preset == "tiny" else 1                # the interpreter is slow: keep the bigger preset short
    x = _pixels(cfg, batch=batch)
    labels = torch.tensor([1, 7])[:batch]
    out = model(x, labels=labels)                       # Triton kernels through the interpreter
    assert out.logits.shape == (batch, cfg.num_classes)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.cls_token.grad.abs().sum() > 0 and model.pos_embed.grad.abs().sum() > 0

    model.eval()
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    fresh = _model(seed=123, preset=preset).eval()
    assert not torch.equal(fresh.pos_embed, model.pos_embed)
    fresh.load_state_dict(torch.load(tmp_path / "vit.pt"))
    with torch.no_grad(), fused_kernels.use_backend("torch"):  # the round trip is about the weights: fast path
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("preset, expected", [("vit-b16", 86_567_656), ("vit-l16", 304_326_632)])
def test_big_preset_parameter_counts(preset, expected):
    """ViT-B/16 and ViT-L/16 at 224 pixels, 1000 classes (timm's counts), built on the meta device only."""
    with torch.device("meta"):
        model = ViT(ViTConfig.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.pos_embed.shape == (1, 197, model.config.dim)


@pytest.mark.parametrize("image, patch, tokens, batch", [(8, 2, 17, 2), (6, 2, 10, 2), (14, 2, 50, 1)])
def test_triton_matches_reference_odd_tokens(image, patch, tokens, batch):
    """Same weights, float64: the interpreter's Triton kernels vs the PyTorch ops, forward
    and every gradient, on sequence lengths that no kernel block divides."""
    model = _model(dtype=torch.float64, image_size=image, patch_size=patch)
    x = _pixels(model.config, batch=batch, dtype=torch.float64)
    labels = torch.tensor([3, 0])[:batch]

    def run():
        model.zero_grad()
        feats = model.forward_features(x)                      # (B, tokens, dim)
        logits = model.head(feats[:, 0])                       # what forward() does (checked elsewhere)
        F.cross_entropy(logits, labels).backward()
        return feats.detach(), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    feats, logits, grads = run()
    assert feats.shape == (batch, tokens, model.config.dim)
    with fused_kernels.use_backend("torch"):
        ref_feats, ref_logits, ref_grads = run()
    torch.testing.assert_close(feats, ref_feats, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-10)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-8, atol=1e-10, msg=name)


def test_loss_is_cross_entropy_and_headless_model():
    model = _model().eval()
    x = _pixels(model.config)
    labels = torch.tensor([2, 9])
    with torch.no_grad(), fused_kernels.use_backend("torch"):     # semantics, not kernels: the fast path
        out = model(x, labels=labels)
        torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
        feats = model.forward_features(x)
        torch.testing.assert_close(out.logits, model.head(feats[:, 0]))

    headless = _model(num_classes=0).eval()
    assert isinstance(headless.head, torch.nn.Identity)
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        torch.testing.assert_close(headless(x).logits, headless.forward_features(x)[:, 0])
    with pytest.raises(ValueError, match="no classification head"):
        headless(x, labels=labels)


def test_attention_weights_and_input_checks():
    model = _model().eval()
    x = _pixels(model.config)
    with torch.no_grad():
        out = model(x, output_attentions=True)
        plain = model(x)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-6)
    assert len(out.attentions) == model.config.n_layers
    for w in out.attentions:
        assert w.shape == (2, model.config.n_heads, 17, 17)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, model.config.n_heads, 17))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(2, 1, 10, 10))


def test_class_token_sees_every_patch():
    """Changing one patch changes the class token's output (attention is global, not local)."""
    model = _model().eval()
    x = _pixels(model.config)
    y = x.clone()
    y[:, :, -2:, -2:] += 1.0                  # the last patch only
    with torch.no_grad(), fused_kernels.use_backend("torch"):
        a, b = model(x).logits, model(y).logits
    assert (a - b).abs().max() > 1e-4


# --- Hugging Face ----------------------------------------------------------------------------------------


def _hf_config(transformers, image=8, patch=2, qkv_bias=True, act="gelu", labels=5):
    return transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  image_size=image, patch_size=patch, num_channels=3, num_labels=labels,
                                  qkv_bias=qkv_bias, hidden_act=act, layer_norm_eps=1e-12)


def _hf_pixels(image, seed=2):
    return torch.randn(2, 3, image, image, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("image, patch, qkv_bias, act", [(8, 2, True, "gelu"), (6, 2, False, "gelu_pytorch_tanh")])
def test_huggingface_image_classification(image, patch, qkv_bias, act):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(_hf_config(transformers, image, patch, qkv_bias, act)).eval()
    model = ViT.from_huggingface(hf).eval()
    assert model.config.qkv_bias is qkv_bias and model.config.num_classes == 5
    x, labels = _hf_pixels(image), torch.tensor([4, 1])
    with torch.no_grad():
        want = hf(pixel_values=x, labels=labels)
        for backend in ("auto", "torch"):
            with fused_kernels.use_backend(backend):
                got = model(x, labels=labels)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4, msg=backend)
            torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4, msg=backend)


def test_huggingface_vit_model_without_head():
    """``ViTModel`` (pooler included, which has no counterpart and is skipped): no head, same features."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.ViTModel(_hf_config(transformers)).eval()
    assert any(k.startswith("pooler.") for k in hf.state_dict())
    model = ViT.from_huggingface(hf).eval()
    assert model.config.num_classes == 0
    x = _hf_pixels(8)
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        for backend in ("auto", "torch"):
            with fused_kernels.use_backend(backend):
                feats = model.forward_features(x)
            torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-4, msg=backend)
        with fused_kernels.use_backend("torch"):
            torch.testing.assert_close(model(x).logits, want[:, 0], rtol=1e-4, atol=1e-4)


def _legacy_key(key: str) -> str:
    """A current transformers ViT key in the layout of checkpoints saved before transformers 5."""
    key = re.sub(r"layers\.(\d+)\.", r"encoder.layer.\1.", key)
    key = re.sub(r"attention\.([qkv])_proj", lambda m: "attention.attention." + {"q": "query", "k": "key",
                                                                               "v": "value"}[m[1]], key)
    return (key.replace("attention.o_proj", "attention.output.dense").replace("mlp.fc1", "intermediate.dense")
            .replace("mlp.fc2", "output.dense"))


def test_huggingface_legacy_key_names(tmp_path):
    """The pre-5 layout (``vit.encoder.layer.N.attention.attention.query``, ``...intermediate.dense``,
    ``...output.dense``): transformers itself loads it (checked here, offline) and so do we."""
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    cfg = _hf_config(transformers)
    hf = transformers.ViTForImageClassification(cfg).eval()
    legacy = {_legacy_key(k): v.clone() for k, v in hf.state_dict().items()}
    assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
    assert "vit.encoder.layer.1.intermediate.dense.weight" in legacy
    assert "vit.encoder.layer.1.output.dense.weight" in legacy
    assert "vit.encoder.layer.1.attention.output.dense.weight" in legacy

    cfg.save_pretrained(tmp_path)
    safetensors_torch.save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reloaded, info = transformers.ViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    current = ViT.from_huggingface(hf)
    model = ViT(ViT.config_from_huggingface(cfg))
    model.load_huggingface_state_dict(legacy)
    for k, v in current.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # ViTModel-style (no "vit." prefix), legacy names, no head.
    headless = ViT(ViT.config_from_huggingface(cfg, with_head=False))
    headless.load_huggingface_state_dict({k.removeprefix("vit."): v for k, v in legacy.items()
                                          if not k.startswith("classifier.")})
    torch.testing.assert_close(headless.pos_embed, current.pos_embed, rtol=0, atol=0)


def test_huggingface_strict_loading_errors():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = _hf_config(transformers)
    sd = transformers.ViTForImageClassification(cfg).state_dict()
    model = ViT(ViT.config_from_huggingface(cfg))

    missing = {k: v for k, v in sd.items() if k != "vit.layers.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing.*blocks\.1\.ffn\.fc2\.bias"):
        model.load_huggingface_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected.*vit\.layers\.0\.extra\.weight"):
        model.load_huggingface_state_dict({**sd, "vit.layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected.*blocks\.2\.ln1\.weight"):
        model.load_huggingface_state_dict({**sd, "vit.layers.2.layernorm_before.weight": torch.zeros(32)})
    with pytest.raises(ValueError, match=r"shape mismatch.*head\.weight"):
        model.load_huggingface_state_dict({**sd, "classifier.weight": torch.zeros(7, 32)})
    no_value = {k: v for k, v in sd.items() if k != "vit.layers.0.attention.v_proj.weight"}
    with pytest.raises(ValueError, match=r"incomplete q/k/v.*blocks\.0\.attn\.qkv_proj\.weight"):
        model.load_huggingface_state_dict(no_value)

"""LoRA and BitFit: exact parameter counts, init equivalence (B = 0), merge/unmerge equivalence after
training, only the adapter (or bias) parameters receive gradients and change, adapter save/load round
trip with PEFT-style key names, and the default targets on every model of the package."""

import copy
import importlib
import re

import pytest
import torch
from torch import nn

import fused_kernels
from transformer.config import ViTConfig
from transformer.layers import Attention, BlockSpec, DecoderBlock, EncoderBlock
from transformer.lora import (
    DEFAULT_TARGET_MODULES,
    LoRALinear,
    apply_bitfit,
    apply_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    parameter_counts,
    remove_lora,
    save_lora,
    unmerge_lora,
)
from transformer.vit import ViT

DIM, HEADS, FFN = 16, 2, 32


class Stack(nn.Module):
    """A plain torch module of shared blocks: a post-LN encoder block and a decoder block attending to it
    (self-attention qkv_proj, cross-attention q_proj + kv_proj, out_proj in each), and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        spec = BlockSpec(DIM, HEADS, FFN, pre_ln=False)
        self.enc = EncoderBlock(spec)
        self.dec = DecoderBlock(spec)
        self.out = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        memory, _, _ = self.enc(x)
        h, _, _ = self.dec(y, None, memory)
        return self.out(h)


def _stack(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Stack().to(dtype).eval()


def _stack_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, DIM, generator=g).to(dtype), torch.randn(2, 4, DIM, generator=g).to(dtype)


def _vit(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return ViT(ViTConfig.from_preset("tiny")).to(dtype).eval()


def _pixels(dtype=torch.float32):
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)).to(dtype)


def _lora_names(model):
    return {n for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def _train(model, inputs, steps=3, lr=0.05):
    """A few Adam steps on whatever is trainable; returns nothing, changes the model."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(*inputs)
        out = out.logits if hasattr(out, "logits") else out
        (out.float() ** 2).mean().backward()
        opt.step()
    model.eval()


# --- counts --------------------------------------------------------------------------------------------


def test_vit_counts_and_freezing():
    model = _vit()
    total_before = sum(p.numel() for p in model.parameters())
    c = model.config
    r = 4
    report = apply_lora(model, r=r, alpha=8)
    # per block: qkv_proj (dim -> 3 dim) and out_proj (dim -> dim): r * (in + out) each
    expected = c.n_layers * r * ((c.dim + 3 * c.dim) + (c.dim + c.dim))
    assert expected == 1536
    assert report["trainable"] == expected
    assert report["total"] == total_before + expected
    assert report["percent"] == pytest.approx(100 * expected / (total_before + expected))
    assert report["modules"] == [f"blocks.{i}.attn.{p}" for i in range(c.n_layers) for p in ("qkv_proj", "out_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _lora_names(model) and len(trainable) == 4 * c.n_layers
    layer = model.blocks[0].attn.qkv_proj
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert layer.lora_A.weight.shape == (r, c.dim) and layer.lora_B.weight.shape == (3 * c.dim, r)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    bound = 1 / c.dim ** 0.5                       # kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.weight is layer.base_layer.weight  # the base layer's attributes stay reachable
    assert parameter_counts(model) == {k: report[k] for k in ("trainable", "total", "percent")}


def test_stack_counts_by_default_and_by_pattern():
    r = 2
    model = _stack()
    report = apply_lora(model, r=r)
    # enc: qkv 4d, out 2d; dec self: qkv 4d, out 2d; dec cross: q 2d, kv 3d, out 2d  ->  19 d r
    assert report["trainable"] == 19 * DIM * r
    assert sorted(report["modules"]) == sorted(["enc.attn.qkv_proj", "enc.attn.out_proj", "dec.self_attn.qkv_proj",
                                                "dec.self_attn.out_proj", "dec.cross_attn.q_proj",
                                                "dec.cross_attn.kv_proj", "dec.cross_attn.out_proj"])

    report = apply_lora(_stack(), r=r, target_modules=["fc1", "fc2"])     # suffix match
    assert report["trainable"] == 2 * r * (DIM + FFN) * 2
    report = apply_lora(_stack(), r=r, target_modules="dec.*_proj")       # glob on the qualified name
    assert report["trainable"] == 13 * DIM * r
    report = apply_lora(_stack(), r=r, target_modules=re.compile(r"enc\.attn\.(qkv|out)_proj"))
    assert report["trainable"] == 6 * DIM * r
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(_stack(), target_modules=["nonexistent"])

    model = _stack()                               # a second call adds adapters elsewhere, keeps the first
    apply_lora(model, r=r)
    report = apply_lora(model, r=r, target_modules=["fc1", "fc2", "*"])
    assert len(lora_layers(model)) == 7 + 4 + 1    # + ffn fc1/fc2 twice, + the head; no LoRA of a LoRA
    assert report["trainable"] == 19 * DIM * r + 4 * r * (DIM + FFN) + r * (DIM + 3)


# --- equivalence ---------------------------------------------------------------------------------------


def test_init_equivalence():
    """B = 0: right after apply_lora the model computes exactly what it did (Triton kernels path)."""
    vit, stack = _vit(), _stack()
    x, (a, b) = _pixels(), _stack_inputs()
    with torch.no_grad():
        want_vit, want_stack = vit(x).logits, stack(a, b)
        apply_lora(vit, r=4, dropout=0.1)
        apply_lora(stack, r=4)
        torch.testing.assert_close(vit(x).logits, want_vit, rtol=0, atol=0)
        torch.testing.assert_close(stack(a, b), want_stack, rtol=0, atol=0)


def test_only_lora_parameters_train():
    """One optimizer step through the Triton kernels: only lora_A/lora_B get gradients and change."""
    model = _vit()
    apply_lora(model, r=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(_pixels(), labels=torch.tensor([1, 2]))
    out.loss.backward()
    lora = _lora_names(model)
    for n, p in model.named_parameters():
        if n in lora:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    # B starts at zero, so A's gradient is zero on the first step; B's is not.
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora if n.endswith("lora_B.weight"))
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in lora if n.endswith("lora_B.weight")}


@pytest.mark.parametrize("which", ["vit", "stack"])
def test_merge_unmerge_after_training(which):
    dtype = torch.float64
    if which == "vit":
        model, inputs = _vit(dtype=dtype), (_pixels(dtype),)
        targets = None
    else:
        model, inputs = _stack(dtype=dtype), _stack_inputs(dtype)
        targets = [*DEFAULT_TARGET_MODULES, "fc1", "fc2"]
    apply_lora(model, r=4, alpha=8, target_modules=targets)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    with fused_kernels.use_backend("torch"):              # the training steps only move weights: fast path
        _train(model, inputs)
    assert all(torch.count_nonzero(m.lora_B.weight) > 0 for m in lora_layers(model).values())

    def run():
        with torch.no_grad():
            out = model(*inputs)
        return out.logits if hasattr(out, "logits") else out

    unmerged = run()
    assert merge_lora(model) == len(lora_layers(model)) and merge_lora(model) == 0     # idempotent
    assert all(m.merged for m in lora_layers(model).values())
    moved = [n for n, p in model.named_parameters() if n in base and not torch.equal(p, base[n])]
    assert len(moved) == len(lora_layers(model))    # every base weight (not bias) received its update
    merged = run()
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    assert (merged - run()).abs().max() == 0        # a merged layer no longer runs the LoRA branch
    assert unmerge_lora(model) == len(lora_layers(model))
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=1e-12, atol=1e-12, msg=n)
    torch.testing.assert_close(run(), unmerged, rtol=1e-10, atol=1e-10)


def test_remove_lora_restores_plain_model():
    model = _stack(dtype=torch.float64)
    keys = set(model.state_dict())
    inputs = _stack_inputs(torch.float64)
    apply_lora(model, r=2)
    with fused_kernels.use_backend("torch"):
        _train(model, inputs)
        with torch.no_grad():
            want = model(*inputs)
        remove_lora(model)
        with torch.no_grad():
            got = model(*inputs)
    assert not lora_layers(model) and set(model.state_dict()) == keys
    assert type(model.dec.cross_attn.kv_proj) is nn.Linear
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- save / load ---------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    model = _vit()
    apply_lora(model, r=4, alpha=16)
    with fused_kernels.use_backend("torch"):
        _train(model, (_pixels(),))
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)

    saved = load_file(path)
    assert set(saved) == set(lora_state_dict(model))
    assert len(saved) == 2 * len(lora_layers(model))
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in saved)
    assert "blocks.0.attn.qkv_proj.lora_A.weight" in saved and "blocks.1.attn.out_proj.lora_B.weight" in saved
    with safetensors.safe_open(str(path), "pt") as f:   # nothing but the adapter tensors in the file
        assert not f.metadata()
        assert set(f.keys()) == set(saved)

    fresh = _vit(seed=0)                           # same base weights ...
    torch.manual_seed(99)
    apply_lora(fresh, r=4, alpha=16)               # ... different A, zero B
    x = _pixels()
    with torch.no_grad():
        want = model(x).logits
        assert not torch.equal(fresh(x).logits, want)
        load_lora(fresh, path)
        torch.testing.assert_close(fresh(x).logits, want, rtol=0, atol=0)

        merge_lora(fresh)                          # loading into merged layers keeps them merged and right
        torch.manual_seed(5)
        other = _vit()
        apply_lora(other, r=4, alpha=16)
        save_lora(other, tmp_path / "other.safetensors")
        load_lora(fresh, tmp_path / "other.safetensors")
        load_lora(fresh, path)
        assert all(m.merged for m in lora_layers(fresh).values())
        torch.testing.assert_close(fresh(x).logits, want, rtol=1e-5, atol=1e-6)


def test_load_validates_keys_and_shapes(tmp_path):
    pytest.importorskip("safetensors")
    model = _vit()
    apply_lora(model, r=4)
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)

    wrong_rank = _vit()
    apply_lora(wrong_rank, r=2)
    with pytest.raises(ValueError, match=r"shape mismatch.*blocks\.0\.attn\.qkv_proj\.lora_A\.weight"):
        load_lora(wrong_rank, path)

    wrong_targets = _vit()
    apply_lora(wrong_targets, r=4, target_modules=["qkv_proj", "fc1"])
    before = {k: v.clone() for k, v in lora_state_dict(wrong_targets).items()}
    with pytest.raises(ValueError, match=r"missing.*ffn\.fc1\.lora_A.*unexpected.*out_proj\.lora_A"):
        load_lora(wrong_targets, path)
    for k, v in lora_state_dict(wrong_targets).items():           # nothing written on failure
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(_vit(), tmp_path / "none.safetensors")


# --- BitFit --------------------------------------------------------------------------------------------


def test_bitfit():
    model = _vit()
    c = model.config
    report = apply_bitfit(model)
    per_block = 3 * c.dim + c.dim + 2 * c.dim + c.ffn_dim + c.dim   # qkv, out, ln1 + ln2, fc1, fc2
    expected = c.n_layers * per_block + c.dim + c.dim + c.num_classes  # + patch conv, final norm, head
    assert expected == 650
    assert report["trainable"] == expected
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert all(n.endswith(".bias") for n in report["parameters"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert {"blocks.0.attn.qkv_proj.bias", "blocks.0.ffn.fc1.bias", "blocks.1.ln2.bias", "norm.bias"} <= trainable

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with fused_kernels.use_backend("torch"):
        _train(model, (_pixels(),), steps=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert "cls_token" not in changed and "blocks.0.attn.qkv_proj.weight" not in changed

    no_bias = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.raises(ValueError, match="no bias"):
        apply_bitfit(no_bias)


# --- every model of the package ------------------------------------------------------------------------

MODELS = [("transformer.gpt", "GPT", "GPTConfig"), ("transformer.bert", "BERTForPreTraining", "BERTConfig"),
          ("transformer.encoder_decoder", "EncoderDecoder", "EncoderDecoderConfig"), ("transformer.vit", "ViT",
                                                                                       "ViTConfig")]


@pytest.mark.parametrize("module, cls, config", MODELS, ids=[m[1] for m in MODELS])
def test_default_targets_on_every_model(module, cls, config):
    """Built on the meta device (no compute): the defaults wrap exactly the Attention projections, the
    count is sum r * (in + out) over them, and BitFit leaves exactly the biases trainable."""
    try:
        model_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"{module}.{cls} not available: {e}")
    cfg = getattr(importlib.import_module("transformer.config"), config).from_preset("tiny")
    with torch.device("meta"):
        model = model_cls(cfg)
    projections = {f"{n}.{p}": getattr(m, p) for n, m in model.named_modules() if isinstance(m, Attention)
                   for p in ("qkv_proj", "q_proj", "kv_proj", "out_proj") if hasattr(m, p)}
    assert projections
    total = sum(p.numel() for p in model.parameters())
    report = apply_lora(model, r=4)
    assert set(report["modules"]) == set(projections)
    assert report["trainable"] == sum(4 * (lin.in_features + lin.out_features) for lin in projections.values())
    assert report["total"] == total + report["trainable"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _lora_names(model)

    bitfit = apply_bitfit(copy.deepcopy(model))
    assert bitfit["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))

"""Hugging Face GPT-2 and Llama / Qwen2 / Mistral checkpoints -> ``transformer.gpt.GPT``: the configuration and
the state-dict key maps (``GPT.from_huggingface`` / ``GPT.load_huggingface_state_dict`` call these)."""

from __future__ import annotations

from typing import Any

import torch

from transformer.config import GPTConfig

# HF GPT-2 block key -> ours, and whether the weight is a Conv1D stored as (in, out).
_HF_BLOCK_KEYS: dict[str, tuple[str, bool]] = {
    "ln_1.weight": ("ln1.weight", False),
    "ln_1.bias": ("ln1.bias", False),
    "attn.c_attn.weight": ("attn.qkv_proj.weight", True),
    "attn.c_attn.bias": ("attn.qkv_proj.bias", False),
    "attn.c_proj.weight": ("attn.out_proj.weight", True),
    "attn.c_proj.bias": ("attn.out_proj.bias", False),
    "ln_2.weight": ("ln2.weight", False),
    "ln_2.bias": ("ln2.bias", False),
    "mlp.c_fc.weight": ("ffn.fc1.weight", True),
    "mlp.c_fc.bias": ("ffn.fc1.bias", False),
    "mlp.c_proj.weight": ("ffn.fc2.weight", True),
    "mlp.c_proj.bias": ("ffn.fc2.bias", False),
}
_HF_TOP_KEYS = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight",
                "ln_f.bias": "ln_f.bias", "lm_head.weight": "lm_head.weight"}
_HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")   # causal-mask buffers of older transformers


def convert_huggingface_state_dict(state_dict: dict[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
    """HF GPT-2 state dict (old or new key names) -> ours. Keys it does not know pass through unchanged
    (so that the strict load names them); ``lm_head.weight`` is dropped when ``tied``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("transformer.")
        if name.endswith(_HF_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name in _HF_TOP_KEYS:
            out[_HF_TOP_KEYS[name]] = value
            continue
        parts = name.split(".", 2)                        # "h", "{i}", rest
        if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit() and parts[2] in _HF_BLOCK_KEYS:
            ours, conv1d = _HF_BLOCK_KEYS[parts[2]]
            out[f"blocks.{parts[1]}.{ours}"] = value.t().contiguous() if conv1d else value
            continue
        out[key] = value
    return out


_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                   "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


def config_from_huggingface(hf_config: Any, **overrides: Any) -> GPTConfig:
    """``GPT2Config`` -> ``GPTConfig``. HF's embedding dropout ``embd_pdrop`` and residual dropout
    ``resid_pdrop`` share our one ``dropout`` (the residual one is taken). Options we do not implement
    (attention without 1/sqrt(d) scaling, per-layer scaling, cross-attention) raise."""
    checks = (("scale_attn_weights=False", not getattr(hf_config, "scale_attn_weights", True)),
              ("scale_attn_by_inverse_layer_idx=True", getattr(hf_config, "scale_attn_by_inverse_layer_idx", False)),
              ("add_cross_attention=True", getattr(hf_config, "add_cross_attention", False)))
    unsupported = [name for name, bad in checks if bad]
    if unsupported:
        raise ValueError(f"GPT.from_huggingface: unsupported GPT-2 options {unsupported}")
    act = hf_config.activation_function
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"GPT.from_huggingface: unsupported activation_function {act!r}")
    fields: dict[str, Any] = dict(
        vocab_size=hf_config.vocab_size, max_seq_len=hf_config.n_positions, dim=hf_config.n_embd,
        n_layers=hf_config.n_layer, n_heads=hf_config.n_head, ffn_dim=hf_config.n_inner or 4 * hf_config.n_embd,
        dropout=hf_config.resid_pdrop, attn_dropout=hf_config.attn_pdrop, eps=hf_config.layer_norm_epsilon,
        activation=_HF_ACTIVATIONS[act], bias=True,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)))
    fields.update(overrides)
    return GPTConfig(**fields)


# ------------------------------------------------------------------------------------ Llama, Qwen2, Mistral

LLAMA_LIKE = ("llama", "qwen2", "mistral")
_LLAMA_BLOCK_KEYS = {
    "self_attn.o_proj.weight": "attn.out_proj.weight",
    "self_attn.o_proj.bias": "attn.out_proj.bias",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
    "mlp.gate_proj.bias": "ffn.gate_proj.bias",
    "mlp.up_proj.bias": "ffn.up_proj.bias",
    "mlp.down_proj.bias": "ffn.down_proj.bias",
    "input_layernorm.weight": "ln1.weight",
    "post_attention_layernorm.weight": "ln2.weight",
}


def convert_llama_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """transformers Llama / Qwen2 / Mistral state dict (``model.``-prefixed or a base model's) -> ours: the q, k, v
    projections (and biases) concatenated into ``qkv_proj``; ``lm_head.weight`` dropped for a tied head. Keys it
    does not know pass through unchanged (so that the strict load names them)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight"):
            continue
        if name in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
            out[{"embed_tokens.weight": "wte.weight", "norm.weight": "ln_f.weight"}.get(name, name)] = value
            continue
        parts = name.split(".", 2)                          # "layers", "{i}", rest
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
            i, rest = parts[1], parts[2]
            if rest in _LLAMA_BLOCK_KEYS:
                out[f"blocks.{i}.{_LLAMA_BLOCK_KEYS[rest]}"] = value
                continue
            proj = rest.removeprefix("self_attn.")
            if proj != rest and proj.split(".")[0] in ("q_proj", "k_proj", "v_proj"):
                kind, what = proj.split(".", 1)
                qkv.setdefault((i, what), {})[kind] = value
                continue
        out[key] = value
    for (i, what), found in qkv.items():
        if set(found) != {"q_proj", "k_proj", "v_proj"}:
            raise ValueError(f"convert_llama_state_dict: layer {i} has {sorted(found)} {what}s, needs q, k and v")
        out[f"blocks.{i}.attn.qkv_proj.{what}"] = torch.cat([found["q_proj"], found["k_proj"], found["v_proj"]], 0)
    return out


def llama_config_from_huggingface(hf_config: Any, **overrides: Any) -> GPTConfig:
    """``LlamaConfig`` / ``Qwen2Config`` / ``MistralConfig`` -> ``GPTConfig``: RoPE (``rope_theta``, the scaling
    dict and ``partial_rotary_factor`` from ``rope_parameters``, or from the older ``rope_theta`` /
    ``rope_scaling`` fields), SwiGLU, RMSNorm, grouped-query attention, q / k / v biases (Qwen2, or Llama's
    ``attention_bias`` with ``mlp_bias``), Mistral's sliding window. What ours cannot express raises."""
    kind = hf_config.model_type
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"GPT.from_huggingface: {kind} with hidden_act {act!r}; ours has silu (SwiGLU)")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if head_dim * heads != hf_config.hidden_size:
        raise ValueError(f"GPT.from_huggingface: head_dim {head_dim} x {heads} heads != hidden_size "
                         f"{hf_config.hidden_size}; ours splits hidden_size evenly")
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    partial = rope.pop("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    kind_of_rope = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if kind_of_rope == "default" else rope
    if kind == "qwen2":
        bias, qkv_bias = False, True
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("GPT.from_huggingface: Qwen2 with use_sliding_window (per-layer windows) is not supported")
        window = None
    else:
        attention_bias, mlp_bias = getattr(hf_config, "attention_bias", False), getattr(hf_config, "mlp_bias", False)
        if attention_bias != mlp_bias:
            raise ValueError(f"GPT.from_huggingface: {kind} with attention_bias={attention_bias} and "
                             f"mlp_bias={mlp_bias}; ours has one bias flag for o_proj and the feed-forward")
        bias, qkv_bias = bool(attention_bias), None
        window = getattr(hf_config, "sliding_window", None) if kind == "mistral" else None
    fields: dict[str, Any] = dict(
        vocab_size=hf_config.vocab_size, max_seq_len=hf_config.max_position_embeddings, dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers, n_heads=heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads, ffn_dim=hf_config.intermediate_size,
        dropout=0.0, attn_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        eps=hf_config.rms_norm_eps, activation="silu", bias=bias, qkv_bias=qkv_bias, window=window,
        positions="rope", rope_theta=float(theta), rope_scaling=scaling, partial_rotary_factor=float(partial),
        mlp="swiglu", norm="rmsnorm", tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))
    fields.update(overrides)
    return GPTConfig(**fields)

"""Model configs: one dataclass per family, with named presets.

    GPTConfig.from_preset("gpt2")                 # GPT-2 124M
    GPTConfig.from_preset("tiny", dropout=0.0)    # overrides by keyword
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
GPT_POSITIONS = ("learned", "alibi", "rope")
GPT_MLPS = ("gelu", "swiglu", "geglu")
GPT_NORMS = ("layernorm", "rmsnorm")


@dataclass
class Config:
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        if name not in cls.presets:
            raise ValueError(f"{cls.__name__}: unknown preset {name!r}; choose one of {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def type_error(cls, name: str, value: Any) -> str | None:
        """Why ``value`` cannot be field ``name`` (None: it can): the simple field types only (int, float, bool,
        str, optionally None); an int is a float, a bool is not an int. What the command line checks its
        ``--model KEY=VALUE`` overrides with, before the config's own checks compute with them."""
        hint = typing.get_type_hints(cls).get(name)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = typing.get_args(hint) if union else (hint,)
        if value is None and type(None) in args:
            return None
        simple = [t for t in args if t in (int, float, bool, str)]
        if not simple:
            return None
        kinds = {bool} if isinstance(value, bool) else {int, float} if isinstance(value, int) else {type(value)}
        if kinds & set(simple):
            return None
        names = {int: "an int", float: "a number", bool: "true or false", str: "a string"}
        want = " or ".join(names[t] for t in simple) + (" or null" if type(None) in args else "")
        return f"{name} must be {want}, got {value!r}"

    def __post_init__(self) -> None:
        dim, heads = getattr(self, "dim", None), getattr(self, "n_heads", None)
        if dim is not None and heads is not None and dim % heads:
            raise ValueError(f"{type(self).__name__}: dim ({dim}) must be divisible by n_heads ({heads})")
        act = getattr(self, "activation", None)
        if act is not None and act not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of {ACTIVATIONS}, got {act!r}")


@dataclass
class GPTConfig(Config):
    """GPT-2: pre-LN, learned positions, GELU (tanh), final LN, LM head tied to the token embeddings.

    Attention variants (``fused_kernels.attention``'s ``window`` / ``alibi_slopes``, in every block):

    - ``window``: sliding-window attention (Mistral, Longformer's causal band): each token attends the
      ``window`` most recent positions, itself included (``causal=True, window=(window - 1, 0)``). ``None``:
      the whole causal prefix. KV-cached decoding stays exact; each cached step reads only the last
      ``window`` positions of the cache.
    - ``positions``: ``"learned"`` (GPT-2's ``wpe`` table), ``"rope"`` (rotary embeddings on q and k in every
      block, ``fused_kernels.apply_rotary_pos_emb``: base ``rope_theta``, transformers' ``rope_scaling`` dict,
      the first ``partial_rotary_factor`` of each head's dims rotated) or ``"alibi"`` (Press et al. 2022): no position
      table; every head adds ``-slope_h * (i - j)`` to the score of query i on key j, with the paper's
      geometric slopes for any head count (``transformer.layers.alibi_slopes``, a non-persistent float32
      buffer of each attention layer: not in the state dict). ``position_ids`` then play no part (the bias
      is the distance within the sequence; left padding leaves the distances between real tokens alone).
      ``max_seq_len`` stays the limit on sequence length with ALiBi too (the same checks, cache sizes and
      training windows as learned positions), although nothing would index past it.

    The modern decoder (Llama, Qwen2, Mistral): ``positions="rope"``, ``mlp="swiglu"`` (``"geglu"`` for Gemma's
    gated GELU; ``"gelu"`` is GPT-2's fc1 -> activation -> fc2), ``norm="rmsnorm"``, ``n_kv_heads`` (grouped-query
    attention), ``bias=False`` (``qkv_bias=True`` gives Qwen2's q / k / v biases alone), untied or tied
    embeddings (``tie_embeddings``); the presets ``llama-tiny`` and ``llama-small``. ``fused_loss``: the training
    loss (``forward(..., return_logits=False)``) through ``fused_kernels.linear_cross_entropy``, never the
    (B, L, vocab) logits; False computes the logits and ``F.cross_entropy`` (for comparison).
    """

    vocab_size: int = 50257
    max_seq_len: int = 1024
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1           # embeddings and residual branches
    attn_dropout: float = 0.1      # attention probabilities
    eps: float = 1e-5
    activation: str = "gelu_tanh"
    bias: bool = True
    tie_embeddings: bool = True
    window: int | None = None      # sliding-window attention: the most recent `window` positions, self included
    positions: str = "learned"     # "learned" (a wpe table), "rope" (rotary q / k) or "alibi" (distance biases)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # transformers' rope_parameters / rope_scaling (rope_type, factor, ...)
    partial_rotary_factor: float = 1.0       # the rotated share of each head's dims (Phi / GPT-NeoX: < 1)
    mlp: str = "gelu"              # "gelu" (fc1 -> activation -> fc2), "swiglu" or "geglu" (gated)
    norm: str = "layernorm"        # "layernorm" or "rmsnorm"
    n_kv_heads: int | None = None  # grouped-query attention: key / value heads (default n_heads)
    qkv_bias: bool | None = None   # biases of the q / k / v projections (default: bias)
    fused_loss: bool = True        # training loss through linear_cross_entropy (no logits)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(vocab_size=96, max_seq_len=64, dim=32, n_layers=2, n_heads=4, ffn_dim=128),
        # Sliding-window attention with ALiBi, for the tests: a window of 8 inside a context of 64, and 6 heads
        # (ALiBi's slopes for a head count that is not a power of two).
        "sliding-alibi-tiny": dict(vocab_size=96, max_seq_len=64, dim=48, n_layers=2, n_heads=6, ffn_dim=128,
                                   window=8, positions="alibi", dropout=0.0, attn_dropout=0.0),
        # A small CPU-trainable model of the same kind (the window a quarter of the context). Not called
        # "mistral": Mistral's RoPE, grouped-query attention, RMSNorm and SwiGLU are not part of this GPT.
        "sliding-alibi-small": dict(vocab_size=128, max_seq_len=256, dim=128, n_layers=4, n_heads=4, ffn_dim=512,
                                    window=64, positions="alibi", dropout=0.0, attn_dropout=0.0),
        "small-char": dict(vocab_size=128, max_seq_len=128, dim=128, n_layers=4, n_heads=4, ffn_dim=512,
                           dropout=0.0, attn_dropout=0.0),
        # nanoGPT's character-level CPU recipe (Tiny Shakespeare, val loss ~1.88 after 2,000 iterations)
        "char-64": dict(vocab_size=96, max_seq_len=64, dim=128, n_layers=4, n_heads=4, ffn_dim=512,
                        dropout=0.0, attn_dropout=0.0),
        "gpt2": dict(),
        "gpt2-medium": dict(dim=1024, n_layers=24, n_heads=16, ffn_dim=4096),
        # Llama-style decoders (RoPE, SwiGLU, RMSNorm, grouped-query attention, no biases): a test-sized one with
        # an untied head, and a CPU-trainable character model with a tied one (as Llama 3.2 1B ties them).
        "llama-tiny": dict(vocab_size=96, max_seq_len=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                           positions="rope", mlp="swiglu", norm="rmsnorm", bias=False, eps=1e-6, dropout=0.0,
                           attn_dropout=0.0, tie_embeddings=False),
        "llama-small": dict(vocab_size=128, max_seq_len=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=2,
                            ffn_dim=688, positions="rope", mlp="swiglu", norm="rmsnorm", bias=False, eps=1e-6,
                            dropout=0.0, attn_dropout=0.0, tie_embeddings=True),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        w = self.window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"GPTConfig: window must be None (full causal attention) or an int >= 1 (the number "
                             f"of most recent positions each token attends, itself included), got {w!r}")
        if self.positions not in GPT_POSITIONS:
            raise ValueError(f"GPTConfig: positions must be one of {GPT_POSITIONS}, got {self.positions!r}")
        if self.mlp not in GPT_MLPS:
            raise ValueError(f"GPTConfig: mlp must be one of {GPT_MLPS}, got {self.mlp!r}")
        if self.norm not in GPT_NORMS:
            raise ValueError(f"GPTConfig: norm must be one of {GPT_NORMS}, got {self.norm!r}")
        kv = self.n_kv_heads
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.n_heads % kv):
            raise ValueError(f"GPTConfig: n_kv_heads must be None or an int >= 1 dividing n_heads ({self.n_heads}), "
                             f"got {kv!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"GPTConfig: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.positions == "rope" and self.rotary_dim < 2:
            raise ValueError(f"GPTConfig: partial_rotary_factor {self.partial_rotary_factor} of head dim "
                             f"{self.dim // self.n_heads} leaves no pair of dims to rotate")

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (positions="rope"): head_dim x partial_rotary_factor, rounded down to even."""
        return int(self.dim // self.n_heads * self.partial_rotary_factor) // 2 * 2


@dataclass
class BERTConfig(Config):
    """BERT: post-LN encoder, word + position + token-type embeddings, pooler, MLM and NSP heads."""

    vocab_size: int = 30522
    max_seq_len: int = 512
    type_vocab_size: int = 2
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    attn_dropout: float = 0.1
    eps: float = 1e-12
    activation: str = "gelu"
    pad_token_id: int = 0
    num_labels: int = 2             # sequence / token classification heads
    classifier_dropout: float | None = None
    # Given an attention_mask, run the blocks on the packed real tokens (fused_kernels.varlen_attention) instead
    # of the padded batch; off by default: the padded path is the one that returns attention weights.
    padding_free: bool = False
    # The masked-LM training loss (forward(..., return_logits=False)) through fused_kernels.linear_cross_entropy on
    # the masked positions only, no (B, L, vocab) logits; False: logits and F.cross_entropy
    fused_loss: bool = True

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(vocab_size=128, max_seq_len=64, dim=32, n_layers=2, n_heads=4, ffn_dim=64),
        # the CPU pre-training / fine-tuning recipe of `python -m transformer train bert`
        "mini": dict(vocab_size=1024, max_seq_len=64, dim=128, n_layers=2, n_heads=4, ffn_dim=512),
        "small": dict(vocab_size=4096, max_seq_len=128, dim=256, n_layers=4, n_heads=4, ffn_dim=1024),
        "bert-base": dict(),
        "bert-large": dict(dim=1024, n_layers=24, n_heads=16, ffn_dim=4096),
    }


@dataclass
class ViTConfig(Config):
    """ViT: patch embedding (strided convolution), class token, learned positions, pre-LN encoder."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    num_classes: int = 1000
    dropout: float = 0.0
    attn_dropout: float = 0.0
    eps: float = 1e-12
    activation: str = "gelu"
    qkv_bias: bool = True

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(image_size=8, patch_size=2, num_channels=1, dim=32, n_layers=2, n_heads=4, ffn_dim=64,
                     num_classes=10),
        "digits": dict(image_size=8, patch_size=2, num_channels=1, dim=64, n_layers=4, n_heads=4, ffn_dim=128,
                       num_classes=10, dropout=0.1),
        "vit-b16": dict(),
        "vit-l16": dict(dim=1024, n_layers=24, n_heads=16, ffn_dim=4096),
    }


@dataclass
class EncoderDecoderConfig(Config):
    """The original Transformer: sinusoidal positions, shared embeddings tied to the output projection.

    ``embed_dim`` (default: ``dim``) is the width of the shared embedding; when it differs from the
    model width ``dim``, inputs are projected up after embedding and the decoder output is projected
    down before the tied output layer."""

    vocab_size: int = 37000
    max_seq_len: int = 512
    dim: int = 512
    embed_dim: int | None = None
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    attn_dropout: float = 0.0
    activation_dropout: float = 0.0
    eps: float = 1e-5
    activation: str = "relu"
    pre_ln: bool = False                 # the paper is post-LN
    scale_embedding: bool = True         # multiply embeddings by sqrt(dim), as the paper does
    positions: str = "interleaved"       # sinusoid layout: "interleaved" (paper) or "concat" (sin | cos, Marian)
    tie_embeddings: bool = True
    share_embeddings: bool = True        # one token table for source and target (else a separate source table)
    source_vocab_size: int | None = None  # source table size when not shared (default: vocab_size)
    final_logits_bias: bool = False      # Marian's extra output bias
    label_smoothing: float = 0.1
    pad_token_id: int = 0
    bos_token_id: int = 1                # decoder start token
    eos_token_id: int = 2
    # Teacher-forced passes with padding masks run on the packed real tokens (fused_kernels.varlen_attention);
    # cached decoding (generate) always runs padded.
    padding_free: bool = False
    # The training loss (forward(..., return_logits=False)) through fused_kernels.linear_cross_entropy, no
    # (B, T, vocab) logits; False: logits and F.cross_entropy
    fused_loss: bool = True

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(vocab_size=64, max_seq_len=64, dim=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                     ffn_dim=64),
        "small": dict(vocab_size=256, max_seq_len=64, dim=128, n_heads=4, n_encoder_layers=3,
                      n_decoder_layers=3, ffn_dim=512),
        "transformer-base": dict(),
        "transformer-big": dict(dim=1024, n_heads=16, ffn_dim=4096, dropout=0.3),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.positions not in ("interleaved", "concat"):
            raise ValueError(f"EncoderDecoderConfig: positions must be 'interleaved' or 'concat', "
                             f"got {self.positions!r}")
        if self.share_embeddings and self.source_vocab_size not in (None, self.vocab_size):
            raise ValueError("EncoderDecoderConfig: source_vocab_size differs from vocab_size but the source and "
                             "target embeddings are shared (share_embeddings=True)")


@dataclass
class MultimodalConfig(Config):
    """Image encoder (ViT blocks) + text encoder (BERT blocks), their outputs concatenated with a modality
    embedding, and a joint decoder of learned queries (one set per task) with one head per task.

    ``tasks`` maps each task's name to its number of outputs (classes); ``n_queries`` queries per task."""

    image_size: int = 8
    patch_size: int = 2
    num_channels: int = 1
    vocab_size: int = 64
    max_text_len: int = 32
    dim: int = 64
    n_heads: int = 4
    ffn_dim: int = 128
    image_layers: int = 2
    text_layers: int = 2
    decoder_layers: int = 2
    n_queries: int = 4
    tasks: dict[str, int] = field(default_factory=lambda: {"match": 2, "digit": 10, "sum": 10})
    dropout: float = 0.1
    attn_dropout: float = 0.0
    eps: float = 1e-5
    activation: str = "gelu"
    pad_token_id: int = 0
    # The text encoder's BERTConfig.padding_free (the image encoder has no padding; the decoder's queries
    # are unpadded and attend to the memory under its padding mask).
    padding_free: bool = False

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(dim=32, ffn_dim=64, image_layers=1, text_layers=1, decoder_layers=1, n_queries=2),
        "digits-words": dict(),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tasks or any(not isinstance(n, int) or n < 1 for n in self.tasks.values()):
            raise ValueError(f"MultimodalConfig: tasks must map names to output counts >= 1, got {self.tasks}")

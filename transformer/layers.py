"""The building blocks every model here is made of, on our kernels.

Attention runs on ``fused_kernels.attention`` (or, when the weights are asked for, ``fused_kernels.softmax`` over
explicit scores); every residual add + LayerNorm is one ``fused_kernels.add_layer_norm``. No model
re-implements either. On CPU tensors (and under ``fused_kernels.use_backend("torch")``) the same modules with
the same weights run the PyTorch path (torch's flash attention and native norms),
which the tests compare with the Triton kernels.

Pre-LN blocks pass a (hidden, residual) pair along the stack, so the residual add that ends one
sublayer fuses with the norm that starts the next:

    hidden, residual = embeddings, None
    for block in blocks:
        hidden, residual, _ = block(hidden, residual)
    out, _ = add_norm(hidden, residual, final_norm)

Post-LN blocks take and return the hidden state (residual is None).

Padding-free (packed) encoders: ``Packing.from_mask(attention_mask)`` once per forward, ``unpad`` the
embeddings to (1, total, dim) before the first block, pass ``packing=`` to every block (its attention then
runs ``fused_kernels.varlen_attention`` over the packed tokens: no work on padding, no mask), ``repad`` after
the last one (zeros at padded positions). Norms and feed-forwards are per token, so they take the packed
(1, total, dim) tensor unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fused_kernels
from fused_kernels.distributed import ring_attention
from fused_kernels.nn import GatedMLP, LayerNorm, RMSNorm
from fused_kernels.reference import causal_mask

from . import context_parallel

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: nn.LayerNorm | nn.RMSNorm,
             dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_out = residual + dropout(x)``; returns ``(norm(residual_out), residual_out)``: one kernel for a
    LayerNorm. An RMSNorm (Llama-style blocks) normalizes the sum with ``fused_kernels.rms_norm`` after the add
    (``fused_kernels`` has no fused add + RMSNorm op yet).

    Under autocast a sublayer's output arrives in bf16/fp16 while the residual stream is fp32: the sum is
    taken in the wider dtype, as ``x + residual`` would promote in plain PyTorch."""
    if residual is not None and residual.dtype != x.dtype:
        wide = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(wide), residual.to(wide)
    if isinstance(norm, nn.RMSNorm):
        out = F.dropout(x, dropout_p) if dropout_p > 0 else x
        if residual is not None:
            out = residual + out
        return fused_kernels.rms_norm(out, norm.normalized_shape, norm.weight, norm.eps), out
    return fused_kernels.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, dropout_p)


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 1/0 (or bool) "attend to this token" mask -> bool (B, 1, 1, S), broadcast over heads and queries."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
    return attention_mask.bool()[:, None, None, :]


@dataclass
class Packing:
    """Where the real tokens of a padded (B, L) batch go once packed one sequence after another.

    Built once per forward from the padding mask and shared by every layer: ``indices`` (total,) int64 are
    the flat positions ``b * L + t`` of the kept tokens in row order, ``cu_seqlens`` (B + 1,) int32 the
    cumulative lengths ``fused_kernels.varlen_attention`` takes, ``max_seqlen`` the longest row."""

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seqlen: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Packing:
        """(B, L) 1/0 (or bool) mask -> the packing of its kept positions (any pattern: right or left padding,
        holes; a row with no kept token is an empty sequence)."""
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
        keep = attention_mask.bool()
        b, l = keep.shape
        lengths = keep.sum(1, dtype=torch.int32)                                     # (B,)
        cu = torch.zeros(b + 1, dtype=torch.int32, device=keep.device)
        cu[1:] = lengths.cumsum(0)
        # One host sync per forward (not per layer): the launch grid of varlen_attention needs an int.
        max_seqlen = int(lengths.max()) if b else 0
        return cls(keep.flatten().nonzero().squeeze(1), cu, max_seqlen, b, l)

    @property
    def total(self) -> int:
        return self.indices.numel()


def unpad(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(B, L, ...) -> (1, total, ...): the kept tokens, one sequence after another (a gather; differentiable)."""
    return x.reshape(packing.batch * packing.seqlen, *x.shape[2:]).index_select(0, packing.indices)[None]


def repad(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(1, total, ...) -> (B, L, ...) with zeros at the padded positions (a scatter; differentiable)."""
    flat = x.new_zeros(packing.batch * packing.seqlen, *x.shape[2:])
    return flat.index_copy(0, packing.indices, x[0]).view(packing.batch, packing.seqlen, *x.shape[2:])


def alibi_slopes(n_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022), float32 (n_heads,): for a power of two n, the geometric
    sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise the n' = 2^floor(log2 n) slopes of n' heads followed
    by every other slope of 2n' heads (the odd-numbered ones) for the remaining n - n' heads, as the paper's
    reference code does."""
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads must be an int >= 1, got {n_heads!r}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = geometric(closest) + geometric(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def sinusoidal_table(n_positions: int, dim: int, layout: str = "interleaved") -> torch.Tensor:
    """(n_positions, dim) sinusoids of "Attention Is All You Need": frequency 1 / 10000^(2i/dim) for pair i.

    ``layout="interleaved"`` puts sin/cos of pair i in columns 2i/2i+1 (the paper); ``"concat"`` puts
    all sines first, then all cosines (Marian)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = pos * freq                                                   # (n, ceil(dim / 2))
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    if layout == "interleaved":
        table[:, 0::2] = angles.sin()
        table[:, 1::2] = angles[:, : dim // 2].cos()
    elif layout == "concat":
        half = (dim + 1) // 2
        table[:, :half] = angles.sin()
        table[:, half:] = angles[:, : dim // 2].cos()
    else:
        raise ValueError(f"layout must be 'interleaved' or 'concat', got {layout!r}")
    return table.float()


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position encodings (a non-persistent buffer: not in the state dict)."""

    def __init__(self, max_positions: int, dim: int, layout: str = "interleaved") -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_positions, dim, layout), persistent=False)

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        if offset + length > self.table.shape[0]:
            raise ValueError(f"positions {offset}..{offset + length - 1} exceed the table of {self.table.shape[0]}")
        return self.table[offset: offset + length]                       # (L, dim)


class PatchEmbedding(nn.Module):
    """Cut an image into patch_size x patch_size patches, flatten and project each: a strided convolution."""

    def __init__(self, image_size: int, patch_size: int, num_channels: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"pixel_values must be (batch, channels, {self.image_size}, {self.image_size}), "
                             f"got {tuple(pixel_values.shape)}")
        return self.proj(pixel_values).flatten(2).transpose(1, 2)       # (B, num_patches, dim)


class FeedForward(nn.Module):
    """Position-wise feed-forward: fc2(dropout(act(fc1(x))))."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.act = _ACTIVATIONS[activation]
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.training and self.dropout > 0:
            h = F.dropout(h, self.dropout)
        return self.fc2(h)


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Buffers (B, H, max_len, D) filled up to ``length``; ``append`` writes new keys/values and returns
    views of everything filled so far (read in place by the attention kernel)."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.k = torch.empty(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = k.shape[2]
        if self.length + new > self.k.shape[2]:
            raise ValueError(f"KVCache is full: {self.length} + {new} > {self.k.shape[2]} positions")
        self.k[:, :, self.length: self.length + new] = k
        self.v[:, :, self.length: self.length + new] = v
        self.length += new
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search)."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class Attention(nn.Module):
    """Multi-head attention on ``fused_kernels.attention``.

    Self-attention projects q, k, v with one fused ``qkv_proj`` (its output split into strided views,
    no copies); cross-attention has ``q_proj`` and a fused ``kv_proj`` over the memory. ``causal`` is
    bottom-right aligned (the last query sees every key), so the same call serves training, prefill
    and one-token decoding over a ``KVCache``. ``attn_mask``: bool (True = attend) or float, broadcast
    to (B, H, L, S), e.g. ``key_padding_mask(attention_mask)``. With ``packing`` (padding-free, see the
    module docstring) x is (1, total, dim) packed tokens and the call is one ``fused_kernels.varlen_attention``;
    cross-attention then also needs ``memory_packing``, the packing of the (1, total_k, kv_dim) memory.

    ``n_kv_heads`` (self-attention; default ``n_heads``): grouped-query attention, ``n_heads / n_kv_heads`` query
    heads per key / value head; ``qkv_proj`` then has (n_heads + 2 n_kv_heads) x head_dim outputs (q | k | v).
    ``rope=(cos, sin)`` in ``forward``: rotary embeddings (``fused_kernels.apply_rotary_pos_emb``, tables
    (B or 1, L, R), R <= head_dim) applied to q and k before they enter the cache.

    Self-attention variants, passed on to ``fused_kernels.attention``: ``window=(left, right)`` (its band, -1 =
    unbounded; with ``causal`` the right side is 0) and ``alibi=True`` (ALiBi distance biases with
    ``alibi_slopes(n_heads)``, kept as the non-persistent float32 buffer ``alibi_slopes``: not in the state
    dict, recomputed whenever the module moves or is cast, so ``.to(bfloat16)`` leaves it exact and float32).
    Both are relative to the bottom-right alignment, so a ``KVCache`` call stays exact; with a window only the
    keys some query can still see are read from the cache. Paths that cannot honour them (packed, paged cache,
    context parallel) raise a ValueError naming the option."""

    def __init__(self, dim: int, n_heads: int, *, n_kv_heads: int | None = None, cross: bool = False,
                 kv_dim: int | None = None, bias: bool = True, out_bias: bool | None = None, dropout: float = 0.0,
                 window: tuple[int, int] | None = None, alibi: bool = False) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"Attention: n_kv_heads must be an int >= 1 dividing n_heads ({n_heads}), got "
                             f"{n_kv_heads!r}")
        if cross and n_kv_heads != n_heads:
            raise ValueError("Attention: n_kv_heads (grouped-query attention) is for self-attention")
        self.dim, self.n_heads, self.head_dim, self.cross = dim, n_heads, dim // n_heads, cross
        self.n_kv_heads = n_kv_heads
        if window is not None:
            if (not isinstance(window, (tuple, list)) or len(window) != 2
                    or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window)):
                raise ValueError(f"Attention: window must be None or (left, right), two ints >= -1 (-1: unbounded), "
                                 f"got {window!r}")
            window = None if tuple(window) == (-1, -1) else (int(window[0]), int(window[1]))
        if cross and (window is not None or alibi):
            raise ValueError("Attention: window and alibi are for self-attention; cross-attention has no common "
                             "positions for queries and keys")
        self.window: tuple[int, int] | None = window
        self.alibi_slopes: torch.Tensor | None
        if alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(n_heads), persistent=False)
        else:
            self.alibi_slopes = None
        if cross:
            self.q_proj = nn.Linear(dim, dim, bias=bias)
            self.kv_proj = nn.Linear(kv_dim or dim, 2 * dim, bias=bias)
        else:
            self.qkv_proj = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias if out_bias is None else out_bias)
        self.dropout = dropout

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Attention:
        # model.to(dtype) / .half() / to_empty() would cast or blank the slopes buffer like any other;
        # recompute it, exact and float32 (what fused_kernels.attention takes), on wherever it went.
        out = super()._apply(fn, recurse)
        if self.alibi_slopes is not None:
            self.alibi_slopes = alibi_slopes(self.n_heads, device=self.alibi_slopes.device)
        return out

    def _variant_names(self) -> str:
        """The options in force that only fused_kernels.attention's dense path honours ('' when none)."""
        names = ([f"window={self.window}"] if self.window is not None else []) + (
            ["alibi_slopes (ALiBi)"] if self.alibi_slopes is not None else [])
        return " and ".join(names)

    def _variant_kwargs(self) -> dict:
        """fused_kernels.attention's window / alibi_slopes arguments, only those in force (plain attention passes
        none)."""
        kw: dict = {}
        if self.window is not None:
            kw["window"] = self.window
        if self.alibi_slopes is not None:
            kw["alibi_slopes"] = self.alibi_slopes
        return kw

    def _explicit_mask(self, l: int, s: int, causal: bool, attn_mask: torch.Tensor | None,
                       dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The mask of the explicit-weights path (``need_weights``): ``attn_mask`` with the causal band, the
        window and the ALiBi biases of fused_kernels.attention folded in (bool, or float with -inf where not kept)."""
        left, right = self.window if self.window is not None else (-1, -1)
        if causal:
            right = 0
        i = torch.arange(l, device=device)[:, None] + (s - l)          # bottom-right: query i sits at i + off
        j = torch.arange(s, device=device)[None, :]
        keep = None
        if right != -1:
            keep = j <= i + right
        if left != -1:
            keep = (j >= i - left) if keep is None else keep & (j >= i - left)
        mask = attn_mask
        if self.alibi_slopes is not None:
            bias = -self.alibi_slopes.to(dtype)[:, None, None] * (i - j).abs().to(dtype)    # (H, L, S)
            if mask is None:
                mask = bias
            elif mask.dtype == torch.bool:
                mask = torch.where(mask, bias, float("-inf"))               # broadcast: (B, H, L, S)
            else:
                mask = mask + bias
        if keep is not None:
            mask = keep if mask is None else (keep & mask if mask.dtype == torch.bool
                                              else torch.where(keep, mask, float("-inf")))
        return mask

    def _heads(self, t: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        b, n, _ = t.shape                                            # (B, T, parts * dim)
        if parts == 3 and self.n_kv_heads != self.n_heads:          # q | k | v with fewer key / value heads
            q, k, v = t.split([self.dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], -1)
            return (q.view(b, n, self.n_heads, self.head_dim).transpose(1, 2),
                    k.view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2),
                    v.view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2))
        t = t.view(b, n, parts, self.n_heads, self.head_dim)
        return tuple(x.transpose(1, 2) for x in t.unbind(2))        # parts x (B, H, T, D) strided views

    def _packed(self, x: torch.Tensor, memory: torch.Tensor | None, causal: bool, packing: Packing,
                memory_packing: Packing | None) -> torch.Tensor:
        """Packed tokens x (1, total_q, dim) [memory (1, total_k, kv_dim)] -> (1, total_q, dim)."""
        t = x.shape[1]
        heads = (self.n_heads, self.head_dim)
        if self.cross:
            if memory is None or memory_packing is None:
                raise ValueError("packed cross-attention needs the packed memory and its memory_packing")
            if memory_packing.batch != packing.batch:
                raise ValueError(f"packed cross-attention: {packing.batch} query sequences but "
                                 f"{memory_packing.batch} memory sequences")
            q = self.q_proj(x[0]).view(t, *heads)                                 # (total_q, H, D)
            k, v = self.kv_proj(memory[0]).view(memory.shape[1], 2, *heads).unbind(1)   # (total_k, H, D) views
            kv_packing = memory_packing
        else:
            q, k, v = (part[0].transpose(0, 1) for part in self._heads(self.qkv_proj(x), 3))  # (total, H, D) views
            kv_packing = packing
        p = self.dropout if self.training else 0.0
        # check=False: the packings are built by Packing.from_mask, correct by construction, and the
        # checks would read cu_seqlens on the host in every layer.
        out = fused_kernels.varlen_attention(q, k, v, packing.cu_seqlens, kv_packing.cu_seqlens, packing.max_seqlen,
                                       kv_packing.max_seqlen, causal=causal, dropout_p=p, check=False)
        return self.out_proj(out.reshape(1, t, self.dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, *, causal: bool = False,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                need_weights: bool = False, packing: Packing | None = None,
                memory_packing: Packing | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, L, dim), memory (B, S, kv_dim) for cross-attention -> ((B, L, dim), weights (B, H, L, S) or None).

        With a cache, self-attention appends this step's keys/values to it; cross-attention fills it
        from ``memory`` on the first call and reuses it afterwards (memory may then be None). A paged cache layer
        (``fused_kernels.ops.attention.cache.PagedLayer``, sequences of different lengths) appends and attends
        itself.
        With ``packing`` x (and memory) are packed tokens (see the class docstring); no mask, cache or
        weights then."""
        if packing is not None:
            if rope is not None:
                raise ValueError("packed (padding-free) attention does not apply rotary embeddings")
            if attn_mask is not None or cache is not None or need_weights:
                raise ValueError("packed (padding-free) attention takes no attn_mask or cache and returns no "
                                 "attention weights")
            if context_parallel.active() is not None:
                raise ValueError("context parallel attention takes full sequences, not packed ones")
            if self._variant_names():
                raise ValueError(f"packed (padding-free) attention does not support {self._variant_names()}: "
                                 f"run the padded batch (padding_free=False)")
            return self._packed(x, memory, causal, packing, memory_packing), None
        b, l, _ = x.shape
        if self.cross:
            (q,) = self._heads(self.q_proj(x), 1)
            if cache is not None and cache.length > 0:
                k, v = cache.get()
            else:
                if memory is None:
                    raise ValueError("cross-attention needs memory (or a filled cache)")
                k, v = self._heads(self.kv_proj(memory), 2)
                if cache is not None:
                    k, v = cache.append(k, v)
        else:
            q, k, v = self._heads(self.qkv_proj(x), 3)
            if rope is not None:   # tables in q's dtype (bf16 under autocast): the rotated q, k stay in it
                cos, sin = (t.to(q.dtype) for t in rope)
                q, k = fused_kernels.apply_rotary_pos_emb(q, k, cos, sin)              # (B, H / Hkv, L, D)
            # a fused_kernels.PagedKVCache layer: append and attend via its block table
            if getattr(cache, "paged", False):
                if attn_mask is not None or need_weights:
                    raise ValueError("a paged KV cache takes no attn_mask and returns no attention weights")
                if self.n_kv_heads != self.n_heads:
                    raise ValueError("the paged KV cache holds n_heads key / value heads: grouped-query attention "
                                     "(n_kv_heads) runs on a dense KVCache (GPT.generate on a (batch, seq) tensor)")
                if self._variant_names():
                    raise ValueError(f"the paged KV cache does not support {self._variant_names()}: use a dense "
                                     f"KVCache (GPT.generate on a (batch, seq) tensor)")
                out = cache.attend(q, k, v, causal=causal)
                return self.out_proj(out.transpose(1, 2).reshape(b, l, self.dim)), None
            if cache is not None:
                k, v = cache.append(k, v)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            mask = attn_mask
            if self._variant_names():
                dtype = torch.promote_types(q.dtype, torch.float32)
                mask = self._explicit_mask(l, k.shape[2], causal, attn_mask, dtype, q.device)
            elif causal:
                keep = causal_mask(l, k.shape[2], q.device, bottom_right=True)
                mask = keep if mask is None else (keep & mask if mask.dtype == torch.bool
                                                  else mask.masked_fill(~keep, float("-inf")))
            if self.n_kv_heads != self.n_heads:                              # the explicit path repeats heads
                group = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            weights = fused_kernels.softmax(q @ k.transpose(-2, -1), mask=mask, scale=self.head_dim ** -0.5)
            out = (F.dropout(weights, p) if p > 0 else weights) @ v              # (B, H, L, D)
        elif (ring := context_parallel.active()) is not None and not self.cross and cache is None:
            if attn_mask is not None:
                raise ValueError("context parallel attention takes no attn_mask (padding): pass full sequences")
            if self._variant_names():
                raise ValueError(f"context parallel (ring) attention does not support {self._variant_names()}")
            out = ring_attention(q, k, v, ring.group, causal=causal, layout=ring.layout, dropout_p=p)
        else:
            if self.window is not None and self.window[0] != -1:
                # Keys left of the first query's band are seen by no query: with a cache (S = cached + L) only
                # the last window[0] + L keys are read. Window and ALiBi are relative to the bottom-right
                # offset S - L, so dropping a prefix of the keys changes nothing else.
                start = max(0, k.shape[2] - l - self.window[0])
                if start > 0:
                    k, v = k[:, :, start:], v[:, :, start:]
                    if attn_mask is not None and attn_mask.shape[-1] != 1:
                        attn_mask = attn_mask[..., start:]
            out = fused_kernels.attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=p,
                                    **self._variant_kwargs())
        return self.out_proj(out.transpose(1, 2).reshape(b, l, self.dim)), weights


@dataclass
class BlockSpec:
    """Shape and regularization of one transformer block."""

    dim: int
    n_heads: int
    ffn_dim: int
    activation: str = "gelu"
    pre_ln: bool = True
    dropout: float = 0.0              # residual branches
    attn_dropout: float = 0.0         # attention probabilities
    activation_dropout: float = 0.0   # inside the feed-forward
    eps: float = 1e-5
    bias: bool = True                 # every linear layer
    qkv_bias: bool | None = None      # overrides bias for the q/k/v projections
    window: tuple[int, int] | None = None   # self-attention band (left, right), fused_kernels.attention's window
    alibi: bool = False               # ALiBi distance biases in self-attention (Attention's alibi)
    n_kv_heads: int | None = None     # grouped-query self-attention (default n_heads)
    norm: str = "layernorm"           # "layernorm" or "rmsnorm"
    mlp: str = "gelu"                 # "gelu" (fc1 -> activation -> fc2), "swiglu" or "geglu" (gated, GatedMLP)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """Our ``LayerNorm`` or ``RMSNorm`` (drop-ins for torch's)."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


def make_ffn(spec: BlockSpec) -> nn.Module:
    """The block's feed-forward: ``FeedForward`` ("gelu": fc1 -> spec.activation -> fc2) or ``GatedMLP``
    ("swiglu": silu; "geglu": GELU, tanh-approximated when spec.activation is "gelu_tanh"), Llama's names."""
    if spec.mlp == "gelu":
        return FeedForward(spec.dim, spec.ffn_dim, spec.activation, spec.activation_dropout, spec.bias)
    if spec.activation_dropout:
        raise ValueError("the gated feed-forwards (swiglu / geglu) have no activation dropout")
    if spec.mlp == "swiglu":
        return GatedMLP(spec.dim, spec.ffn_dim, "silu", bias=spec.bias)
    if spec.mlp == "geglu":
        return GatedMLP(spec.dim, spec.ffn_dim, "gelu_tanh" if spec.activation == "gelu_tanh" else "gelu",
                        bias=spec.bias)
    raise ValueError(f"mlp must be 'gelu', 'swiglu' or 'geglu', got {spec.mlp!r}")


class EncoderBlock(nn.Module):
    """Self-attention + feed-forward, pre-LN or post-LN (BERT, ViT; GPT with ``causal=True``).

    ``ln1`` is the norm around attention, ``ln2`` the one around the feed-forward."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.pre_ln, self.dropout = spec.pre_ln, spec.dropout
        qkv_bias = spec.bias if spec.qkv_bias is None else spec.qkv_bias
        self.attn = Attention(spec.dim, spec.n_heads, n_kv_heads=spec.n_kv_heads, bias=qkv_bias, out_bias=spec.bias,
                              dropout=spec.attn_dropout, window=spec.window, alibi=spec.alibi)
        self.ln1 = make_norm(spec.norm, spec.dim, spec.eps)
        self.ffn = make_ffn(spec)
        self.ln2 = make_norm(spec.norm, spec.dim, spec.eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None, *, causal: bool = False,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                need_weights: bool = False, packing: Packing | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (hidden, residual, attention weights or None); see the module docstring for the pair.
        ``packing``: hidden (and residual) are packed (1, total, dim) tokens. ``rope``: the (cos, sin) tables
        of rotary embeddings (``Attention``)."""
        p = self.dropout if self.training else 0.0
        if self.pre_ln:
            normed, residual = add_norm(hidden, residual, self.ln1, p if residual is not None else 0.0)
            a, w = self.attn(normed, causal=causal, attn_mask=attn_mask, cache=cache, need_weights=need_weights,
                             packing=packing, rope=rope)
            normed, residual = add_norm(a, residual, self.ln2, p)
            return self.ffn(normed), residual, w
        a, w = self.attn(hidden, causal=causal, attn_mask=attn_mask, cache=cache, need_weights=need_weights,
                         packing=packing, rope=rope)
        hidden, _ = add_norm(a, hidden, self.ln1, p)
        hidden, _ = add_norm(self.ffn(hidden), hidden, self.ln2, p)
        return hidden, None, w


@dataclass
class DecoderCache:
    """Per decoder block: the growing self-attention cache and the once-computed cross-attention one."""

    self_attn: KVCache
    cross_attn: KVCache

    def reorder(self, index: torch.Tensor) -> None:
        self.self_attn.reorder(index)
        self.cross_attn.reorder(index)


class DecoderBlock(nn.Module):
    """Causal self-attention + cross-attention to the encoder output + feed-forward, pre-LN or post-LN.

    ``ln1``/``ln2``/``ln3`` are the norms around self-attention, cross-attention and the feed-forward."""

    def __init__(self, spec: BlockSpec, memory_dim: int | None = None) -> None:
        super().__init__()
        self.pre_ln, self.dropout = spec.pre_ln, spec.dropout
        qkv_bias = spec.bias if spec.qkv_bias is None else spec.qkv_bias
        self.self_attn = Attention(spec.dim, spec.n_heads, bias=qkv_bias, out_bias=spec.bias,
                                   dropout=spec.attn_dropout, window=spec.window, alibi=spec.alibi)
        self.ln1 = LayerNorm(spec.dim, eps=spec.eps)
        self.cross_attn = Attention(spec.dim, spec.n_heads, cross=True, kv_dim=memory_dim, bias=qkv_bias,
                                    out_bias=spec.bias, dropout=spec.attn_dropout)
        self.ln2 = LayerNorm(spec.dim, eps=spec.eps)
        self.ffn = FeedForward(spec.dim, spec.ffn_dim, spec.activation, spec.activation_dropout, spec.bias)
        self.ln3 = LayerNorm(spec.dim, eps=spec.eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, memory: torch.Tensor | None, *,
                self_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                cache: DecoderCache | None = None, need_weights: bool = False, causal: bool = True,
                packing: Packing | None = None, memory_packing: Packing | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """-> (hidden, residual, (self-attention weights, cross-attention weights)). ``causal=False`` lets
        every input see every other (a set of learned queries rather than a sequence being generated).
        ``packing`` / ``memory_packing``: hidden and memory are packed (1, total, dim) tokens (padding-free)."""
        p = self.dropout if self.training else 0.0
        self_cache = cache.self_attn if cache is not None else None
        cross_cache = cache.cross_attn if cache is not None else None
        if self.pre_ln:
            normed, residual = add_norm(hidden, residual, self.ln1, p if residual is not None else 0.0)
            a, w_self = self.self_attn(normed, causal=causal, attn_mask=self_mask, cache=self_cache,
                                       need_weights=need_weights, packing=packing)
            normed, residual = add_norm(a, residual, self.ln2, p)
            c, w_cross = self.cross_attn(normed, memory, attn_mask=memory_mask, cache=cross_cache,
                                         need_weights=need_weights, packing=packing, memory_packing=memory_packing)
            normed, residual = add_norm(c, residual, self.ln3, p)
            return self.ffn(normed), residual, (w_self, w_cross)
        a, w_self = self.self_attn(hidden, causal=causal, attn_mask=self_mask, cache=self_cache,
                                   need_weights=need_weights, packing=packing)
        hidden, _ = add_norm(a, hidden, self.ln1, p)
        c, w_cross = self.cross_attn(hidden, memory, attn_mask=memory_mask, cache=cross_cache,
                                     need_weights=need_weights, packing=packing, memory_packing=memory_packing)
        hidden, _ = add_norm(c, hidden, self.ln2, p)
        hidden, _ = add_norm(self.ffn(hidden), hidden, self.ln3, p)
        return hidden, None, (w_self, w_cross)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT-style init: normal(0, std) linear and embedding weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.RMSNorm) and m.weight is not None:
            nn.init.ones_(m.weight)


def embedding_scale(dim: int, enabled: bool) -> float:
    return math.sqrt(dim) if enabled else 1.0

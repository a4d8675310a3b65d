"""Drop-in replacements for ``torch.nn`` modules, running our kernels.

Each subclasses its ``torch.nn`` counterpart and overrides only ``forward``: constructor, attributes,
``state_dict`` keys and ``isinstance`` checks are torch's own, so a torch state dict loads unchanged.
``LayerNorm``, ``RMSNorm``, ``Softmax``, ``MultiheadAttention`` and ``CrossEntropyLoss`` run our ops;
``TransformerEncoderLayer`` only routes around torch's inference fast path, which would otherwise skip its
(swapped) submodules.

Modules for the ops torch has no module for, with the parameter names of the models that use them:
``SwiGLU`` / ``GEGLU`` (the activation on (gate, up) or on one concatenated tensor), ``GatedMLP`` (Llama's
``gate_proj`` / ``up_proj`` / ``down_proj`` feed-forward), ``RotaryEmbedding`` (cos / sin tables, as
transformers' rotary modules), ``LinearCrossEntropyLoss`` (the output layer and the loss without logits).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ._core import checks as _checks
from .ops.attention import scaled_dot_product_attention
from .ops.cross_entropy import cross_entropy, linear_cross_entropy
from .ops.gated_mlp import geglu, swiglu
from .ops.norms import layer_norm, rms_norm
from .ops.rotary import rope_cos_sin
from .ops.softmax import softmax


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on the fused LayerNorm kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on the fused RMSNorm kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax`` on the softmax kernel (``dim=None`` picks the dim as torch does)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dim = self.dim
        if dim is None:  # torch's legacy implicit choice
            dim = 0 if input.dim() in (0, 1, 3) else 1
        return softmax(input, dim)


# torch class -> our subclass. Only exact instances are swapped: a user's subclass may have its own
# forward, which we must not replace.
_REPLACEMENTS: dict[type, type] = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.Softmax: Softmax,
}


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on our kernels: the fused attention kernel when
    ``need_weights=False``, our masked softmax kernel when the weights are asked for.

    Constructor, parameters (``in_proj_weight``/``in_proj_bias``, ``q/k/v_proj_weight`` when kdim/vdim
    differ, ``bias_k``/``bias_v``, ``out_proj``), masks (bool True = masked, float added; a float mask may
    require grad), return values and argument checks (the checks torch makes, in its order, with its exception
    types, before any projection) are torch's. ``is_causal=True`` is a hint, as in torch: it needs
    ``attn_mask``, and with no ``key_padding_mask`` and ``need_weights=False`` the mask is not used (nor
    checked) and the top-left causal mask is applied instead. One difference: a query whose keys are all
    masked gets a zero output (and zero weights) in every mode. torch's (2.13, CPU) gives NaN there with
    ``need_weights=True``, and with ``need_weights=False`` in eval mode under ``no_grad`` (its fast path);
    otherwise 0 as well."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise _checks.ArgumentValueError(
                "MultiheadAttention: Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask.")
        # torch's hint: without a key padding mask and weights, attn_mask is replaced by top-left is_causal.
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        if not batched:  # (L, E) -> (L, 1, E) in the sequence-first layout below
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # (N, L, E) -> (L, N, E): a view, no copy
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        tgt_len, bsz, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        q, k, v = self._project(query, key, value)             # (L, N, E), (S, N, E), (S, N, E)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(1, bsz, k.shape[-1])])
            v = torch.cat([v, v.new_zeros(1, bsz, v.shape[-1])])
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        src_len = k.shape[0]
        # (T, N, E) -> (N, H, T, D): strided views of the projections, read in place by the kernel.
        q, k, v = (t.view(t.shape[0], bsz, heads, head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
        mask = _merge_masks(attn_mask, key_padding_mask, bsz, heads, tgt_len, src_len, q.dtype)
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = q @ k.transpose(-2, -1)                     # (N, H, L, S)
            weights = softmax(scores, mask=mask, scale=head_dim ** -0.5)
            if dropout_p > 0:
                weights = torch.nn.functional.dropout(weights, dropout_p)
            out = weights @ v                                    # (N, H, L, D)
        else:
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
            weights = None
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)     # (L, N, E)
        out = self.out_proj(out)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """torch's mask dtype and dimension checks (``F._canonical_mask``, ``F._mha_shape_check``), with its
        AssertionErrors (as ``ShapeAssertionError``) and messages; returns whether the input is batched."""
        op = "MultiheadAttention"
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
            _checks.check_tensor_type(name, mask, op)
            if mask.dtype != torch.bool and not torch.is_floating_point(mask):
                raise _checks.ShapeAssertionError(f"{op}: only bool and floating types of {name} are supported")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=3)
        fail = _checks.ShapeAssertionError
        if query.dim() == 3:
            if key.dim() != 3 or value.dim() != 3:
                raise fail(f"{op}: For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                           f"{key.dim()}-D and {value.dim()}-D tensors respectively")
            if key_padding_mask is not None and key_padding_mask.dim() != 2:
                raise fail(f"{op}: For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D but "
                           f"found {key_padding_mask.dim()}-D tensor instead")
            if attn_mask is not None and attn_mask.dim() not in (2, 3):
                raise fail(f"{op}: For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D but "
                           f"found {attn_mask.dim()}-D tensor instead")
            return True
        if query.dim() == 2:
            if key.dim() != 2 or value.dim() != 2:
                raise fail(f"{op}: For unbatched (2-D) `query`, expected `key` and `value` to be 2-D but found "
                           f"{key.dim()}-D and {value.dim()}-D tensors respectively")
            if key_padding_mask is not None and key_padding_mask.dim() != 1:
                raise fail(f"{op}: For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D "
                           f"but found {key_padding_mask.dim()}-D tensor instead")
            if attn_mask is not None:
                if attn_mask.dim() not in (2, 3):
                    raise fail(f"{op}: For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                               f"but found {attn_mask.dim()}-D tensor instead")
                if attn_mask.dim() == 3:
                    expected = (self.num_heads, query.shape[0], key.shape[0])
                    if tuple(attn_mask.shape) != expected:
                        raise fail(f"{op}: Expected `attn_mask` shape to be {expected} but got "
                                   f"{tuple(attn_mask.shape)}")
            return False
        raise fail(f"{op}: query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query "
                   f"tensor")

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask) -> None:
        """torch's shape checks of ``F.multi_head_attention_forward`` on the (T, N, E) layout, before any
        projection: embedding dims, key vs value, the masks' sizes (AssertionError or RuntimeError, as torch)."""
        op = "MultiheadAttention"
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim:
            raise _checks.ShapeAssertionError(f"{op}: was expecting embedding dimension of {self.embed_dim}, but got "
                                              f"{embed_dim}")
        if not self._qkv_same_embed_dim:
            if key.shape[:2] != value.shape[:2]:
                raise _checks.ShapeAssertionError(f"{op}: key's sequence and batch dims {tuple(key.shape[:2])} do not "
                                                  f"match value's {tuple(value.shape[:2])}")
        elif key.shape != value.shape:
            raise _checks.ShapeAssertionError(f"{op}: key shape {tuple(key.shape)} does not match value shape "
                                              f"{tuple(value.shape)}")
        for name, t, want in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] == want:
                continue
            if not self._qkv_same_embed_dim:   # torch's _in_projection asserts the weight shapes
                raise _checks.ShapeAssertionError(f"{op}: expecting {name} weights shape of "
                                                  f"{(self.embed_dim, t.shape[-1])}, but got "
                                                  f"{(self.embed_dim, want)}")
            # torch's packed projection (F.linear) fails with a RuntimeError here
            raise _checks.ArgumentValueError(f"{op}: {name} has embedding dimension {t.shape[-1]}, but the module's "
                                             f"{'kdim' if name == 'key' else 'vdim'} is {want}")
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) != (tgt_len, src_len):
                raise _checks.ArgumentValueError(f"{op}: The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, "
                                                 f"but should be {(tgt_len, src_len)}.")
            if attn_mask.dim() == 3 and tuple(attn_mask.shape) != (bsz * self.num_heads, tgt_len, src_len):
                raise _checks.ArgumentValueError(f"{op}: The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, "
                                                 f"but should be {(bsz * self.num_heads, tgt_len, src_len)}.")
            if attn_mask.device != query.device:
                raise _checks.ArgumentValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on "
                                                 f"{query.device}")
        if key_padding_mask is not None:
            if key_padding_mask.shape[0] != bsz:
                raise _checks.ShapeAssertionError(f"{op}: Expected key_padded_mask.shape[0] to be {bsz}, but got "
                                                  f"{key_padding_mask.shape[0]}")
            if key_padding_mask.shape[1] != src_len:
                raise _checks.ShapeAssertionError(f"{op}: Expected key_padded_mask.shape[1] to be {src_len}, but got "
                                                  f"{key_padding_mask.shape[1]}")
            if key_padding_mask.device != query.device:
                raise _checks.ArgumentValueError(f"{op}: key_padding_mask is on {key_padding_mask.device} but query "
                                                 f"is on {query.device}")

    def _project(self, query, key, value):
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.split(e)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        if query is key and key is value:  # self-attention: one fused projection, split as views
            return F.linear(query, w, b).split(e, dim=-1)
        bq, bkv = (None, None) if b is None else (b[:e], b[e:])
        q = F.linear(query, w[:e], bq)
        if key is value:
            return (q, *F.linear(key, w[e:], bkv).split(e, dim=-1))
        bk, bv = (None, None) if bkv is None else bkv.split(e)
        return q, F.linear(key, w[e:2 * e], bk), F.linear(value, w[2 * e:], bv)


def _pad_masks(attn_mask, key_padding_mask):
    """One more key (bias_k or the zero key) that nothing masks."""
    pad = lambda m: None if m is None else F.pad(m, (0, 1))
    return pad(attn_mask), pad(key_padding_mask)


def _merge_masks(attn_mask, key_padding_mask, bsz, heads, tgt_len, src_len, dtype):
    """torch's MHA masks (bool True = masked, or float added; attn_mask (L, S) or (N*H, L, S),
    key_padding_mask (N, S)) as one mask for our kernels (bool True = keep, or float added),
    broadcastable to (N, H, L, S) and expanded only when both masks are given."""
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.view(bsz, heads, tgt_len, src_len)
        masks.append(attn_mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(bsz, 1, 1, src_len))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        masked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~masked
    total = None
    for m in masks:
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)
        total = m if total is None else total + m
    return total


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` that always runs its submodules' ``forward``.

    In eval mode with autograd off (``torch.no_grad()`` / ``torch.inference_mode()``), torch's layer
    normally hands its weights to one fused op (``torch._transformer_encoder_layer_fwd``), which never calls
    ``self_attn``, ``norm1`` or ``norm2``: after ``replace_modules`` our kernels would silently not run.
    This subclass computes what torch's layer computes on its standard path (the one it takes in training),
    in every mode: ``norm1``/``norm2`` (our LayerNorm), ``self_attn`` (our MultiheadAttention with
    ``need_weights=False``: the fused attention kernel), torch's linear layers, activation and dropout.
    Results equal torch's fast path up to rounding, except that a query whose keys are all masked gives 0
    where the fast path gives NaN. Nested-tensor inputs (which only torch's fast path accepts) are refused:
    ``replace_modules`` turns off ``torch.nn.TransformerEncoder``'s conversion to them.

    Built directly (same constructor as torch's), its ``self_attn``, ``norm1`` and ``norm2`` are ours."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        replace_modules(self)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if src.is_nested:
            raise ValueError("fused_kernels.nn.TransformerEncoderLayer: nested-tensor input "
                             "(torch.nn.TransformerEncoder makes it in eval mode from a padding mask): "
                             "build the encoder with enable_nested_tensor=False, or call "
                             "fused_kernels.nn.replace_modules on the encoder")
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


_REPLACEMENTS[torch.nn.MultiheadAttention] = MultiheadAttention
_REPLACEMENTS[torch.nn.TransformerEncoderLayer] = TransformerEncoderLayer


def replace_modules(model: torch.nn.Module) -> int:
    """Swap every exact ``torch.nn.MultiheadAttention``, ``LayerNorm``, ``RMSNorm``, ``Softmax`` and
    ``TransformerEncoderLayer`` in ``model`` (itself included) for ours, in place; returns how many modules
    were swapped (a ``torch.nn.TransformerEncoderLayer`` counts 4: itself, ``self_attn``, ``norm1``, ``norm2``).

    The swap changes each module's class and nothing else, so parameters stay the very same tensors
    (device, dtype, an optimizer's references to them and hooks all survive). Subclasses of these torch
    classes (a user's own ``forward``) are left alone.

    When our kernels run: the swapped MultiheadAttention, LayerNorm, RMSNorm and Softmax run them in every
    mode (training, eval, ``no_grad``). A swapped ``TransformerEncoderLayer`` calls them in every mode too:
    torch's own layer, in eval mode under ``no_grad``, would pass its weights to one fused op
    (``torch._transformer_encoder_layer_fwd``) and skip its submodules. A ``torch.nn.TransformerEncoder``
    holding swapped layers gets ``use_nested_tensor = False`` (as if built with ``enable_nested_tensor=False``).
    Not covered: a subclass of ``TransformerEncoderLayer`` (not swapped) still takes torch's fast path in
    eval mode under ``no_grad``, and then our swapped submodules inside it do not run."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"replace_modules: model must be a torch.nn.Module, got {type(model).__name__}")
    swapped = 0
    for module in model.modules():
        ours = _REPLACEMENTS.get(type(module))
        if ours is not None:
            module.__class__ = ours
            swapped += 1
    for module in model.modules():
        if isinstance(module, torch.nn.TransformerEncoder) and \
                any(type(layer) is TransformerEncoderLayer for layer in module.layers):
            module.use_nested_tensor = False
    return swapped


# ----------------------------------------------------------------------------- gated feed-forward, rotary, losses


class SwiGLU(torch.nn.Module):
    """``F.silu(gate) * up`` (``fused_kernels.swiglu``); ``forward(gate_up)`` splits one concatenated tensor."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        return swiglu(gate, up)


class GEGLU(torch.nn.Module):
    """``F.gelu(gate, approximate=approximate) * up`` (``fused_kernels.geglu``)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GEGLU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        return geglu(gate, up, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


class GatedMLP(torch.nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: the feed-forward of Llama, Qwen, Mistral (``activation="silu"``)
    and Gemma (``"gelu_tanh"``), with their parameter names, so their state dicts load unchanged; the activation
    and product run as one ``swiglu`` / ``geglu`` kernel."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if activation not in GATED_ACTIVATIONS:
            raise ValueError(f"GatedMLP: activation must be one of {GATED_ACTIVATIONS}, got {activation!r}")
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.hidden_size, self.intermediate_size, self.activation = hidden_size, intermediate_size, activation
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation == "silu":
            return self.down_proj(swiglu(gate, up))
        return self.down_proj(geglu(gate, up, "tanh" if self.activation == "gelu_tanh" else "none"))


class RotaryEmbedding(torch.nn.Module):
    """cos / sin tables of rotary embeddings, as transformers' rotary modules return them: ``forward(x,
    position_ids)`` -> (cos, sin) of shape (*position_ids.shape, dim) in x's dtype (``fused_kernels.rope_cos_sin``:
    ``theta``, transformers' ``scaling`` dict, ``interleaved`` layout). No parameters or buffers."""

    def __init__(self, dim: int, theta: float = 10000.0, scaling: dict | None = None, *, interleaved: bool = False,
                 max_position_embeddings: int | None = None) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling = dim, float(theta), dict(scaling or {})
        self.interleaved, self.max_position_embeddings = interleaved, max_position_embeddings

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(position_ids, self.dim, self.theta, self.scaling, interleaved=self.interleaved,
                            max_position_embeddings=self.max_position_embeddings, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}, scaling={self.scaling or None}, interleaved={self.interleaved}"


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on ``fused_kernels.cross_entropy`` (the gradient computed with the loss, no
    ``log_softmax`` stored); class weights and probability targets run torch's own op."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing)


class LinearCrossEntropyLoss(torch.nn.Module):
    """``forward(input, weight, target, bias=None)`` = ``fused_kernels.linear_cross_entropy`` with the options given
    here: the output layer and the cross-entropy without the (N, V) logits."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None) -> None:
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap = z_loss, softcap

    def forward(self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(input, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")

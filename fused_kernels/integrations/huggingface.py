"""Run Hugging Face ``transformers`` models on our kernels.

    >>> from fused_kernels.integrations import huggingface
    >>> report = huggingface.apply(model)             # norms, rotary, gated MLP, attention, the LM loss
    >>> print(report)                                 # what was swapped, and what was kept and why

or attention alone:

    >>> name = huggingface.register()                 # "fused_kernels"
    >>> model.set_attn_implementation(name)           # or from_pretrained(..., attn_implementation=name)

``apply`` (on a loaded model, in place; parameters, state dict and optimizer references unchanged):

- norms: every ``nn.LayerNorm`` becomes ``fused_kernels.nn.LayerNorm``; the RMSNorm modules of Llama, Qwen2 / 3,
  Mistral, Phi-3 (``weight * x_hat``) and Gemma 2 / 3 (``(1 + weight) * x_hat``) run ``fused_kernels.rms_norm``;
- rotary: the modeling module's ``apply_rotary_pos_emb`` becomes ``fused_kernels.apply_rotary_pos_emb``
  (module-wide: every model of that family in the process, the same results);
- gated MLP: ``act(gate_proj(x)) * up_proj(x)`` (Llama, Qwen, Mistral, Gemma) and Phi-3's ``gate_up_proj`` run
  ``fused_kernels.swiglu`` / ``geglu`` (silu, tanh-approximated or exact GELU);
- attention: ``set_attn_implementation("fused_kernels")`` (``register``), logit soft-capping (Gemma 2) included;
- loss: a causal LM (``*ForCausalLM``, GPT-2's ``GPT2LMHeadModel``) called with ``labels`` computes its loss with
  ``fused_kernels.linear_cross_entropy`` from the final hidden states (Gemma's final-logit soft-cap, transformers'
  shift, ``ignore_index``, ``num_items_in_batch`` / ``shift_labels``), and BERT's / RoBERTa's ``*ForMaskedLM`` on
  the labelled positions only: the (B, L, vocab) logits are never materialized (``logits`` is None).
  Without labels the model runs as before.

Our function takes the place of transformers' ``sdpa`` one with the same semantics: the same 4-D
boolean masks (padding and causal, built by transformers' ``sdpa_mask``), the same top-left causal
rule, grouped-query attention without repeating key/value heads. ``transformers`` stays an optional
dependency: it is imported only by ``register``.

Packed (padding-free) batches, e.g. from ``transformers.DataCollatorWithFlattening``: one row of
concatenated sequences. Given transformers' FlashAttention keyword arguments ``cu_seq_lens_q``,
``cu_seq_lens_k``, ``max_length_q`` and ``max_length_k`` (``return_flash_attn_kwargs=True``), or only
``position_ids`` that restart at every sequence (what transformers' flash path falls back to), the call is
one ``fused_kernels.varlen_attention`` over the packed tokens, causal per sequence when the module is causal; the
4-D block-diagonal mask transformers built for the same batch is then not read.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

NAME = "fused_kernels"


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,            # (B, H, L, E)
    key: torch.Tensor,              # (B, Hkv, S, E)
    value: torch.Tensor,            # (B, Hkv, S, Ev)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface; returns ``((B, L, H, Ev) output, None)``."""
    from ..ops.attention import scaled_dot_product_attention

    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed = _packed_sequences(module, query, key, position_bias, kwargs)
    if packed is not None:
        return _varlen_forward(query, key, value, *packed, causal=bool(is_causal), dropout=dropout,
                               scale=scaling), None
    # As transformers' sdpa path: the causal flag only stands in for a mask that was not built.
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and kv_length > q_length:
        # Prefill into an empty static cache: the keys past the queries are all masked (top-left rule).
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    softcap = kwargs.get("softcap")
    if softcap is not None:     # Gemma 2: softcap * tanh(scores / softcap) before the mask, in the kernel
        from ..ops.attention import attention

        # bottom-right causal equals top-left here: is_causal is only set with as many keys as queries
        out = attention(query, key, value, causal=is_causal, attn_mask=attention_mask, scale=scaling,
                        dropout_p=dropout, softcap=float(softcap))
        return out.transpose(1, 2).contiguous(), None
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _packed_sequences(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      position_bias: torch.Tensor | None, kwargs: dict,
                      ) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) when this call is over packed sequences, else None.

    As transformers' ``_flash_attention_forward``: the four varlen kwargs when all are given, else
    ``position_ids`` of one row (batch 1, several queries, no cache) that restart somewhere. A sliding
    window or a position bias is only in the mask, so such calls keep the masked dense path, as do
    transformers' paged-cache calls (``block_table``)."""
    if position_bias is not None or getattr(module, "sliding_window", None) is not None:
        return None
    if kwargs.get("block_table") is not None:       # continuous batching's paged decode: not a packed batch
        return None
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    given = [kwargs.get(n) for n in names]
    if all(x is not None for x in given):
        cu_q, cu_k, max_q, max_k = given
        return cu_q, cu_k, int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1 or query.shape[2] <= 1 or key.shape[2] != query.shape[2]:
        return None
    pos = position_ids.reshape(-1)
    if pos.numel() != query.shape[2]:
        return None
    # Sequences restart at the smallest position id (not always 0: RoBERTa-like models start past the pad).
    starts = (pos == pos.min()).nonzero().view(-1)
    if starts.numel() <= 1:                                    # one sequence: the dense path is the same
        return None
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    max_len = int(cu.diff().max())
    return cu, cu, max_len, max_len


def _varlen_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                    cu_k: torch.Tensor, max_q: int, max_k: int, *, causal: bool, dropout: float,
                    scale: float | None) -> torch.Tensor:
    """query (1, H, total_q, E), key/value (1, Hkv, total_k, E/Ev) -> (1, total_q, H, Ev)."""
    # Imported per call, so a patched fused_kernels.varlen_attention (the tests' spy) is the one that runs.
    from .. import varlen_attention

    if query.shape[0] != 1:
        raise ValueError(f"{NAME}: packed sequences (cu_seq_lens_*) need one row of concatenated tokens, got a "
                         f"batch of {query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))      # (total, heads, head_dim) views
    out = varlen_attention(q, k, v, cu_q.to(q.device), cu_k.to(q.device), max_q, max_k, causal=causal,
                           scale=scale, dropout_p=dropout)
    return out[None]                                                    # (1, total_q, H, Ev)


def register(name: str = NAME) -> str:
    """Register our attention (and transformers' sdpa mask builder) under ``name``; returns ``name``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        if importlib.util.find_spec("transformers") is None:
            raise ImportError("fused_kernels.integrations.huggingface needs transformers: "
                              "pip install transformers") from err
        # installed but broken (a missing or mismatched dependency) or too old: the real error says which
        raise ImportError(f"fused_kernels.integrations.huggingface: transformers is installed but importing what "
                          f"it needs failed: {type(err).__name__}: {err}") from err
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


# ----------------------------------------------------------------------------- apply


_MARK = "_fused_kernels_report"


@dataclass
class Report:
    """What ``apply`` swapped in a model (kind -> descriptions) and what it kept (with the reason)."""

    model: str
    swapped: dict[str, list[str]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def add(self, kind: str, what: str) -> None:
        self.swapped.setdefault(kind, []).append(what)

    def count(self, kind: str) -> int:
        return len(self.swapped.get(kind, []))

    def __str__(self) -> str:
        lines = [f"fused_kernels.integrations.huggingface.apply({self.model}):"]
        for kind, items in self.swapped.items():
            names = sorted(set(items))
            lines.append(f"  {kind}: {len(items)} swapped ({', '.join(names)})")
        lines += [f"  kept: {why}" for why in self.kept]
        return "\n".join(lines)


def apply(model: torch.nn.Module, *, norms: bool = True, rotary: bool = True, mlp: bool = True,
          attention: bool = True, loss: bool = True) -> Report:
    """Swap, in a loaded transformers model and in place, the norms, rotary embeddings, gated MLPs, attention and
    the language-modelling loss for ours (see the module docstring); returns a ``Report`` of what was swapped
    (``print(report)``). Applying twice returns the first report and changes nothing."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply: model must be a torch.nn.Module, got {type(model).__name__}")
    previous = getattr(model, _MARK, None)
    if previous is not None:
        return previous
    report = Report(type(model).__name__)
    if norms:
        _swap_norms(model, report)
    if rotary:
        _swap_rotary(model, report)
    if mlp:
        _swap_mlps(model, report)
    if attention:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(register())
            report.add("attention", f"attn_implementation={NAME!r}")
        else:
            report.kept.append("attention: the model has no set_attn_implementation")
    if loss:
        _swap_loss(model, report)
    object.__setattr__(model, _MARK, report)
    return report


def _rms_norm_forward(module: torch.nn.Module, gemma: bool):
    """``forward`` of a transformers RMSNorm on ``fused_kernels.rms_norm``: Llama's ``weight * x_hat`` (in the
    promoted dtype of input and weight) or Gemma's ``(1 + weight) * x_hat`` (in the input's dtype)."""
    from ..ops.norms import rms_norm

    eps = float(module.eps if gemma else module.variance_epsilon)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w = module.weight
        if gemma:
            return rms_norm(hidden_states, w.shape, 1.0 + w.float(), eps).to(hidden_states.dtype)
        out_dtype = torch.promote_types(hidden_states.dtype, w.dtype)
        if w.dtype != hidden_states.dtype and w.dtype != torch.float32:
            w = w.to(hidden_states.dtype)
        return rms_norm(hidden_states, w.shape, w, eps).to(out_dtype)

    return forward


def _swap_norms(model: torch.nn.Module, report: Report) -> None:
    from ..nn import LayerNorm

    for name, module in model.named_modules():
        cls = type(module)
        if cls is torch.nn.LayerNorm:
            module.__class__ = LayerNorm
            report.add("norms", "LayerNorm -> fused_kernels.layer_norm")
        elif cls.__name__.endswith("RMSNorm") and cls.__module__.startswith("transformers.") and \
                isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1:
            gemma = cls.__name__.startswith("Gemma") and hasattr(module, "eps")
            if not gemma and not hasattr(module, "variance_epsilon"):
                report.kept.append(f"{name}: {cls.__name__} of an unknown form")
                continue
            module.forward = _rms_norm_forward(module, gemma)
            report.add("norms", f"{cls.__name__} -> fused_kernels.rms_norm")


def _swap_rotary(model: torch.nn.Module, report: Report) -> None:
    """Replace ``apply_rotary_pos_emb`` in the modeling modules of the model's attention layers."""
    from ..ops.rotary import apply_rotary_pos_emb

    seen = set()
    for module in model.modules():
        mod = sys.modules.get(type(module).__module__)
        if mod is None or mod.__name__ in seen or not mod.__name__.startswith("transformers.models."):
            continue
        seen.add(mod.__name__)
        original = getattr(mod, "apply_rotary_pos_emb", None)
        if original is None or original is apply_rotary_pos_emb:
            if original is apply_rotary_pos_emb:
                report.add("rotary", f"{mod.__name__}.apply_rotary_pos_emb (already)")
            continue
        params = list(inspect.signature(_underlying(original)).parameters)
        if params[:4] != ["q", "k", "cos", "sin"]:
            report.kept.append(f"{mod.__name__}.apply_rotary_pos_emb: signature {params}")
            continue
        mod.apply_rotary_pos_emb = apply_rotary_pos_emb
        report.add("rotary", f"{mod.__name__}.apply_rotary_pos_emb -> fused_kernels.apply_rotary_pos_emb")


def _underlying(fn: Any) -> Any:
    """The plain function behind transformers' hub-kernel wrapper (``use_kernel_forward_from_hub`` on a function
    makes an ``nn.Module`` whose ``forward`` calls it), or ``fn`` itself."""
    if isinstance(fn, torch.nn.Module):
        inner = inspect.getclosurevars(type(fn).forward).nonlocals.get("func")
        if callable(inner):
            return inner
    return fn


def _activation_kind(act: Any) -> str | None:
    """"silu", "gelu_tanh" or "gelu" for transformers' / torch's activation modules, else None."""
    name = type(act).__name__
    if name in ("SiLUActivation", "SiLU"):
        return "silu"
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation"):   # the tanh approximation, in C or Python
        return "gelu_tanh"
    if name == "GELUActivation":
        return "gelu"
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    return None


def _gated(kind: str):
    from ..ops.gated_mlp import geglu, swiglu

    if kind == "silu":
        return swiglu
    return lambda gate, up=None: geglu(gate, up, "tanh" if kind == "gelu_tanh" else "none")


def _swap_mlps(model: torch.nn.Module, report: Report) -> None:
    for name, module in model.named_modules():
        cls = type(module)
        if not cls.__name__.endswith("MLP"):
            continue
        linear = lambda n, m=module: isinstance(getattr(m, n, None), torch.nn.Linear)
        if linear("gate_proj") and linear("up_proj") and linear("down_proj"):
            kind = _activation_kind(getattr(module, "act_fn", None))
            if kind is None:
                report.kept.append(f"{name}: {cls.__name__} with activation {type(module.act_fn).__name__}")
                continue
            glu = _gated(kind)

            def forward(x, module=module, glu=glu):
                return module.down_proj(glu(module.gate_proj(x), module.up_proj(x)))
        elif linear("gate_up_proj") and linear("down_proj"):
            kind = _activation_kind(getattr(module, "activation_fn", None))
            if kind is None:
                report.kept.append(f"{name}: {cls.__name__} with activation {type(module.activation_fn).__name__}")
                continue
            glu = _gated(kind)

            def forward(x, module=module, glu=glu):
                return module.down_proj(glu(module.gate_up_proj(x)))     # (gate | up) split in the kernel
        else:
            continue
        module.forward = forward
        report.add("gated_mlp", f"{cls.__name__} -> fused_kernels.{'swiglu' if kind == 'silu' else 'geglu'}")


def _swap_loss(model: torch.nn.Module, report: Report) -> None:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name in ("GPT2LMHeadModel",):
        _causal_lm_loss(model, report)
    elif name in ("BertForMaskedLM", "RobertaForMaskedLM"):
        _masked_lm_loss(model, report)
    else:
        report.kept.append(f"loss: {name} has no language-modelling head this integration knows")


def _labels_of(signature: inspect.Signature, args: tuple, kwargs: dict) -> Any:
    try:
        return signature.bind_partial(*args, **kwargs).arguments.get("labels")
    except TypeError:
        return kwargs.get("labels")


def _drop_logits(out: Any, placeholder: Any) -> Any:
    if isinstance(out, tuple):
        return tuple(x for x in out if x is not placeholder)
    if hasattr(out, "logits"):
        out.logits = None
    return out


def _causal_lm_loss(model: torch.nn.Module, report: Report) -> None:
    """With labels: the LM head hands its input (the final hidden states) to the loss instead of multiplying it
    out; the loss is ``linear_cross_entropy`` with transformers' ``ForCausalLMLoss`` conventions."""
    from ..ops.cross_entropy import linear_cross_entropy

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or not hasattr(type(model), "loss_function"):
        report.kept.append(f"loss: {type(model).__name__} has no linear LM head and loss_function")
        return
    state: dict[str, Any] = {"capture": False, "hidden": None, "placeholder": None}
    head_forward = head.forward

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        if not state["capture"]:
            return head_forward(hidden)
        state["hidden"] = hidden
        state["placeholder"] = hidden.new_empty(*hidden.shape[:-1], 0)      # no logits: (B, L, 0)
        return state["placeholder"]

    cap = getattr(model.config, "final_logit_softcapping", None)
    original_loss = model.loss_function

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        hidden = state["hidden"]
        # logits computed elsewhere (not from our empty head output, nor from ops on it such as Gemma's final
        # soft-cap): transformers' own loss
        if hidden is None or logits.shape[-1] != 0:
            return original_loss(logits, labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if shift_labels is None:
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        reduction = "sum" if num_items_in_batch is not None else "mean"
        out = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                   shift_labels.reshape(-1).to(hidden.device), head.bias, ignore_index=ignore_index,
                                   reduction=reduction, softcap=cap,
                                   out_dtype=torch.promote_types(hidden.dtype, torch.float32))
        if reduction == "sum":
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(out.device)
            out = out / num_items_in_batch
        return out

    original_forward = model.forward
    signature = inspect.signature(original_forward)

    def forward(*args, **kwargs):
        if _labels_of(signature, args, kwargs) is None:
            return original_forward(*args, **kwargs)
        state.update(capture=True, hidden=None, placeholder=None)
        try:
            out = original_forward(*args, **kwargs)
            return _drop_logits(out, state["placeholder"])
        finally:
            state.update(capture=False, hidden=None, placeholder=None)

    head.forward = capture
    model.loss_function = loss_function
    model.forward = forward
    report.add("loss", f"{type(model).__name__} loss -> fused_kernels.linear_cross_entropy"
                       f"{' (softcap)' if cap else ''}, no logits with labels")


def _masked_lm_loss(model: torch.nn.Module, report: Report) -> None:
    """BERT / RoBERTa masked LM with labels: the encoder, the head's transform on the labelled positions only,
    and ``linear_cross_entropy`` against the decoder (the tied embedding and its bias)."""
    from transformers.modeling_outputs import MaskedLMOutput

    from ..ops.cross_entropy import linear_cross_entropy

    if type(model).__name__ == "BertForMaskedLM":
        encoder, head = model.bert, model.cls.predictions
        transform, decoder = head.transform, head.decoder
    else:
        encoder, head = model.roberta, model.lm_head
        decoder = head.decoder

        def transform(x):
            return head.layer_norm(F.gelu(head.dense(x)))
    original_forward = model.forward
    signature = inspect.signature(original_forward)

    def forward(*args, **kwargs):
        labels = _labels_of(signature, args, kwargs)
        if labels is None:
            return original_forward(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = {k: v for k, v in bound.arguments.items() if k not in ("labels", "kwargs", "return_dict")}
        inputs.update(bound.arguments.get("kwargs", {}))
        outputs = encoder(**inputs, return_dict=True)
        seq = outputs.last_hidden_state
        flat = labels.reshape(-1).to(seq.device)
        picked = (flat != -100).nonzero().squeeze(1)                        # the labelled positions
        h = transform(seq.reshape(-1, seq.shape[-1]).index_select(0, picked))
        out = linear_cross_entropy(h, decoder.weight, flat.index_select(0, picked), decoder.bias,
                                   out_dtype=torch.promote_types(h.dtype, torch.float32))
        return MaskedLMOutput(loss=out, logits=None, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)

    model.forward = forward
    report.add("loss", f"{type(model).__name__} loss -> fused_kernels.linear_cross_entropy on the labelled "
                       f"positions, no logits with labels")

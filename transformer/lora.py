"""Parameter-efficient fine-tuning for any model here (GPT, BERT, ViT, EncoderDecoder) or any torch module.

LoRA (Hu et al., 2021): a frozen linear layer ``W`` learns a low-rank update, ``y = W x + (alpha / r) B A x``
with ``A`` (r, in) and ``B`` (out, r); ``B`` starts at zero, so the wrapped model is exactly the original
until it trains. Only ``A`` and ``B`` train: r * (in + out) parameters per layer instead of in * out.
After training, ``merge_lora`` folds ``B A alpha / r`` into ``W`` so inference costs nothing extra.

BitFit (Ben Zaken et al., 2021): train only the bias terms; the non-linearities after them make
shifting the biases alone surprisingly effective.

    report = apply_lora(model, r=8, alpha=16)          # wraps attention projections, freezes the rest
    ... train ...
    save_lora(model, "adapter.safetensors")            # only the adapter weights
    load_lora(other_wrapped_model, "adapter.safetensors")
    merge_lora(model)                                  # fold into the base weights for inference

Names follow PEFT: a wrapped layer keeps its original as ``<name>.base_layer`` and adds ``<name>.lora_A``
and ``<name>.lora_B``, so adapter keys read ``<name>.lora_A.weight`` / ``<name>.lora_B.weight``.

The default targets are the attention projections of ``transformer.layers.Attention`` (``qkv_proj``,
``q_proj``, ``kv_proj``, ``out_proj``), which every model here is built from; add the feed-forward
with ``target_modules=("qkv_proj", "q_proj", "kv_proj", "out_proj", "fc1", "fc2")``.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Iterable

import torch
from torch import nn

DEFAULT_TARGET_MODULES = ("qkv_proj", "q_proj", "kv_proj", "out_proj")

TargetModules = str | re.Pattern | Iterable[str | re.Pattern]


class LoRALinear(nn.Module):
    """``base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / r`` around a frozen ``nn.Linear``.

    ``A`` is initialised kaiming-uniform (a = sqrt(5), as PEFT and ``nn.Linear`` do), ``B`` to zero.
    ``merge()`` adds the update to the base weight (the forward then runs the base layer alone);
    ``unmerge()`` subtracts it again."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # The base layer's attributes, for code that reads them off the layer it built.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update ``B @ A * alpha / r``, (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)                                             # (..., out)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling     # A x: (..., r)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """{"trainable", "total", "percent"}: parameters with ``requires_grad``, all parameters (a tied
    tensor counted once), and the trainable share in percent."""
    params = list(model.parameters())                   # deduplicated: tied weights appear once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}


def _report(model: nn.Module, verbose: bool, **extra) -> dict:
    counts = {**parameter_counts(model), **extra}
    if verbose:
        print(f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} "
              f"|| trainable%: {counts['percent']:.4f}")
    return counts


def _matcher(target_modules: TargetModules | None):
    """A predicate on qualified module names. Strings match a name that equals them, ends with
    ``"." + pattern`` (PEFT's suffix rule), or matches them as a glob (``fnmatch``: ``"blocks.0.*"``);
    compiled regular expressions must match the whole name."""
    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES
    if isinstance(target_modules, (str, re.Pattern)):
        target_modules = (target_modules,)
    patterns = list(target_modules)
    if not patterns:
        raise ValueError("apply_lora: target_modules is empty")

    def match(name: str) -> bool:
        for p in patterns:
            if isinstance(p, re.Pattern):
                if p.fullmatch(name):
                    return True
            elif name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p):
                return True
        return False

    return match, patterns


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> ``LoRALinear`` for every LoRA layer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: TargetModules | None = None, verbose: bool = False) -> dict:
    """Wrap every ``nn.Linear`` whose qualified name matches ``target_modules`` (default: the attention
    projections ``qkv_proj``, ``q_proj``, ``kv_proj``, ``out_proj``) in a ``LoRALinear``, in place, and
    freeze every parameter except the new ``lora_A`` / ``lora_B``.

    Returns ``{"trainable", "total", "percent", "modules"}`` (the counts after wrapping, adapters
    included in the total, and the wrapped names); ``verbose`` also prints them. Layers already wrapped
    are left alone, so calling it again with other targets adds adapters there. To train a new task
    head as well, set its ``requires_grad`` back to True afterwards (it is not part of the adapter file)."""
    match, patterns = _matcher(target_modules)
    inside_lora = {id(sub) for m in lora_layers(model).values() for sub in m.modules()}   # no LoRA of a LoRA
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and id(m) not in inside_lora and match(name)]
    if not targets:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside_lora]
        raise ValueError(f"apply_lora: no nn.Linear matches target_modules {patterns}; "
                         f"linear layers in the model: {linear[:20]}{' ...' if len(linear) > 20 else ''}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, r=r, alpha=alpha, dropout=dropout))
    for m in lora_layers(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return _report(model, verbose, modules=[name for name, _ in targets])


def merge_lora(model: nn.Module) -> int:
    """Fold ``B @ A * alpha / r`` into each LoRA layer's base weight (idempotent); returns how many
    layers were merged now. The merged model computes the same function without the extra matmuls."""
    layers = [m for m in lora_layers(model).values() if not m.merged]
    for m in layers:
        m.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo ``merge_lora`` (subtract the update again, up to rounding); returns how many layers."""
    layers = [m for m in lora_layers(model).values() if m.merged]
    for m in layers:
        m.unmerge()
    return len(layers)


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain ``nn.Linear`` layers back in place of the LoRA layers, with the update merged into the
    weights (``merge=True``) or discarded; the state-dict keys are the original model's again.
    Does not change ``requires_grad``."""
    for name, m in lora_layers(model).items():
        if merge:
            m.merge()
        else:
            m.unmerge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base_layer)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone: ``{"<name>.lora_A.weight": (r, in), "<name>.lora_B.weight": (out, r)}``."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("lora_state_dict: the model has no LoRA layers (call apply_lora first)")
    out = {}
    for name, m in layers.items():
        prefix = f"{name}." if name else ""
        out[f"{prefix}lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{prefix}lora_B.weight"] = m.lora_B.weight.detach()
    return out


def save_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``lora_state_dict(model)`` to a safetensors file, and nothing else (no metadata: the rank
    is in the shapes; alpha and the target names are the caller's to record)."""
    from safetensors.torch import save_file  # installed with transformers; only needed here

    save_file({k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}, os.fspath(path))


def load_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Load adapter weights saved by ``save_lora`` into a model wrapped the same way (same targets and
    rank). Keys and shapes are checked first: any missing, unexpected or mis-shaped entry raises, naming
    them all, before anything is written. Merged layers are unmerged, loaded and merged again."""
    from safetensors.torch import load_file

    loaded = load_file(os.fspath(path))
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = [f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in loaded and loaded[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = [f"{what}: {items}" for what, items in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
        raise ValueError(f"load_lora: {os.fspath(path)} does not match the model's LoRA layers; " + "; ".join(problems))
    for name, m in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        was_merged = m.merged
        m.unmerge()
        with torch.no_grad():
            m.lora_A.weight.copy_(loaded[f"{prefix}lora_A.weight"])
            m.lora_B.weight.copy_(loaded[f"{prefix}lora_B.weight"])
        if was_merged:
            m.merge()


def apply_bitfit(model: nn.Module, verbose: bool = False) -> dict:
    """Freeze every parameter except the bias terms (attention, feed-forward, norm, and any other
    ``bias``); returns ``{"trainable", "total", "percent", "parameters"}``, the last the trainable names."""
    names = []
    for name, p in model.named_parameters():
        is_bias = name.rpartition(".")[2] == "bias"
        p.requires_grad_(is_bias)
        if is_bias:
            names.append(name)
    if not names:
        raise ValueError("apply_bitfit: the model has no bias parameters to train")
    return _report(model, verbose, parameters=names)

"""Drop-in replacements for ``torch.nn`` modules, running our kernels.

Each subclasses its ``torch.nn`` counterpart and overrides only ``forward``: constructor, attributes,
``state_dict`` keys and ``isinstance`` checks are torch's own, so a torch state dict loads unchanged.
"""

from __future__ import annotations

import torch

from .layer_norm import layer_norm, rms_norm
from .softmax import softmax


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


def replace_modules(model: torch.nn.Module) -> int:
    """Swap every ``torch.nn.LayerNorm``, ``RMSNorm`` and ``Softmax`` in ``model`` (itself included)
    for ours, in place; returns how many were swapped.

    The swap changes each module's class and nothing else, so parameters stay the very same tensors
    (device, dtype, an optimizer's references to them and hooks all survive)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"replace_modules: model must be a torch.nn.Module, got {type(model).__name__}")
    swapped = 0
    for module in model.modules():
        ours = _REPLACEMENTS.get(type(module))
        if ours is not None:
            module.__class__ = ours
            swapped += 1
    return swapped

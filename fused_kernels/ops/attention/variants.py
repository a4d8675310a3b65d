"""Validation and normalization of attention's variants (window, ALiBi, softcap, documents, prefix-LM, user
score/mask mods), plus the torch helpers that the PyTorch path evaluates them with. See the score pipeline in
``fused_kernels.attention``'s docstring: softcap, alibi, float attn_mask (added by the caller), score_mod."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..._core import checks as _checks

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class Variants:
    window: tuple[int, int] | None = None
    alibi_slopes: torch.Tensor | None = None       # (B, H) float32
    softcap: float | None = None
    q_ids: torch.Tensor | None = None              # (B, L)
    k_ids: torch.Tensor | None = None              # (B, S)
    prefix_lengths: torch.Tensor | None = None     # (B,)
    score_mod: Any = None
    score_mod_grad: Any = None
    mask_mod: Any = None
    mod_args: tuple = ()
    block_mask: Any = None
    causal: bool = False
    off: int | torch.Tensor = 0     # S - L, or per row (B, 1, 1, 1) seqlens_k[b] - L (``row_offsets``)

    @property
    def is_builtin(self) -> bool:
        """Only built-in variants (no user mod, mod_args or block_mask): expressible as custom-op arguments."""
        return self.score_mod is None and self.mask_mod is None and not self.mod_args and self.block_mask is None

    def _call(self, name: str, mod: Any, *args: Any) -> Any:
        fn = getattr(mod, "fn", mod)
        try:
            return fn(*args, self.mod_args) if self.mod_args else fn(*args)
        except Exception as e:  # the body runs on torch tensors here, not in a kernel
            raise TypeError(torch_path_mod_error("attention", name, fn, e)) from e

    def _idx(self, b: int, h: int, l: int, s: int, device: torch.device):
        ar = lambda n: torch.arange(n, device=device, dtype=torch.int64)  # noqa: E731
        return (ar(b).view(b, 1, 1, 1), ar(h).view(1, h, 1, 1), ar(l).view(1, 1, l, 1), ar(s).view(1, 1, 1, s))

    def keep(self, b: int, h: int, l: int, s: int, device: torch.device) -> torch.Tensor | None:
        """Bool broadcastable to (B, H, L, S) of the variants' masks (window, prefix, documents, mask_mod)."""
        bi, hi, i, j = self._idx(b, h, l, s, device)
        keep = None

        def a(m):
            nonlocal keep
            keep = m if keep is None else keep & m
        if self.window is not None:
            left, right = self.window
            if left != -1:
                a(j >= i + self.off - left)
            if right != -1:
                a(j <= i + self.off + right)
        if self.prefix_lengths is not None:
            a((j <= i + self.off) | (j < self.prefix_lengths.to(device).view(b, 1, 1, 1)))
        if self.q_ids is not None:
            a(self.q_ids.view(b, 1, l, 1) == self.k_ids.view(b, 1, 1, s))
        if self.mask_mod is not None:
            m = self._call("mask_mod", self.mask_mod, bi, hi, i, j)
            a(torch.as_tensor(m, device=device).to(torch.bool))
        return keep

    def pre_scores(self, x: torch.Tensor) -> torch.Tensor:
        """softcap then alibi on the scaled scores x (B, H, L, S): before the float attn_mask."""
        b, h, l, s = x.shape
        if self.softcap is not None:
            x = self.softcap * torch.tanh(x / self.softcap)
        if self.alibi_slopes is not None:
            _, _, i, j = self._idx(b, h, l, s, x.device)
            x = x - self.alibi_slopes.to(x.dtype).view(b, h, 1, 1) * (i + self.off - j).abs().to(x.dtype)
        return x

    def post_scores(self, x: torch.Tensor) -> torch.Tensor:
        """score_mod on the scores after the float attn_mask."""
        if self.score_mod is None:
            return x
        b, h, l, s = x.shape
        bi, hi, i, j = self._idx(b, h, l, s, x.device)
        return self._call("score_mod", self.score_mod, x, bi, hi, i, j)

    def scores(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The whole pipeline on scaled scores: softcap, alibi, + float mask, score_mod."""
        x = self.pre_scores(x)
        if mask is not None and mask.dtype != torch.bool:
            x = x + mask.to(x.dtype)
        return self.post_scores(x)


def torch_path_mod_error(op: str, name: str, fn: Any, err: Exception) -> str:
    """One line for a user mod whose Python body failed on the PyTorch path: which mod, why, and the way out.
    A mod that calls ``tl.*`` (``tl.load`` of a table, ...) can only run inside a kernel, and this path calls its
    Python body on torch index tensors instead."""
    why = (str(err).strip().splitlines() or [""])[0]
    return (f"{op}: {name} {getattr(fn, '__name__', fn)!r} cannot run on the PyTorch path ({type(err).__name__}: "
            f"{why}): there its Python body runs on int64 torch index tensors, which works for a mod written with "
            f"operators only (no tl.* calls); to run it as written use a CUDA device or set TRITON_INTERPRET=1 "
            f"before importing fused_kernels")


def row_offsets(offset: int, seqlens_k: torch.Tensor, s: int) -> torch.Tensor:
    """(B, 1, 1, 1) int64 bottom-right offsets per row, ``offset + seqlens_k[b] - S`` with seqlens_k clamped to
    [0, S] as the kernels read it: with ``offset = S - L``, query i of row b sits at seqlens_k[b] - L + i, at
    the end of its own valid keys (a padded KV cache), as varlen and paged attention align each sequence."""
    # copy=True: a new tensor even from int64 ones (aten.to returning its input breaks the custom ops' schema)
    return (seqlens_k.to(torch.int64, copy=True).clamp(0, s) + (offset - s)).view(-1, 1, 1, 1)


def _tensor(op: str, name: str, t: object, q: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an int tensor of shape {shape}, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise _checks.ArgumentTypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise _checks.ArgumentValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != q.device:
        raise _checks.ArgumentValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    return t


def _check_mod(op: str, name: str, mod: object, nparams: int, has_args: bool) -> None:
    import triton
    from triton.runtime.interpreter import InterpretedFunction  # what triton.jit makes under TRITON_INTERPRET=1
    if not isinstance(mod, (triton.JITFunction, InterpretedFunction)) or not callable(getattr(mod, "fn", None)):
        raise TypeError(f"{op}: {name} must be a @triton.jit function, got {type(mod).__name__}")
    want = nparams + (1 if has_args else 0)
    got = len(inspect.signature(mod.fn).parameters)
    if got != want:
        params = ["score", "b", "h", "q_idx", "kv_idx"][5 - nparams:] + (["args"] if has_args else [])
        raise _checks.ArgumentValueError(f"{op}: {name} must take {want} parameters ({', '.join(params)}), "
                                         f"got {got}")


def check_variants(op: str, q: torch.Tensor, k: torch.Tensor, causal: bool, window: object, alibi_slopes: object,
                   softcap: object, document_ids: object, prefix_lengths: object, score_mod: object,
                   score_mod_grad: object, mask_mod: object, mod_args: object, block_mask: object) -> Variants | None:
    """Validated, normalized variants; None when every variant is off."""
    b, h, l, _ = q.shape
    s = k.shape[2]
    win = None
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise _checks.ArgumentValueError(f"{op}: window must be a pair (left, right) of ints >= -1, got "
                                             f"{window!r}")
        for side in window:
            if not isinstance(side, int) or isinstance(side, bool):
                raise TypeError(f"{op}: window sides must be ints >= -1, got {window!r}")
            if side < -1:
                raise _checks.ArgumentValueError(f"{op}: window sides must be >= -1 (-1 = unbounded), got {window!r}")
        left, right = int(window[0]), int(window[1])
        if causal:
            right = 0
        if (left, right) != (-1, -1) and not (causal and left == -1):   # causal with (-1, .) is plain causal
            win = (left, right)
    slopes = None
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"{op}: alibi_slopes must be a float32 tensor ({h},) or ({b}, {h}), got "
                            f"{type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise _checks.ArgumentTypeError(f"{op}: alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((h,), (b, h)):
            raise _checks.ArgumentValueError(f"{op}: alibi_slopes must have shape ({h},) or ({b}, {h}), got "
                                             f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise _checks.ArgumentValueError(f"{op}: alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
        slopes = alibi_slopes.expand(b, h)
    cap = None
    if softcap is not None:
        if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
            raise TypeError(f"{op}: softcap must be a float >= 0 or None, got {type(softcap).__name__}")
        if not softcap >= 0:
            raise _checks.ArgumentValueError(f"{op}: softcap must be >= 0 (0.0 or None: off), got {softcap!r}")
        cap = float(softcap) or None    # 0.0 is off, as FlashAttention's softcap=0.0 (and dropout_p=0.0)
    q_ids = k_ids = None
    if document_ids is not None:
        if isinstance(document_ids, (tuple, list)):
            if len(document_ids) != 2:
                raise _checks.ArgumentValueError(f"{op}: document_ids must be a tensor (B, S) or a pair (q_ids, "
                                                 f"k_ids), got {len(document_ids)} items")
            q_ids = _tensor(op, "document_ids[0] (q_ids)", document_ids[0], q, (b, l))
            k_ids = _tensor(op, "document_ids[1] (k_ids)", document_ids[1], q, (b, s))
        else:
            if isinstance(document_ids, torch.Tensor) and l != s:
                raise _checks.ArgumentValueError(f"{op}: document_ids as one tensor needs L == S (got L {l}, S {s}); "
                                                 f"pass the pair (q_ids (B, L), k_ids (B, S))")
            q_ids = k_ids = _tensor(op, "document_ids", document_ids, q, (b, s))
    if prefix_lengths is not None:
        prefix_lengths = _tensor(op, "prefix_lengths", prefix_lengths, q, (b,))
        if not causal:
            raise _checks.ArgumentValueError(f"{op}: prefix_lengths needs causal=True")
        if win is not None:
            raise _checks.ArgumentValueError(f"{op}: prefix_lengths and window are not combinable")
    if not isinstance(mod_args, (tuple, list)):
        raise TypeError(f"{op}: mod_args must be a tuple of tensors, got {type(mod_args).__name__}")
    mod_args = tuple(mod_args)
    for i, t in enumerate(mod_args):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: mod_args[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise _checks.ArgumentValueError(f"{op}: mod_args[{i}] is on {t.device} but q is on {q.device}")
    for name, mod, n in (("score_mod", score_mod, 5), ("score_mod_grad", score_mod_grad, 5), ("mask_mod", mask_mod, 4)):
        if mod is not None:
            _check_mod(op, name, mod, n, bool(mod_args))
    if score_mod is not None and score_mod_grad is None and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad):
        raise _checks.ArgumentValueError(f"{op}: score_mod needs score_mod_grad (d score_mod / d score) when a "
                                         f"gradient is wanted (q/k/v require grad)")
    if all(x is None for x in (win, slopes, cap, q_ids, prefix_lengths, score_mod, mask_mod)):
        return None
    return Variants(win, slopes, cap, q_ids, k_ids, prefix_lengths, score_mod, score_mod_grad, mask_mod, mod_args,
                    block_mask, causal, s - l)

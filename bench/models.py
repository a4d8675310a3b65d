"""Model-level benchmarks: a GPT-2 124M training step (bf16, seq 1024) in tokens/s and peak memory, and
BERT-base / ViT-B/16 inference, each on our kernels and on torch SDPA + torch LayerNorm, eager and
``torch.compile``d.

The baseline is the same model object with the same weights: ``torch_ops()`` swaps the functions the
models call (``fused_kernels.attention``, ``fused_kernels.add_layer_norm`` and the ``layer_norm`` behind
``fused_kernels.nn.LayerNorm``) for ``F.scaled_dot_product_attention`` and ``F.layer_norm`` with the same
semantics: plain torch modules, with none of our code on the path. (``fused_kernels.use_backend("torch")`` runs
our PyTorch path, which is what is compared with this baseline on the CPU.)

Precision: weights, activations and optimizer state in bf16 (``model.to(torch.bfloat16)``). torch.autocast
does not work with these models today: ``add_layer_norm`` requires the residual (fp32 under autocast) and
the sublayer output (bf16) to share a dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import fused_kernels
import fused_kernels.nn
from bench.attention import ours_context
from bench.harness import REGISTRY, Case, Env, Prepared, Unsupported, cuda_only
from fused_kernels.reference import causal_mask

FAMILY = "model"


# ----------------------------------------------------------------------------- the torch baseline


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   attn_mask: torch.Tensor | None = None, seqlens_k: torch.Tensor | None = None,
                   scale: float | None = None, dropout_p: float = 0.0,
                   return_lse: bool = False) -> torch.Tensor:
    """``fused_kernels.attention``'s semantics on ``F.scaled_dot_product_attention`` (bottom-right causal)."""
    if return_lse:
        raise NotImplementedError("the SDPA baseline does not return the log-sum-exp")
    l, s = q.shape[2], k.shape[2]
    keep: torch.Tensor | None = None
    if seqlens_k is not None:
        keep = (torch.arange(s, device=q.device) < seqlens_k[:, None])[:, None, None, :]
    is_causal = causal and l == s and attn_mask is None and keep is None
    if causal and not is_causal:
        if seqlens_k is None:
            c = causal_mask(l, s, q.device, bottom_right=True)
        else:   # bottom-right per row: query i of row b at seqlens_k[b] - L + i
            last = torch.arange(l, device=q.device)[:, None] + (seqlens_k.to(q.device) - l).view(-1, 1, 1, 1)
            c = torch.arange(s, device=q.device) <= last
        keep = c if keep is None else keep & c
    mask = attn_mask
    if keep is not None:
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
    kw = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, **kw)


def torch_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5,
                         dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_kernels.add_layer_norm`` as separate torch ops: dropout, residual add, ``F.layer_norm``."""
    r = F.dropout(x, dropout_p) if dropout_p > 0 else x
    if residual is not None:
        r = residual + r
    return F.layer_norm(r, (x.shape[-1],), weight, bias, eps), r


def torch_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids=None,
               unsqueeze_dim: int = 1, *, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Llama ``apply_rotary_pos_emb`` (rotate-half; the first cos.shape[-1] dims, the rest passed)."""
    if interleaved:
        raise NotImplementedError("the torch baseline is the rotate-half form")
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xr = x[..., :rot]
        half = torch.cat((-xr[..., rot // 2:], xr[..., :rot // 2]), dim=-1)
        out = xr * cos + half * sin
        return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), dim=-1)
    return rotate(q), rotate(k)


def torch_swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.silu(gate) * up


def torch_linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The unfused form: the (N, V) logits, then ``F.cross_entropy`` (z-loss / soft-cap as plain ops)."""
    logits = F.linear(input, weight, bias).reshape(-1, weight.shape[0])
    if out_dtype is not None:
        logits = logits.to(out_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    t = target.reshape(-1)
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        valid = t != ignore_index
        zl = (z_loss * torch.logsumexp(logits, -1) ** 2).masked_fill(~valid, 0.0)
        loss = loss + (zl if reduction == "none" else zl.sum() / valid.sum() if reduction == "mean" else zl.sum())
    return loss.reshape(target.shape) if reduction == "none" else loss


@contextlib.contextmanager
def torch_ops() -> Iterator[None]:
    """Run the models on plain torch ops: SDPA, ``F.layer_norm`` / ``F.rms_norm``, transformers' rotary formula,
    ``F.silu(gate) * up`` and the (N, V) logits + ``F.cross_entropy``. Swaps the module attributes the models
    look up at call time."""
    saved = (fused_kernels.attention, fused_kernels.add_layer_norm, fused_kernels.nn.layer_norm,
             fused_kernels.rms_norm, fused_kernels.nn.rms_norm, fused_kernels.apply_rotary_pos_emb,
             fused_kernels.nn.swiglu, fused_kernels.linear_cross_entropy)
    fused_kernels.attention, fused_kernels.add_layer_norm = sdpa_attention, torch_add_layer_norm
    fused_kernels.nn.layer_norm = F.layer_norm
    fused_kernels.rms_norm = fused_kernels.nn.rms_norm = F.rms_norm
    fused_kernels.apply_rotary_pos_emb, fused_kernels.nn.swiglu = torch_rope, torch_swiglu
    fused_kernels.linear_cross_entropy = torch_linear_cross_entropy
    try:
        yield
    finally:
        (fused_kernels.attention, fused_kernels.add_layer_norm, fused_kernels.nn.layer_norm, fused_kernels.rms_norm,
         fused_kernels.nn.rms_norm, fused_kernels.apply_rotary_pos_emb, fused_kernels.nn.swiglu,
         fused_kernels.linear_cross_entropy) = saved


# ----------------------------------------------------------------------------- grids


def cases(env: Env) -> list[Case]:
    if env.is_cuda:
        specs = [("gpt2", "train", "gpt2", dict(B=8, L=1024)),
                 ("bert-base", "infer", "bert-base", dict(B=32, L=512, padded=True)),
                 ("vit-b16", "infer", "vit-b16", dict(B=64, L=197))]
    else:
        specs = [("gpt2", "train", "tiny", dict(B=2, L=32)),
                 ("bert-base", "infer", "tiny", dict(B=2, L=32, padded=True)),
                 ("vit-b16", "infer", "tiny", dict(B=2, L=17))]
    out = []
    for op, mode, preset, shape in specs:
        skip = {}
        if env.quick and env.is_cuda:
            for p in ("ours-compile", "torch-compile"):
                skip[p] = "quick run: whole-model torch.compile skipped (compile time)"
        out.append(Case(FAMILY, op, mode, "model", "bf16", dict(preset=preset, **shape), "tokens_per_s",
                        tokens=shape["B"] * shape["L"], skip=skip))
    return out


# ----------------------------------------------------------------------------- building and running


def _build_model(case: Case, env: Env) -> tuple[torch.nn.Module, Callable[[], object], Callable[[], torch.Tensor]]:
    """The model, its timed call and its output for the agreement check (same seed: same weights)."""
    from transformer import BERT, GPT, BERTConfig, GPTConfig, ViT, ViTConfig

    torch.manual_seed(0)
    sh, dev, dtype = case.shape, env.device, torch.bfloat16
    b, l = sh["B"], sh["L"]
    if case.op == "gpt2":
        cfg = GPTConfig.from_preset(sh["preset"], max_seq_len=max(l, 64))
        model = GPT(cfg).to(dev, dtype).train()
        ids = torch.randint(0, cfg.vocab_size, (b, l), device=dev)
        # fused AdamW: one kernel for every parameter on CUDA, as a real training loop would use.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=env.is_cuda)

        def step() -> object:
            opt.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            return None

        def output() -> torch.Tensor:
            # Dropout makes training outputs random: compare in eval mode. The first 16 positions only:
            # the reference is kept while the other providers run and would inflate their peak memory.
            model.eval()
            try:
                return model(ids).logits[:, :16]
            finally:
                model.train()
        return model, step, output
    if case.op == "bert-base":
        cfg = BERTConfig.from_preset(sh["preset"], max_seq_len=max(l, 64))
        model = BERT(cfg).to(dev, dtype).eval()
        ids = torch.randint(1, cfg.vocab_size, (b, l), device=dev)
        g = torch.Generator().manual_seed(0)
        lens = torch.randint(l // 2, l + 1, (b,), generator=g).to(dev)
        mask = (torch.arange(l, device=dev) < lens[:, None]).long()

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return model(ids, attention_mask=mask).last_hidden_state

        def valid() -> torch.Tensor:
            # padded positions carry meaningless outputs: compare the real tokens only
            return run()[mask.bool()]
        return model, run, valid
    if case.op == "vit-b16":
        cfg = ViTConfig.from_preset(sh["preset"])
        model = ViT(cfg).to(dev, dtype).eval()
        if (cfg.image_size // cfg.patch_size) ** 2 + 1 != l:
            raise Unsupported(f"ViT preset {sh['preset']!r} gives {(cfg.image_size // cfg.patch_size) ** 2 + 1} "
                              f"tokens, not {l}")
        pixels = torch.randn(b, cfg.num_channels, cfg.image_size, cfg.image_size, device=dev, dtype=dtype)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return model(pixels).logits
        return model, run, run
    raise Unsupported(f"unknown model {case.op!r}")


def _provider(ours: bool, compiled: bool) -> Callable[[Case, Env], Prepared]:
    def build(case: Case, env: Env) -> Prepared:
        context = ours_context(env) if ours else torch_ops
        # Peak memory is counted from here: this model's weights, gradients, optimizer state and
        # activations, not whatever earlier measurements left allocated.
        base = torch.cuda.memory_allocated() if env.is_cuda else 0
        with context():
            model, fn, output = _build_model(case, env)
        if compiled:
            from torch import _dynamo
            _dynamo.reset()
            model.forward = torch.compile(model.forward)     # the step still runs backward and the optimizer

        def before() -> None:
            if env.is_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def extra() -> dict:
            if not env.is_cuda:
                return {"peak_mem_gb": None}
            return {"peak_mem_gb": (torch.cuda.max_memory_allocated() - base) / 1e9}

        impl = ("triton" if env.is_cuda else "fast_torch") if ours else "sdpa+F.layer_norm"
        return Prepared(fn, output, [], context=context, impl=impl + (" (torch.compile)" if compiled else ""),
                        extra=extra, before=before)
    return build


_COMPILE_CPU = "torch.compile skipped on the CPU run (compile time; the CPU run only tests the harness)"

REGISTRY.register(FAMILY, "ours", _provider(True, False))
REGISTRY.register(FAMILY, "ours-compile", _provider(True, True), cuda_only(_COMPILE_CPU))
REGISTRY.register(FAMILY, "torch-sdpa", _provider(False, False))
REGISTRY.register(FAMILY, "torch-sdpa-compile", _provider(False, True), cuda_only(_COMPILE_CPU))

"""Attention benchmarks: the FlashAttention grid, BERT and ViT shapes, and decoding.

Grids (GPU; ``--quick`` takes a subset, the CPU tiny shapes):
- standard: batch x seq = 16k tokens, hidden 2048 (H = 2048 / D), seq 512..16k, head dim 64/128/256,
  causal and not, bf16/fp16, forward and forward+backward: the grid FlashAttention's papers report.
- bert: seq 128 / 512, 12 heads of 64, every sequence padded (key lengths drawn in [S/2, S], passed to
  ours as ``seqlens_k`` and to the others as a (B, 1, 1, S) key-padding mask).
- vit: 197 and 577 tokens (ViT-B/16 at 224 and 384 px), 12 heads of 64, not causal.
- decode: one query over a KV cache of 1k..32k keys, batch 1..64, Llama-3-8B heads (32 query heads,
  8 key/value heads, D 128): judged in GB/s of KV cache read.
- paged: the same decoding over a paged KV cache (``fused_kernels.paged_attention``, 16-position blocks in shuffled
  physical order), the sequences of a batch of different lengths (drawn in [S/8, S]); judged in GB/s of the
  valid keys/values read. The baselines attend over the same sequences gathered into a dense padded cache
  (what a non-paged server would hold): ours ("ours-dense", ``seqlens_k``) and SDPA with a key-padding mask.
- varlen: packed variable-length self-attention (``fused_kernels.varlen_attention``, one launch over every
  sequence) of B sequences whose lengths spread log-uniformly over [S/32, S] (``varlen_lengths``), against the
  same sequences padded to S: our dense kernel with the key lengths ("ours-dense", ``seqlens_k``) and SDPA with
  a key-padding mask. Only the valid tokens' work counts (4*H*D*sum(len^2)); outputs are compared on the valid
  query rows. GPU cases (Llama-like 32 heads of 128, bf16, 16k tokens of padding capacity) and one tiny CPU case.
- variants: causal attention with one variant each (``VARIANTS``): a sliding window of 1024 keys, ALiBi, a
  softcap of 50, packed documents of mixed lengths (``document_lengths``) and a prefix-LM prefix
  (``prefix_lengths``); bf16, 16k tokens, 16 heads of 128, L 4k / 16k. Ours takes the variant's argument;
  FlexAttention gets the same mask as a ``mask_mod`` with a ``BlockMask`` (built once per case) and ALiBi /
  softcap as a ``score_mod``; flash-attn 2 its ``window_size`` / ``alibi_slopes`` / ``softcap``
  (no documents outside varlen, no prefix-LM); SDPA the mask materialized (bool, or a float bias for
  ALiBi; no softcap). Only the unmasked (query, key) pairs count: 4*H*D*pairs.

FLOPs (FlashAttention's convention): forward 4*B*H*L*S*D (two matmuls, 2 FLOPs per multiply-add),
halved when causal; backward 2.5x forward (five matmuls instead of two), so forward+backward is 3.5x.
With padding only the valid keys count: 4*H*D*L*sum(seqlens_k). Every provider of a case is credited
with the same FLOPs, so TFLOP/s ratios are time ratios.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import fused_kernels
from bench.harness import (
    DTYPES,
    REGISTRY,
    Case,
    Env,
    Prepared,
    Rotation,
    Unsupported,
    all_of,
    cuda_only,
    module_available,
    rotation_count,
)

FAMILY = "attention"


# ----------------------------------------------------------------------------- work counts


def attention_flops(b: int, h: int, l: int, s: int, d: int, *, causal: bool = False, mode: str = "fwd",
                    valid_keys: int | None = None) -> float:
    """FLOPs of attention on (B, H, L, D) queries and S keys.

    ``valid_keys``: the sum over the batch of each row's key length (padding), replacing ``B * S``.
    ``mode``: "fwd", "bwd" (2.5x forward) or "fwd+bwd" (3.5x)."""
    keys = b * s if valid_keys is None else valid_keys
    f = 4.0 * h * l * keys * d
    if causal:
        f /= 2
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


PAGE = 16          # block size of the paged cases


def paged_lengths(b: int, s: int) -> list[int]:
    """Cache lengths of a paged batch: drawn in [S/8, S] from a fixed seed, the same for every provider."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(max(1, s // 8), s + 1, (b,), generator=g).tolist()


def varlen_lengths(b: int, s: int) -> list[int]:
    """Sequence lengths of a packed batch: log-uniform in [S/32, S] (many short documents, a few long ones, as
    in packed pre-training or a serving batch), from a fixed seed, the same for every provider."""
    g = torch.Generator().manual_seed(3)
    lo = max(1, s // 32)
    u = torch.rand(b, generator=g, dtype=torch.float64)
    return [min(s, max(lo, int(round(lo * (s / lo) ** x)))) for x in u.tolist()]


VARIANTS = ("window", "alibi", "softcap", "document", "prefix")
WINDOW = 1024       # keys a query of the window cases sees (itself included): window=(WINDOW - 1, 0)
SOFTCAP = 50.0      # Gemma 2's attention softcap


def alibi_slopes(h: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """ALiBi's slopes for H heads, 2^(-8 (i + 1) / H), float32 (H,)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], dtype=torch.float32, device=device)


def document_lengths(b: int, s: int) -> list[list[int]]:
    """Per batch row, document lengths that fill S exactly: log-uniform in [S/64, S/2] (many short documents,
    some long ones, as in packed pre-training), the last one cut to fit; fixed seed, the same for every provider."""
    g = torch.Generator().manual_seed(4)
    lo, hi = max(1, s // 64), max(1, s // 2)
    rows = []
    for _ in range(b):
        row: list[int] = []
        while sum(row) < s:
            x = float(torch.rand(1, generator=g, dtype=torch.float64))
            row.append(min(s - sum(row), max(lo, int(round(lo * (hi / lo) ** x)))))
        rows.append(row)
    return rows


def document_ids(b: int, s: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, S) int32 document index of every position (``document_lengths``)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
                        for r in document_lengths(b, s)]).to(device=device, dtype=torch.int32)


def prefix_lengths(b: int, s: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(B,) int32 prefix-LM prefix lengths, drawn in [S/8, S/2] from a fixed seed."""
    g = torch.Generator().manual_seed(5)
    return torch.randint(max(1, s // 8), max(2, s // 2) + 1, (b,), generator=g).to(device=device, dtype=torch.int32)


def window_keys(l: int) -> int:
    """Keys a query of a window case sees: ``WINDOW``, a quarter of the sequence on the CPU's tiny shapes."""
    return WINDOW if l >= 4 * WINDOW else max(1, l // 4)


def variant_pairs(variant: str, b: int, l: int, s: int) -> int:
    """Unmasked (query, key) pairs of a causal variant case (L == S), summed over the batch."""
    i = torch.arange(l, dtype=torch.int64)
    if variant == "window":
        return b * int(torch.clamp(i + 1, max=window_keys(l)).sum())
    if variant == "document":
        return sum(n * (n + 1) // 2 for row in document_lengths(b, s) for n in row)
    if variant == "prefix":
        return sum(int(torch.clamp(i + 1, min=p).sum()) for p in prefix_lengths(b, s).tolist())
    return b * l * (l + 1) // 2          # alibi, softcap: the causal triangle


def variant_mask(case: Case, device: str | torch.device) -> torch.Tensor | None:
    """The variant's mask materialized, True where a key is kept: (B or 1, 1, L, S) bool; None for softcap.
    For ALiBi the causal mask (the bias is added by the caller)."""
    b, _, _, l, s, _ = _dims(case)
    variant = case.shape["variant"]
    if variant == "softcap":
        return None
    i = torch.arange(l, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    keep = (j <= i + (s - l))[None, None]
    if variant == "window":
        keep = keep & (j >= i + (s - l) - (window_keys(l) - 1))[None, None]
    elif variant == "document":
        ids = document_ids(b, s, device)
        keep = keep & (ids[:, None, :, None] == ids[:, None, None, :])
    elif variant == "prefix":
        keep = keep | (j[None, None] < prefix_lengths(b, s, device)[:, None, None, None])
    return keep


def decode_bytes(b: int, hkv: int, s: int, d: int, element_size: int, dv: int | None = None) -> int:
    """Bytes of KV cache one decoding step must read: K (B, Hkv, S, D) and V (B, Hkv, S, Dv), once."""
    return b * hkv * s * (d + (dv or d)) * element_size


def seqlens(b: int, s: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Key lengths of a padded batch: drawn in [S/2, S] from a fixed seed, the same for every provider."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(s // 2, s + 1, (b,), generator=g).to(device)


# ----------------------------------------------------------------------------- grids


def _case(grid: str, mode: str, dtype: str, b: int, h: int, hkv: int, l: int, s: int, d: int, causal: bool,
          padded: bool = False, skip: dict[str, str] | None = None, variant: str | None = None) -> Case:
    # Hkv is recorded only for GQA (None: as many key/value heads as query heads).
    shape = dict(B=b, H=h, Hkv=hkv if hkv != h else None, L=l, S=s, D=d, causal=causal, padded=padded)
    elt = DTYPES[dtype].itemsize
    if grid == "paged":
        valid = sum(paged_lengths(b, s))
        return Case(FAMILY, "paged_decode", mode, grid, dtype, shape, "gbps",
                    flops=attention_flops(b, h, l, s, d, valid_keys=valid), bytes=valid * hkv * 2 * d * elt,
                    skip=dict(skip or {}))
    if grid == "varlen":
        lens = varlen_lengths(b, s)
        f = 4.0 * h * d * sum(n * n for n in lens) / (2 if causal else 1)
        return Case(FAMILY, "varlen_attention", mode, grid, dtype, shape, "tflops",
                    flops=f * {"fwd": 1.0, "fwd+bwd": 3.5}[mode], skip=dict(skip or {}))
    if grid == "variants":
        assert variant in VARIANTS and causal and l == s, (variant, causal, l, s)
        shape["variant"] = variant
        if variant == "window":
            shape["W"] = window_keys(l)
        f = 4.0 * h * d * variant_pairs(variant, b, l, s)
        return Case(FAMILY, "attention_" + variant, mode, grid, dtype, shape, "tflops",
                    flops=f * {"fwd": 1.0, "fwd+bwd": 3.5}[mode], skip=dict(skip or {}))
    if grid == "decode":
        return Case(FAMILY, "decode", mode, grid, dtype, shape, "gbps",
                    flops=attention_flops(b, h, l, s, d, mode=mode), bytes=decode_bytes(b, hkv, s, d, elt),
                    skip=dict(skip or {}))
    valid = int(seqlens(b, s).sum()) if padded else None
    return Case(FAMILY, "attention", mode, grid, dtype, shape, "tflops",
                flops=attention_flops(b, h, l, s, d, causal=causal, mode=mode, valid_keys=valid),
                skip=dict(skip or {}))


def cases(env: Env) -> list[Case]:
    out: list[Case] = []
    if not env.is_cuda:
        # Tiny shapes through the PyTorch path: each grid and mode once, to test the harness.
        for mode in ("fwd", "fwd+bwd"):
            for causal in (False, True):
                for l in (32, 64):
                    out.append(_case("standard", mode, "bf16", 128 // l, 2, 2, l, l, 64, causal))
        out.append(_case("bert", "fwd", "bf16", 2, 2, 2, 32, 32, 16, False, padded=True))
        out.append(_case("bert", "fwd+bwd", "bf16", 2, 2, 2, 32, 32, 16, False, padded=True))
        out.append(_case("vit", "fwd", "bf16", 2, 2, 2, 17, 17, 16, False))
        for b in (1, 2):
            out.append(_case("decode", "fwd", "bf16", b, 4, 2, 1, 64, 16, False))
        out.append(_case("paged", "fwd", "bf16", 4, 4, 2, 1, 256, 16, False))
        out.append(_case("varlen", "fwd", "bf16", 4, 2, 2, 64, 64, 16, False, padded=True))
        out.append(_case("varlen", "fwd+bwd", "bf16", 4, 2, 2, 64, 64, 16, False, padded=True))
        for variant in VARIANTS:
            for mode in ("fwd", "fwd+bwd"):
                out.append(_case("variants", mode, "bf16", 2, 2, 2, 64, 64, 16, True, variant=variant))
        return out

    quick = env.quick
    dtypes = ["bf16"] if quick else ["bf16", "fp16"]
    dims = [64, 128] if quick else [64, 128, 256]
    lens = [1024, 4096, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    for dtype in dtypes:
        for mode in ("fwd", "fwd+bwd"):
            for d in dims:
                for causal in (False, True):
                    for l in lens:
                        skip = {}
                        # FlexAttention compiles a kernel per shape and mask (seconds each): the quick
                        # run, which must fit in gpu_check's 8 minutes, compiles it for one shape, the
                        # full run for bf16 only.
                        if quick and not (d == 128 and l == 4096):
                            skip["flex"] = "quick run: FlexAttention compiled for D=128, L=4096 only"
                        elif dtype != "bf16":
                            skip["flex"] = "FlexAttention timed in bf16 only (compile time)"
                        out.append(_case("standard", mode, dtype, 16384 // l, 2048 // d, 2048 // d, l, l, d,
                                         causal, skip=skip))
    quick_skip = {"flex": "quick run: FlexAttention compiled for the standard grid only"} if quick else {}
    for dtype in dtypes:
        for mode in ("fwd", "fwd+bwd"):
            for l, b in ((128, 128), (512, 32)):
                out.append(_case("bert", mode, dtype, b, 12, 12, l, l, 64, False, padded=True, skip=quick_skip))
            for l, b in ((197, 64), (577, 32)):
                out.append(_case("vit", mode, dtype, b, 12, 12, l, l, 64, False, skip=quick_skip))
    batches = [1, 16, 64] if quick else [1, 4, 16, 64]
    caches = [4096, 32768] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
    for dtype in ["bf16"]:
        for b in batches:
            for s in caches:
                out.append(_case("decode", "fwd", dtype, b, 32, 8, 1, s, 128, False, skip=quick_skip))
    paged_skip = {"flex": "paged cases: not run on FlexAttention", "flash-attn": "paged cases: not benchmarked",
                  "fa3": "paged cases: not benchmarked"}
    for b in batches:
        for s in caches:
            out.append(_case("paged", "fwd", "bf16", b, 32, 8, 1, s, 128, False, skip=paged_skip))
    varlen_skip = {"flex": "varlen cases: not run on FlexAttention",
                   "flash-attn": "varlen cases: flash_attn_varlen_func not benchmarked",
                   "fa3": "varlen cases: not benchmarked"}
    for mode in ("fwd", "fwd+bwd"):
        for s in ([2048, 8192] if quick else [1024, 2048, 4096, 8192]):
            out.append(_case("varlen", mode, "bf16", 16384 // s * 2, 32, 8, s, s, 128, False, padded=True,
                             skip=varlen_skip))
    # Variants: the full run only (one FlexAttention compile per case does not fit gpu_check's budget).
    if not quick:
        for mode in ("fwd", "fwd+bwd"):
            for variant in VARIANTS:
                for l in (4096, 16384):
                    out.append(_case("variants", mode, "bf16", 16384 // l, 16, 16, l, l, 128, True,
                                     variant=variant))
    if quick:
        # If the time budget runs out, what is left is skipped: run one head dim of the standard grid, then
        # decoding and the model shapes, then the rest.
        rank = {"standard": 0, "decode": 1, "paged": 1, "varlen": 1, "bert": 2, "vit": 2, "variants": 4}
        out.sort(key=lambda c: rank[c.grid] if c.grid != "standard" or c.shape["D"] == 128 else 3)
    return out


# ----------------------------------------------------------------------------- inputs


def _dims(case: Case) -> tuple[int, int, int, int, int, int]:
    sh = case.shape
    return sh["B"], sh["H"], sh["Hkv"] or sh["H"], sh["L"], sh["S"], sh["D"]


def _inputs(case: Case, env: Env, layout: str = "bhld") -> Rotation:
    """Rotating (q, k, v, dout) sets in ``layout`` ("bhld": (B, H, L, D); "blhd": (B, L, H, D)),
    contiguous in that layout, with gradients on when the case runs a backward."""
    b, h, hkv, l, s, d = _dims(case)
    dtype = DTYPES[case.dtype]
    grad = case.mode != "fwd"

    def make(heads: int, length: int) -> torch.Tensor:
        t = torch.randn((b, heads, length, d), device=env.device, dtype=dtype)
        return t if layout == "bhld" else t.transpose(1, 2).contiguous()

    one = 2 * b * h * l * d + 2 * b * hkv * s * d        # q, out (or dout), k, v elements
    n = rotation_count(one * DTYPES[case.dtype].itemsize, env)
    torch.manual_seed(0)       # every provider of a case gets the same inputs: the agreement check needs it
    sets = []
    for _ in range(n):
        q, k, v = make(h, l), make(hkv, s), make(hkv, s)
        do = make(h, l) if grad else None
        sets.append((q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad), do))
    return Rotation(sets)


def _paged_inputs(case: Case, env: Env) -> tuple[Rotation, list[tuple]]:
    """The decode inputs (``_inputs``) and, per set, the same sequences in a paged pool: (k_cache, v_cache,
    block_table, cache_seqlens) with the blocks of all sequences in one shuffled order."""
    b, _, hkv, _, s, d = _dims(case)
    rot = _inputs(case, env)
    lens = paged_lengths(b, s)
    need = [-(-n // PAGE) for n in lens]
    width = -(-s // PAGE)
    pools = []
    for _, k, v, _ in rot.sets:
        perm = torch.randperm(sum(need), generator=torch.Generator().manual_seed(2)).tolist()
        table = torch.zeros(b, width, dtype=torch.int32)
        at = 0
        for i, n in enumerate(need):
            table[i, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
            at += n
        table = table.to(env.device)
        k_cache = k.new_zeros(sum(need), PAGE, hkv, d)
        v_cache = v.new_zeros(sum(need), PAGE, hkv, d)
        zero = torch.zeros(1, dtype=torch.int32, device=env.device)
        with ours_context(env)():
            for i, n in enumerate(lens):
                fused_kernels.paged_append(k_cache, v_cache, table[i:i + 1], zero, k[i:i + 1, :, :n], v[i:i + 1, :, :n])
        pools.append((k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32, device=env.device)))
    return rot, pools


def _prepared(case: Case, rot: Rotation, fwd: Callable[..., torch.Tensor], *, layout: str = "bhld",
              context: Callable | None = None, impl: str | None = None) -> Prepared:
    """The timed call (forward, or forward then backward with a fixed output gradient) over rotating inputs."""
    if case.mode == "fwd":
        def fn() -> object:
            q, k, v, _ = rot.next()
            with torch.no_grad():
                return fwd(q, k, v)
    else:
        def fn() -> object:
            q, k, v, do = rot.next()
            fwd(q, k, v).backward(do)
            return None

    def output() -> torch.Tensor:
        q, k, v, _ = rot.first
        out = fwd(q, k, v)
        out = out if layout == "bhld" else out.transpose(1, 2)    # compared in (B, H, L, D)
        if case.grid == "varlen":                                 # padded query rows are not part of the answer
            out = _varlen_pack(out, varlen_lengths(case.shape["B"], case.shape["S"]))
        return out

    leaves = [t for s in rot.sets for t in s[:3] if t.requires_grad]
    kw = {} if context is None else {"context": context}
    return Prepared(fn, output, leaves, impl=impl, **kw)


def _padding_mask(case: Case, env: Env) -> torch.Tensor | None:
    """(B, 1, 1, S) bool, True for valid keys: how the non-varlen baselines receive the padding (and the
    different lengths of a paged case)."""
    b, _, _, _, s, _ = _dims(case)
    if case.grid == "paged":
        lens = torch.tensor(paged_lengths(b, s), device=env.device)
    elif case.grid == "varlen":
        lens = torch.tensor(varlen_lengths(b, s), device=env.device)
    elif case.shape["padded"]:
        lens = seqlens(b, s, env.device)
    else:
        return None
    return (torch.arange(s, device=env.device) < lens[:, None])[:, None, None, :]


# ----------------------------------------------------------------------------- providers


def ours_context(env: Env) -> Callable:
    """Our kernels on a GPU (never a silent fallback); the PyTorch path (ops/attention/torch_path.py) on the CPU,
    where the Triton interpreter (on under pytest) would take minutes and time nothing meaningful."""
    return lambda: fused_kernels.use_backend("triton" if env.is_cuda else "torch")


def _ours_paged(case: Case, env: Env) -> Prepared:
    rot, pools = _paged_inputs(case, env)
    sets = Rotation([(q, *pool) for (q, _, _, _), pool in zip(rot.sets, pools)])

    def call(q, k_cache, v_cache, table, lens):
        with torch.no_grad():
            return fused_kernels.paged_attention(q, k_cache, v_cache, table, lens, check=False)
    return Prepared(lambda: call(*sets.next()), lambda: call(*sets.first), [], context=ours_context(env),
                    impl="triton" if env.is_cuda else "fast_torch")


def _varlen_pack(t: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """(B, H, L, D) padded -> (sum(lens), H, D) packed: the valid rows of each sequence, one after another."""
    return torch.cat([t[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)], 0)


def _ours_varlen(case: Case, env: Env) -> Prepared:
    """The padded inputs' valid tokens packed, one ``fused_kernels.varlen_attention`` call over all sequences."""
    rot = _inputs(case, env)
    b, _, _, _, s, _ = _dims(case)
    lens = varlen_lengths(b, s)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=env.device)
    grad = case.mode != "fwd"
    sets = []
    for q, k, v, do in rot.sets:
        packed = [_varlen_pack(t.detach(), lens).requires_grad_(grad) for t in (q, k, v)]
        sets.append((*packed, _varlen_pack(do, lens) if grad else None))
    prot = Rotation(sets)
    causal = bool(case.shape["causal"])

    def call(q, k, v):
        return fused_kernels.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=causal, check=False)

    if grad:
        def fn() -> object:
            q, k, v, do = prot.next()
            call(q, k, v).backward(do)
            return None
    else:
        def fn() -> object:
            q, k, v, _ = prot.next()
            with torch.no_grad():
                return call(q, k, v)

    def output() -> torch.Tensor:
        q, k, v, _ = prot.first
        return call(q, k, v)

    leaves = [t for st in sets for t in st[:3] if t.requires_grad]
    return Prepared(fn, output, leaves, context=ours_context(env), impl="triton" if env.is_cuda else "fast_torch")


def ours_variant_kwargs(case: Case, env: Env) -> dict:
    """The keyword arguments of ``fused_kernels.attention`` (besides ``causal=True``) for a variants case."""
    b, h, _, l, s, _ = _dims(case)
    variant = case.shape["variant"]
    if variant == "window":
        return {"window": (window_keys(l) - 1, 0)}
    if variant == "alibi":
        return {"alibi_slopes": alibi_slopes(h, env.device)}
    if variant == "softcap":
        return {"softcap": SOFTCAP}
    if variant == "document":
        return {"document_ids": document_ids(b, s, env.device)}
    return {"prefix_lengths": prefix_lengths(b, s, env.device)}


def _ours(case: Case, env: Env) -> Prepared:
    if case.grid == "paged":
        return _ours_paged(case, env)
    if case.grid == "varlen":
        return _ours_varlen(case, env)
    if case.grid == "variants":
        kw = ours_variant_kwargs(case, env)

        def fwd_variant(q, k, v):
            return fused_kernels.attention(q, k, v, causal=True, **kw)
        return _prepared(case, _inputs(case, env), fwd_variant, context=ours_context(env),
                         impl="triton" if env.is_cuda else "fast_torch")
    rot = _inputs(case, env)
    b, _, _, _, s, _ = _dims(case)
    lens = seqlens(b, s, env.device) if case.shape["padded"] else None
    causal = bool(case.shape["causal"])

    def fwd(q, k, v):
        return fused_kernels.attention(q, k, v, causal=causal, seqlens_k=lens)
    return _prepared(case, rot, fwd, context=ours_context(env), impl="triton" if env.is_cuda else "fast_torch")


def _ours_dense(case: Case, env: Env) -> Prepared:
    """A paged (varlen) case on our dense attention over the padded cache (batch), the key lengths as
    ``seqlens_k``: what paging (packing) costs or saves."""
    if case.grid not in ("paged", "varlen"):
        raise Unsupported("the dense baseline of the paged and varlen cases only")
    b, _, _, _, s, _ = _dims(case)
    lens = torch.tensor((paged_lengths if case.grid == "paged" else varlen_lengths)(b, s), device=env.device)

    def fwd(q, k, v):
        return fused_kernels.attention(q, k, v, seqlens_k=lens)
    return _prepared(case, _inputs(case, env), fwd, context=ours_context(env),
                     impl="triton" if env.is_cuda else "fast_torch")


# Scores above this many elements make the math backend (which materializes B*H*L*S scores and
# probabilities, in fp32 for its softmax) too slow and too large to be worth timing.
MATH_MAX_SCORES = 1 << 30


def sdpa_variant_mask(case: Case, env: Env, dtype: torch.dtype) -> torch.Tensor:
    """The materialized ``attn_mask`` of a variants case (causal included): bool (B or 1, 1, L, S), or for
    ALiBi a float (1, H, L, S) bias, -slope[h] * |i - j|, -inf above the diagonal. Softcap has no mask form."""
    _, h, _, l, s, _ = _dims(case)
    if case.shape["variant"] == "softcap":
        raise Unsupported("softcap: SDPA has no form of it")
    keep = variant_mask(case, env.device)
    if case.shape["variant"] != "alibi":
        return keep
    i = torch.arange(l, device=env.device)[:, None] + (s - l)
    j = torch.arange(s, device=env.device)[None, :]
    bias = -alibi_slopes(h, env.device)[:, None, None] * (i - j).abs()
    return bias.masked_fill(~keep[0], float("-inf"))[None].to(dtype)


def _sdpa(backend: str) -> Callable[[Case, Env], Prepared]:
    def build(case: Case, env: Env) -> Prepared:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b, h, hkv, l, s, _ = _dims(case)
        if backend == "MATH" and b * h * l * s > MATH_MAX_SCORES:
            raise Unsupported(f"math backend would materialize {b * h * l * s:.2e} scores (> {MATH_MAX_SCORES:.0e})")
        which = getattr(SDPBackend, backend, None)
        if which is None:
            raise Unsupported(f"SDPBackend.{backend} not in torch {torch.__version__}")
        mask = _padding_mask(case, env)
        causal = bool(case.shape["causal"])
        if case.grid == "variants":
            mask, causal = sdpa_variant_mask(case, env, DTYPES[case.dtype]), False
        if causal and l != s:
            raise Unsupported("SDPA's is_causal is top-left aligned; the grids only use causal with L == S")
        kw = {"enable_gqa": True} if hkv != h else {}
        rot = _inputs(case, env)

        def fwd(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **kw)
        return _prepared(case, rot, fwd, context=lambda: sdpa_kernel(which), impl=f"sdpa:{backend.lower()}")
    return build


def flex_variant_mods(case: Case, env: Env) -> tuple[Callable, Callable | None, bool]:
    """FlexAttention's form of a variants case: (mask_mod, score_mod or None, whether the mask differs per
    batch row). The mask always includes causal; ALiBi and softcap are score_mods on the scaled score."""
    b, h, _, l, s, _ = _dims(case)
    variant, off = case.shape["variant"], s - l

    def causal_mod(bi, hi, qi, ki):
        return qi + off >= ki
    mask_mod, score_mod, per_batch = causal_mod, None, False
    if variant == "window":
        left = window_keys(l) - 1

        def mask_mod(bi, hi, qi, ki):
            return (qi + off >= ki) & (qi + off - ki <= left)
    elif variant == "document":
        ids = document_ids(b, s, env.device)
        per_batch = True

        def mask_mod(bi, hi, qi, ki):
            return (qi + off >= ki) & (ids[bi, qi + off] == ids[bi, ki])
    elif variant == "prefix":
        prefix = prefix_lengths(b, s, env.device)
        per_batch = True

        def mask_mod(bi, hi, qi, ki):
            return (qi + off >= ki) | (ki < prefix[bi])
    elif variant == "alibi":
        slopes = alibi_slopes(h, env.device)

        def score_mod(score, bi, hi, qi, ki):
            return score - slopes[hi] * (qi + off - ki).abs()
    else:
        cap = SOFTCAP

        def score_mod(score, bi, hi, qi, ki):
            return cap * torch.tanh(score / cap)
    return mask_mod, score_mod, per_batch


def _flex(case: Case, env: Env) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, hkv, l, s, _ = _dims(case)
    causal, padded = bool(case.shape["causal"]), bool(case.shape["padded"])
    lens = seqlens(b, s, env.device) if padded else None
    score_mod = None
    if case.grid == "variants":
        mask_mod, score_mod, per_batch = flex_variant_mods(case, env)
        block_mask = create_block_mask(mask_mod, b if per_batch else None, None, l, s, device=env.device)
    elif causal and padded:
        def mask_mod(bi, hi, qi, ki):
            return (qi >= ki) & (ki < lens[bi])
    elif causal:
        def mask_mod(bi, hi, qi, ki):
            return qi >= ki
    elif padded:
        def mask_mod(bi, hi, qi, ki):
            return ki < lens[bi]
    else:
        mask_mod = None
    if case.grid != "variants":
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, b if padded else None, None, l, s, device=env.device)
    # A fresh compile per case: every case is a new shape or mask anyway, and past dynamo's recompile
    # limit a reused wrapper would silently run eager flex_attention (unfused, slow) under our label.
    from torch import _dynamo
    _dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    kw = {"enable_gqa": True} if hkv != h else {}
    rot = _inputs(case, env)

    def fwd(q, k, v):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, **kw)
    return _prepared(case, rot, fwd, impl="flex_attention (torch.compile)")


def flash_variant_kwargs(case: Case, env: Env, module: str = "flash_attn") -> dict:
    """flash_attn_func's keyword arguments (besides ``causal=True``) for a variants case; Unsupported where it
    has no form of the variant (documents need flash_attn_varlen_func, no prefix-LM; FA3 has no ALiBi)."""
    _, h, _, l, _, _ = _dims(case)
    variant = case.shape["variant"]
    if variant == "window":
        return {"window_size": (window_keys(l) - 1, 0)}
    if variant == "softcap":
        return {"softcap": SOFTCAP}
    if variant == "alibi" and module == "flash_attn":
        return {"alibi_slopes": alibi_slopes(h, env.device)}
    if variant == "document":
        raise Unsupported("documents: flash-attn needs flash_attn_varlen_func (not benchmarked)")
    raise Unsupported(f"{variant}: no such argument in {module}.flash_attn_func")


def _flash_attn(module: str) -> Callable[[Case, Env], Prepared]:
    def build(case: Case, env: Env) -> Prepared:
        import importlib

        if case.shape["padded"]:
            raise Unsupported("padding needs flash_attn_varlen_func on unpadded tokens: not benchmarked")
        causal = bool(case.shape["causal"])
        kw = flash_variant_kwargs(case, env, module) if case.grid == "variants" else {}
        func = importlib.import_module(module).flash_attn_func
        rot = _inputs(case, env, layout="blhd")          # flash-attn's native (B, L, H, D)

        def fwd(q, k, v):
            out = func(q, k, v, causal=causal, **kw)
            return out[0] if isinstance(out, tuple) else out   # some FA3 versions also return the lse
        return _prepared(case, rot, fwd, layout="blhd", impl=module)
    return build


def _hopper(env: Env) -> str | None:
    return None if env.capability is not None and env.capability[0] == 9 else "FlashAttention-3 needs a Hopper GPU"


def _cudnn_available(env: Env) -> str | None:
    if not env.is_cuda:
        return "cuDNN attention needs a CUDA device"
    return None if torch.backends.cudnn.is_available() else "cuDNN not available in this torch"


REGISTRY.register(FAMILY, "ours", _ours)
REGISTRY.register(FAMILY, "ours-dense", _ours_dense)
REGISTRY.register(FAMILY, "sdpa-flash", _sdpa("FLASH_ATTENTION"))
REGISTRY.register(FAMILY, "sdpa-cudnn", _sdpa("CUDNN_ATTENTION"), _cudnn_available)
REGISTRY.register(FAMILY, "sdpa-efficient", _sdpa("EFFICIENT_ATTENTION"))
REGISTRY.register(FAMILY, "sdpa-math", _sdpa("MATH"))
REGISTRY.register(FAMILY, "flex", _flex,
                  all_of(cuda_only("FlexAttention needs torch.compile for speed: skipped on the CPU run"),
                         module_available("torch.nn.attention.flex_attention", "FlexAttention (torch >= 2.5)")))
REGISTRY.register(FAMILY, "flash-attn", _flash_attn("flash_attn"),
                  all_of(cuda_only(), module_available("flash_attn", "flash-attn")))
REGISTRY.register(FAMILY, "fa3", _flash_attn("flash_attn_interface"),
                  all_of(cuda_only(), _hopper,
                         module_available("flash_attn_interface", "FlashAttention-3 (flash_attn_interface)")))

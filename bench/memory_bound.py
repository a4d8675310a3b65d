"""Bandwidth of the memory-bound kernels against torch eager, measured side by side.

    python -m bench.memory_bound [--out DIR] [--dtype bf16] [--quick]

For each op and row length: our kernel and torch eager, the median time (triton.testing.do_bench),
GB/s (every input read once, every output written once) and the fraction of the device-to-device
copy bandwidth measured at the start of the same run. Writes one JSON record per measurement to
``DIR/memory_bound.json`` and prints a table. Without a GPU it runs tiny shapes through the
reference path, which tests the harness, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn()``: triton's do_bench on a GPU, a plain loop on the CPU."""
    if device == "cuda":
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    return cpu_time


def copy_bandwidth(device: str, bench: Callable) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write), the ceiling for these kernels."""
    n = (1 << 30) // 4 if device == "cuda" else 1 << 20
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def cases(m: int, n: int, dtype: torch.dtype, device: str):
    """(op, provider, fn, bytes moved) for rows of n elements."""
    x = torch.randn(m, n, dtype=dtype, device=device, requires_grad=True)
    r = torch.randn(m, n, dtype=dtype, device=device)
    w = torch.randn(n, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(n, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(m, n, dtype=dtype, device=device)
    e = x.element_size() * m * n
    ln_ours = lambda: kernels.layer_norm(x, (n,), w, b)
    ln_torch = lambda: F.layer_norm(x, (n,), w, b)
    add_ours = lambda: kernels.add_layer_norm(x, r, w, b)[0]
    add_torch = lambda: F.layer_norm(x + r, (n,), w, b)
    sm_ours = lambda: kernels.softmax(x, -1)
    sm_torch = lambda: torch.softmax(x, -1)

    def fwd_bwd(fn):
        return lambda: torch.autograd.backward(fn(), dy)

    return [
        ("layer_norm fwd", "ours", ln_ours, 2 * e),
        ("layer_norm fwd", "torch", ln_torch, 2 * e),
        ("layer_norm fwd+bwd", "ours", fwd_bwd(ln_ours), 5 * e),
        ("layer_norm fwd+bwd", "torch", fwd_bwd(ln_torch), 5 * e),
        ("add_layer_norm fwd", "ours", add_ours, 4 * e),
        ("add_layer_norm fwd", "torch", add_torch, 4 * e),
        ("softmax fwd", "ours", sm_ours, 2 * e),
        ("softmax fwd", "torch", sm_torch, 2 * e),
        ("softmax fwd+bwd", "ours", fwd_bwd(sm_ours), 5 * e),
        ("softmax fwd+bwd", "torch", fwd_bwd(sm_torch), 5 * e),
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="fewer row lengths")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    bench = timer(device)
    ceiling = copy_bandwidth(device, bench)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {gpu}  copy bandwidth: {ceiling:.0f} GB/s  dtype: {args.dtype}")
    if device == "cuda":
        sizes = [1024, 4096, 16384, 65536] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
        elements = 1 << 26
    else:
        sizes, elements = [64, 1024], 1 << 12
    records = []
    print(f"{'op':<22}{'N':>7} {'provider':<8}{'ms':>9}{'GB/s':>9}{'% copy':>8}")
    for n in sizes:
        for op, provider, fn, nbytes in cases(max(1, elements // n), n, dtype, device):
            ms = bench(fn)
            gbs = nbytes / ms / 1e6
            records.append(dict(op=op, n=n, rows=max(1, elements // n), dtype=args.dtype, provider=provider,
                                ms=ms, gbps=gbs, pct_copy=100 * gbs / ceiling, device=gpu,
                                torch=torch.__version__, copy_gbps=ceiling))
            print(f"{op:<22}{n:>7} {provider:<8}{ms:>9.4f}{gbs:>9.0f}{100 * gbs / ceiling:>7.0f}%")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory_bound.json"), "w") as f:
        json.dump(records, f, indent=1)
    return records


if __name__ == "__main__":
    main()

"""The benchmark suite through pytest-benchmark, for users of that plugin:

    pytest bench/ --benchmark-only [-k "attention and ours"] [--benchmark-json out.json]

One test per (case, provider) of the ``--quick`` grid (tiny shapes through the PyTorch path on the CPU);
unavailable providers and unsupported cases are skipped with their reason. The extra info of each
benchmark carries the case, its FLOPs/bytes/tokens and the TFLOP/s, GB/s or tokens/s of the median.
Each test runs ``BENCH_ROUNDS`` timed rounds (default 20) after two warm-up rounds, with gradients reset
outside the timing. pytest-benchmark times with the host clock, so each round ends with a device
synchronize; it does not flush the L2 cache, so small inputs are rotated (bench/harness.py).
``python -m bench`` is the primary tool: it times with ``triton.testing.do_bench``, measures the
ceilings, checks agreement with ours, and writes the table and plots.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("pytest_benchmark")

from bench.harness import FAMILIES, REGISTRY, Case, Env, Provider, Unsupported  # noqa: E402
from bench.run import CASES  # noqa: E402

ENV = Env.detect(quick=True)
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20"))


def _params() -> list:
    params = []
    for family in FAMILIES:
        for case in CASES[family](ENV):
            for provider in REGISTRY.providers(family):
                name = f"{family}-{case.op}-{case.mode}-{case.dtype}-{case.label().replace(' ', '_')}-{provider.name}"
                params.append(pytest.param(case, provider, id=name))
    return params


@pytest.fixture(scope="module", autouse=True)
def _one_thread_on_cpu():
    """On the CPU the run only tests the harness: one thread, so that it does not fight for shared cores."""
    import torch

    threads = torch.get_num_threads()
    if not ENV.is_cuda:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("case", "provider"), _params())
def test_benchmark(benchmark, case: Case, provider: Provider) -> None:
    reason = case.skip.get(provider.name) or provider.available(ENV)
    if reason:
        pytest.skip(reason)
    try:
        prepared = provider.build(case, ENV)
    except Unsupported as exc:
        pytest.skip(str(exc))
    benchmark.extra_info.update(family=case.family, op=case.op, mode=case.mode, dtype=case.dtype,
                                shape=case.shape, provider=provider.name, flops=case.flops, bytes=case.bytes,
                                tokens=case.tokens, gpu=ENV.gpu, device=ENV.device)

    def target() -> None:
        prepared.fn()
        ENV.synchronize()

    def setup() -> None:
        for t in prepared.grad_to_none:
            t.grad = None

    with prepared.context():
        try:
            prepared.fn()       # compile / autotune outside the timing; also finds unsupported shapes
        except Exception as exc:
            if provider.name == "ours":
                raise
            # As in python -m bench: a baseline refusing a shape (SDPA's "No available kernel") is a skip.
            pytest.skip(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        if prepared.before is not None:
            prepared.before()
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=2)
        if prepared.extra is not None:
            benchmark.extra_info.update(prepared.extra())
        benchmark.extra_info["impl"] = prepared.impl
    stats = getattr(benchmark, "stats", None)
    median_s = stats.stats.median if stats is not None else None
    if median_s:
        ms = median_s * 1e3
        if case.flops:
            benchmark.extra_info["tflops"] = case.flops / ms / 1e9
        if case.bytes:
            benchmark.extra_info["gbps"] = case.bytes / ms / 1e6
        if case.tokens:
            benchmark.extra_info["tokens_per_s"] = case.tokens / ms * 1e3

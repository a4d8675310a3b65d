"""Test setup shared by every test file.

The Triton interpreter must be switched on before anything imports ``triton`` (its ``jit`` decorator
reads ``TRITON_INTERPRET`` at decoration time, i.e. when ``fused_kernels`` is imported), so this module sets
it first: on a machine without a GPU, every kernel test then runs the real Triton kernel code on CPU
tensors; with a GPU the kernels compile for it. (Importing torch and asking for CUDA does not import
triton.) ``setdefault`` leaves an explicit choice made by the caller alone.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist every worker is one process: one thread each keeps N workers on N cores instead of
# N x (cores) threads spin-waiting for each other (which slows CPU training tests several-fold).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import fused_kernels  # noqa: E402
from fused_kernels._core import backend as _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skip them (visibly) without one. Tests marked
    ``triton_only`` check a kernel property: their ``op_backend="torch"`` variants are deselected."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("op_backend") == "torch" and item.get_closest_marker("triton_only"):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """On a GPU: after a failed test, stop using this process if its CUDA context is dead (an illegal address or
    a device-side fault is sticky: every later test in the process would fail with the same message). Under
    pytest-xdist the worker exits (its test's report has been sent; the controller reports the test as crashed
    and starts a fresh worker for the remaining tests); without it the session stops after this test."""
    yield
    if not HAS_CUDA or not any(getattr(r, "failed", False) for r in getattr(item, "_cuda_reports", ())):
        return
    try:
        torch.cuda.synchronize()
    except Exception as exc:  # any error here: the context is unusable
        message = f"{item.nodeid}: CUDA context lost ({exc})"
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            item.session.shouldstop = message
            return
        sys.stderr.write(f"\n{message}; ending this test process\n")
        sys.stderr.flush()
        os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if HAS_CUDA:
        item.__dict__.setdefault("_cuda_reports", []).append(outcome.get_result())


@pytest.fixture(scope="session")
def device() -> str:
    """Where the kernel tests run: the GPU when there is one, else the CPU through the interpreter."""
    if not HAS_CUDA and not _backend.INTERPRET:
        pytest.fail("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run here")
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (never a silent fallback to the PyTorch path) for the test's duration."""
    with fused_kernels.use_backend("triton"):
        yield


@pytest.fixture(params=["triton", "torch"])
def op_backend(request):
    """Run the test twice: on our Triton kernels (the interpreter on a CPU) and on the PyTorch path
    (each op's PyTorch path, what a CPU tensor runs in normal use). Yields the backend's name."""
    with fused_kernels.use_backend(request.param):
        yield request.param


@pytest.fixture(scope="module")
def reference_backend():
    """The PyTorch ops (backend "torch") and one thread, for a test module that trains models for real
    steps: the interpreter would make them slow, and tiny tensors gain nothing from intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with fused_kernels.use_backend("torch"):
        yield
    torch.set_num_threads(threads)

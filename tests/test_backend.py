"""Backend selection: ``use_backend`` and ``FUSED_KERNELS_BACKEND``, "auto" / "triton" / "torch" ("torch" and a
CPU tensor under "auto" without the interpreter run the op's PyTorch path, never a kernel).

``FUSED_KERNELS_BACKEND`` and ``TRITON_INTERPRET`` are read when ``fused_kernels`` is imported, so the cases that
depend on them run in fresh Python processes (started together, once per session, to save time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import bounds_checked

import fused_kernels
from fused_kernels import reference as ref
from fused_kernels._core import backend as _backend
from fused_kernels.ops import norms as ln_mod
from fused_kernels.ops import softmax as sm_mod
from fused_kernels.ops.attention import torch_path

ROOT = Path(__file__).resolve().parents[1]

OPS = ["layer_norm", "rms_norm", "add_layer_norm", "softmax"]


def _run_op(op: str, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(3, 16, generator=gen).to(device), torch.randn(3, 16, generator=gen).to(device)
    w, b = torch.randn(16, generator=gen).to(device), torch.randn(16, generator=gen).to(device)
    mask = (torch.rand(16, generator=gen) > 0.3).to(device)
    if op == "layer_norm":
        return fused_kernels.layer_norm(x, (16,), w, b), ref.layer_norm_ref(x, (16,), w, b)
    if op == "rms_norm":
        return fused_kernels.rms_norm(x, (16,), w), ref.rms_norm_ref(x, (16,), w)
    if op == "add_layer_norm":
        return fused_kernels.add_layer_norm(x, r, w, b)[0], ref.add_layer_norm_ref(x, r, w, b)[0]
    return fused_kernels.softmax(x, mask=mask, scale=0.5), ref.softmax_ref(x, mask=mask, scale=0.5)


def _launches(op: str, device: str = "cpu") -> int:
    with bounds_checked("_layer_norm_fwd_kernel") as ln, bounds_checked("_softmax_fwd_kernel") as sm:
        out, want = _run_op(op, device)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    return sum(ln.values()) + sum(sm.values())


# Each op's PyTorch path: (module, function) by op name.
TORCH_PATHS = {"layer_norm": (ln_mod, "_layer_norm_torch"), "rms_norm": (ln_mod, "_rms_norm_torch"),
               "add_layer_norm": (ln_mod, "_add_layer_norm_torch"), "softmax": (sm_mod, "_softmax_torch"),
               "attention": (torch_path, "attention"),
               "scaled_dot_product_attention": (torch_path, "scaled_dot_product_attention"),
               # the plain self-attention call of both (no mask, one shape): their short path
               "self_attention": (torch_path, "self_attention")}


@pytest.fixture
def fast_torch_calls(monkeypatch) -> list[str]:
    """Names of the ops whose PyTorch path was called while the test runs."""
    calls: list[str] = []
    for name, (module, fn) in TORCH_PATHS.items():
        original = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


# ----------------------------------------------------------------------------- in this process


def test_interpreter_is_on_without_a_gpu():
    """The suite must exercise the real kernels: on a CPU-only machine that needs the interpreter."""
    assert torch.cuda.is_available() or _backend.INTERPRET


@pytest.mark.parametrize("op", OPS)
def test_auto_runs_the_kernel_on_cpu_under_the_interpreter(op):
    if not _backend.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    with fused_kernels.use_backend("auto"):
        assert _launches(op) == 1


@pytest.mark.parametrize("op", OPS)
def test_torch_backend_runs_the_pytorch_path(op, fast_torch_calls):
    with fused_kernels.use_backend("torch"):
        assert _launches(op) == 0
    assert fast_torch_calls == [op]


@pytest.mark.parametrize("op", OPS)
def test_kernel_paths_never_call_the_pytorch_path(op, fast_torch_calls):
    if not (_backend.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs the interpreter or a GPU")
    for backend in ("auto", "triton"):
        with fused_kernels.use_backend(backend):
            assert _launches(op) == 1
    assert fast_torch_calls == []


def test_attention_dispatch(fast_torch_calls):
    """Under backend "torch" both attention functions run the PyTorch path: the plain self-attention call its
    short path (``torch_path.self_attention``), a masked call the op's own."""
    q = torch.randn(1, 2, 5, 16)
    keep = torch.rand(1, 1, 5, 5) > 0.3
    with fused_kernels.use_backend("torch"):
        fused_kernels.attention(q, q, q, causal=True)
        fused_kernels.scaled_dot_product_attention(q, q, q)
        fused_kernels.attention(q, q, q, attn_mask=keep)
        fused_kernels.scaled_dot_product_attention(q, q, q, attn_mask=keep)
    assert fast_torch_calls == ["self_attention", "self_attention", "attention", "scaled_dot_product_attention"]


def test_choose_routes_a_case_to_torch_only_under_auto():
    """``torch_faster``: the hook for routing a CUDA case to torch's fused kernel; "triton" still means
    the kernel, "torch" always torch."""
    x = torch.empty(0)
    kernel_here = _backend.INTERPRET or torch.cuda.is_available()
    with fused_kernels.use_backend("auto"):
        assert _backend.choose(x, "op", torch_faster=True) == "torch"
        assert _backend.choose(x, "op") == ("triton" if kernel_here else "torch")
    with fused_kernels.use_backend("torch"):
        assert _backend.choose(x, "op") == "torch"
    if kernel_here:
        with fused_kernels.use_backend("triton"):
            assert _backend.choose(x, "op", torch_faster=True) == "triton"


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_runs_the_kernel(op):
    if not (_backend.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs the interpreter or a GPU")
    with fused_kernels.use_backend("triton"):
        assert _launches(op) == 1


def test_use_backend_nests_and_restores():
    start = fused_kernels.get_backend()
    with fused_kernels.use_backend("torch"):
        assert fused_kernels.get_backend() == "torch"
        with fused_kernels.use_backend("triton"):
            assert fused_kernels.get_backend() == "triton"
        assert fused_kernels.get_backend() == "torch"
    assert fused_kernels.get_backend() == start


def test_use_backend_restores_after_an_exception():
    start = fused_kernels.get_backend()
    with pytest.raises(KeyError), fused_kernels.use_backend("torch"):
        raise KeyError("boom")
    assert fused_kernels.get_backend() == start


@pytest.mark.parametrize("name", ["cuda", "", None])
def test_use_backend_rejects_unknown_names(name):
    start = fused_kernels.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"), fused_kernels.use_backend(name):
        pass
    assert fused_kernels.get_backend() == start


def test_describe_names_backend_and_implementation():
    with fused_kernels.use_backend("torch"):
        assert "backend=torch" in _backend.describe() and "PyTorch ops" in _backend.describe()
    if _backend.INTERPRET and not torch.cuda.is_available():
        with fused_kernels.use_backend("auto"):
            assert "triton kernels (interpreter)" in _backend.describe()


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_auto_runs_the_kernel_on_cuda(op):
    with fused_kernels.use_backend("auto"):
        assert _launches(op, "cuda") == 1


# ----------------------------------------------------------------------------- fresh processes

# Each script prints one JSON line of findings; the tests below judge them.
_PRELUDE = """
import json, torch, fused_kernels
from fused_kernels import reference as ref
from fused_kernels._core import backend as _backend
from fused_kernels.ops import norms as ln_mod
from fused_kernels.ops import softmax as sm_mod
x, r, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
CALLS = {
    "layer_norm": lambda: fused_kernels.layer_norm(x, (16,), w),
    "rms_norm": lambda: fused_kernels.rms_norm(x, (16,), w),
    "add_layer_norm": lambda: fused_kernels.add_layer_norm(x, r, w)[0],
    "softmax": lambda: fused_kernels.softmax(x, mask=x > 0),
}
REFS = {
    "layer_norm": lambda: ref.layer_norm_ref(x, (16,), w),
    "rms_norm": lambda: ref.rms_norm_ref(x, (16,), w),
    "add_layer_norm": lambda: ref.add_layer_norm_ref(x, r, w)[0],
    "softmax": lambda: ref.softmax_ref(x, mask=x > 0),
}
RAN = []
TORCH_PATHS = {"layer_norm": (ln_mod, "_layer_norm_torch"), "rms_norm": (ln_mod, "_rms_norm_torch"),
               "add_layer_norm": (ln_mod, "_add_layer_norm_torch"), "softmax": (sm_mod, "_softmax_torch")}
for _name, (_mod, _fn) in TORCH_PATHS.items():  # record every call into the PyTorch path
    setattr(_mod, _fn, lambda *a, _f=getattr(_mod, _fn), _n=_name, **k: RAN.append(_n) or _f(*a, **k))
def outcome(name):
    RAN.clear()
    try:
        close = torch.allclose(CALLS[name](), REFS[name](), rtol=1e-5, atol=1e-6)
    except RuntimeError as err:
        return "RuntimeError: " + str(err)
    return ("close" if close else "different") + (" (fast_torch)" if RAN == [name] else " (kernel)")
found = {"backend": fused_kernels.get_backend(), "interpret": _backend.INTERPRET}
"""

SCRIPTS = {
    # No interpreter, no FUSED_KERNELS_BACKEND: "auto" runs the PyTorch path on the CPU, "triton" refuses.
    "plain": """
found["auto"] = {op: outcome(op) for op in CALLS}
with fused_kernels.use_backend("triton"):
    found["triton"] = {op: outcome(op) for op in CALLS}
with fused_kernels.use_backend("torch"):
    found["torch"] = {op: outcome(op) for op in CALLS}
found["describe"] = _backend.describe()
""",
    # FUSED_KERNELS_BACKEND=" Torch " (case and spaces ignored) with the interpreter on: the PyTorch path runs,
    # the kernels are never touched (they are replaced by None), until use_backend overrides it.
    "env-torch": """
kernels_saved = ln_mod._layer_norm_fwd_kernel, sm_mod._softmax_fwd_kernel
ln_mod._layer_norm_fwd_kernel = sm_mod._softmax_fwd_kernel = None
found["env"] = {op: outcome(op) for op in CALLS}
ln_mod._layer_norm_fwd_kernel, sm_mod._softmax_fwd_kernel = kernels_saved
with fused_kernels.use_backend("triton"):
    found["triton"] = {op: "ran" if CALLS[op]().shape == x.shape else "?" for op in CALLS}
""",
    # FUSED_KERNELS_BACKEND=triton without the interpreter: every op raises a clear error.
    "env-triton": """
found["env"] = {op: outcome(op) for op in CALLS}
""",
}
ENVS = {
    "plain": {},
    "env-torch": {"TRITON_INTERPRET": "1", "FUSED_KERNELS_BACKEND": " Torch "},
    "env-triton": {"FUSED_KERNELS_BACKEND": "triton"},
    "env-bogus": {"FUSED_KERNELS_BACKEND": "cuda"},
}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_KERNELS_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU story, even on a GPU machine
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def processes() -> dict[str, subprocess.CompletedProcess]:
    """Start every scenario at once (each pays for importing torch and triton), then collect them."""
    running = {}
    for name, extra in ENVS.items():
        code = "import fused_kernels" if name == "env-bogus" else _PRELUDE + textwrap.dedent(SCRIPTS[name]) + \
            "\nprint(json.dumps(found))"
        running[name] = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(extra),
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {}
    for name, proc in running.items():
        out, err = proc.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def _found(processes, name) -> dict:
    proc = processes[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_is_auto_and_runs_the_pytorch_path_without_the_interpreter(processes):
    found = _found(processes, "plain")
    assert found["backend"] == "auto" and found["interpret"] is False
    assert found["auto"] == {op: "close (fast_torch)" for op in OPS}
    assert found["torch"] == {op: "close (fast_torch)" for op in OPS}
    assert "PyTorch ops" in found["describe"]


def test_triton_backend_on_cpu_without_interpreter_raises_a_clear_error(processes):
    found = _found(processes, "plain")
    for op in OPS:
        message = found["triton"][op]
        assert message.startswith("RuntimeError: "), (op, message)
        assert op in message and "TRITON_INTERPRET=1" in message and "CUDA" in message, message


def test_env_var_selects_torch(processes):
    found = _found(processes, "env-torch")
    assert found["backend"] == "torch" and found["interpret"] is True
    assert found["env"] == {op: "close (fast_torch)" for op in OPS}
    assert found["triton"] == {op: "ran" for op in OPS}


def test_env_var_selects_triton(processes):
    found = _found(processes, "env-triton")
    assert found["backend"] == "triton"
    for op in OPS:
        assert found["env"][op].startswith("RuntimeError: ") and "TRITON_INTERPRET=1" in found["env"][op]


def test_env_var_with_unknown_backend_fails_at_import(processes):
    proc = processes["env-bogus"]
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "backend must be one of" in proc.stderr and "'cuda'" in proc.stderr

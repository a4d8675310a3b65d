"""Every ```python block of README.md and docs/*.md runs as written, on the CPU, as a user would run it: without
TRITON_INTERPRET (the conftest sets it for the other tests), so CPU tensors take the default PyTorch path.

Each block is saved as a script and run in a fresh namespace (a block is a complete example: imports and inputs
included), in one child process per environment (importing torch and triton once keeps the whole file to seconds),
in a temporary working directory. A block may start with one marker comment:

    # doc-test: skip (needs CUDA)     skipped, with the reason in parentheses shown in the test report
    # doc-test: TRITON_INTERPRET=1    run with the Triton interpreter (a mod that calls tl.*, ...)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"^# doc-test: (?:skip \((?P<reason>[^)]+)\)|(?P<env>TRITON_INTERPRET=1))[ \t]*$")

# Runs in the child: read the blocks as JSON from stdin, save each as a script (``@triton.jit`` needs its function's
# source in a file, as a user's own script has) and run it as __main__ in its own namespace; print the results.
RUNNER = r"""
import json, re, runpy, sys, time, traceback
blocks = json.load(sys.stdin)
results = []
for name, code in blocks:
    path = re.sub(r"[^A-Za-z0-9]+", "_", name) + ".py"
    with open(path, "w") as f:
        f.write(code)
    t0 = time.perf_counter()
    try:
        runpy.run_path(path, run_name="__main__")
        results.append(dict(name=name, error=None, seconds=time.perf_counter() - t0))
    except BaseException:
        results.append(dict(name=name, error=traceback.format_exc(), seconds=time.perf_counter() - t0))
print("DOC-TEST-RESULTS " + json.dumps(results))
"""


def _blocks() -> list[tuple[str, str, str | None, str | None]]:
    """(id "file:line", code, skip reason, env) of every python block, in file order."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 2          # the block's first code line
            code = m.group(1)
            first = code.splitlines()[0] if code.strip() else ""
            mark = MARKER.match(first)
            if first.startswith("# doc-test:") and not mark:
                raise ValueError(f"{path.name}:{line}: unknown doc-test marker {first!r}")
            out.append((f"{path.relative_to(ROOT)}:{line}", code, mark and mark["reason"], mark and mark["env"]))
    return out


BLOCKS = _blocks()


def _run(blocks: list[tuple[str, str]], env_extra: dict[str, str], cwd: Path) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_KERNELS_BACKEND")}
    env.update(env_extra, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("DOC-TEST-RESULTS ")), None)
    assert line is not None, f"the doc-test child died (status {proc.returncode}):\n{proc.stderr[-4000:]}"
    return {r["name"]: r for r in json.loads(line.split(" ", 1)[1])}


def _run_all(cwd: Path) -> dict[str, dict]:
    got: dict[str, dict] = {}
    for env in (None, "TRITON_INTERPRET=1"):
        group = [(name, code) for name, code, skip, e in BLOCKS if skip is None and e == env]
        if group:
            extra = dict([env.split("=")]) if env else {}
            got.update(_run(group, extra, cwd))
    return got


@pytest.fixture(scope="session")
def results(tmp_path_factory, request) -> dict[str, dict]:
    """The blocks run once per test session: under pytest-xdist the first worker runs them and the others read its
    results (the pattern of xdist's docs: the workers share their base temp's parent, one per session)."""
    worker = getattr(request.config, "workerinput", {}).get("workerid")
    if worker is None:
        return _run_all(tmp_path_factory.mktemp("doc-blocks"))
    from filelock import FileLock  # a dependency of torch

    shared = tmp_path_factory.getbasetemp().parent / "doc-blocks.json"
    with FileLock(str(shared) + ".lock"):
        if not shared.is_file():
            shared.write_text(json.dumps(_run_all(tmp_path_factory.mktemp("doc-blocks"))))
        return json.loads(shared.read_text())


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 20 and any(name.startswith("README.md") for name, *_ in BLOCKS)


@pytest.mark.parametrize("name, code, skip, env", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_runs(name, code, skip, env, results):
    if skip is not None:
        pytest.skip(f"{name}: {skip}")
    r = results[name]
    if r["error"] is not None:
        pytest.fail(f"{name} fails as written{' with ' + env if env else ''}:\n{r['error']}", pytrace=False)

"""What the README's commands write into a checkout stays out of git: ``runs/`` (training runs) and
``results/`` (``python -m bench --out results/``), while ``bench/results/`` (committed GPU and CPU runs) does not."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_run_and_bench_outputs_are_ignored_but_committed_results_are_not():
    assert _ignored("runs/vit/model.safetensors") and _ignored("results/bench.json")
    assert not _ignored("bench/results/h100_2027-01-01/bench.json")
    assert not _ignored("transformer/training/runs.py")


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_tiny_shakespeare_is_not_committed():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "shakespeare" not in files.lower()

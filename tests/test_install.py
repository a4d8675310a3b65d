"""Our import package ``fused_kernels`` installs beside Hugging Face's ``kernels`` (a dependency of
transformers >= 5.25) without either shadowing the other, from the checkout and from a user's own directory,
and the wheel installs exactly the packages a user imports."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter so that the directory it starts in decides what ``import`` finds, as for a user.
_PROBE = r"""
import json, sys
from pathlib import Path

import torch
import fused_kernels
import kernels
import transformers
from transformers import BertModel, LlamaConfig, LlamaForCausalLM  # the model classes import
from fused_kernels.integrations import huggingface

name = huggingface.register()
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 64, (2, 9))
mask = torch.ones(2, 9, dtype=torch.long)
mask[0, :3] = 0                                           # left padding
with torch.no_grad():
    model.set_attn_implementation("sdpa")
    want = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(name)
    got = model(input_ids=ids, attention_mask=mask).logits
valid = mask.bool()
print(json.dumps({
    "fused_kernels": str(Path(fused_kernels.__file__).resolve()),
    "fused_api": all(hasattr(fused_kernels, n) for n in ("attention", "use_backend", "layer_norm", "nn")),
    "kernels": str(Path(kernels.__file__).resolve()),
    "kernels_api": hasattr(kernels, "get_kernel"),
    "attn_implementation": model.config._attn_implementation,
    "name": name,
    "max_diff": (got[valid] - want[valid]).abs().max().item(),
    "bert": BertModel.__name__,
}))
"""


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None,
                    reason="Hugging Face's `kernels` is not installed (transformers < 5.25 does not require it)")
@pytest.mark.parametrize("where", ["outside", "root"])
def test_fused_kernels_and_hugging_face_kernels_import_side_by_side(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["fused_kernels"] == str(ROOT / "fused_kernels" / "__init__.py")
    assert got["fused_api"]
    assert "site-packages" in Path(got["kernels"]).parts, got["kernels"]     # Hugging Face's, installed
    assert got["kernels_api"]
    assert got["name"] == "fused_kernels" and got["attn_implementation"] == "fused_kernels"
    assert got["max_diff"] < 1e-4


def test_no_top_level_kernels_package_in_the_checkout():
    # An alias would shadow Hugging Face's package again whenever Python starts in the checkout.
    assert not (ROOT / "kernels").exists()
    assert not (ROOT / "kernels.py").exists()


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building the wheel needs setuptools")
def test_wheel_installs_only_the_import_packages(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for name in ("fused_kernels", "transformer", "bench", "tests"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "license" not in (proc.stdout + proc.stderr).lower(), proc.stderr[-3000:]   # PEP 639: no deprecation
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/")[0] for n in zf.namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"fused_kernels", "transformer"}, tops

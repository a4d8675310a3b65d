"""torchrun on the CPU: 2 processes with gloo follow the same loss curve as 1 process with the same global
batch (DDP, and FSDP with --fsdp); only rank 0 writes the run directory."""

import json
import os
import socket
import subprocess
import sys

import pytest

ARGS = ["train", "gpt", "--preset", "tiny", "--model", "dropout=0", "--model", "attn_dropout=0", "--steps", "4",
        "--batch-size", "8", "--backend", "torch", "--no-progress", "--log-every", "1", "--eval-every", "4",
        "--eval-batches", "2", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out, data, processes: int, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "transformer"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
         f"--master_port={_free_port()}", "-m", "transformer"]
    done = subprocess.run([*launcher, *ARGS, "--data", str(data), "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, text):
    return _train(tmp_path_factory.mktemp("single"), text, 1)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, text, single, mode):
    records = _train(tmp_path, text, 2, *(["--fsdp"] if mode == "fsdp" else []))
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    expected = [r["train_loss"] for r in single if "train_loss" in r]
    assert len(losses) == 4 and losses == pytest.approx(expected, rel=1e-4)
    assert records[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-4)
    assert not list(tmp_path.glob("*.tmp"))


# A sharper comparison for context parallelism: at the default warm-up the first steps barely move the
# weights, and a model whose attention saw only its own rank's tokens would pass; at a high rate from step 1
# the loss curve depends on what attention sees.
SHARP = ("--lr", "0.02", "--warmup", "0")


@pytest.fixture(scope="module")
def single_sharp(tmp_path_factory, text):
    return _train(tmp_path_factory.mktemp("single-sharp"), text, 1, *SHARP)


@pytest.mark.parametrize("processes,extra", [(2, ()), (2, ("--fsdp",)), (4, ())], ids=["ddp", "fsdp", "dp2-cp2"])
def test_context_parallel_matches_one_process(tmp_path, text, single_sharp, processes, extra):
    """--context-parallel 2: every sequence split over two ranks (ring attention), the same global batch, the
    same loss curve as one process; with 4 processes, two data-parallel replicas of such a ring."""
    records = _train(tmp_path, text, processes, "--context-parallel", "2", *SHARP, *extra)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    expected = [r["train_loss"] for r in single_sharp if "train_loss" in r]
    assert len(losses) == 4 and losses == pytest.approx(expected, rel=1e-4)
    assert records[-1]["val_loss"] == pytest.approx(single_sharp[-1]["val_loss"], rel=1e-4)


def test_context_parallel_refusals(tmp_path, text, capsys):
    """One-line errors before any step: another task, a world size it does not divide, a sequence length it does
    not split into two zigzag chunks per rank, attention dropout."""
    from transformer.config import GPTConfig
    from transformer.gpt import GPT
    from transformer.training import cli, distributed, trainer

    base = [*ARGS, "--data", str(text), "--out", str(tmp_path)]
    assert cli.main(["train", "bert", "--context-parallel", "2", "--out", str(tmp_path)]) == 2
    assert "task 'gpt' only" in capsys.readouterr().err
    assert cli.main([*base, "--context-parallel", "0"]) == 2
    assert "context_parallel must be a positive integer" in capsys.readouterr().err
    assert cli.main([*base, "--context-parallel", "2"]) == 2          # one process
    assert "must divide the number of processes (1)" in capsys.readouterr().err
    cp = distributed.ContextParallel(size=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        trainer.check_context_parallel(cp, GPT(GPTConfig.from_preset("tiny", max_seq_len=30, attn_dropout=0.0)))
    with pytest.raises(ValueError, match="attn_dropout=0"):
        trainer.check_context_parallel(cp, GPT(GPTConfig.from_preset("tiny", attn_dropout=0.1)))


def test_context_parallel_attention_refuses_a_mask():
    """Inside ``context_parallel`` a self-attention layer runs the ring, which takes no padding mask."""
    import torch

    from transformer.context_parallel import active, context_parallel
    from transformer.layers import Attention

    attn = Attention(16, 2)
    x = torch.randn(1, 4, 16)
    with context_parallel(None) as ring:
        assert active() is ring and ring.layout == "zigzag"
        with pytest.raises(ValueError, match="no attn_mask"):
            attn(x, causal=True, attn_mask=torch.ones(1, 1, 1, 4, dtype=torch.bool))
    assert active() is None
    with pytest.raises(ValueError, match="layout must be one of"):
        with context_parallel(None, layout="striped"):
            pass

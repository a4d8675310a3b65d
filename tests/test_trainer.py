"""The shared training loop: schedule, argument resolution, run directory, resume after Ctrl-C (the same
result as an uninterrupted run), corrupt and mismatched checkpoints, fine-tuning methods, the CLI, and
the Triton path against the PyTorch path over a few steps."""

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_kernels
from transformer import GPT, GPTConfig
from transformer.outputs import LMOutput
from transformer.training import checkpoint as ckpt
from transformer.training.cli import main
from transformer.training.task import Task, register
from transformer.training.trainer import (
    TrainArgs,
    TrainingInterrupted,
    backend_in_force,
    load_run,
    lr_at,
    resolve,
    train,
)

VOCAB, LENGTH = 16, 16


@register
class CountTask(Task):
    """Sequences that count modulo 16 from a random start: learnable in a few steps."""

    name = "count"
    config_class = GPTConfig
    default_preset = "tiny"
    defaults = dict(steps=8, batch_size=8, lr=3e-3, eval_every=4, log_every=2, warmup=2, backend="torch",
                    progress=False)

    def model_config(self, preset, **overrides):
        return GPTConfig.from_preset(preset, **{"vocab_size": VOCAB, "max_seq_len": LENGTH, "dropout": 0.0,
                                                "attn_dropout": 0.0, **overrides})

    def build_model(self, config):
        return GPT(config)

    def train_batch(self, generator, batch_size):
        start = torch.randint(0, VOCAB, (batch_size, 1), generator=generator)
        x = (start + torch.arange(LENGTH)) % VOCAB                                    # (B, L)
        return {"input_ids": x, "labels": x}

    def evaluate(self, model, batch_size, max_batches=None):
        x = (torch.arange(VOCAB)[:, None] + torch.arange(LENGTH)) % VOCAB
        return {"val_loss": model(input_ids=x, labels=x).loss.item()}

    def examples(self, model, n=4):
        return ["0 1 2 -> " + " ".join(map(str, model.generate(torch.tensor([[0, 1, 2]]), 4)[0].tolist()))]


class GPTWithHead(GPT):
    """GPT with one more layer on its logits: what fine-tuning adds (a new head) over a trained body."""

    def __init__(self, config):
        super().__init__(config)
        self.extra = nn.Linear(config.vocab_size, config.vocab_size)

    def forward(self, input_ids, labels=None):
        logits = self.extra(super().forward(input_ids).logits)                     # (B, L, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()) if labels is not None else None
        return LMOutput(logits, loss)


@register
class CountHeadTask(CountTask):
    name = "count-head"

    def build_model(self, config):
        return GPTWithHead(config)


def run(tmp_path, name="run", **kw) -> tuple[dict, str]:
    out = str(tmp_path / name)
    return train(TrainArgs(task=kw.pop("task", "count"), out=out, **kw)), out


def test_schedule_warms_up_then_decays_to_a_tenth():
    r = {"lr": 1.0, "warmup": 4, "steps": 14, "min_lr_ratio": 0.1}
    assert [lr_at(s, r) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, r) == pytest.approx(1.0)
    assert lr_at(9, r) == pytest.approx(0.55)          # half-way down the cosine
    assert lr_at(14, r) == pytest.approx(0.1)
    assert all(lr_at(s, r) >= lr_at(s + 1, r) for s in range(4, 14))


def test_resolve_precedence_and_errors(tmp_path):
    run_, saved = resolve(TrainArgs(task="count", steps=20))
    assert saved is None and run_["steps"] == 20 and run_["batch_size"] == 8 and run_["lr"] == 3e-3
    assert run_["warmup"] == 2 and run_["eval_every"] == 4 and run_["precision"] == "fp32"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        resolve(TrainArgs(task="nope"))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        resolve(TrainArgs(task="count", steps=0))
    with pytest.raises(ValueError, match="pass --init"):
        resolve(TrainArgs(task="count", method="lora"))
    with pytest.raises(ValueError, match="which task"):
        resolve(TrainArgs())
    with pytest.raises(ckpt.CheckpointError, match="not a run directory"):
        resolve(TrainArgs(resume=str(tmp_path)))


def test_a_run_writes_its_directory_and_learns(tmp_path):
    final, out = run(tmp_path)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "checkpoint.json", "checkpoint-8", "metrics.json", "metrics.jsonl", "loss.png"} == files
    assert {p.name for p in (tmp_path / "run" / "checkpoint-8").iterdir()} == {"model.safetensors",
                                                                              "trainer_state.pt"}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert train_losses[-1] < train_losses[0] - 0.3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val_loss"] == pytest.approx(final["val_loss"])
    config = ckpt.load_config(out)
    assert config["task"] == "count" and config["model"]["vocab_size"] == VOCAB and config["train"]["steps"] == 8
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def _interrupt_at(monkeypatch, step_to_fail: int) -> None:
    calls = {"n": 0}
    original = CountTask.train_batch

    def flaky(self, generator, batch_size):
        calls["n"] += 1
        if calls["n"] == step_to_fail + 1:
            raise KeyboardInterrupt
        return original(self, generator, batch_size)

    monkeypatch.setattr(CountTask, "train_batch", flaky)


def test_resume_after_ctrl_c_retraces_the_uninterrupted_run(tmp_path, monkeypatch):
    full, full_out = run(tmp_path, "full", steps=6)
    _interrupt_at(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted, match="after step 3"):
        run(tmp_path, "cut", steps=6)
    monkeypatch.undo()
    assert ckpt.load_state(tmp_path / "cut")["step"] == 3
    resumed = train(TrainArgs(resume=str(tmp_path / "cut")))
    a, b = ckpt.load_weights(full_out), ckpt.load_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_loss"] == full["val_loss"]

    def losses(d):
        lines = (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in map(json.loads, lines)]
    assert losses("cut") == losses("full")
    with pytest.raises(ValueError, match="already did 6 steps"):
        train(TrainArgs(resume=str(tmp_path / "cut")))


def test_ctrl_c_from_the_cli_exits_130_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 3)
    out = tmp_path / "cli"
    monkeypatch.setattr("transformer.training.cli.TASK_NAMES", ("count",))
    assert main(["train", "count", "--out", str(out), "--no-progress"]) == 130
    assert "--resume" in capsys.readouterr().err
    assert ckpt.load_state(out)["step"] == 3


def _replace_in_checkpoint(run_dir, name: str, data: bytes) -> None:
    """Put ``data`` in file ``name`` of the run's checkpoint and record it in checkpoint.json, as if the file
    had been saved that way (to reach the checks behind the digests)."""
    manifest = json.loads((run_dir / "checkpoint.json").read_text())
    (run_dir / manifest["directory"] / name).write_bytes(data)
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (run_dir / "checkpoint.json").write_text(json.dumps(manifest))


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    _, out = run(tmp_path, steps=2, eval_every=2)
    base = tmp_path / "run"
    weights = (base / "checkpoint-2" / "model.safetensors").read_bytes()
    _replace_in_checkpoint(base, "model.safetensors", weights[: len(weights) // 2])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is corrupt"):
        train(TrainArgs(resume=out, steps=4))
    _replace_in_checkpoint(base, "model.safetensors", weights)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))
    state = ckpt.load_state(base)
    evil = io.BytesIO()
    torch.save({**state, "evil": Evil()}, evil)
    _replace_in_checkpoint(base, "trainer_state.pt", evil.getvalue())
    with pytest.raises(ckpt.CheckpointError, match="holds more than tensors"):
        train(TrainArgs(resume=out, steps=4))
    _replace_in_checkpoint(base, "trainer_state.pt", pickle.dumps({"step": 1}))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        train(TrainArgs(resume=out, steps=4))
    good = io.BytesIO()
    torch.save(state, good)
    _replace_in_checkpoint(base, "trainer_state.pt", good.getvalue())

    config = json.loads((base / "config.json").read_text())
    config["model"]["dim"] = 64
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match="do not match the model.*wrong shape"):
        train(TrainArgs(resume=out, steps=4))
    (base / "config.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="config.json is corrupt"):
        load_run(out)
    with pytest.raises(ValueError, match="trained task 'count', not 'count-head'"):
        config["model"]["dim"] = 32
        (base / "config.json").write_text(json.dumps(config))
        train(TrainArgs(task="count-head", resume=out, steps=4))


def test_a_save_failing_between_its_files_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """A checkpoint is whole or absent: the save of step 8 fails after the weights were written (the trainer
    state's write raises, as on a full disk). The run stops with one line naming the file and the reason, the
    checkpoint of step 4 stays current and complete, nothing of the failed one is left, and resuming retraces
    the uninterrupted run (before, --resume took step 8's weights with step 4's optimizer and step)."""
    full, full_out = run(tmp_path, "full", steps=8)
    real = ckpt._write

    def full_disk(path, data):
        if path.name == "trainer_state.pt" and path.parent.name == ".checkpoint-8.partial":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write", full_disk)
    monkeypatch.setattr("transformer.training.cli.TASK_NAMES", ("count",))
    out = tmp_path / "cut"
    assert main(["train", "count", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "trainer_state.pt" in err and "No space left on device" in err and "step 4 is kept" in err, err
    monkeypatch.undo()
    assert ckpt.checkpoint_step(out) == 4 and ckpt.load_state(out)["step"] == 4
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint.json"]
    resumed = train(TrainArgs(resume=str(out)))
    a, b = ckpt.load_weights(full_out), ckpt.load_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_loss"] == full["val_loss"]


def test_a_torn_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    """Resume checks each file against checkpoint.json (size and SHA-256): a file of another save, or one that
    is missing, stops the run with one line naming it, before any training."""
    _, out = run(tmp_path, steps=4, eval_every=2)
    _, other = run(tmp_path, "other", steps=2, eval_every=2)
    base = tmp_path / "run"
    (base / "checkpoint-4" / "model.safetensors").write_bytes(
        (tmp_path / "other" / "checkpoint-2" / "model.safetensors").read_bytes())
    assert main(["train", "--resume", out, "--steps", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.safetensors does not match checkpoint.json" in err, err
    assert "torn or was modified" in err and "--overwrite" in err, err
    (base / "checkpoint-4" / "trainer_state.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.pt: No such file"):
        ckpt.load_state(out)


def test_weights_without_a_manifest_load_but_do_not_resume(tmp_path):
    """A directory holding model.safetensors itself (weights put there by hand, or a run saved before checkpoints
    had a manifest) evaluates; resuming it is refused, since nothing ties its weights to a trainer state."""
    _, out = run(tmp_path, steps=2, eval_every=2)
    base = tmp_path / "run"
    (base / "model.safetensors").write_bytes((base / "checkpoint-2" / "model.safetensors").read_bytes())
    shutil.rmtree(base / "checkpoint-2")
    (base / "checkpoint.json").unlink()
    task, model = load_run(out)
    with fused_kernels.use_backend("torch"):
        assert task.evaluate(model, 8)["val_loss"] > 0
    with pytest.raises(ckpt.CheckpointError, match="has no checkpoint.json.*cannot be resumed"):
        train(TrainArgs(resume=out, steps=4))


_FILE_SIZE_LIMIT = """
import resource, sys, torch
from pathlib import Path
from transformer.training import checkpoint as ckpt
out = Path(sys.argv[1])
ckpt.save_checkpoint(out, 1, {"w": torch.ones(16)}, {"step": 1, "optimizer": {}})
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))   # Python ignores SIGXFSZ: the write fails (EFBIG)
try:
    ckpt.save_checkpoint(out, 2, {"w": torch.ones(1 << 16)}, {"step": 2, "optimizer": {}})
except ckpt.CheckpointError as e:
    print(e)
"""


def test_a_save_over_the_file_size_limit_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A real write failure (``ulimit -f``: RLIMIT_FSIZE in a child process) in the first file of a save: one
    line (which file, the OS's reason), the previous checkpoint intact, no temporary file left behind."""
    pytest.importorskip("resource")
    out = tmp_path / "limited"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.count("\n") == 0 and "model.safetensors" in message, message
    assert "File too large" in message and "step 1 is kept" in message, message
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint.json"]
    assert torch.equal(ckpt.load_weights(out)["w"], torch.ones(16)) and ckpt.load_state(out)["step"] == 1


def test_a_run_is_not_replaced_without_overwrite(tmp_path, monkeypatch, capsys):
    """A new run into a directory that holds a run is refused in one line naming the directory, what it holds
    and the two ways on (--overwrite, --resume); --overwrite replaces the files a run writes and nothing else;
    --resume is unchanged; --out naming a file is one line too (it was a FileExistsError)."""
    monkeypatch.setattr("transformer.training.cli.TASK_NAMES", ("count",))
    _, out = run(tmp_path, steps=4, eval_every=2)
    before = ckpt.load_weights(out)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["train", "count", "--out", out, "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and out in err and "a finished count run (step 4 of 4)" in err, err
    assert "--overwrite" in err and f"--resume {out}" in err, err
    assert all(torch.equal(before[k], v) for k, v in ckpt.load_weights(out).items())
    assert main(["train", "count", "--out", out, "--steps", "2", "--eval-every", "2", "--overwrite"]) == 0
    assert "replacing a finished count run" in capsys.readouterr().out
    assert ckpt.checkpoint_step(out) == 2 and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name) == ["checkpoint-2",
                                                                                            "checkpoint.json"]
    assert main(["train", "--resume", out, "--steps", "4"]) == 0
    assert ckpt.checkpoint_step(out) == 4
    assert main(["train", "--resume", out, "--steps", "6", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    readme = tmp_path / "README.md"
    readme.write_text("not a run")
    assert main(["train", "count", "--out", str(readme)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert readme.read_text() == "not a run"


@pytest.mark.parametrize("method", ["full", "lora", "bitfit"])
def test_finetuning_methods_train_what_they_should(tmp_path, method):
    _, source = run(tmp_path, "source", steps=4)
    final, out = run(tmp_path, method, task="count-head", init=source, method=method, steps=4)
    config = ckpt.load_config(out)
    assert config["head"] == ["extra.bias", "extra.weight"]
    counts = config["parameters"]
    if method == "full":
        assert counts["trainable"] == counts["total"]
    else:
        assert counts["trainable"] < counts["total"] / 2
    before, after = ckpt.load_weights(source), ckpt.load_weights(out)
    body = "wte.weight"                                            # frozen by LoRA and BitFit alike
    assert torch.equal(before[body], after[body]) == (method != "full")
    task, model = load_run(out)                                    # reloads with the method applied
    with fused_kernels.use_backend("torch"):
        assert task.evaluate(model, 8)["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)


def test_init_that_shares_nothing_is_an_error(tmp_path):
    _, source = run(tmp_path, "source", steps=2, eval_every=2)
    weights = ckpt.load_weights(source)
    ckpt.save_checkpoint(tmp_path / "source", 2, {"other." + k: v for k, v in weights.items()},
                         ckpt.load_state(source))
    with pytest.raises(ckpt.CheckpointError, match="no weight of that run fits"):
        run(tmp_path, "ft", task="count-head", init=source, steps=2)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """What a user gets wrong ends in one line and exit 2, not a traceback: a diverging loss names the step and
    suggests a lower --lr (fp16 advice only on an fp16 run), a --model value of the wrong type names the field,
    and 0 for --eval-every is refused like 0 for --log-every (before, it silently meant the default)."""
    monkeypatch.setattr("transformer.training.cli.TASK_NAMES", ("count",))
    real = Task.loss

    def diverging(self, model, batch):
        loss, n = real(self, model, batch)
        return loss * float("nan"), n

    monkeypatch.setattr(CountTask, "loss", diverging)
    assert main(["train", "count", "--out", str(tmp_path / "nan"), "--lr", "1e6"]) == 2
    err = _one_line_error(capsys)
    assert "diverged: the loss is nan at step 1" in err and "lower --lr (it was" in err, err
    assert "fp16" not in err and "bf16" not in err, err
    monkeypatch.undo()
    monkeypatch.setattr("transformer.training.cli.TASK_NAMES", ("count",))
    assert main(["train", "count", "--out", str(tmp_path / "a"), "--model", "dim=abc"]) == 2
    assert "--model dim: dim must be an int, got 'abc'" in _one_line_error(capsys)
    assert main(["train", "count", "--out", str(tmp_path / "b"), "--model", "dropout=yes"]) == 2
    assert "dropout must be a number" in _one_line_error(capsys)
    for flag in ("--eval-every", "--log-every"):
        assert main(["train", "count", "--out", str(tmp_path / "c"), flag, "0"]) == 2
        assert f"{flag[2:].replace('-', '_')} must be a positive integer, got 0" in _one_line_error(capsys)


def test_the_banner_counts_and_says_what_auto_resolved_to(tmp_path, capsys):
    """ "1 step", not "1 steps"; the backend line says what "auto" runs on the device."""
    run(tmp_path, steps=1, eval_every=1, log_every=1)
    banner = capsys.readouterr().out.splitlines()[0]
    assert "1 step of 8 on cpu" in banner and "kernels backend torch" in banner, banner
    with fused_kernels.use_backend("auto"):
        want = "the Triton kernels" if fused_kernels._core.backend.INTERPRET else "the PyTorch ops"
        assert backend_in_force(torch.device("cpu")) == f"auto: {want}"


def test_cli_eval_prints_the_metrics(tmp_path, capsys):
    _, out = run(tmp_path, steps=2, eval_every=2)
    capsys.readouterr()
    assert main(["eval", out]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[: printed.index("}") + 1])["val_loss"] > 0
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_triton_and_reference_paths_give_the_same_loss_curve(tmp_path):
    """The convergence test: a few steps through the real kernels (the interpreter here) and through the
    PyTorch path follow the same curve."""
    if not fused_kernels._core.backend.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    curves = {}
    for backend in ("triton", "torch"):
        run(tmp_path, backend, steps=4, batch_size=4, backend=backend, eval_every=4, log_every=1)
        lines = (tmp_path / backend / "metrics.jsonl").read_text().splitlines()
        curves[backend] = [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]
    assert len(curves["triton"]) == 4
    assert curves["triton"] == pytest.approx(curves["torch"], rel=2e-4, abs=2e-4)
    assert curves["triton"][-1] < curves["triton"][0]


# ----------------------------------------------------------------------------- CPU threads


def test_cpu_threads_rule(monkeypatch):
    from transformer.training.trainer import cpu_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(None, "cpu") == 1               # one thread on the CPU by default
    assert cpu_threads(3, "cpu") == 3 and cpu_threads(2, "cuda") == 2
    assert cpu_threads(None, "cuda") is None          # torch's default on a GPU
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(None, "cpu") is None           # the user's OMP_NUM_THREADS wins (torch follows it)
    assert cpu_threads(4, "cpu") == 4                 # and --threads over both


def test_a_run_sets_its_threads_and_restores_them(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []
    original = CountTask.train_batch
    monkeypatch.setattr(CountTask, "train_batch", lambda self, g, b: seen.append(torch.get_num_threads())
                        or original(self, g, b))
    before = torch.get_num_threads()
    for threads, want in ((None, 1), (2, 2)):
        seen.clear()
        run(tmp_path, f"t{threads}", steps=2, eval_every=2, threads=threads)
        assert set(seen) == {want}
        assert torch.get_num_threads() == before
        assert f"{want} CPU thread" in capsys.readouterr().out
    config = json.loads((tmp_path / "t2" / "config.json").read_text())
    assert "threads" not in config["train"]            # how a run executed, not what it trains
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        resolve(TrainArgs(task="count", threads=0))


# ----------------------------------------------------------------------------- backend against device


def test_triton_backend_on_the_cpu_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """Without the interpreter, backend 'triton' cannot run on the CPU: resolve (hence the CLI) says so in
    one line before anything is built or written, whether it comes from --backend or FUSED_KERNELS_BACKEND."""
    monkeypatch.setattr(fused_kernels._core.backend, "INTERPRET", False)
    with pytest.raises(ValueError, match=r"--backend triton on cpu: the Triton kernels need a CUDA device"):
        resolve(TrainArgs(task="count", backend="triton", device="cpu"))
    from transformer.training.trainer import check_backend
    with fused_kernels.use_backend("triton"), pytest.raises(ValueError, match="FUSED_KERNELS_BACKEND"):
        check_backend(None, "cpu")                                      # no --backend: the one in force
    resolve(TrainArgs(task="count", backend="torch", device="cpu"))
    out = tmp_path / "run"
    assert main(["train", "vit", "--backend", "triton", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --backend triton on cpu:") and err.count("\n") == 1 and "interpreter" in err
    assert not out.exists()
    _, trained = run(tmp_path, "trained", steps=2, eval_every=2)          # eval of a run, same check
    with fused_kernels.use_backend("triton"):
        assert main(["eval", trained]) == 2
    assert "need a CUDA device" in capsys.readouterr().err
    monkeypatch.setattr(fused_kernels._core.backend, "INTERPRET", True)              # with the interpreter it may run
    resolve(TrainArgs(task="count", backend="triton", device="cpu"))


def test_interpreter_note_is_printed_when_the_kernels_would_run_interpreted(monkeypatch):
    from transformer.training.trainer import interpreter_note
    monkeypatch.setattr(fused_kernels._core.backend, "INTERPRET", True)
    assert "for tests" in interpreter_note("triton", "cpu") and interpreter_note(None, "cpu")
    assert interpreter_note("torch", "cpu") is None and interpreter_note("triton", "cuda") is None
    monkeypatch.setattr(fused_kernels._core.backend, "INTERPRET", False)
    assert interpreter_note("auto", "cpu") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cli_triton_backend_on_the_cpu_exits_2_with_one_line(tmp_path):
    """The real command, in a process without TRITON_INTERPRET: exit status 2, one line, no traceback, no
    progress bar, nothing written."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_KERNELS_BACKEND")}
    out = tmp_path / "vit"
    proc = subprocess.run([sys.executable, "-m", "transformer", "train", "vit", "--backend", "triton", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --backend triton on cpu: the Triton kernels need a CUDA device")
    assert proc.stdout == "" and not out.exists()


# ----------------------------------------------------------------------------- loss.png


def test_loss_plot_draws_labelled_losses_and_held_out_accuracies(tmp_path):
    from transformer.training.plot import accuracy_keys, plot_losses
    records = [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5},
               {"step": 2, "val_loss": 1.2, "accuracy": 0.5, "exact_match": 0.25, "bleu": 30.0},
               {"step": 4, "train_loss": 1.0}, {"step": 4, "val_loss": 0.9, "accuracy": 0.75, "exact_match": 0.5}]
    assert accuracy_keys(records) == ["accuracy", "exact_match"]   # fractions only: not bleu
    drawn = plot_losses(records, tmp_path / "a.png", "t", ("training loss: smoothed", "held-out loss: plain"))
    assert drawn == {"loss": ["training loss: smoothed", "held-out loss: plain"],
                     "accuracy": ["held-out accuracy", "held-out exact match"]}
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    losses_only = [r for r in records if "accuracy" not in r]
    assert plot_losses(losses_only, tmp_path / "b.png", "t") == {"loss": ["training loss"]}
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_help_is_plain_text(capsys):
    """argparse prints descriptions as they are: no reStructuredText markup (``...``) in any --help."""
    from transformer.training.cli import parser
    top = parser()
    texts = [top.format_help()]
    for command in ("train", "finetune", "eval", "generate", "translate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts.append(capsys.readouterr().out)
    assert all("``" not in text for text in texts), [t for t in texts if "``" in t][0]
    assert "COMMAND --help" in texts[0]

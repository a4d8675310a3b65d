"""The GPT training task: next-token windows, the loss, deterministic held-out metrics, tokenizer reload,
sampling (seeded, past the context) and a short training run that learns.

Training and evaluation run on the PyTorch path (``fused_kernels.use_backend("torch")``): the
Triton interpreter would take minutes for the same steps, and the kernels have their own tests."""

import math
from pathlib import Path

import pytest
import torch

from transformer.data.text import load_text, split_text
from transformer.training.task import get_task
from transformer.training.tasks.gpt import GPTTask, _sample

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare.txt"


pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def task() -> GPTTask:
    return GPTTask()                     # the pydoc text, character level


def _tiny(task: GPTTask, seed: int = 0):
    torch.manual_seed(seed)
    return task.build_model(task.model_config("tiny", dropout=0.0, attn_dropout=0.0)).eval()


def _train(task: GPTTask, model, steps: int, batch_size: int = 16, lr: float = 3e-3) -> None:
    """The trainer's step, without the schedule: AdamW, clipping, batch s drawn from a generator seeded s."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for s in range(steps):
        loss, units = task.loss(model, task.train_batch(torch.Generator().manual_seed(s), batch_size))
        assert units == batch_size * model.config.max_seq_len
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def test_registered_with_char_default(task):
    assert get_task("gpt") is GPTTask
    assert task.spec() == {"data": None, "tokenizer": "char", "bpe_vocab": 1024}
    train_text, _ = split_text(load_text())
    assert task.tokenizer.vocab_size == 7 + len(set(train_text))
    assert task.model_config(GPTTask.default_preset).vocab_size == task.tokenizer.vocab_size


def test_batches_are_seeded_windows_with_shifted_targets(task):
    _tiny(task)                                                  # fixes the window length (max_seq_len 64)
    a = task.train_batch(torch.Generator().manual_seed(3), 5)
    b = task.train_batch(torch.Generator().manual_seed(3), 5)
    c = task.train_batch(torch.Generator().manual_seed(4), 5)
    assert set(a) == {"input_ids", "targets"}
    assert a["input_ids"].shape == a["targets"].shape == (5, 64) and a["input_ids"].dtype == torch.long
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert torch.equal(a["targets"][:, :-1], a["input_ids"][:, 1:])
    train_text, _ = split_text(load_text())
    for x, y in zip(a["input_ids"], a["targets"]):
        assert task.tokenizer.decode(torch.cat([x, y[-1:]]).tolist()) in train_text   # contiguous training text


def test_evaluate_is_deterministic_and_starts_at_uniform(task):
    model = _tiny(task)
    sampled = task.evaluate(model, batch_size=8, max_batches=2)
    torch.manual_seed(123)                                       # the global RNG plays no part
    assert task.evaluate(model, batch_size=8, max_batches=2) == sampled
    whole = task.evaluate(model, batch_size=256, max_batches=None)
    assert task.evaluate(model, batch_size=100, max_batches=None)["val_loss"] == pytest.approx(whole["val_loss"])
    # an untrained GPT-2 init (std 0.02, logits of std ~0.1) predicts nearly uniformly: loss near ln(vocab)
    assert whole["val_loss"] == pytest.approx(math.log(task.tokenizer.vocab_size), abs=0.2)
    assert whole["val_ppl"] == pytest.approx(math.exp(whole["val_loss"]))
    assert whole["bits_per_char"] == pytest.approx(whole["val_loss"] / math.log(2))     # 1 char per token


def _unigram_entropy(text: str) -> float:
    counts = torch.tensor([text.count(c) for c in set(text)], dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def test_short_training_run_beats_unigram_model(task):
    model = _tiny(task)
    before = task.evaluate(model, 32, max_batches=4)["val_loss"]
    _train(task, model, steps=60)
    after = task.evaluate(model, 32, max_batches=4)["val_loss"]
    train_text, _ = split_text(load_text())
    assert after < before - 1.5
    assert after < _unigram_entropy(train_text)                 # it uses the context, not just frequencies


def test_tokenizer_reloads_from_run_directory(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog; 42 émigrés.\n" * 200)
    for options in ({"tokenizer": "char"}, {"tokenizer": "bpe", "bpe_vocab": 300}):
        first = GPTTask(str(path), **options)
        run = tmp_path / options["tokenizer"]
        run.mkdir()
        first.save(run)
        again = GPTTask(**first.spec(), directory=run)
        assert again.spec() == first.spec()
        assert again.tokenizer.vocab_size == first.tokenizer.vocab_size
        assert torch.equal(again.train_ids, first.train_ids) and torch.equal(again.val_ids, first.val_ids)
    assert GPTTask(str(path), tokenizer="bpe", bpe_vocab=300).tokenizer.vocab_size == 300


def test_generate_is_seeded_and_slides_past_the_context(task):
    model = _tiny(task)
    state = torch.get_rng_state()
    text = task.generate(model, "def main(", max_new_tokens=100, seed=7)
    assert torch.equal(torch.get_rng_state(), state)            # the caller's RNG is left alone
    assert text.startswith("def main(") and len(text) > len("def main(")
    assert task.generate(model, "def main(", max_new_tokens=100, seed=7) == text
    assert task.generate(model, "def main(", max_new_tokens=100, seed=8) != text
    assert task.generate(model, "", max_new_tokens=5, seed=0) != ""

    # 30 cached tokens fill the context of 64, then 40 more through the sliding window: greedily, the same
    # tokens as recomputing the last 64 tokens from scratch at every step (nanoGPT's sampler)
    ids = torch.tensor([task.tokenizer.encode("class Foo(Base):\n    def __init__(self, x):")])   # 34 tokens
    new = _sample(model, ids, 70, temperature=0.0, top_k=None)
    assert new.shape == (1, 70)
    tokens = ids
    with torch.no_grad():
        for _ in range(70):
            nxt = model(tokens[:, -64:]).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    assert torch.equal(new, tokens[:, ids.shape[1]:])


def test_examples_are_deterministic_continuations(task):
    model = _tiny(task)
    examples = task.examples(model, n=2, max_new_tokens=20)
    assert len(examples) == 2 and all("▌" in e for e in examples)
    _, val_text = split_text(load_text())
    assert all(e.split("▌")[0] in val_text for e in examples)    # prompts from the held-out text
    assert task.examples(model, n=2, max_new_tokens=20) == examples


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        GPTTask(str(tmp_path / "no_such_file.txt"))
    with pytest.raises(ValueError, match="tokenizer must be 'char' or 'bpe'"):
        GPTTask(tokenizer="words")
    with pytest.raises(ValueError, match="unknown options"):
        GPTTask(vocab=12)
    short = tmp_path / "short.txt"
    short.write_text("only a few characters\n")
    small = GPTTask(str(short))
    small.model_config("tiny")
    with pytest.raises(ValueError, match="fewer than one window"):
        small.train_batch(torch.Generator().manual_seed(0), 2)
    with pytest.raises(RuntimeError, match="model_config"):
        GPTTask(str(short)).train_batch(torch.Generator().manual_seed(0), 2)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent")
def test_tiny_shakespeare_vocabulary_and_short_run():
    task = GPTTask(str(SHAKESPEARE))
    assert task.tokenizer.vocab_size == 65 + 7                  # nanoGPT's 65 characters + our specials
    assert len(task.train_ids) == int(len(SHAKESPEARE.read_text()) * 0.9)
    model = _tiny(task)
    before = task.evaluate(model, 32, max_batches=4)["val_loss"]
    _train(task, model, steps=40)
    assert task.evaluate(model, 32, max_batches=4)["val_loss"] < before - 1.0


def test_documented_nanogpt_recipes_run(tmp_path):
    """The two nanoGPT recipes of docs/models.md, as written there, for 2 steps: on the pydoc text that ships with
    Python, and on Tiny Shakespeare (which the docs say where to fetch; never committed here)."""
    import re
    import shlex

    from transformer.training.cli import main

    readme = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    assert f"curl -o tiny_shakespeare.txt {url}" in readme
    commands = re.findall(r"`python -m transformer (train gpt --preset char-64[^`]*)`", readme)
    assert len(commands) == 2 and sum("--data tiny_shakespeare.txt" in c for c in commands) == 1
    for i, command in enumerate(commands):
        args = shlex.split(command)
        if "--data" in args:
            if not SHAKESPEARE.is_file():
                continue
            args[args.index("--data") + 1] = str(SHAKESPEARE)
        args += ["--steps", "2", "--eval-batches", "1", "--out", str(tmp_path / str(i)), "--no-progress"]
        assert main(args) == 0, command
        assert (tmp_path / str(i) / "metrics.json").is_file()


def test_sliding_window_alibi_preset_trains_and_generates(task):
    """The task with the sliding-window ALiBi preset: a short run learns, and sampling past the context works."""
    torch.manual_seed(0)
    model = task.build_model(task.model_config("sliding-alibi-tiny")).eval()
    assert model.wpe is None and model.config.window == 8
    before = task.evaluate(model, 32, max_batches=2)["val_loss"]
    _train(task, model, steps=40)
    after = task.evaluate(model, 32, max_batches=2)["val_loss"]
    assert after < before - 1.0
    text = task.generate(model, "def main(", max_new_tokens=80, seed=0)
    assert text.startswith("def main(") and len(text) > len("def main(")
    # no paged cache for a window / ALiBi: each prompt runs alone on the dense cache, greedily the same text
    prompts = ["def main(", "class X:", ""]
    batch = task.generate_batch(model, prompts, max_new_tokens=12, temperature=0.0)
    assert batch == [task.generate(model, p, max_new_tokens=12, temperature=0.0)[len(p):] for p in prompts]

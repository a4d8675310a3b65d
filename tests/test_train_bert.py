"""The BERT training tasks: next-sentence pairs and their segments, the unigram yardstick, the docstrings
classification data, and short runs that learn (pre-training, then fine-tuning through the trainer).

Training runs on the PyTorch path (``fused_kernels.use_backend("torch")``): the Triton
interpreter would take minutes for the same steps, and the kernels have their own tests."""

import math

import pytest
import torch

from transformer.data import docstrings
from transformer.training import checkpoint
from transformer.training.task import get_task
from transformer.training.tasks.bert import (
    BERTClassifyTask,
    BERTPretrainTask,
    make_pair,
    split_sentences,
    unigram_entropy,
)
from transformer.training.trainer import TrainArgs, train

pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def task() -> BERTPretrainTask:
    return BERTPretrainTask(bpe_vocab=384)          # the pydoc text


@pytest.fixture(scope="module")
def cls_task() -> BERTClassifyTask:
    return BERTClassifyTask(bpe_vocab=384)          # the standard-library docstrings


def _tiny(task, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return task.build_model(task.model_config("tiny", **overrides)).eval()


def _train(task, model, steps: int, batch_size: int, lr: float) -> None:
    """The trainer's step without the schedule: AdamW, clipping, batch s drawn from a generator seeded s."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for s in range(steps):
        torch.manual_seed(s)
        loss, _ = task.loss(model, task.train_batch(torch.Generator().manual_seed(s), batch_size))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


# -------------------------------------------------------------------------------------- sentences, pairs

def test_split_sentences():
    text = "Title\n*****\n\nOne sentence. Two \"quoted.\" Three?\n  Still three! e.g. lower stays.\n\n   x = f(1)\n"
    assert split_sentences(text) == ["Title", "One sentence.", "Two \"quoted.\"", "Three?",
                                     "Still three! e.g. lower stays.", "x = f(1)"]


def _sentence_of(token: int) -> int:
    return token - 100


def _synthetic() -> list[list[int]]:
    """Sentence k is the token 100 + k repeated 1 to 7 times, so every token names its sentence."""
    return [[100 + k] * (1 + k * 5 % 7) for k in range(60)]


def test_pairs_are_true_continuations_or_random(task):
    sentences, tok = _synthetic(), task.tokenizer
    g = torch.Generator().manual_seed(0)
    labels = []
    for start in range(0, 58):
        pair, end = make_pair(sentences, start, 24, g, tok)
        ids, types = pair["input_ids"], pair["token_type_ids"]
        assert len(ids) == len(types) <= 24
        sep = ids.index(tok.sep_id)
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and ids.count(tok.sep_id) == 2
        assert types == [0] * (sep + 1) + [1] * (len(ids) - sep - 1)
        a = [_sentence_of(t) for t in ids[1:sep]]
        b = [_sentence_of(t) for t in ids[sep + 1:-1]]
        assert a and b and a[-1] == end - 1 and start <= a[0]          # A: a run ending just before `end`
        assert sorted(a) == a and sorted(set(a)) == list(range(a[0], end))
        assert set(b) == set(range(b[0], b[-1] + 1)) and sorted(b) == b     # B: a run of consecutive sentences
        assert b.count(b[0]) == len(sentences[b[0]]) or len(set(b)) == 1  # ... from the start of a sentence
        if pair["next_sentence_label"] == 0:
            assert b[0] == end                                           # the true continuation
        else:
            assert not start <= b[0] <= end                              # elsewhere
        labels.append(pair["next_sentence_label"])
    assert 0.3 < sum(labels) / len(labels) < 0.7


def test_batches_segments_lengths_and_determinism(task):
    tok = task.tokenizer
    _tiny(task, max_seq_len=24)                                  # fixes the pair length
    a = task.train_batch(torch.Generator().manual_seed(3), 16)
    b = task.train_batch(torch.Generator().manual_seed(3), 16)
    c = task.train_batch(torch.Generator().manual_seed(4), 16)
    assert set(a) == {"input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape[1] <= 24 and a["next_sentence_label"].shape == (16,)
    masked = a["labels"] != -100
    assert masked.any() and not (masked & (a["attention_mask"] == 0)).any()
    for ids, types, mask in zip(a["input_ids"], a["token_type_ids"], a["attention_mask"]):
        n = int(mask.sum())
        ids, types = ids[:n].tolist(), types[:n].tolist()
        seps = [i for i, t in enumerate(ids) if t == tok.sep_id]
        assert ids[0] == tok.cls_id and len(seps) == 2 and seps[1] == n - 1
        assert types == [0] * (seps[0] + 1) + [1] * (n - seps[0] - 1)     # [CLS] A [SEP] | B [SEP]
    _tiny(task)                                                  # back to the tiny preset's 64


def test_unigram_entropy_by_hand():
    # vocabulary of 10 with specials 0..6: the non-special tokens are 7, 8, 9 (V = 3); training counts
    # 7: 2, 8: 1, 9: 0 (N = 3), so add-one gives p = 3/6, 2/6, 1/6; specials count nowhere
    specials = range(7)
    h = unigram_entropy([7, 7, 8, 2, 3], [7, 9, 0, 4], 10, specials)
    assert h == pytest.approx(-(math.log(3 / 6) + math.log(1 / 6)) / 2)
    with pytest.raises(ValueError, match="no non-special"):
        unigram_entropy([7], [0, 3], 10, specials)


# ------------------------------------------------------------------------------------------- docstrings

def test_docstrings_dataset_is_deterministic_and_disjoint():
    a, b = docstrings.load_classification(), docstrings.load_classification()
    assert a == b
    assert len(a.labels) >= 6 and len(a.train) > 1000 and len(a.test) > 200
    train_texts, test_texts = {t for t, _ in a.train}, {t for t, _ in a.test}
    assert not train_texts & test_texts
    assert len(train_texts) == len(a.train) and len(test_texts) == len(a.test)
    assert {y for _, y in a.train} == {y for _, y in a.test} == set(range(len(a.labels)))
    counts = torch.bincount(torch.tensor([y for _, y in a.train]))
    assert counts.max() / counts.sum() < 0.3                      # no class dominates


def test_tsv_data(tmp_path):
    path = tmp_path / "data.tsv"
    rows = [f"{'pos' if i % 3 else 'neg'}\ttext number {i}" for i in range(30)]
    path.write_text("\n".join(rows + ["", "pos\ttext number 1", "neg\ttext number 2"]) + "\n")
    data = docstrings.load_classification(str(path))
    assert data.labels == ["neg", "pos"]
    texts = [t for t, _ in data.train + data.test]
    assert len(texts) == len(set(texts)) == 29                     # "text number 2" had two labels: dropped
    assert len(data.test) == 6
    path.write_text("pos\tfine\nno tab here\n")
    with pytest.raises(ValueError, match="line 2"):
        docstrings.load_classification(str(path))
    with pytest.raises(FileNotFoundError, match="--data"):
        docstrings.load_classification(str(tmp_path / "missing.tsv"))


# ---------------------------------------------------------------------------------------------- training

def test_registered(task, cls_task):
    assert get_task("bert") is BERTPretrainTask and get_task("bert-cls") is BERTClassifyTask
    assert BERTPretrainTask.finetune_task == "bert-cls"
    assert task.spec() == {"data": None, "tokenizer": "bpe", "bpe_vocab": 384}
    assert task.model_config("tiny").vocab_size == task.tokenizer.vocab_size == 384
    assert cls_task.model_config("tiny").num_labels == len(cls_task.labels)
    with pytest.raises(ValueError, match="unknown options"):
        BERTPretrainTask(vocab=3)


def test_pretraining_lowers_the_masked_lm_loss(task):
    model = _tiny(task, dropout=0.0, attn_dropout=0.0)
    before = task.evaluate(model, batch_size=32, max_batches=2)
    assert before == task.evaluate(model, batch_size=32, max_batches=2)            # deterministic
    assert before["mlm_loss"] == pytest.approx(math.log(384), abs=0.5)
    assert before["unigram_entropy"] < math.log(384)
    _train(task, model, steps=80, batch_size=32, lr=3e-3)
    after = task.evaluate(model, batch_size=32, max_batches=2)
    assert after["mlm_loss"] < before["mlm_loss"] - 0.7             # ~1.1 at seeds 0-2
    assert after["val_loss"] == pytest.approx(after["mlm_loss"] + after["nsp_loss"])
    examples = task.examples(model, 2)
    assert len(examples) == 2 and all("[MASK]" in e and "truth" in e for e in examples)


def test_classification_learns(cls_task):
    model = _tiny(cls_task, dropout=0.0, attn_dropout=0.0)
    before = cls_task.evaluate(model, batch_size=64, max_batches=3)
    _train(cls_task, model, steps=100, batch_size=32, lr=3e-3)
    after = cls_task.evaluate(model, batch_size=64, max_batches=3)
    assert after["val_loss"] < before["val_loss"] - 0.15
    assert after["accuracy"] > after["majority_accuracy"]
    assert 0 <= after["macro_f1"] <= 1
    examples = cls_task.examples(model, 3)
    assert len(examples) == 3 and all(e.startswith("predicted ") for e in examples)


def test_pretrain_then_finetune_with_the_trainer(tmp_path):
    """``train bert`` then ``finetune bert --init`` (LoRA): the tokenizer and the encoder come from the
    pre-training run, the classifier head is new and trains, the pre-trained encoder stays frozen."""
    common = dict(preset="tiny", backend="torch", progress=False, eval_batches=1, eval_batch_size=64)
    pre = tmp_path / "pre"
    train(TrainArgs(task="bert", steps=3, batch_size=8, out=str(pre), task_options={"bpe_vocab": 384}, **common))
    result = train(TrainArgs(task="bert-cls", init=str(pre), method="lora", steps=3, batch_size=8, lr=1e-3,
                             out=str(tmp_path / "cls"), **common))
    assert 0 < result["trainable_parameters"] < result["total_parameters"] / 5
    assert {"val_loss", "accuracy", "majority_accuracy", "macro_f1"} <= set(result)
    assert checkpoint.load_config(tmp_path / "cls")["head"] == ["classifier.bias", "classifier.weight"]
    pre_weights, cls_weights = checkpoint.load_weights(pre), checkpoint.load_weights(tmp_path / "cls")
    assert torch.equal(cls_weights["bert.word_embed.weight"], pre_weights["bert.word_embed.weight"])   # frozen
    assert BERTClassifyTask(directory=pre).tokenizer.vocab_size == 384       # the pre-training tokenizer

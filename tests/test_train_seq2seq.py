"""The translation task: num2words pairs with a fixed held-out set, TSV files, padded batches with [EOS]
targets, the shared tokenizer and its reload, the metrics, translation, a short training run that learns,
and a trainer run whose saved directory reloads to the same metrics.

Training and evaluation run on the PyTorch path (``fused_kernels.use_backend("torch")``): the
Triton interpreter would take minutes for the same steps, and the kernels have their own tests."""

import pytest
import torch

from transformer.data.numbers import (
    HELD_OUT,
    NUMBERS,
    SMALL,
    NumberPairs,
    TsvPairs,
    held_out_numbers,
    load_pairs,
    read_tsv,
    sample_numbers,
    spell,
)
from transformer.training.task import get_task
from transformer.training.tasks.seq2seq import BOS, EOS, PAD, Seq2SeqTask, bleu, chrf, exact_match

pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def task() -> Seq2SeqTask:
    return Seq2SeqTask()                     # numbers-fr, BPE


def _tiny(task: Seq2SeqTask, seed: int = 0):
    torch.manual_seed(seed)
    return task.build_model(task.model_config("tiny", dropout=0.0, label_smoothing=0.0)).eval()


def _tsv(tmp_path, lines: list[str], name: str = "pairs.tsv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_number_pairs_are_spelled_right():
    assert spell(21, "fr") == ("twenty-one", "vingt et un")
    assert spell(80, "fr") == ("eighty", "quatre-vingts")
    assert spell(80080, "fr") == ("eighty thousand and eighty", "quatre-vingt mille quatre-vingts")
    assert spell(1234, "fr") == ("one thousand, two hundred and thirty-four", "mille deux cent trente-quatre")
    assert spell(21, "de") == ("twenty-one", "einundzwanzig")
    assert spell(71, "es") == ("seventy-one", "setenta y uno")


def test_held_out_numbers_are_fixed_and_never_trained_on():
    data = load_pairs("numbers-fr")
    assert isinstance(data, NumberPairs) and isinstance(load_pairs(None), NumberPairs)
    held = held_out_numbers()
    torch.manual_seed(123)                   # no global RNG involved
    assert held == held_out_numbers() == data.held_numbers and len(set(held)) == HELD_OUT
    assert all(SMALL <= n < NUMBERS for n in held)
    assert data.held == [spell(n, "fr") for n in held]
    drawn = sample_numbers(torch.Generator().manual_seed(0), 20_000, set())
    assert set(drawn) & set(held)            # so excluding them below is really exercised
    trained = sample_numbers(torch.Generator().manual_seed(0), 20_000, set(held))
    assert not set(trained) & set(held) and len(trained) == 20_000
    assert trained == sample_numbers(torch.Generator().manual_seed(0), 20_000, set(held))
    assert min(trained) >= 0 and max(trained) < NUMBERS
    assert 0.1 < sum(n < 10 for n in trained) / len(trained) < 0.25     # a sixth are single digits
    pairs = data.sample(torch.Generator().manual_seed(0), 8)
    assert pairs == [spell(n, "fr") for n in sample_numbers(torch.Generator().manual_seed(0), 8, set(held))]


def test_tsv_split_and_errors(tmp_path):
    pairs = [(f"source {i}", f"target {i}") for i in range(40)]
    path = _tsv(tmp_path, [f"{s}\t{t}" for s, t in pairs] + ["", "source 3\ttarget 3"])   # blank, repeated
    data = load_pairs(str(path))
    assert isinstance(data, TsvPairs) and (len(data.train), len(data.held)) == (36, 4)
    assert sorted(data.train + data.held) == sorted(pairs) and load_pairs(str(path)).held == data.held
    drawn = data.sample(torch.Generator().manual_seed(0), 50)
    assert set(drawn) <= set(data.train) and drawn == data.sample(torch.Generator().manual_seed(0), 50)
    bad = _tsv(tmp_path, ["a\tb", "c\td", "no tab here", "e\tf"], "bad.tsv")
    with pytest.raises(ValueError, match="line 3"):
        read_tsv(bad)
    with pytest.raises(ValueError, match="line 2"):
        read_tsv(_tsv(tmp_path, ["a\tb", "c\t "], "empty_side.tsv"))
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_pairs(str(tmp_path / "nope.tsv"))
    small = Seq2SeqTask(str(path), tokenizer="char")
    assert small.held_pairs == data.held and small.spec()["data"] == str(path)


def test_registered_and_config_matches_tokenizer(task):
    assert get_task("seq2seq") is Seq2SeqTask
    assert task.spec() == {"data": None, "tokenizer": "bpe", "vocab_size": 512, "max_len": 64}
    tok = task.tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS) == (0, 5, 6)
    config = task.model_config(Seq2SeqTask.default_preset)
    assert config.vocab_size == tok.vocab_size and config.share_embeddings
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 5, 6)
    with pytest.raises(ValueError, match="eos_token_id"):
        task.model_config("tiny", eos_token_id=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        task.model_config("tiny", max_seq_len=32)            # the max_len option sets it


def test_batches_are_deterministic_and_well_formed(task):
    a = task.train_batch(torch.Generator().manual_seed(3), 16)
    b = task.train_batch(torch.Generator().manual_seed(3), 16)
    c = task.train_batch(torch.Generator().manual_seed(4), 16)
    assert set(a) == {"input_ids", "attention_mask", "labels"}
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["input_ids"], c["input_ids"])
    ids, mask, labels = a["input_ids"], a["attention_mask"], a["labels"]
    assert ids.shape == mask.shape and ids.shape[0] == labels.shape[0] == 16
    assert torch.all(ids[mask == 0] == PAD) and torch.all(ids[mask == 1] != PAD)
    assert torch.equal(mask, mask.cummin(dim=1).values)                 # right padding
    expected = task.pairs.sample(torch.Generator().manual_seed(3), 16)
    for src, m, lab, pair in zip(ids, mask, labels, expected):
        n = int((lab != PAD).sum())
        assert lab[n - 1] == EOS and torch.all(lab[n:] == PAD) and EOS not in lab[:n - 1]
        assert (task.tokenizer.decode(src[m == 1].tolist()), task.tokenizer.decode(lab[:n - 1].tolist())) == pair


def test_tokenizer_save_and_reload(task, tmp_path):
    task.save(tmp_path)
    again = Seq2SeqTask(directory=tmp_path)
    assert again.tokenizer.vocab_size == task.tokenizer.vocab_size
    source, target = task.held_pairs[0]
    assert again.tokenizer.encode(target) == task.tokenizer.encode(target)
    assert again.tokenizer.decode(again.tokenizer.encode(source)) == source
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Seq2SeqTask(directory=tmp_path / "missing")


def test_metrics():
    refs = ["vingt et un mille deux cents", "cent", "mille deux cent trente et un"]
    assert exact_match(refs, refs) == 1.0
    assert exact_match(["vingt et un mille deux cents", "cent un", "mille"], refs) == pytest.approx(1 / 3)
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert 0.0 < bleu(["vingt et un mille deux cent", "cent", "mille deux cent trente"], refs) < 100.0
    compounds = ["einundzwanzig", "achtzigtausendachtzig"]                  # one word each: no word bigrams
    assert bleu(compounds, compounds) == 0.0 and chrf(compounds, compounds) == pytest.approx(100.0)
    assert 0.0 < chrf(["einundzwanzig", "achtzigtausend"], compounds) < 100.0
    with pytest.raises(ValueError, match="equally many"):
        exact_match(["a"], refs)


def test_translate_returns_strings_and_rejects_bad_input(task):
    model = _tiny(task).train()
    out = task.translate(model, ["twenty-one", "  one hundred and five "], num_beams=2)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert model.training                                                # mode restored
    assert task.translate(model.eval(), ["twenty-one"]) == task.translate(model, ["twenty-one"])
    assert task.translate(model, []) == []
    with pytest.raises(ValueError, match="sentence 1"):
        task.translate(model, ["one", " "])
    examples = task.examples(model, 2)
    assert len(examples) == 2 and task.held_pairs[0][0] in examples[0] and task.held_pairs[0][1] in examples[0]


def test_short_training_lowers_val_loss_and_evaluate_is_deterministic(task):
    model = _tiny(task)
    before = task.evaluate(model, batch_size=64, max_batches=1)
    assert task.evaluate(model, batch_size=64, max_batches=1) == before
    assert set(before) == {"val_loss", "exact_match", "bleu", "chrf"} and before["exact_match"] == 0.0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    for s in range(60):
        loss, units = task.loss(model, task.train_batch(torch.Generator().manual_seed(s), 32))
        assert units > 32
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    after = task.evaluate(model, batch_size=64, max_batches=1)
    assert after["val_loss"] < before["val_loss"] - 1.5
    assert after["bleu"] > before["bleu"] and after["chrf"] > before["chrf"]


def test_trainer_run_reloads_and_translates(tmp_path):
    """End to end: the trainer saves the tokenizer and the spec; the reloaded run gives the same metrics."""
    from transformer.training.trainer import TrainArgs, load_run, train

    result = train(TrainArgs(task="seq2seq", preset="tiny", steps=20, batch_size=32, eval_batch_size=500,
                             out=str(tmp_path), backend="torch", progress=False, seed=1))
    task, model = load_run(str(tmp_path))
    assert task.spec() == {"data": None, "tokenizer": "bpe", "vocab_size": 512, "max_len": 64}
    with torch.no_grad():
        again = task.evaluate(model, 500)
    assert again == pytest.approx({k: result[k] for k in ("val_loss", "exact_match", "bleu", "chrf")})
    out = task.translate(model, ["twenty-one", "eighty thousand and eighty"], num_beams=3)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)

"""The multimodal model: shapes, padding masks, task heads, single-modality inputs, the Triton path against
the reference, its digit/phrase data, and a short training run whose loss falls."""

import json

import pytest
import torch
import torch.nn.functional as F

import fused_kernels
from transformer import Multimodal, MultimodalConfig
from transformer.data import digit_phrases
from transformer.training.trainer import TrainArgs, train


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Multimodal(MultimodalConfig.from_preset("tiny", vocab_size=40, max_text_len=24, dropout=0.0)).eval()


def inputs(b=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 40, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 5:] = 0
    mask[-1, 2:] = 0
    return torch.rand(b, 1, 8, 8, generator=g), ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(autouse=True)
def reference():
    with fused_kernels.use_backend("torch"):
        yield


def test_every_task_head_has_its_shape_and_the_loss_is_their_sum(model):
    pixels, ids, mask = inputs()
    labels = {"match": torch.tensor([0, 1, 1]), "digit": torch.tensor([3, 0, 9]), "sum": torch.tensor([1, 2, 3])}
    out = model(pixels, ids, mask, labels=labels)
    assert {t: tuple(v.shape) for t, v in out.logits.items()} == {"match": (3, 2), "digit": (3, 10), "sum": (3, 10)}
    expected = sum(F.cross_entropy(out.logits[t], labels[t]) for t in labels)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    only = model(pixels, ids, mask, tasks=["sum"])
    assert list(only.logits) == ["sum"] and only.loss is None
    # a task's queries attend only to each other: its logits do not depend on which other tasks run
    torch.testing.assert_close(only.logits["sum"], out.logits["sum"])


def test_padded_text_tokens_change_nothing(model):
    pixels, ids, mask = inputs()
    wider_ids = torch.cat([ids, torch.randint(7, 40, (3, 4))], dim=1)        # junk ids at padded positions
    wider_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    wider_ids[0, 5:] = torch.randint(7, 40, (wider_ids.shape[1] - 5,))
    a = model(pixels, ids, mask).logits
    b = model(pixels, wider_ids, wider_mask).logits
    for t in a:
        torch.testing.assert_close(b[t], a[t])
    memory, memory_mask = model.encode(pixels, wider_ids, wider_mask)
    assert memory.shape == (3, 1 + 16 + 13, 32) and memory_mask[:, :17].all() and memory_mask[0, 17 + 5:].sum() == 0


def test_one_modality_alone_and_bad_inputs(model):
    pixels, ids, mask = inputs()
    assert model.encode(pixels)[0].shape == (3, 17, 32)
    assert model.encode(None, ids, mask)[0].shape == (3, 9, 32)
    assert model(input_ids=ids, attention_mask=mask).logits["digit"].shape == (3, 10)
    with pytest.raises(ValueError, match="needs pixel_values, input_ids or both"):
        model()
    with pytest.raises(ValueError, match="different batch sizes"):
        model(pixels[:2], ids, mask)
    with pytest.raises(ValueError, match=r"unknown tasks \['caption'\]"):
        model(pixels, tasks=["caption"])


def test_triton_path_matches_the_reference_forward_and_backward():
    if not fused_kernels._core.backend.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    torch.manual_seed(0)
    m = Multimodal(MultimodalConfig.from_preset("tiny", vocab_size=40, max_text_len=24, dropout=0.0))
    pixels, ids, mask = inputs(b=2, t=6)
    labels = {"match": torch.tensor([0, 1]), "digit": torch.tensor([3, 7]), "sum": torch.tensor([1, 2])}
    results = {}
    for backend in ("triton", "torch"):
        m.zero_grad()
        with fused_kernels.use_backend(backend):
            out = m(pixels, ids, mask, labels=labels)
            out.loss.backward()
        results[backend] = (out.logits, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    (logits_t, grads_t), (logits_r, grads_r) = results["triton"], results["torch"]
    for t in logits_r:
        torch.testing.assert_close(logits_t[t], logits_r[t], rtol=1e-4, atol=1e-5)
    assert grads_t.keys() == grads_r.keys() and len(grads_r) > 50
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-3, atol=1e-5, msg=name)


def test_phrase_pairs_carry_consistent_labels():
    number_of = {p: n for lang in digit_phrases.phrases() for n, p in enumerate(lang)}
    assert digit_phrases.phrases()[1][97] == "quatre-vingt-dix-sept"
    assert digit_phrases.phrases()[2][97] == "siebenundneunzig"
    held = digit_phrases.held_out()
    again = digit_phrases.held_out()
    assert held.texts == again.texts and len(held.texts) == 720
    numbers = torch.tensor([number_of[t] for t in held.texts])
    digits = held.labels["digit"]
    assert torch.equal(held.labels["match"], (numbers % 10 == digits).long())
    assert torch.equal(held.labels["sum"], (numbers + digits) % 10)
    assert 0.4 < held.labels["match"].float().mean() < 0.6


@pytest.mark.parametrize("modalities, present, absent", [("both", {"pixel_values", "input_ids"}, set()),
                                                        ("image", {"pixel_values"}, {"input_ids"}),
                                                        ("text", {"input_ids"}, {"pixel_values"})])
def test_task_batches_hold_the_chosen_modalities(modalities, present, absent):
    from transformer.training.tasks.multimodal import MultimodalTask
    task = MultimodalTask(modalities=modalities)
    batch = task.train_batch(torch.Generator().manual_seed(0), 8)
    again = task.train_batch(torch.Generator().manual_seed(0), 8)
    assert present <= set(batch) and not absent & set(batch)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    with pytest.raises(ValueError, match="modalities must be one of"):
        MultimodalTask(modalities="audio")


def test_a_short_training_run_lowers_the_loss(tmp_path):
    """Through the trainer, on a fixed set of 32 pairs (new random pairs need a few hundred steps to
    leave the chance plateau; a fixed set shows within seconds that every part learns)."""
    from transformer.training.task import register
    from transformer.training.tasks.multimodal import MultimodalTask

    @register
    class FixedPairs(MultimodalTask):
        name = "multimodal-fixed-pairs"

        def train_batch(self, generator, batch_size):
            return super().train_batch(torch.Generator().manual_seed(0), batch_size)

    train(TrainArgs(task=FixedPairs.name, preset="tiny", steps=40, batch_size=32, lr=3e-3, warmup=5,
                    eval_every=40, eval_batches=1, eval_batch_size=64, model_overrides={"dropout": 0.0},
                    backend="torch", progress=False, out=str(tmp_path)))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[0] > 4.5 and losses[-1] < losses[0] - 1.0

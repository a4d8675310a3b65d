"""The ViT digits task: the fixed split, seeded augmented batches, evaluation, examples, and a short
training run (pure-PyTorch backend) that must learn."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_kernels
from transformer.data.digits import affine, ascii_digit, load_digits_split, random_affine, random_shift
from transformer.outputs import ClassificationOutput
from transformer.training.tasks.vit import ViTTask
from transformer.training.trainer import TrainArgs, load_run, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This model's ops are too small to gain from intra-op threads, and on shared cores the threads wait
    for each other: on 2 busy cores the training test took 111 s with 2 threads and 4 s with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task() -> ViTTask:
    return ViTTask()


def test_split_is_fixed_disjoint_complete_and_scaled():
    from sklearn.datasets import load_digits

    a, b = load_digits_split(), load_digits_split()
    for name in ("train_images", "train_labels", "train_index", "test_images", "test_labels", "test_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.train_images.shape == (1437, 1, 8, 8) and a.test_images.shape == (360, 1, 8, 8)
    assert a.train_images.dtype == torch.float32 and a.train_labels.dtype == torch.int64
    everything = torch.cat([a.train_index, a.test_index])
    assert torch.equal(everything.sort().values, torch.arange(1797))          # disjoint and complete
    source = load_digits()
    assert torch.equal(a.test_labels, torch.from_numpy(source.target[a.test_index.numpy()]))
    expected = torch.from_numpy(source.images[a.test_index.numpy()]).float().unsqueeze(1) / 16
    torch.testing.assert_close(a.test_images, expected)
    images = torch.cat([a.train_images, a.test_images])
    assert images.min() == 0 and images.max() == 1


def test_split_is_stratified():
    split = load_digits_split()
    train, test = split.train_labels.bincount(minlength=10), split.test_labels.bincount(minlength=10)
    share = 360 / 1797
    for c in range(10):
        assert abs(test[c] - share * (train[c] + test[c])) <= 1, (c, train[c], test[c])


def test_batches_are_deterministic_for_a_seeded_generator(task):
    a = task.train_batch(torch.Generator().manual_seed(7), 32)
    b = task.train_batch(torch.Generator().manual_seed(7), 32)
    c = task.train_batch(torch.Generator().manual_seed(8), 32)
    assert set(a) == {"pixel_values", "labels"}
    assert a["pixel_values"].shape == (32, 1, 8, 8) and a["labels"].shape == (32,)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pixel_values"], c["pixel_values"])


def _shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """images moved down by dy and right by dx, zero filled (a slow, obvious reference)."""
    out = torch.zeros_like(images)
    h, w = images.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_affine_moves_and_turns_exactly():
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    zero, one = torch.zeros(4), torch.ones(4)
    dy, dx = torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, -3.0, 0.0])
    moved = affine(images, zero, one, dy, dx)
    for i in range(4):
        torch.testing.assert_close(moved[i], _shifted(images[i], int(dy[i]), int(dx[i])), rtol=0, atol=1e-6)
    turned = affine(images, torch.full((4,), torch.pi / 2), one, zero, zero)
    torch.testing.assert_close(turned, torch.rot90(images, 1, (-2, -1)), rtol=0, atol=1e-5)
    shrunk = affine(torch.ones(4, 1, 8, 8), zero, one / 2, zero, zero)      # half size, about the centre
    expected = torch.zeros(4, 1, 8, 8)
    expected[..., 2:6, 2:6] = 1
    torch.testing.assert_close(shrunk, expected, rtol=0, atol=1e-6)


def test_augmentation_keeps_shapes_range_and_labels(task):
    plain = ViTTask(shift=0, degrees=0, scale=0)
    a = task.train_batch(torch.Generator().manual_seed(3), 64)
    b = plain.train_batch(torch.Generator().manual_seed(3), 64)
    train = task.split.train_images.flatten(1)
    for x, y in zip(b["pixel_values"].flatten(1), b["labels"]):       # no augmentation: training images as they are
        assert (task.split.train_labels[(train == x).all(1)] == y).any()
    assert torch.equal(a["labels"], b["labels"])                       # the same draws, only the pixels change
    assert a["pixel_values"].shape == b["pixel_values"].shape and a["pixel_values"].dtype == torch.float32
    assert a["pixel_values"].min() >= 0 and a["pixel_values"].max() <= 1
    assert not torch.equal(a["pixel_values"], b["pixel_values"])
    x, y = a["pixel_values"].flatten(1), b["pixel_values"].flatten(1)
    similarity = F.cosine_similarity(x, y)                              # each is still a close variant of its image
    assert similarity.min() > 0.5 and similarity.mean() > 0.8, similarity


def test_random_shift_moves_whole_pixels():
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    moved = random_shift(images, 1, torch.Generator().manual_seed(0))
    offsets = set()
    for x, y in zip(images, moved):
        found = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if torch.equal(_shifted(x, dy, dx), y)]
        assert len(found) == 1
        offsets.update(found)
    assert len(offsets) > 3
    assert torch.equal(random_shift(images, 0, torch.Generator()), images)
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(images, -1, torch.Generator())


def test_random_affine_checks_its_amounts():
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="shift"):
        random_affine(images, torch.Generator(), shift=-1.0)
    with pytest.raises(ValueError, match="scale"):
        random_affine(images, torch.Generator(), scale=1.0)


def test_options_are_checked():
    with pytest.raises(ValueError, match="digits"):
        ViTTask(data="mnist")
    with pytest.raises(ValueError, match="degrees"):
        ViTTask(degrees=-5)
    with pytest.raises(ValueError, match="shift"):
        ViTTask(shift="two")
    with pytest.raises(ValueError, match="unknown options"):
        ViTTask(rotate=5)
    task = ViTTask(shift=0.5, degrees=0, scale=0.1)
    assert task.spec() == {"data": "digits", "shift": 0.5, "degrees": 0, "scale": 0.1, "label_smoothing": 0.1}
    assert ViTTask(**task.spec()).spec() == task.spec()


def test_model_config_fixes_what_the_data_needs(task):
    config = task.model_config("tiny", num_classes=3, dim=48)
    assert (config.image_size, config.num_channels, config.num_classes, config.dim) == (8, 1, 10, 48)


class NearestMean(nn.Module):
    """A stub classifier with fixed logits: minus the squared distance to each class's mean training image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        means = torch.stack([images[labels == c].mean(0).flatten() for c in range(10)])
        self.means = nn.Parameter(means, requires_grad=False)            # a parameter: model_device finds it

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassificationOutput:
        return ClassificationOutput(logits=-torch.cdist(pixel_values.flatten(1), self.means) ** 2)


@torch.no_grad()
def test_evaluate_matches_a_hand_computation(task):
    model = NearestMean(task.split.train_images, task.split.train_labels)
    images, labels = task.split.test_images, task.split.test_labels
    logits = model(images).logits
    metrics = task.evaluate(model, batch_size=7)                  # 360 = 51 * 7 + 3: a ragged last batch
    assert metrics["accuracy"] == (logits.argmax(-1) == labels).sum().item() / 360
    assert math.isclose(metrics["val_loss"], F.cross_entropy(logits, labels).item(), rel_tol=1e-5)
    assert 0.5 < metrics["accuracy"] < 1                          # right and wrong answers both counted
    prefix = task.evaluate(model, batch_size=50, max_batches=2)
    assert prefix["accuracy"] == (logits[:100].argmax(-1) == labels[:100]).sum().item() / 100
    assert math.isclose(prefix["val_loss"], F.cross_entropy(logits[:100], labels[:100]).item(), rel_tol=1e-5)
    assert task.evaluate(model, batch_size=7) == metrics


@torch.no_grad()
def test_training_loss_is_smoothed_cross_entropy(task):
    model = NearestMean(task.split.train_images, task.split.train_labels)
    batch = task.train_batch(torch.Generator().manual_seed(0), 16)
    logits = model(batch["pixel_values"]).logits
    loss, units = task.loss(model, batch)
    assert units == 16
    assert math.isclose(loss.item(), F.cross_entropy(logits, batch["labels"], label_smoothing=0.1).item(), rel_tol=1e-6)
    plain, _ = ViTTask(label_smoothing=0).loss(model, batch)
    assert math.isclose(plain.item(), F.cross_entropy(logits, batch["labels"]).item(), rel_tol=1e-6)
    assert plain < loss
    with pytest.raises(ValueError, match="label_smoothing"):
        ViTTask(label_smoothing=1.0)


def test_loss_plot_labels_say_what_each_loss_is(task):
    """Training loss is label-smoothed cross entropy, which cannot go below the smoothed target's entropy
    (0.50 at 0.1 over 10 classes); the held-out loss is plain cross entropy: the legend says so."""
    from transformer.training.plot import smoothed_minimum
    config = task.model_config("tiny")
    train_label, held_label = task.loss_labels(config)
    assert train_label == "training loss: cross entropy with label smoothing 0.1 (its minimum: 0.50), augmented images"
    assert "plain cross entropy" in held_label
    target = torch.full((1, 10), 0.1 / 10)
    target[0, 3] += 0.9
    floor = F.cross_entropy(target.log(), torch.tensor([3]), label_smoothing=0.1).item()   # logits = the target
    assert math.isclose(smoothed_minimum(0.1, 10), floor, rel_tol=1e-6) and round(floor, 2) == 0.50
    plain = ViTTask(label_smoothing=0).loss_labels(config)
    assert "smoothing" not in plain[0] and plain[1] == "held-out loss: cross entropy"


@torch.no_grad()
def test_evaluate_and_examples_on_the_vit(task):
    torch.manual_seed(0)
    model = task.build_model(task.model_config("tiny")).eval()
    with fused_kernels.use_backend("torch"):
        first, again, other = task.evaluate(model, 64), task.evaluate(model, 64), task.evaluate(model, 100)
        examples = task.examples(model, 3)
        predicted = model(task.split.test_images).logits.argmax(-1)
    assert set(first) == {"val_loss", "accuracy"} and first == again
    assert math.isclose(first["val_loss"], other["val_loss"], rel_tol=1e-5)
    assert len(examples) == 3
    for text in examples:
        head, *art = text.split("\n")
        m = re.fullmatch(r"test #(\d+): predicted (\d) \(\d+%\), true (\d) \[(ok|WRONG)\]", head)
        assert m, head
        i, pred, true = int(m[1]), int(m[2]), int(m[3])
        assert true == task.split.test_labels[i] and pred == predicted[i]
        assert (m[4] == "ok") == (pred == true)
        assert art == ascii_digit(task.split.test_images[i])


def test_ascii_digit_maps_ink_to_dark_characters():
    image = torch.zeros(1, 8, 8)
    image[0, 3, 4] = 1.0
    art = ascii_digit(image)
    assert art[3] == " " * 8 + "@@" + " " * 6 and all(line.strip() == "" for i, line in enumerate(art) if i != 3)


def test_short_training_run_learns(tmp_path, monkeypatch):
    """300 steps of the tiny ViT through the trainer (torch backend), no augmentation (which slows the
    first hundreds of steps): well above chance (10%); seeds 0-3 reach 92-94%. Its loss.png labels both
    losses and draws the held-out accuracy."""
    from transformer.training import trainer
    drawn = []
    original = trainer.plot_losses
    monkeypatch.setattr(trainer, "plot_losses", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    result = train(TrainArgs(task="vit", preset="tiny", steps=300, batch_size=64, lr=3e-3, warmup=30,
                             eval_every=300, out=str(tmp_path), backend="torch", progress=False,
                             task_options=dict(shift=0, degrees=0, scale=0)))
    assert result["accuracy"] > 0.7, result
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == result["accuracy"]
    assert drawn == [{"loss": ["training loss: cross entropy with label smoothing 0.1 (its minimum: 0.50)",
                               "held-out loss: plain cross entropy (no smoothing)"],
                      "accuracy": ["held-out accuracy"]}]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    task, model = load_run(str(tmp_path))
    with fused_kernels.use_backend("torch"), torch.no_grad():
        assert task.evaluate(model, 360)["accuracy"] == result["accuracy"]   # the saved run evaluates the same

"""The handwritten digits of scikit-learn (UCI optdigits test set): 1,797 8x8 grey images of 0-9.

They ship inside scikit-learn, so nothing is downloaded. Pixels, counts 0-16 in the source, are divided
by 16 into [0, 1] (no mean/std normalisation: the patch projection's bias absorbs the offset, and 0
stays "no ink", which the zero padding of the augmentation relies on).

The split is stratified and fixed by ``SPLIT_SEED``, never by a training seed, so every run, resume and
evaluation of any task that uses these images (classification here; image + number phrase pairs later)
sees the same 1,437 training and 360 test images (``TEST_SIZE``: about 20% of every class held out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 8
NUM_CLASSES = 10
MAX_PIXEL = 16.0     # the source's largest pixel count
TEST_SIZE = 360      # about 20%: 1,437 train / 360 test
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    """Images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64 and each image's position in
    ``sklearn.datasets.load_digits()`` (N,) int64, for the two fixed parts."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_index: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    test_index: torch.Tensor


def load_digits_split() -> DigitsSplit:
    """The fixed stratified train/test split (fresh tensors on every call: callers may modify them)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn)") from e
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / MAX_PIXEL   # (N, 1, 8, 8)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=TEST_SIZE,
                                           stratify=bunch.target, random_state=SPLIT_SEED)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return DigitsSplit(images[train_idx], labels[train_idx], train_idx, images[test_idx], labels[test_idx], test_idx)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random whole-pixel (dy, dx) in [-max_shift, max_shift]^2, the uncovered
    border filled with 0 (no ink); the pixels stay exactly the source's values."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images.clone()
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)                                      # (B, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)  # crop offsets
    rows = (dy + torch.arange(h))[:, None, :, None]                               # (B, 1, H, 1)
    cols = (dx + torch.arange(w))[:, None, None, :]                               # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channels, rows, cols]


def affine(images: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, dy: torch.Tensor,
           dx: torch.Tensor) -> torch.Tensor:
    """Each image i rotated counter-clockwise by ``angle[i]`` radians about its centre, scaled by
    ``zoom[i]`` and moved down ``dy[i]`` and right ``dx[i]`` pixels, resampled bilinearly; what comes
    from outside the image is 0 (no ink). Integer moves and quarter turns are exact."""
    b, _, h, w = images.shape
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    # affine_grid maps each output position to where it reads the input, in [-1, 1] coordinates
    theta = torch.stack([torch.stack([cos, -sin, -dx * 2 / w], 1),
                         torch.stack([sin, cos, -dy * 2 / h], 1)], 1)               # (B, 2, 3)
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def check_augmentation(shift: float, degrees: float, scale: float) -> None:
    """Raise ValueError, naming them, unless the ``random_affine`` amounts are usable (options may come
    from the command line, so their types are checked too)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (shift, degrees, scale))
    if not (numbers and shift >= 0 and degrees >= 0 and 0 <= scale < 1):
        raise ValueError(f"augmentation: need numbers shift >= 0 (pixels), degrees >= 0 and 0 <= scale < 1, "
                         f"got shift={shift!r}, degrees={degrees!r}, scale={scale!r}")


def random_affine(images: torch.Tensor, generator: torch.Generator, shift: float = 0.5, degrees: float = 5.0,
                  scale: float = 0.05) -> torch.Tensor:
    """``affine`` with amounts drawn uniformly from ``generator``: moves up to ``shift`` pixels each way
    (sub-pixel ones included), rotations up to ``degrees``, zooms of 1 +- ``scale``. The digits are
    centred and size-normalised by the source's preprocessing, so small changes are plausible new
    samples of the same digit. The default amounts are the ones tuned for the ViT digits task, where
    stronger ones (1 pixel, 8 degrees) did worse."""
    check_augmentation(shift, degrees, scale)
    u = torch.rand(4, images.shape[0], generator=generator) * 2 - 1               # uniform in [-1, 1)
    return affine(images, u[0] * degrees * torch.pi / 180, 1 + u[1] * scale, u[2] * shift, u[3] * shift)


def ascii_digit(image: torch.Tensor) -> list[str]:
    """An (1, 8, 8) or (8, 8) image in [0, 1] as 8 lines of text, two characters per pixel (so it looks
    square), darker characters for more ink."""
    ramp = " .:-=+*#%@"
    levels = (image.reshape(IMAGE_SIZE, IMAGE_SIZE).clamp(0, 1) * (len(ramp) - 1)).round().long()
    return ["".join(ramp[v] * 2 for v in row.tolist()) for row in levels]

"""A seeded, augmented copy of uint8 images on the CPU: what dynamic FINE extracts its features
from with ``--fine-features augmented`` (the official code passes the training loader, with its
augmentation, to the feature extractor).

The same augmentations as :class:`kdfine.data.batches.TrainBatches`: zero-padded random crop
(``PAD`` pixels) and horizontal flip, drawn per image from ``seed``.
"""

from __future__ import annotations

import numpy as np

from kdfine.data.batches import PAD


def augmented_copy(images: np.ndarray, augment: str, seed: int) -> np.ndarray:
    """``images`` (N, H, W, C) uint8 with ``augment`` (``crop-flip``, ``crop``, ``flip`` or
    ``none``) applied; a new array of the same shape (``images`` itself for ``none``)."""
    crop, flip = augment in ("crop-flip", "crop"), augment in ("crop-flip", "flip")
    if not (crop or flip):
        return images
    rng = np.random.default_rng(seed)
    n, h, w = images.shape[:3]
    out = np.empty_like(images)
    if crop:
        padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
        shifts = rng.integers(0, 2 * PAD + 1, size=(n, 2))
        for dy in range(2 * PAD + 1):  # one slice per offset pair: 81 vectorised copies, not N
            for dx in range(2 * PAD + 1):
                rows = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
                out[rows] = padded[rows, dy:dy + h, dx:dx + w]
    else:
        out[:] = images
    if flip:
        flips = np.flatnonzero(rng.random(n) < 0.5)
        out[flips] = out[flips, :, ::-1]
    return out

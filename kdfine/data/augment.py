"""Seeded, augmented copies of uint8 images on the CPU: what dynamic FINE extracts its features
from with ``--fine-features augmented`` (the official code passes the training loader, with its
augmentation, to the feature extractor).

The same augmentations as :class:`kdfine.data.batches.TrainBatches`: zero-padded random crop
(``PAD`` pixels) and horizontal flip, drawn per image from ``seed``. ``rrc-flip`` contributes its
flip only: a random-resized crop down to 8% of the image would score fragments, not the samples.
The draws for all N images are made first (:func:`augment_draws`, a few bytes per image), so a
large set can be augmented chunk by chunk (:func:`apply_draws`) with the same result as at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdfine.data.batches import PAD


@dataclass(frozen=True)
class Draws:
    """Per-image draws: pad-crop offsets (N, 2) in [0, 2 * PAD] or None, flip mask (N,) or None."""

    shifts: np.ndarray | None
    flips: np.ndarray | None

    def rows(self, lo: int, hi: int) -> Draws:
        """The draws of images ``lo:hi``."""
        cut = lambda a: None if a is None else a[lo:hi]
        return Draws(cut(self.shifts), cut(self.flips))


def augment_draws(n: int, augment: str, seed: int) -> Draws | None:
    """The draws of ``augment`` (``crop-flip``, ``crop``, ``flip``, ``rrc-flip`` or ``none``) for
    ``n`` images from ``seed``; None when it draws nothing."""
    crop, flip = augment in ("crop-flip", "crop"), augment in ("crop-flip", "flip", "rrc-flip")
    if not (crop or flip):
        return None
    rng = np.random.default_rng(seed)
    shifts = rng.integers(0, 2 * PAD + 1, size=(n, 2)) if crop else None
    flips = rng.random(n) < 0.5 if flip else None
    return Draws(shifts, flips)


def apply_draws(images: np.ndarray, d: Draws | None) -> np.ndarray:
    """``images`` (N, H, W, C) uint8 with the draws ``d`` (N of them) applied: a new array of the
    same shape, or ``images`` itself when ``d`` is None."""
    if d is None:
        return images
    n, h, w = images.shape[:3]
    out = np.empty_like(images)
    if d.shifts is not None:
        padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
        for dy in range(2 * PAD + 1):  # one slice per offset pair: 81 vectorised copies, not N
            for dx in range(2 * PAD + 1):
                rows = np.flatnonzero((d.shifts[:, 0] == dy) & (d.shifts[:, 1] == dx))
                out[rows] = padded[rows, dy:dy + h, dx:dx + w]
    else:
        out[:] = images
    if d.flips is not None:
        flips = np.flatnonzero(d.flips)
        out[flips] = out[flips, :, ::-1]
    return out

"""Batches from a dataset kept on the training device as one uint8 tensor.

Per epoch, one seeded permutation plus per-position crop offsets and flip bits are drawn on the
CPU (a few KB) and moved to the device; every batch is then a gather, a crop by two more gathers,
a flip by ``torch.where`` and an affine normalisation, all batched on the device. The draw depends
only on ``(seed, epoch)``, and each rank takes its slice of every *global* batch, so data order and
augmentation do not depend on the number of processes.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

PAD = 4  # pad-crop padding in pixels, as in the standard CIFAR recipe


def to_device_images(images: np.ndarray, device: torch.device, pad: int = 0) -> torch.Tensor:
    """uint8 NHWC numpy -> uint8 NCHW tensor on ``device``, zero-padded by ``pad`` pixels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    return x.contiguous().to(device)


class Normalizer:
    """uint8 NCHW -> float, ``(x/255 - mean) / std`` as one multiply-add per channel."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False):
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * s)
        self.shift = -m / s
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, x.float(), self.scale)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


class TrainBatches:
    """Iterate training batches ``(x, y, index)`` of a dataset on ``device``.

    images: (N, H, W, C) uint8; labels: (N,) int64; batch_size: the *global* batch, split evenly
    across ``world_size`` ranks; augment: ``crop-flip``, ``crop``, ``flip`` or ``none``.
    The last incomplete batch of an epoch is dropped (BatchNorm dislikes tiny batches), except when
    the whole selection is smaller than one batch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, *, batch_size: int,
                 device: torch.device, augment: str = "none", seed: int = 0, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.crop = augment in ("crop-flip", "crop")
        self.flip = augment in ("crop-flip", "flip")
        self.pad = PAD if self.crop else 0
        self.h, self.w = images.shape[1], images.shape[2]
        self.images = to_device_images(images, device, self.pad)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        self.norm = Normalizer(mean, std, device, channels_last)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world_size = rank, world_size
        self.selection = np.arange(len(labels), dtype=np.int64)

    def set_selection(self, indices: np.ndarray) -> None:
        """Train on these dataset indices only (``--keep``, dynamic FINE)."""
        if len(indices) < self.world_size:
            raise ValueError("the selection has fewer samples than processes")
        self.selection = np.sort(np.asarray(indices, dtype=np.int64))

    def __len__(self) -> int:
        return max(len(self.selection) // self.batch_size, 1)

    @property
    def images_per_epoch(self) -> int:
        return min(len(self) * self.batch_size, len(self.selection))

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        m = len(self.selection)
        order = torch.from_numpy(self.selection)[torch.randperm(m, generator=g)].to(self.device)
        shifts = torch.randint(0, 2 * self.pad + 1, (m, 2), generator=g).to(self.device)
        flips = (torch.rand(m, generator=g) < 0.5).to(self.device)
        b = min(self.batch_size, m)
        local = b // self.world_size
        for step in range(len(self)):
            lo = step * b + self.rank * local
            pos = slice(lo, lo + local)
            idx = order[pos]
            yield self._augment(idx, shifts[pos], flips[pos]), self.labels[idx], idx

    def _augment(self, idx: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Normalised images ``idx`` (B,) cropped at ``shifts`` (B, 2) and flipped where ``flips`` (B,)."""
        x = self.images[idx]
        if self.crop:
            n, c = x.shape[0], x.shape[1]
            rows = torch.arange(self.h, device=self.device)
            cols = torch.arange(self.w, device=self.device)
            r = (shifts[:, 0:1] + rows).view(n, 1, self.h, 1).expand(n, c, self.h, x.shape[3])
            x = x.gather(2, r)
            q = (shifts[:, 1:2] + cols).view(n, 1, 1, self.w).expand(n, c, self.h, self.w)
            x = x.gather(3, q)
        if self.flip:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
        return self.norm(x)

    def view(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Another augmentation of the images ``idx`` (B,), drawn from ``generator`` (on the CPU):
        the second view that DivideMix averages its guesses over."""
        n = idx.shape[0]
        shifts = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator).to(self.device)
        flips = (torch.rand(n, generator=generator) < 0.5).to(self.device)
        return self._augment(idx, shifts, flips)


def eval_batches(images: np.ndarray | torch.Tensor, mean, std, *, batch_size: int, device: torch.device,
                 channels_last: bool = False) -> Iterator[torch.Tensor]:
    """Normalised batches of ``images`` in order, no augmentation. ``images`` is uint8 NHWC numpy
    (moved to the device batch by batch) or an NCHW uint8 tensor already there."""
    norm = Normalizer(mean, std, device, channels_last)
    n = images.shape[0]
    for lo in range(0, n, batch_size):
        chunk = images[lo:lo + batch_size]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).to(device, non_blocking=True)
        yield norm(chunk)

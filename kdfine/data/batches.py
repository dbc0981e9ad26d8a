"""Training batches on the device: from one uint8 tensor held there, or streamed from the cache.

Per epoch, one seeded permutation plus per-position crop offsets, flip bits and (rrc-flip)
random-resized-crop boxes are drawn on the CPU and moved to the device; every batch is then a
gather, a crop by two more gathers (or one ``roi_align`` call that crops and resizes the whole
batch), a flip by ``torch.where`` and an affine normalisation, all batched on the device. The draw
depends only on ``(seed, epoch)``, and each rank takes its slice of every *global* batch, so data
order and augmentation do not depend on the number of processes.

:class:`TrainBatches` copies the whole training set to the device once (the fast path);
:class:`StreamBatches` gathers each batch from the memory-mapped decode cache in a background
thread and applies the very same augmentation, so both give identical batches for one seed.
:func:`train_batches` picks one of them by :func:`should_stream`.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from kdfine.data.cache import advise_random, release_pages
from kdfine.errors import InputError, UsageError
from kdfine.files.rows import file_rows, pread_rows
from kdfine.runtime.memory import available_memory

PAD = 4  # pad-crop padding in pixels, as in the standard CIFAR recipe
RRC_SCALE = (0.08, 1.0)  # random-resized-crop area share and aspect range (the ImageNet recipe)
RRC_RATIO = (3 / 4, 4 / 3)
BUDGET_SHARE = 0.5  # share of the available memory that the in-memory training set may take


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


def rrc_boxes(m: int, h: int, w: int, g: torch.Generator, scale=RRC_SCALE, ratio=RRC_RATIO) -> torch.Tensor:
    """Random-resized-crop boxes ``(m, 4)`` as ``x1, y1, x2, y2`` pixel edges of an ``h`` x ``w``
    image: area a uniform share ``scale`` of the image, aspect log-uniform in ``ratio``, position
    uniform; ten tries per box as in torchvision's RandomResizedCrop, the first that fits wins;
    none fitting gives the centre crop with the aspect clamped into ``ratio``. Drawn from ``g``."""
    area = torch.empty(m, 10).uniform_(scale[0], scale[1], generator=g) * (h * w)
    aspect = torch.exp(torch.empty(m, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g))
    cw = torch.sqrt(area * aspect).round()
    ch = torch.sqrt(area / aspect).round()
    pos = torch.rand(m, 2, generator=g)
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.float().argmax(1, keepdim=True)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    if w / h < ratio[0]:
        fw, fh = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        fw, fh = round(h * ratio[1]), h
    else:
        fw, fh = w, h
    ok = fits.any(1)
    cw, ch = torch.where(ok, cw, float(fw)), torch.where(ok, ch, float(fh))
    y = torch.where(ok, (pos[:, 0] * (h - ch + 1)).floor(), float((h - fh) // 2))
    x = torch.where(ok, (pos[:, 1] * (w - cw + 1)).floor(), float((w - fw) // 2))
    return torch.stack([x, y, x + cw, y + ch], 1)


@dataclass
class EpochDraws:
    """Everything random about one epoch, drawn on the CPU from ``(seed, epoch)``: ``order``
    (dataset indices, on the CPU and on the device), per-position crop ``shifts`` (m, 2),
    ``flips`` (m,) and, for rrc-flip, ``boxes`` (m, 4)."""

    order_cpu: torch.Tensor
    order: torch.Tensor
    shifts: torch.Tensor
    flips: torch.Tensor
    boxes: torch.Tensor | None


class TrainBatches:
    """Iterate training batches ``(x, y, index)`` of a dataset on ``device``.

    images: (N, H, W, C) uint8, copied to the device once; labels: (N,) int64; batch_size: the
    *global* batch, split evenly across ``world_size`` ranks; augment: ``crop-flip``, ``crop``,
    ``flip``, ``rrc-flip`` or ``none``. The last incomplete batch of an epoch is dropped
    (BatchNorm dislikes tiny batches), except when the whole selection is smaller than one batch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, *, batch_size: int,
                 device: torch.device, augment: str = "none", seed: int = 0, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.crop = augment in ("crop-flip", "crop")
        self.flip = augment in ("crop-flip", "flip", "rrc-flip")
        self.rrc = augment == "rrc-flip"
        self.pad = PAD if self.crop else 0
        self.h, self.w = images.shape[1], images.shape[2]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        self.norm = Normalizer(mean, std, device, channels_last)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world_size = rank, world_size
        self.selection = np.arange(len(labels), dtype=np.int64)
        self.images = self._hold(images)

    def _hold(self, images: np.ndarray):
        x = to_device_images(images, self.device, self.pad)
        release_pages(images)  # a memory-mapped cache: its pages now live in the copy
        return x

    def set_selection(self, indices: np.ndarray) -> None:
        """Train on these dataset indices only (``--keep``, dynamic FINE)."""
        if len(indices) < self.world_size:
            raise ValueError("the selection has fewer samples than processes")
        self.selection = np.sort(np.asarray(indices, dtype=np.int64))

    def __len__(self) -> int:
        return max(len(self.selection) // self.batch_size, 1)

    def draws(self, epoch: int) -> EpochDraws:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        m = len(self.selection)
        order = torch.from_numpy(self.selection)[torch.randperm(m, generator=g)]
        shifts = torch.randint(0, 2 * self.pad + 1, (m, 2), generator=g).to(self.device)
        flips = (torch.rand(m, generator=g) < 0.5).to(self.device)
        boxes = rrc_boxes(m, self.h, self.w, g).to(self.device) if self.rrc else None
        return EpochDraws(order, order.to(self.device), shifts, flips, boxes)

    def positions(self) -> Iterator[slice]:
        """This rank's slice of every global batch of an epoch, as positions into the order."""
        b = min(self.batch_size, len(self.selection))
        local = b // self.world_size
        for step in range(len(self)):
            lo = step * b + self.rank * local
            yield slice(lo, lo + local)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        d = self.draws(epoch)
        for pos in self.positions():
            idx = d.order[pos]
            yield self.augment(self.images[idx], d, pos), self.labels[idx], idx

    def augment(self, x: torch.Tensor, d: EpochDraws, pos: slice) -> torch.Tensor:
        """uint8 NCHW (padded by ``self.pad``) -> the augmented, normalised float batch."""
        if self.crop:
            n, c = x.shape[0], x.shape[1]
            rows = torch.arange(self.h, device=x.device)
            cols = torch.arange(self.w, device=x.device)
            r = (d.shifts[pos, 0:1] + rows).view(n, 1, self.h, 1).expand(n, c, self.h, x.shape[3])
            x = x.gather(2, r)
            q = (d.shifts[pos, 1:2] + cols).view(n, 1, 1, self.w).expand(n, c, self.h, self.w)
            x = x.gather(3, q)
        if self.rrc:
            from torchvision.ops import roi_align

            boxes = d.boxes[pos]
            rois = torch.cat([torch.arange(len(boxes), device=x.device, dtype=boxes.dtype)[:, None], boxes], 1)
            # the crop is never larger than the output, so one sample per bin is plain bilinear resizing
            x = roi_align(x.float(), rois, (self.h, self.w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
        if self.flip:
            x = torch.where(d.flips[pos].view(-1, 1, 1, 1), x.flip(3), x)
        return self.norm(x)

    def view(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Another augmentation of the images ``idx`` (B,) held on the device, drawn from
        ``generator`` (on the CPU): the second view that DivideMix averages its guesses over."""
        n = idx.shape[0]
        shifts = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator).to(self.device)
        flips = (torch.rand(n, generator=generator) < 0.5).to(self.device)
        boxes = rrc_boxes(n, self.h, self.w, generator).to(self.device) if self.rrc else None
        d = EpochDraws(idx.cpu(), idx, shifts, flips, boxes)
        return self.augment(self.images[idx], d, slice(0, n))


class StreamBatches(TrainBatches):
    """:class:`TrainBatches` for data that stays on disk: the same draws and the same on-device
    augmentation, but each batch is gathered from ``images`` (a memory map of the decode cache)
    by a background thread, ``prefetch`` batches ahead, into pinned memory (CUDA) and copied
    without blocking. The resident set stays bounded: rows of a memory-mapped file are read with
    ``os.preadv`` (the page cache serves them, nothing is mapped into this process); any other
    memory map is gathered through the map, releasing its pages every ``RELEASE_BYTES``."""

    RELEASE_BYTES = 32 << 20

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, *, prefetch: int = 4, **kw):
        self.prefetch = max(1, prefetch)
        super().__init__(images, labels, mean, std, **kw)

    def _hold(self, images: np.ndarray):
        advise_random(images)
        return images

    def view(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise UsageError("--fine-strategy dividemix draws second views of any training image at any time; "
                         "it needs the training set in memory (--no-stream)")

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        d = self.draws(epoch)
        steps = [(pos, d.order_cpu[pos].numpy()) for pos in self.positions()]
        q: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._gather, args=(steps, q, stop), daemon=True, name="kdfine-stream")
        worker.start()
        try:
            for pos, _ in steps:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                x = item.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
                if self.pad:
                    x = torch.nn.functional.pad(x, (self.pad,) * 4)
                idx = d.order[pos]
                yield self.augment(x.contiguous(), d, pos), self.labels[idx], idx
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.05)
            worker.join()

    def _gather(self, steps, q: queue.Queue, stop: threading.Event) -> None:
        pin = self.device.type == "cuda"
        where = file_rows(self.images)
        since, fd = 0, None
        try:  # every failure, opening the file included, reaches the training loop through the queue
            fd = os.open(where[0], os.O_RDONLY) if where else None
            for _, idx in steps:
                if stop.is_set():
                    return
                out = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
                if fd is not None:  # positional reads: the page cache serves them, nothing is mapped
                    if not pread_rows(fd, out.numpy(), where[1], idx.tolist()):
                        raise InputError(f"decode cache {where[0]}: shorter than its header says; delete "
                                         "it to rebuild")
                else:
                    np.take(self.images, idx, axis=0, out=out.numpy(), mode="clip")
                    since += out.numel()
                    if since >= self.RELEASE_BYTES:
                        release_pages(self.images)
                        since = 0
                q.put(out)
        except BaseException as e:  # handed to the training loop, which raises it
            q.put(e)
        finally:
            if fd is not None:
                os.close(fd)


def memory_budget(device: torch.device) -> int:
    """Bytes the training set may take on ``device`` before it is streamed:
    ``$KDFINE_MEMORY_BUDGET`` (bytes, or with a K/M/G/T suffix: ``12G``), else ``BUDGET_SHARE``
    of the available memory (free GPU memory on CUDA, the system's MemAvailable otherwise), which
    leaves the rest for the model, activations and the page cache."""
    env = os.environ.get("KDFINE_MEMORY_BUDGET", "").strip()
    if env:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", env, re.IGNORECASE)
        if not m:
            raise UsageError(f"KDFINE_MEMORY_BUDGET={env!r}: expected bytes, optionally with K, M, G or T (12G)")
        return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(BUDGET_SHARE * free)
    return int(BUDGET_SHARE * available_memory())


def should_stream(shape: tuple[int, ...], augment: str, device: torch.device, stream: bool | None = None) -> bool:
    """``stream`` when given (``--stream/--no-stream``); otherwise stream when the training
    images, (N, H, W, C) uint8 as held on the device (padded for pad-crop), exceed
    :func:`memory_budget`."""
    if stream is not None:
        return stream
    n, h, w, c = shape
    pad = 2 * PAD if augment in ("crop-flip", "crop") else 0
    return n * (h + pad) * (w + pad) * c > memory_budget(device)


def train_batches(images: np.ndarray, labels: np.ndarray, mean, std, *, stream: bool | None = None,
                  **kw) -> TrainBatches:
    """:class:`StreamBatches` or :class:`TrainBatches` (see :func:`should_stream`); ``kw`` as for
    :class:`TrainBatches`. Both give the same batches for the same seed."""
    use = should_stream(images.shape, kw.get("augment", "none"), kw["device"], stream)
    return (StreamBatches if use else TrainBatches)(images, labels, mean, std, **kw)


def eval_batches(images: np.ndarray | torch.Tensor, mean, std, *, batch_size: int, device: torch.device,
                 channels_last: bool = False) -> Iterator[torch.Tensor]:
    """Normalised batches of ``images`` in order, no augmentation. ``images`` is uint8 NHWC numpy
    or a memory map of the cache (moved to the device batch by batch; pages read are released
    every ``StreamBatches.RELEASE_BYTES``, safe since they are re-read on use) or an NCHW uint8
    tensor already there."""
    norm = Normalizer(mean, std, device, channels_last)
    n = images.shape[0]
    since = 0
    for lo in range(0, n, batch_size):
        chunk = images[lo:lo + batch_size]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).to(device, non_blocking=True)
            since += chunk.numel()
            if since >= StreamBatches.RELEASE_BYTES:  # a memory-mapped cache: bound the resident set
                release_pages(images)
                since = 0
        yield norm(chunk)

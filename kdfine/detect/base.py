"""What every detector returns and shares: the :class:`Detection`, the per-class report, the
registry of detectors by name (``detect-noise --method``), and label checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdfine.errors import KdfineWarning
from kdfine.registry import Registry

#: Detectors by name, registered where they are defined: ``fn(features, labels, num_classes, *,
#: zeta, seed, vectors_from, logits, chunk) -> Detection``; ``logits=True`` when a detector reads them.
DETECTORS: Registry = Registry("detection method")


class FineWarning(KdfineWarning):
    """A class that could not be split and was kept whole."""


class NonFiniteLogits(ValueError):
    """The logits hold NaN or inf."""


class NonFiniteFeatures(ValueError):
    """The features hold NaN or inf (``row``: the first such row, when the pass that noticed knows
    it). Found by the passes themselves, at no extra cost: a non-finite entry makes its class gram
    and its own norm non-finite."""

    def __init__(self, row: int | None = None):
        super().__init__("features contain NaN or inf" + (f" (row {row})" if row is not None else ""))
        self.row = row


@dataclass
class ClassSplit:
    label: int
    total: int
    kept: int
    threshold: float  # the lowest score that was kept (nan when nothing was kept)
    note: str = ""


@dataclass
class Detection:
    """The result of :func:`detect`: indices kept as clean (sorted), per-sample scores and
    P(clean), the class vectors (K, D) and the per-class report; ``detail`` holds what the
    method chose (auto: the signals' weights and separations; knn: k and the reference size)."""

    clean_index: np.ndarray
    scores: np.ndarray
    p_clean: np.ndarray
    vectors: np.ndarray | None
    classes: list[ClassSplit] = field(default_factory=list)
    method: str = "gmm"
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def keep(self) -> np.ndarray:
        m = np.zeros(self.scores.shape[0], bool)
        m[self.clean_index] = True
        return m

    def summary(self) -> dict[str, Any]:
        n = int(self.scores.shape[0])
        out = {"method": self.method, "n": n, "kept": int(self.clean_index.size),
               "kept_fraction": self.clean_index.size / n if n else 0.0,
               "estimated_noise_rate": 1.0 - self.clean_index.size / n if n else 0.0,
               "classes": [c.__dict__ for c in self.classes]}
        if self.detail:
            out[self.method] = self.detail
        return out


def class_report(keep: np.ndarray, scores: np.ndarray, labels: np.ndarray, k: int, note: str = "") -> list[ClassSplit]:
    """One :class:`ClassSplit` per class present, from a keep mask and scores (N,)."""
    out = []
    for c in range(k):
        m = labels == c
        if m.any():
            kept = keep & m
            out.append(ClassSplit(c, int(m.sum()), int(kept.sum()),
                                  float(scores[kept].min()) if kept.any() else float("nan"), note))
    return out


class Scratch:
    """One worker thread's reused buffers (FINE's passes: a class's rows gathered from a block and the
    D x D product; knn: a slice's unit rows). A fresh array per class and block costs its page faults
    every time (the gather alone ran 4x slower than into a reused buffer: 31 against 8.5 CPU ms per
    16,384 x 512 block)."""

    def __init__(self):
        self.arrays: dict[tuple, np.ndarray] = {}

    def get(self, name: str, rows: int, shape: tuple, dtype) -> np.ndarray:
        """A C-contiguous (rows,) + shape view of buffer ``name``, grown (never shrunk) as needed."""
        key = (name, shape, np.dtype(dtype).str)
        buf = self.arrays.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = self.arrays[key] = np.empty((max(rows, 2 * (0 if buf is None else buf.shape[0])),) + shape, dtype)
        return buf[:rows]


def gather(block: np.ndarray, idx: np.ndarray, scratch: Scratch, dtype) -> np.ndarray:
    """``block[idx]`` as ``dtype`` in ``scratch``'s reused buffer (valid until its next use)."""
    shape = block.shape[1:]
    if block.dtype == dtype:
        return np.take(block, idx, axis=0, out=scratch.get("rows", idx.size, shape, dtype))
    src = np.take(block, idx, axis=0, out=scratch.get("src", idx.size, shape, block.dtype))
    out = scratch.get("rows", idx.size, shape, dtype)
    out[...] = src
    return out


def groups_of(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(key, ascending positions holding it)] for each key present in ``keys`` (N,) ints, from one
    stable sort: a class's rows of a block, a centroid's query rows."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
    return [(int(sorted_keys[a]), order[a:b]) for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(order)])
            if b > a]


def is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def as_labels(labels) -> np.ndarray:
    if is_torch(labels):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64)


def check_labels(labels: np.ndarray, n: int, num_classes: int) -> None:
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")

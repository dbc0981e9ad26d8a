"""``--method knn``: each label against the labels of its k nearest neighbours (cosine), as SimiFeat
(Zhu et al., ICML 2022) does, from features alone: no training, so it works on the features of a
pretrained backbone (``train-teacher --pretrained --epochs 0``, then ``eval --dump-features``).

score_i = the fraction of i's k nearest neighbours (cosine similarity of the L2-normalised
features, i itself excluded) that carry i's label; i is kept when its label is a most frequent
label among them (the neighbours' majority vote; a tie that includes i's label keeps it).

The neighbours are searched among a reference set: all rows when N <= ``reference`` (exact), else
``reference`` rows drawn without replacement (seeded). The search is a blocked matrix product
(query blocks of ``block`` rows against the reference set, float32 BLAS, top-k by
``argpartition``), which is what scikit-learn's brute-force ``NearestNeighbors`` does for cosine;
the reference rows are read with positional reads and the queries streamed in blocks, so the
resident memory is the reference set (reference x D float32: 20 MB at 10,000 x 512) plus one
block of similarities.
An exact search of 1M rows would be N^2 D = 5e14 multiply-adds, hours on a CPU; the reference
set bounds it at N x reference x D.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from kdfine.detect.base import DETECTORS, Detection, class_report
from kdfine.files.rows import row_blocks, take_rows

K = 10
REFERENCE = 10_000
BLOCK = 2048


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("nd,nd->n", x, x))
    return x / np.maximum(norms, np.finfo(np.float32).tiny)[:, None]


def reference_rows(n: int, reference: int = REFERENCE, seed: int = 0) -> np.ndarray:
    """Sorted indices of the reference set: all n rows, or ``reference`` of them (seeded)."""
    if n <= reference:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, reference, replace=False))


def neighbour_labels(features, labels: np.ndarray, *, k: int = K, reference: int = REFERENCE, seed: int = 0,
                     block: int = BLOCK) -> Iterator[tuple[int, np.ndarray]]:
    """``(lo, nb)`` per block of rows: nb (b, k) the labels of rows lo..lo+b-1's k nearest reference
    rows by cosine similarity, nearest first (a row is never its own neighbour).
    features: (N, D) array or memmap; labels: (N,)."""
    n = features.shape[0]
    ref = reference_rows(n, reference, seed)
    k = min(k, ref.size - 1 if ref.size == n else ref.size)
    if k < 1:
        raise ValueError("knn needs at least 2 samples")
    refx = _normalised(take_rows(features, ref))
    ref_labels = labels[ref]
    for lo, rows in row_blocks(features, block):
        sims = _normalised(rows) @ refx.T  # (b, reference)
        q = np.arange(lo, lo + rows.shape[0])
        pos = np.minimum(np.searchsorted(ref, q), ref.size - 1)
        own = ref[pos] == q
        sims[np.flatnonzero(own), pos[own]] = -np.inf  # a row is not its own neighbour
        top = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]  # no negated copy of the block
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        yield lo, ref_labels[np.take_along_axis(top, order, axis=1)]


def knn_split(features, labels, *, k: int = K, reference: int = REFERENCE,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``keep`` (N,) bool (the label is a most frequent neighbour label) and ``score`` (N,) the
    fraction of the k neighbours that share the label."""
    own, other, k = knn_counts(features, labels, k=k, reference=reference, seed=seed)
    return own >= other, own / k


def knn_counts(features, labels, *, k: int = K, reference: int = REFERENCE,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Per row, how many of its k nearest neighbours carry its label (``own``, (N,)) and the count of
    the most frequent *other* label among them (``other``, (N,), 0 when all agree); and k as used."""
    labels = np.asarray(labels, dtype=np.int64)
    own = np.empty(labels.size, dtype=np.int64)
    other = np.empty(labels.size, dtype=np.int64)
    used = k
    for lo, nb in neighbour_labels(features, labels, k=k, reference=reference, seed=seed):
        y = labels[lo:lo + nb.shape[0]]
        same = nb == y[:, None]
        counts = (nb[:, :, None] == nb[:, None, :]).sum(axis=2)  # each neighbour's label's count
        own[lo:lo + y.size] = same.sum(axis=1)
        other[lo:lo + y.size] = np.where(same, 0, counts).max(axis=1)
        used = nb.shape[1]
    return own, other, used


@DETECTORS.register("knn", title="knn agreement", xlabel="share of the nearest neighbours with the same label")
def knn_detect(features, labels, num_classes: int, *, seed: int = 0, **_) -> Detection:
    """:func:`knn_split` as a :class:`Detection`; ``p_clean`` is the neighbours' agreement."""
    keep, scores = knn_split(features, labels, seed=seed)
    detail = {"k": K, "reference": int(min(labels.size, REFERENCE))}
    return Detection(np.flatnonzero(keep), scores, scores.copy(), None, class_report(keep, scores, labels, num_classes),
                     "knn", detail)

"""FINE noisy-label detection (Kim et al., NeurIPS 2021), as pure functions of arrays.

For features z_i (N, D) and labels y_i:

1. u_k = principal eigenvector of the uncentred class gram G_k = sum_{i: y_i = k} z_i z_i^T,
   accumulated over row chunks (float32 BLAS per chunk, float64 sums), so a memory-mapped N x D
   file larger than RAM works; then ``eigh`` of each D x D gram in float64.
2. score_i = |<u_{y_i}, z_i / ||z_i||>| in [0, 1].
3. Per class, a 2-component GaussianMixture on the scores (full covariance, tol 1e-6, seeded); the
   component with the larger mean is clean; keep i if P(clean | score_i) > zeta (default 0.5).
   ``method="kmeans"`` uses 2-means instead (hard assignment).

Inputs may be numpy arrays, memory-mapped ``.npy`` arrays or torch tensors (computed on their
device). ``small_loss_split`` is the DivideMix-style detector on per-sample cross-entropy, for
comparison.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdfine.errors import KdfineWarning

CHUNK = 16384
METHODS = ("gmm", "kmeans", "small-loss")


class FineWarning(KdfineWarning):
    """A class that could not be split and was kept whole."""


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _rows(features, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) as a float32 numpy array (reads only that slice of a memory map)."""
    x = features[lo:hi]
    if _is_torch(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def class_grams(features, labels: np.ndarray, num_classes: int, subset: np.ndarray | None = None,
                chunk: int = CHUNK) -> np.ndarray:
    """Uncentred per-class gram matrices (K, D, D) float64 of raw ``features`` (N, D).

    subset: optional boolean mask (N,) or index array; only those rows contribute.
    """
    labels = _labels(labels)
    n, d = features.shape
    _check_labels(labels, n, num_classes)
    mask = _mask(subset, n)
    if _is_torch(features):
        import torch

        grams = torch.zeros((num_classes, d, d), dtype=torch.float64, device=features.device)
        y = torch.as_tensor(labels, device=features.device)
        m = None if mask is None else torch.as_tensor(mask, device=features.device)
        for lo in range(0, n, chunk):
            x, yc = features[lo:lo + chunk].float(), y[lo:lo + chunk]
            if m is not None:
                x, yc = x[m[lo:lo + chunk]], yc[m[lo:lo + chunk]]
            for k in torch.unique(yc).tolist():
                xk = x[yc == k]
                grams[k] += (xk.T @ xk).double()
        return grams.cpu().numpy()
    grams = np.zeros((num_classes, d, d), dtype=np.float64)
    for lo in range(0, n, chunk):
        x, yc = _rows(features, lo, lo + chunk), labels[lo:lo + chunk]
        if mask is not None:
            x, yc = x[mask[lo:lo + chunk]], yc[mask[lo:lo + chunk]]
        order = np.argsort(yc, kind="stable")
        x, yc = x[order], yc[order]
        bounds = np.flatnonzero(np.diff(yc)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(yc)]):
            if stop > start:
                xk = x[start:stop]
                grams[yc[start]] += xk.T @ xk
    return grams


def top_eigenvectors(grams: np.ndarray) -> np.ndarray:
    """(K, D) unit principal eigenvectors of (K, D, D) symmetric matrices, sign fixed so that the
    largest-magnitude component is positive; all-zero grams (empty classes) give zero vectors."""
    k, d, _ = grams.shape
    vectors = np.zeros((k, d), dtype=np.float64)
    for c in range(k):
        if not np.any(grams[c]):
            continue
        _, vecs = np.linalg.eigh(grams[c])
        u = vecs[:, -1]
        vectors[c] = u if u[np.argmax(np.abs(u))] >= 0 else -u
    return vectors


def class_vectors(features, labels, num_classes: int, subset: np.ndarray | None = None,
                  chunk: int = CHUNK) -> np.ndarray:
    """u_k for every class: (K, D) float64, unit norm (zero rows for classes with no samples)."""
    return top_eigenvectors(class_grams(features, labels, num_classes, subset, chunk))


def alignment_scores(features, labels, vectors: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """score_i = |<u_{y_i}, z_i / ||z_i||>|, (N,) float64 in [0, 1]; zero rows score 0."""
    labels = _labels(labels)
    n = features.shape[0]
    u = np.asarray(vectors, dtype=np.float64)
    _check_labels(labels, n, u.shape[0])
    scores = np.empty(n, dtype=np.float64)
    if _is_torch(features):
        import torch

        ut = torch.as_tensor(u, device=features.device)
        yt = torch.as_tensor(labels, device=features.device)
        for lo in range(0, n, chunk):
            x = features[lo:lo + chunk].double()
            norms = x.norm(dim=1)
            dots = (x * ut[yt[lo:lo + chunk]]).sum(dim=1)
            s = torch.where(norms > 0, dots.abs() / norms.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
            scores[lo:lo + chunk] = s.cpu().numpy()
        return np.clip(scores, 0.0, 1.0)
    for lo in range(0, n, chunk):
        x = _rows(features, lo, lo + chunk).astype(np.float64)
        norms = np.linalg.norm(x, axis=1)
        dots = np.einsum("nd,nd->n", x, u[labels[lo:lo + chunk]])
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.abs(dots) / norms
        scores[lo:lo + chunk] = np.where(norms > 0, s, 0.0)
    return np.clip(scores, 0.0, 1.0)


@dataclass
class ClassSplit:
    label: int
    total: int
    kept: int
    threshold: float  # the lowest score that was kept (nan when nothing was kept)
    note: str = ""


def split(scores: np.ndarray, labels, *, zeta: float = 0.5, method: str = "gmm", seed: int = 0,
          num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, list[ClassSplit]]:
    """Per-class clean/noisy split of 1-D ``scores`` (higher = cleaner).

    Returns ``keep`` (N,) bool, ``p_clean`` (N,) float64 and one :class:`ClassSplit` per class
    present. A class with fewer than 2 samples, or whose scores do not separate, is kept whole
    with a :class:`FineWarning`.
    """
    labels = _labels(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if method not in ("gmm", "kmeans"):
        raise ValueError(f"method must be gmm or kmeans, got {method!r}")
    p_clean = np.ones_like(scores)
    report = []
    k = int(num_classes if num_classes is not None else (labels.max(initial=-1) + 1))
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            continue
        s = scores[idx]
        note = ""
        if idx.size < 2:
            note = "fewer than 2 samples"
        elif np.ptp(s) <= 1e-12:
            note = "all scores equal"
        if note:
            warnings.warn(f"class {c}: {note}; kept whole", FineWarning, stacklevel=2)
            p = np.ones(idx.size)
        else:
            p = _two_component(s, method, seed)
            if p is None:
                note = "scores do not separate"
                warnings.warn(f"class {c}: {note}; kept whole", FineWarning, stacklevel=2)
                p = np.ones(idx.size)
        p_clean[idx] = p
        kept = p > zeta
        report.append(ClassSplit(c, int(idx.size), int(kept.sum()),
                                 float(s[kept].min()) if kept.any() else float("nan"), note))
    return p_clean > zeta, p_clean, report


def _two_component(s: np.ndarray, method: str, seed: int) -> np.ndarray | None:
    x = s.reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning on near-degenerate classes
        if method == "gmm":
            from sklearn.mixture import GaussianMixture

            gmm = GaussianMixture(n_components=2, covariance_type="full", tol=1e-6, random_state=seed)
            gmm.fit(x)
            means = gmm.means_.ravel()
            if abs(means[0] - means[1]) <= 1e-12:
                return None
            return gmm.predict_proba(x)[:, int(np.argmax(means))]
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(x)
        centres = km.cluster_centers_.ravel()
        if abs(centres[0] - centres[1]) <= 1e-12:
            return None
        return (km.labels_ == int(np.argmax(centres))).astype(np.float64)


def small_loss_split(logits: np.ndarray, labels, *, zeta: float = 0.5, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DivideMix-style detector: one 2-component GMM on the min-max normalised per-sample
    cross-entropy (reg_covar 5e-4, tol 1e-2, max_iter 10); clean = the smaller-mean component.

    Returns ``keep`` (N,) bool, ``p_clean`` (N,) and ``scores`` = p(label | x) (higher = cleaner).
    """
    from sklearn.mixture import GaussianMixture

    from kdfine.metrics import log_softmax

    labels = _labels(labels)
    lp = log_softmax(np.asarray(logits, dtype=np.float64))[np.arange(labels.size), labels]
    loss = -lp
    span = loss.max() - loss.min()
    if span <= 1e-12:
        warnings.warn("all losses equal; everything kept", FineWarning, stacklevel=2)
        ones = np.ones(labels.size)
        return ones > zeta, ones, np.exp(lp)
    norm = ((loss - loss.min()) / span).reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed)
        gmm.fit(norm)
    p = gmm.predict_proba(norm)[:, int(np.argmin(gmm.means_.ravel()))]
    return p > zeta, p, np.exp(lp)


@dataclass
class Detection:
    """The result of :func:`detect`: indices kept as clean (sorted), per-sample scores and
    P(clean), the class vectors (K, D) and the per-class report."""

    clean_index: np.ndarray
    scores: np.ndarray
    p_clean: np.ndarray
    vectors: np.ndarray | None
    classes: list[ClassSplit] = field(default_factory=list)
    method: str = "gmm"

    @property
    def keep(self) -> np.ndarray:
        m = np.zeros(self.scores.shape[0], bool)
        m[self.clean_index] = True
        return m

    def summary(self) -> dict[str, Any]:
        n = int(self.scores.shape[0])
        return {"method": self.method, "n": n, "kept": int(self.clean_index.size),
                "kept_fraction": self.clean_index.size / n if n else 0.0,
                "estimated_noise_rate": 1.0 - self.clean_index.size / n if n else 0.0,
                "classes": [c.__dict__ for c in self.classes]}


def detect(features, labels, num_classes: int | None = None, *, zeta: float = 0.5, method: str = "gmm",
           seed: int = 0, vectors_from: np.ndarray | None = None, logits: np.ndarray | None = None,
           chunk: int = CHUNK) -> Detection:
    """FINE end to end: class vectors (from ``vectors_from``, a mask or index array of samples
    believed clean, else from all samples), alignment scores, per-class split.

    features: (N, D) array, memmap or tensor; labels: (N,) ints in [0, K). With
    ``method="small-loss"``, ``logits`` (N, K) are used instead of the features.
    """
    labels = _labels(labels)
    k = int(num_classes if num_classes is not None else labels.max(initial=-1) + 1)
    if method == "small-loss":
        if logits is None:
            raise ValueError("method small-loss needs logits")
        keep, p, scores = small_loss_split(logits, labels, zeta=zeta, seed=seed)
        report = []
        for c in range(k):
            m = labels == c
            if m.any():
                kept = keep & m
                report.append(ClassSplit(c, int(m.sum()), int(kept.sum()),
                                         float(scores[kept].min()) if kept.any() else float("nan")))
        return Detection(np.flatnonzero(keep), scores, p, None, report, method)
    vectors = class_vectors(features, labels, k, vectors_from, chunk)
    scores = alignment_scores(features, labels, vectors, chunk)
    keep, p, report = split(scores, labels, zeta=zeta, method=method, seed=seed, num_classes=k)
    return Detection(np.flatnonzero(keep), scores, p, vectors, report, method)


def _labels(labels) -> np.ndarray:
    if _is_torch(labels):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64)


def _check_labels(labels: np.ndarray, n: int, num_classes: int) -> None:
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


def _mask(subset, n: int) -> np.ndarray | None:
    if subset is None:
        return None
    if _is_torch(subset):
        subset = subset.detach().cpu().numpy()
    subset = np.asarray(subset)
    if subset.dtype == bool:
        return subset
    m = np.zeros(n, bool)
    m[subset.astype(np.int64)] = True
    return m

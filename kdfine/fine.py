"""FINE noisy-label detection (Kim et al., NeurIPS 2021), as pure functions of arrays.

For features z_i (N, D) and labels y_i:

1. u_k = principal eigenvector of the uncentred class gram G_k = sum_{i: y_i = k} z_i z_i^T,
   accumulated over row chunks (float32 BLAS ``syrk`` into a per-class float32 partial sum that is
   added to a float64 total every ``FLUSH_ROWS`` rows), so an N x D file larger than RAM works;
   then the top eigenpair of each D x D gram in float64 (Lanczos, checked, with ``eigh`` as the
   fallback).
2. score_i = |<u_{y_i}, z_i / ||z_i||>| in [0, 1].
3. Per class, a 2-component Gaussian mixture on the scores (full covariance, tol 1e-6, k-means
   initialisation seeded with ``seed``: scikit-learn's ``GaussianMixture`` fit, reproduced (tested to
   1e-9) by :mod:`kdfine.mixture` without importing scikit-learn); the component with the larger
   mean is clean; keep i if P(clean | score_i) > zeta (default 0.5). ``method="kmeans"`` uses the
   exact 2-means partition instead (hard assignment).

Inputs may be numpy arrays, memory-mapped ``.npy`` arrays or torch tensors (computed on their
device). A memory-mapped ``.npy`` is streamed with plain reads into one reused buffer, never mapped
page by page, so the resident memory stays near one chunk whatever N is.

Thread pools: numpy and scipy each load their own BLAS/OpenMP pool, and on a small
machine pools that spin for work fight for the cores: an ``eigh`` of a 512 x 512 matrix ran 10x
slower. So every pool is limited to one thread while FINE runs, and the two
passes over the features are parallelised by kdfine itself, over classes (grams) and row slices
(scores), with one thread per usable CPU (see :func:`cpu_threads`).

``small_loss_split`` is the DivideMix-style detector on per-sample cross-entropy, for comparison.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from kdfine.errors import KdfineWarning

CHUNK = 16384
GRAM_CHUNK = 65536  # rows per block of the gram pass: more rows per class and product, fewer sums
FLUSH_ROWS = 8192  # rows of one class summed in float32 before the partial gram joins the float64 total
METHODS = ("gmm", "kmeans", "small-loss", "auto", "knn")  # detect-noise/clean --method, in one place
NEEDS_LOGITS = ("small-loss", "auto")


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


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _npy_file(features) -> tuple[str, int] | None:
    """(path, byte offset of row 0) when ``features`` is a whole C-ordered ``np.memmap`` of a file
    (what ``np.load(..., mmap_mode="r")`` returns), else None."""
    if not isinstance(features, np.memmap) or not isinstance(getattr(features, "base", None), mmap.mmap):
        return None
    if not features.flags.c_contiguous or not getattr(features, "filename", None):
        return None
    return features.filename, int(features.offset)


def row_blocks(features, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """``(lo, rows)`` for consecutive blocks of up to ``chunk`` rows of an (N, D) array, in its own
    dtype. A file-backed memmap is read with ``readinto`` into one reused buffer (so ``rows`` is only
    valid until the next block): touching a mapping instead would leave every page read resident.
    """
    n = features.shape[0]
    src = _npy_file(features)
    if src is None:
        for lo in range(0, n, chunk):
            x = features[lo:lo + chunk]
            yield lo, (x.detach().cpu().numpy() if _is_torch(x) else np.asarray(x))
        return
    path, offset = src
    buf = np.empty((max(min(chunk, n), 1),) + features.shape[1:], dtype=features.dtype)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        f.seek(offset)
        for lo in range(0, n, chunk):
            rows = buf[:min(chunk, n - lo)]
            view, got = memoryview(rows).cast("B"), 0
            while got < view.nbytes:
                k = f.readinto(view[got:])
                if not k:
                    raise EOFError(f"{path}: file ends before row {lo + got // max(rows[0].nbytes, 1)}")
                got += k
            yield lo, rows


def take_rows(features, rows: np.ndarray) -> np.ndarray:
    """``features[rows]`` (sorted indices) as a new array. Rows of a file-backed memmap are read
    with positional reads: gathering scattered rows through the mapping would leave their whole
    read-ahead neighbourhoods resident (10,000 rows of a 2 GB file: over a GB)."""
    src = _npy_file(features)
    if src is None:
        x = features[rows]
        return x.detach().cpu().numpy() if _is_torch(x) else np.asarray(x)
    from kdfine.io import pread_rows

    path, offset = src
    out = np.empty((rows.size,) + features.shape[1:], dtype=features.dtype)
    fd = os.open(path, os.O_RDONLY)
    try:
        if not pread_rows(fd, out, offset, rows.tolist()):
            raise EOFError(f"{path}: the file ends before the rows its header declares")
    finally:
        os.close(fd)
    return out


def cpu_threads() -> int:
    """CPUs this process may use, shared among the ranks of this host under torchrun."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(cpus // max(local, 1), 1)


@contextlib.contextmanager
def thread_limit(threads: int):
    """Limit the BLAS and OpenMP pools of numpy and scipy to ``threads`` for the duration. The
    libraries are loaded first: a limit only reaches the pools already loaded."""
    import scipy.linalg.blas  # noqa: F401
    import scipy.sparse.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        yield


def class_grams(features, labels: np.ndarray, num_classes: int, subset: np.ndarray | None = None,
                chunk: int = GRAM_CHUNK) -> np.ndarray:
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
    # Per class, x^T x of each chunk's rows is added into a float32 partial sum, which joins the
    # float64 total every FLUSH_ROWS rows: one float64 add per FLUSH_ROWS rows instead of one per class per chunk, which cost more than the
    # products themselves when classes are many. Each worker thread owns the classes k with
    # k % threads == its number, so no two threads touch the same sums.
    grams = np.zeros((num_classes, d, d), dtype=np.float64)
    part = np.zeros((num_classes, d, d), dtype=np.float32)
    pending = np.zeros(num_classes, dtype=np.int64)
    threads = cpu_threads()
    with _Workers(threads) as pool:
        for lo, block in row_blocks(features, chunk):
            yc = labels[lo:lo + block.shape[0]]
            if mask is not None:
                m = mask[lo:lo + block.shape[0]]
                block, yc = block[m], yc[m]
            groups = _class_groups(yc)
            pool.run(_add_grams, [([g for g in groups if g[0] % threads == w], block, part, grams, pending)
                                  for w in range(threads)])
    for k in np.flatnonzero(pending):
        grams[k] += part[k]
    del part
    for g in grams:  # exactly symmetric, whatever the BLAS rounded (one class at a time: no copy of all)
        g[:] = (g + g.T) / 2
    return grams


def _class_groups(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(class, ascending row indices of that class)] for the classes present in ``labels``."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    bounds = np.flatnonzero(np.diff(sorted_labels)) + 1
    return [(int(sorted_labels[a]), order[a:b]) for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(order)])
            if b > a]


def _add_grams(groups, block: np.ndarray, part: np.ndarray, grams: np.ndarray, pending: np.ndarray) -> None:
    # numpy's matmul releases the GIL (scipy's f2py syrk does not, which left one core idle); the
    # product goes into one reused buffer: a fresh D x D array per class and block costs page faults.
    d = block.shape[1]
    prod = np.empty((d, d), dtype=np.float32)
    for k, idx in groups:
        xk = np.take(block, idx, axis=0)
        if xk.dtype != np.float32:
            xk = xk.astype(np.float32)
        np.matmul(xk.T, xk, out=prod)
        part[k] += prod
        pending[k] += idx.size
        if pending[k] >= FLUSH_ROWS:
            grams[k] += part[k]
            part[k] = 0.0
            pending[k] = 0


class _Workers:
    """A thread pool with every BLAS/OpenMP pool limited to one thread: kdfine parallelises over
    classes and row slices itself. numpy and BLAS release the GIL, and such coarse tasks keep
    their speed when other processes share the cores, where one multi-threaded BLAS call stalls
    each time one of its threads is descheduled."""

    def __init__(self, threads: int):
        self.threads = threads
        self.limit = thread_limit(1)
        self.pool = None

    def __enter__(self) -> "_Workers":
        self.limit.__enter__()
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kdfine-fine")
        return self

    def run(self, fn, arg_lists) -> None:
        """``fn(*args)`` for each args in ``arg_lists``, in parallel; returns when all are done."""
        if self.pool is None:
            for args in arg_lists:
                fn(*args)
            return
        for f in [self.pool.submit(fn, *args) for args in arg_lists]:
            f.result()

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.limit.__exit__(*exc)


def top_eigenvectors(grams: np.ndarray) -> np.ndarray:
    """(K, D) unit principal eigenvectors of (K, D, D) symmetric matrices, sign fixed so that the
    largest-magnitude component is positive; all-zero grams (empty classes) give zero vectors."""
    k, d, _ = grams.shape
    vectors = np.zeros((k, d), dtype=np.float64)
    with thread_limit(1):
        for c in range(k):
            if not np.any(grams[c]):
                continue
            u = top_eigenvector(grams[c])
            vectors[c] = u if u[np.argmax(np.abs(u))] >= 0 else -u
    return vectors


def top_eigenvector(g: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Unit eigenvector of the largest eigenvalue of a symmetric positive semi-definite (D, D)
    float64 matrix.

    Only that one pair is needed, so Lanczos (ARPACK, from a fixed start vector: deterministic)
    replaces a full ``eigh``: about 1 ms instead of 30 ms at D = 512. The pair is accepted when its
    residual ||G u - lambda u|| is below ``rtol * lambda`` and lambda is not below the largest
    diagonal entry (a lower bound of the top eigenvalue); otherwise, and for D < 64, ``eigh``.
    """
    d = g.shape[0]
    if d >= 64:
        from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigsh

        try:
            vals, vecs = eigsh(g, k=1, which="LA", v0=np.full(d, d ** -0.5), tol=0.0)
            lam, u = float(vals[0]), vecs[:, 0]
            if lam >= float(g.diagonal().max()) * (1 - 1e-12) and np.linalg.norm(g @ u - lam * u) <= rtol * lam:
                return u / np.linalg.norm(u)
        except (ArpackError, ArpackNoConvergence):
            pass
    _, vecs = np.linalg.eigh(g)
    return vecs[:, -1]


def class_vectors(features, labels, num_classes: int, subset: np.ndarray | None = None,
                  chunk: int = CHUNK) -> np.ndarray:
    """u_k for every class: (K, D) float64, unit norm (zero rows for classes with no samples).
    Raises :class:`NonFiniteFeatures` when a gram is not finite."""
    grams = class_grams(features, labels, num_classes, subset, chunk)
    if not np.isfinite(grams).all():
        raise NonFiniteFeatures()
    return top_eigenvectors(grams)


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
    threads = cpu_threads()
    with _Workers(threads) as pool:
        for lo, block in row_blocks(features, chunk):
            m = block.shape[0]
            cuts = [m * w // threads for w in range(threads + 1)]
            pool.run(_score_rows, [(block[a:b], labels[lo + a:lo + b], u, scores[lo + a:lo + b])
                                   for a, b in zip(cuts[:-1], cuts[1:]) if b > a])
    bad = np.flatnonzero(np.isnan(scores))
    if bad.size:
        raise NonFiniteFeatures(int(bad[0]))
    return np.clip(scores, 0.0, 1.0)


def _score_rows(x: np.ndarray, labels: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = |<u[labels[i]], x[i]>| / ||x[i]||`` in float64 (0 for zero rows, NaN for rows with
    NaN or inf: their norm is not finite); rows grouped by class, so that each class is one
    matrix-vector product."""
    dots = np.empty(x.shape[0])
    norms = np.empty(x.shape[0])
    for k, idx in _class_groups(labels):
        xk = np.take(x, idx, axis=0).astype(np.float64)
        dots[idx] = xk @ u[k]
        norms[idx] = np.sqrt(np.einsum("nd,nd->n", xk, xk))
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:] = np.where(norms > 0, np.abs(dots) / norms, 0.0)
        out[~np.isfinite(norms)] = np.nan


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
    k = int(num_classes if num_classes is not None else (labels.max(initial=-1) + 1))
    by_class = np.argsort(labels, kind="stable")  # each class's indices, ascending, in one sort
    ends = np.cumsum(np.bincount(labels, minlength=k)[:k]) if labels.size else np.zeros(k, np.int64)
    groups = [(c, by_class[(ends[c - 1] if c else 0):ends[c]]) for c in range(k)]
    groups = [(c, idx) for c, idx in groups if idx.size]
    report: dict[int, ClassSplit] = {}
    threads = min(cpu_threads(), max(len(groups), 1))
    # the classes' fits are independent: each thread takes every threads-th class (numpy's
    # vector operations release the GIL); results are gathered by class, so the order is fixed
    with _Workers(threads) as pool:
        pool.run(_split_classes, [(groups[w::threads], scores, p_clean, report, zeta, method, seed)
                                  for w in range(threads)])
    out = [report[c] for c, _ in groups]
    for r in out:
        if r.note:
            warnings.warn(f"class {r.label}: {r.note}; kept whole", FineWarning, stacklevel=2)
    return p_clean > zeta, p_clean, out


def _split_classes(groups, scores: np.ndarray, p_clean: np.ndarray, report: dict, zeta: float, method: str,
                   seed: int) -> None:
    """Fill ``p_clean[idx]`` and ``report[c]`` (a :class:`ClassSplit`) for each ``(c, idx)`` of ``groups``."""
    for c, idx in groups:
        s = scores[idx]
        note = ""
        if idx.size < 2:
            note = "fewer than 2 samples"
        elif np.ptp(s) <= 1e-12:
            note = "all scores equal"
        p = None if note else _two_component(s, method, seed)
        if p is None:
            note = note or "scores do not separate"
            p = np.ones(idx.size)
        p_clean[idx] = p
        kept = p > zeta
        report[c] = ClassSplit(c, int(idx.size), int(kept.sum()), float(s[kept].min()) if kept.any() else float("nan"),
                               note)


def _two_component(s: np.ndarray, method: str, seed: int) -> np.ndarray | None:
    """P(clean) of each score: the posterior of the larger-mean component of a 2-component
    Gaussian mixture (full covariance, tol 1e-6, k-means initialisation seeded with ``seed``; the
    official method's scikit-learn fit, computed by :mod:`kdfine.mixture`), or membership of the
    larger-centre cluster of the exact 2-means partition. None when the two do not separate."""
    from kdfine import mixture

    if method == "gmm":
        gmm = mixture.gaussian_mixture(s, seed=seed, tol=1e-6)
        if gmm is None or abs(gmm.means[0] - gmm.means[1]) <= 1e-12:
            return None
        return gmm.resp[:, int(np.argmax(gmm.means))]
    high = mixture.two_means(s)
    if high is None:
        return None
    return high.astype(np.float64)


def small_loss_split(logits: np.ndarray, labels, *, zeta: float = 0.5, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DivideMix-style detector: one 2-component GMM on the min-max normalised per-sample
    cross-entropy (reg_covar 5e-4, tol 1e-2, max_iter 10); clean = the smaller-mean component.

    Returns ``keep`` (N,) bool, ``p_clean`` (N,) and ``scores`` = p(label | x) (higher = cleaner).
    """
    from kdfine import mixture

    labels = _labels(labels)
    lp = label_log_likelihood(logits, labels)
    loss = -lp
    span = loss.max() - loss.min()
    if span <= 1e-12:
        warnings.warn("all losses equal; everything kept", FineWarning, stacklevel=2)
        ones = np.ones(labels.size)
        return ones > zeta, ones, np.exp(lp)
    norm = (loss - loss.min()) / span
    gmm = mixture.gaussian_mixture(norm, seed=seed, tol=1e-2, reg_covar=5e-4, max_iter=10)
    p = gmm.resp[:, int(np.argmin(gmm.means))]
    return p > zeta, p, np.exp(lp)


def label_log_likelihood(logits, labels: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """log p(label_i | x_i) under ``logits`` (N, K), (N,) float64; computed in float64 row blocks, so a
    memory-mapped float32 (N, K) stays on disk (1M x 100 would be 800 MB as one float64 array).
    Raises ValueError when a logit is NaN or inf."""
    out = np.empty(labels.size)
    for lo in range(0, labels.size, chunk):
        z = np.array(logits[lo:lo + chunk], dtype=np.float64)  # a copy: shifted and exponentiated in place
        if not np.isfinite(z).all():
            raise NonFiniteLogits("logits contain NaN or inf")
        rows = np.arange(z.shape[0])
        z -= z.max(axis=1, keepdims=True)
        picked = z[rows, labels[lo:lo + z.shape[0]]]  # (z - max)[y], as metrics.log_softmax has it
        np.exp(z, out=z)
        # log_softmax's column y alone: the other K - 1 columns of the (rows, K) result are never used
        out[lo:lo + z.shape[0]] = picked - np.log(z.sum(axis=1))
    return out


def label_fit_rate(logits, labels: np.ndarray, chunk: int = 65536) -> float:
    """The share of samples whose label is the argmax of their logits (N, K), read in row blocks."""
    hits = 0
    for lo in range(0, labels.size, chunk):
        hits += int((np.asarray(logits[lo:lo + chunk]).argmax(axis=1) == labels[lo:lo + chunk]).sum())
    return hits / max(labels.size, 1)


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


def detect(features, labels, num_classes: int | None = None, *, zeta: float = 0.5, method: str = "gmm",
           seed: int = 0, vectors_from: np.ndarray | None = None, logits: np.ndarray | None = None,
           chunk: int = CHUNK) -> Detection:
    """FINE end to end: class vectors (from ``vectors_from``, a mask or index array of samples
    believed clean, else from all samples), alignment scores, per-class split.

    features: (N, D) array, memmap or tensor; labels: (N,) ints in [0, K). ``method`` is one of
    :data:`METHODS`: ``small-loss`` uses the ``logits`` (N, K) instead of the features, ``auto``
    both (:mod:`kdfine.combined`), ``knn`` the features' nearest neighbours (:mod:`kdfine.knn`).
    """
    labels = _labels(labels)
    k = int(num_classes if num_classes is not None else labels.max(initial=-1) + 1)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in NEEDS_LOGITS and logits is None:
        raise ValueError(f"method {method} needs logits")
    if method == "knn":
        from kdfine import knn

        keep, scores = knn.knn_split(features, labels, seed=seed)
        detail = {"k": knn.K, "reference": int(min(labels.size, knn.REFERENCE))}
        return Detection(np.flatnonzero(keep), scores, scores.copy(), None, _report(keep, scores, labels, k),
                         method, detail)
    if method == "small-loss":
        keep, p, scores = small_loss_split(logits, labels, zeta=zeta, seed=seed)
        return Detection(np.flatnonzero(keep), scores, p, None, _report(keep, scores, labels, k), method)
    vectors = class_vectors(features, labels, k, vectors_from, chunk)
    scores = alignment_scores(features, labels, vectors, chunk)
    keep, p, report = split(scores, labels, zeta=zeta, method="gmm" if method == "auto" else method,
                            seed=seed, num_classes=k)
    if method == "auto":
        from kdfine import combined

        _, loss_p, likelihood = small_loss_split(logits, labels, zeta=zeta, seed=seed)
        loss = -np.log(np.maximum(likelihood, np.finfo(np.float64).tiny))
        c = combined.combine(scores, p, loss, loss_p, labels, k, zeta=zeta,
                             fit_rate=label_fit_rate(logits, labels))
        report = _report(c.keep, c.score, labels, k, note=c.short())
        detail = {"weights": c.weights, "separation": c.separation, "memorised": c.memorised,
                  "em_iterations": c.iterations, "description": c.describe()}
        return Detection(np.flatnonzero(c.keep), c.score, c.p_clean, vectors, report, method, detail)
    return Detection(np.flatnonzero(keep), scores, p, vectors, report, method)


def _report(keep: np.ndarray, scores: np.ndarray, labels: np.ndarray, k: int, note: str = "") -> list[ClassSplit]:
    """One :class:`ClassSplit` per class present, from a keep mask and scores (N,)."""
    out = []
    for c in range(k):
        m = labels == c
        if m.any():
            kept = keep & m
            out.append(ClassSplit(c, int(m.sum()), int(kept.sum()),
                                  float(scores[kept].min()) if kept.any() else float("nan"), note))
    return out


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

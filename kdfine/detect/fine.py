"""FINE noisy-label detection (Kim et al., NeurIPS 2021), as pure functions of arrays.

For features z_i (N, D) and labels y_i:

1. u_k = principal eigenvector of the uncentred class gram G_k = sum_{i: y_i = k} z_i z_i^T,
   accumulated over blocks of ``GRAM_CHUNK`` rows (each class's rows of a block, gathered into a
   reused buffer, added by float32 BLAS ``syrk`` into the upper triangle of a per-class float32
   partial sum (:func:`kdfine.runtime.blas.syrk_add`), which joins a float64 total every
   ``FLUSH_ROWS`` rows), so an N x D file larger than RAM works; then the top eigenpair of each
   D x D gram in float64 (Lanczos, checked, with ``eigh`` as the fallback). The float32 partial
   sums leave the gram 0.9-2.4e-7 (relative, max entry) from the exact float64 gram of the same
   float32 features and u_k within 2.2e-9 of its top eigenvector (all 100 classes of the 1M x 512
   benchmark file; numpy's two-step fallback: 0.6-2.0e-7 and 2.0e-9).
2. score_i = |<u_{y_i}, z_i / ||z_i||>| in [0, 1].
3. Per class, a 2-component Gaussian mixture on the scores (full covariance, tol 1e-6, k-means
   initialisation seeded with ``seed``: scikit-learn's ``GaussianMixture`` fit, reproduced (tested to
   1e-9) by :mod:`kdfine.detect.mixture` without importing scikit-learn); the component with the larger
   mean is clean; keep i if P(clean | score_i) > zeta (default 0.5). ``method="kmeans"`` uses the
   exact 2-means partition instead (hard assignment).

Inputs may be numpy arrays, memory-mapped ``.npy`` arrays or torch tensors (computed on their
device). A memory-mapped ``.npy`` is streamed with plain reads into one reused buffer, never mapped
page by page, so the resident memory stays near one chunk whatever N is.

Thread pools: every BLAS/OpenMP pool is limited to one thread while FINE runs, and the two passes
over the features are parallelised by kdfine itself (:mod:`kdfine.runtime.threads`).

Why a gram and not a Krylov method on the data (issue 23, item 4, evaluated on the 1M x 512, K = 100
benchmark file): only the top eigenvector is needed, and subspace iteration or block Krylov on the
rows themselves (per class W = X_c^T (X_c V) per pass, the Rayleigh-Ritz vector certified by its
residual) would skip the N D^2 gram. But a residual certificate of 1e-10 needs float64 products
(float32 accumulation stops near 1e-7), and from the ones vector (cosine 0.91-0.92 with u_k;
lambda_9 / lambda_1 = 3e-3) both needed 5 passes over the 2 GB (simulated on the exact class grams,
blocks of 4 to 16 vectors). One float64 pass with an 8-vector block cost 2.1 CPU s (gather, convert,
two products, row norms), so 10.5 CPU s against 10.4 for the gram pass and the score pass: no gain.
The gram pass is bounded by syrk's rate (27-29 G multiply-adds/s per core on a Zen 3, 34-38 on a
Zen 4 with AVX-512: 3.4-4.9 CPU s for the 1.3e11 multiply-adds of 1M x 512).

Registered detectors: ``gmm`` (the official method) and ``kmeans``.
"""

from __future__ import annotations

import warnings

import numpy as np

from kdfine.detect.base import (DETECTORS, ClassSplit, Detection, FineWarning, NonFiniteFeatures, Scratch, as_labels,
                                check_labels, gather, groups_of, is_torch)
from kdfine.files.rows import CHUNK, row_blocks
from kdfine.runtime.blas import syrk_add
from kdfine.runtime.threads import Workers, cpu_threads, row_slices, thread_limit

GRAM_CHUNK = 65536  # rows per block of both passes over a numpy/memmap input: more rows per class and product
# (syrk on 655 rows x 512 ran at 27 G multiply-adds/s per core, on 164 rows at 15), fewer sums; torch
# inputs keep CHUNK-row blocks (a float64 block of 65,536 rows would be 256 MB on the device)
FLUSH_ROWS = 8192  # rows of one class summed in float32 before the partial gram joins the float64 total


def class_grams(features, labels: np.ndarray, num_classes: int, subset: np.ndarray | None = None,
                chunk: int | None = None) -> np.ndarray:
    """Uncentred per-class gram matrices (K, D, D) float64 of raw ``features`` (N, D).

    subset: optional boolean mask (N,) or index array; only those rows contribute. chunk: rows per
    block (default :func:`_block_rows`).
    """
    labels = as_labels(labels)
    chunk = _block_rows(features, chunk)
    n, d = features.shape
    check_labels(labels, n, num_classes)
    mask = _mask(subset, n)
    if is_torch(features):
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
    scratch = [Scratch() for _ in range(threads)]
    with Workers(threads) as pool:
        for lo, block in row_blocks(features, chunk, readers=threads):
            yc = labels[lo:lo + block.shape[0]]
            if mask is not None:
                m = mask[lo:lo + block.shape[0]]
                block, yc = block[m], yc[m]
            groups = groups_of(yc)
            pool.run(_add_grams, [([g for g in groups if g[0] % threads == w], block, part, grams, pending, scratch[w])
                                  for w in range(threads)])
    for k in np.flatnonzero(pending):
        grams[k] += part[k]
    del part
    lower = np.tril_indices(d, -1)
    for g in grams:  # the sums hold the upper triangle (syrk_add): mirrored, one class at a time
        g[lower] = g.T[lower]
    return grams


def _block_rows(features, chunk: int | None) -> int:
    """Rows per block of a pass: ``chunk``, else GRAM_CHUNK for arrays and memmaps, CHUNK for tensors."""
    if chunk is not None:
        return chunk
    return CHUNK if is_torch(features) else GRAM_CHUNK


def _add_grams(groups, block: np.ndarray, part: np.ndarray, grams: np.ndarray, pending: np.ndarray,
               scratch: Scratch) -> None:
    # each class's rows are gathered into the thread's reused buffer and syrk adds their product
    # into the class's float32 sum (upper triangle), outside the GIL
    d = block.shape[1]
    prod = scratch.get("prod", d, (d,), np.float32)
    for k, idx in groups:
        syrk_add(part[k], gather(block, idx, scratch, np.float32), prod)
        pending[k] += idx.size
        if pending[k] >= FLUSH_ROWS:
            grams[k] += part[k]
            part[k] = 0.0
            pending[k] = 0


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
                  chunk: int | None = None) -> np.ndarray:
    """u_k for every class: (K, D) float64, unit norm (zero rows for classes with no samples).
    Raises :class:`NonFiniteFeatures` when a gram is not finite."""
    grams = class_grams(features, labels, num_classes, subset, chunk)
    if not np.isfinite(grams).all():
        raise NonFiniteFeatures()
    return top_eigenvectors(grams)


def alignment_scores(features, labels, vectors: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """score_i = |<u_{y_i}, z_i / ||z_i||>|, (N,) float64 in [0, 1]; zero rows score 0."""
    labels = as_labels(labels)
    chunk = _block_rows(features, chunk)
    n = features.shape[0]
    u = np.asarray(vectors, dtype=np.float64)
    check_labels(labels, n, u.shape[0])
    scores = np.empty(n, dtype=np.float64)
    if is_torch(features):
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
    scratch = [Scratch() for _ in range(threads)]
    with Workers(threads) as pool:
        for lo, block in row_blocks(features, chunk, readers=threads):
            pool.run(_score_rows, [(block[a:b], labels[lo + a:lo + b], u, scores[lo + a:lo + b], scratch[w])
                                   for w, (a, b) in enumerate(row_slices(block.shape[0], threads))])
    bad = np.flatnonzero(np.isnan(scores))
    if bad.size:
        raise NonFiniteFeatures(int(bad[0]))
    return np.clip(scores, 0.0, 1.0)


def _score_rows(x: np.ndarray, labels: np.ndarray, u: np.ndarray, out: np.ndarray,
                scratch: Scratch | None = None) -> None:
    """``out[i] = |<u[labels[i]], x[i]>| / ||x[i]||`` in float64 (0 for zero rows, NaN for rows with
    NaN or inf: their norm is not finite); rows grouped by class, so that each class is one
    matrix-vector product."""
    scratch = scratch or Scratch()
    dots = np.empty(x.shape[0])
    norms = np.empty(x.shape[0])
    for k, idx in groups_of(labels):
        xk = gather(x, idx, scratch, np.float64)
        dots[idx] = xk @ u[k]
        norms[idx] = np.sqrt(np.einsum("nd,nd->n", xk, xk))
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:] = np.where(norms > 0, np.abs(dots) / norms, 0.0)
        out[~np.isfinite(norms)] = np.nan


def split(scores: np.ndarray, labels, *, zeta: float = 0.5, method: str = "gmm", seed: int = 0,
          num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, list[ClassSplit]]:
    """Per-class clean/noisy split of 1-D ``scores`` (higher = cleaner).

    Returns ``keep`` (N,) bool, ``p_clean`` (N,) float64 and one :class:`ClassSplit` per class
    present. A class with fewer than 2 samples, or whose scores do not separate, is kept whole
    with a :class:`FineWarning`.
    """
    labels = as_labels(labels)
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
    with Workers(threads) as pool:
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
    official method's scikit-learn fit, computed by :mod:`kdfine.detect.mixture`), or membership of the
    larger-centre cluster of the exact 2-means partition. None when the two do not separate."""
    from kdfine.detect import mixture

    if method == "gmm":
        gmm = mixture.gaussian_mixture(s, seed=seed, tol=1e-6)
        if gmm is None or abs(gmm.means[0] - gmm.means[1]) <= 1e-12:
            return None
        return gmm.resp[:, int(np.argmax(gmm.means))]
    high = mixture.two_means(s)
    if high is None:
        return None
    return high.astype(np.float64)


def _mask(subset, n: int) -> np.ndarray | None:
    if subset is None:
        return None
    if is_torch(subset):
        subset = subset.detach().cpu().numpy()
    subset = np.asarray(subset)
    if subset.dtype == bool:
        return subset
    m = np.zeros(n, bool)
    m[subset.astype(np.int64)] = True
    return m


_XLABEL = "alignment score |<u_y, z/|z|>|"


@DETECTORS.register("kmeans", title="FINE alignment scores (2-means split)", xlabel=_XLABEL)  # applied second
@DETECTORS.register("gmm", title="FINE alignment scores (GMM split)", xlabel=_XLABEL)
def fine_detect(features, labels, num_classes: int, *, zeta: float = 0.5, method: str = "gmm", seed: int = 0,
                vectors_from: np.ndarray | None = None, chunk: int | None = None, **_) -> Detection:
    """FINE end to end: class vectors (from ``vectors_from``, a mask or index array of samples
    believed clean, else from all samples), alignment scores, per-class split by ``method`` (gmm
    or kmeans). features: (N, D) array, memmap or tensor; labels: (N,) ints in [0, K)."""
    vectors = class_vectors(features, labels, num_classes, vectors_from, chunk)
    scores = alignment_scores(features, labels, vectors, chunk)
    keep, p, report = split(scores, labels, zeta=zeta, method=method, seed=seed, num_classes=num_classes)
    return Detection(np.flatnonzero(keep), scores, p, vectors, report, method)

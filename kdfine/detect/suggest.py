"""Suggested labels: for each sample, the class the evidence points to and its probability.

Pure numpy, torch-free. One rule picks the suggestion from per-class probabilities ``p`` (N, K):

- a *rejected* sample (the detector believes its label is wrong) gets the most probable class
  among the others, with its probability *given that the label is wrong*: the given class is
  removed and the rest renormalised (a softmax with the given logit at -inf, computed in logs). A model trained on
  the noisy labels has often memorised the wrong label of a training sample (``p_y`` near 1), so
  the raw ``p_c`` of the runner-up would be small even when it is the right class; conditioning on
  the detector's verdict keeps the ranking and gives a probability on the scale ``--relabel-min-p``
  reads;
- a kept sample gets its most probable class (its given label when the evidence agrees) and
  that class's unconditioned probability.

The evidence (the first one given): the dump's logits (softmax); else FINE's class vectors
(``p_c`` proportional to the squared alignment of the normalised feature with class c's vector);
else the neighbours' labels (vote shares). Which evidence suggests best is measured separately
(bench); the signature takes all of them so that a combination can replace the rule here.
"""

from __future__ import annotations

import numpy as np

from kdfine.files.rows import CHUNK, row_blocks
from kdfine.runtime.threads import Workers, cpu_threads, row_slices


def suggest(labels: np.ndarray, *, logits=None, features=None, vectors: np.ndarray | None = None,
            neighbour_labels: np.ndarray | None = None, rejected: np.ndarray | None = None,
            num_classes: int | None = None, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """``(suggested (N,) int64, suggested_p (N,) float64)``.

    labels: (N,) given labels in [0, K); logits: (N, K) (array or memmap, read in row blocks);
    features: (N, D) with vectors (K, D) FINE's class vectors; neighbour_labels: (N, k) the labels of
    each sample's k nearest neighbours; rejected: (N,) bool, the samples the detector rejected
    (default: none); num_classes: K (default from the evidence). See the module docstring for the
    rule. Raises ValueError when no evidence is given.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    bad = np.zeros(n, bool) if rejected is None else np.asarray(rejected, bool)
    out, out_p = np.empty(n, np.int64), np.empty(n, np.float64)

    def rows(lp: np.ndarray, lo: int) -> None:
        hi = lo + lp.shape[0]
        out[lo:hi], out_p[lo:hi] = pick(lp, y[lo:hi], bad[lo:hi])

    # each block's rows are split between the threads (numpy releases the GIL; pick calls no BLAS,
    # so no pool limit is needed, nor scipy imported for one)
    threads = cpu_threads()
    with Workers(threads, limit_blas=False) as pool:
        for lo, lp in _log_probabilities(n, logits, features, vectors, neighbour_labels, num_classes, chunk):
            pool.run(rows, [(lp[a:b], lo + a) for a, b in row_slices(lp.shape[0], threads)])
    return out, out_p


def pick(log_p: np.ndarray, labels: np.ndarray, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule on a block: ``log_p`` (B, K) log-probabilities (or logits: any row-wise shift),
    labels (B,), rejected (B,) bool -> (class (B,), probability (B,)). Working in logs, the
    renormalised probability of a runner-up stays exact when the given class holds nearly all the
    mass. A row without evidence (NaN or +inf, or no class left, as for a rejected sample when K = 1)
    suggests its own label with probability 0."""
    rows = np.arange(log_p.shape[0])
    lp = np.array(log_p, dtype=np.float64)
    first = lp.max(axis=1)  # NaN when the row has a NaN, else +inf when it has a +inf
    valid = ~(np.isnan(first) | np.isposinf(first))
    lp[~valid] = -np.inf
    lp[rows[rejected], labels[rejected]] = -np.inf  # the given class is ruled out; the rest renormalised below
    top = lp.max(axis=1, keepdims=True)
    e = np.exp(lp - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=1)
    best = lp.argmax(axis=1)
    prob = np.divide(e[rows, best], total, out=np.zeros(len(rows)), where=total > 0)
    none = ~(prob > 0)
    best[none] = labels[none]
    return best.astype(np.int64), np.where(none, 0.0, prob)


def relabel(labels: np.ndarray, rejected: np.ndarray, suggested: np.ndarray, suggested_p: np.ndarray,
            min_p: float) -> np.ndarray:
    """(N,) labels with the suggestion in place of the given label where the sample is rejected and
    ``suggested_p >= min_p``; the given label elsewhere (what ``--labels-out`` writes)."""
    swap = np.asarray(rejected, bool) & (np.asarray(suggested_p) >= min_p)
    return np.where(swap, suggested, labels).astype(np.int64)


def _log_probabilities(n: int, logits, features, vectors, neighbour_labels, k: int | None, chunk: int):
    """``(lo, log p)`` row blocks of per-class log-probabilities (up to a row-wise shift) from the
    first evidence given."""
    if logits is not None:
        for lo, z in row_blocks(logits, chunk):
            yield lo, np.asarray(z, np.float64)
    elif features is not None and vectors is not None:
        u = np.asarray(vectors, np.float64)
        for lo, x in row_blocks(features, chunk):
            yield lo, _log(alignment_shares(np.asarray(x, np.float64), u))
    elif neighbour_labels is not None:
        nb = np.asarray(neighbour_labels, np.int64)
        kk = int(k or nb.max(initial=-1) + 1)
        for lo in range(0, n, chunk):
            yield lo, _log(vote_shares(nb[lo:lo + chunk], kk))
    else:
        raise ValueError("suggest needs evidence: logits, features with class vectors, or neighbour labels")


def _log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def alignment_shares(x: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(B, K) shares of the squared alignments <u_c, x/||x||>^2 of features x (B, D) with the class
    vectors (K, D): for orthonormal vectors these are the parts of the unit feature that each class
    explains. A row with no alignment at all is uniform."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    a = ((x / np.where(norms > 0, norms, 1.0)) @ vectors.T) ** 2
    total = a.sum(axis=1, keepdims=True)
    return np.where(total > 0, a / np.where(total > 0, total, 1.0), 1.0 / max(vectors.shape[0], 1))


def vote_shares(neighbour_labels: np.ndarray, k: int) -> np.ndarray:
    """(B, K) share of each class among the neighbours' labels (B, m)."""
    b, m = neighbour_labels.shape
    counts = np.zeros((b, k))
    np.add.at(counts, (np.repeat(np.arange(b), m), neighbour_labels.ravel()), 1.0)
    return counts / max(m, 1)

"""The small-loss detector (DivideMix style): a 2-component Gaussian mixture on the per-sample
cross-entropy of the labels under a model's logits; clean = the smaller-loss component. Also the
per-sample log-likelihood of the labels and the share of labels a model fits, which ``auto`` reads.
Registered as ``small-loss``.
"""

from __future__ import annotations

import warnings

import numpy as np

from kdfine.detect.base import DETECTORS, Detection, FineWarning, NonFiniteLogits, as_labels, class_report


def small_loss_split(logits: np.ndarray, labels, *, zeta: float = 0.5, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DivideMix-style detector: one 2-component GMM on the min-max normalised per-sample
    cross-entropy (reg_covar 5e-4, tol 1e-2, max_iter 10); clean = the smaller-mean component.

    Returns ``keep`` (N,) bool, ``p_clean`` (N,) and ``scores`` = p(label | x) (higher = cleaner).
    """
    from kdfine.detect import mixture

    labels = as_labels(labels)
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


@DETECTORS.register("small-loss", logits=True, title="small-loss scores (GMM on the cross-entropy)",
                    xlabel="p(label | x) from the logits")
def small_loss_detect(features, labels, num_classes: int, *, zeta: float = 0.5, seed: int = 0, logits=None,
                      **_) -> Detection:
    """The small-loss detector as a :class:`Detection` (``features`` unused); logits (N, K)."""
    keep, p, scores = small_loss_split(logits, labels, zeta=zeta, seed=seed)
    return Detection(np.flatnonzero(keep), scores, p, None, class_report(keep, scores, labels, num_classes),
                     "small-loss")

"""Two-cluster splits of one-dimensional scores: 2-means and a 2-component Gaussian mixture.

FINE splits each class's scores with scikit-learn's ``GaussianMixture`` (2 components, full
covariance, tol 1e-6, k-means initialisation, seeded), the small-loss detector the per-sample
losses with a looser one. On 1-D data each is a few vector operations, so they are done here in
numpy, step for step as scikit-learn does them: the same seeded k-means++ draws and Lloyd
iterations for the initial partition, the same EM updates, regularisation, stopping rule and final
E-step. Importing scikit-learn alone costs more than a second of every ``detect-noise`` run; this
module costs nothing, and the test suite checks that its posteriors equal scikit-learn's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_LOG_2PI = float(np.log(2.0 * np.pi))


def two_means(x: np.ndarray) -> np.ndarray | None:
    """The exact 2-means partition of ``x`` (n,): the least within-cluster sum of squares, as a bool
    array that is True for the cluster with the larger mean; None when all values are equal.

    Sorted, every optimal 1-D partition is a split between two consecutive distinct values; the
    sum of squares of each split follows from prefix sums, so all are compared at once.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    xs = x[order]
    n = xs.size
    cuts = np.flatnonzero(xs[1:] > xs[:-1]) + 1  # left part is xs[:i]
    if cuts.size == 0:
        return None
    csum = np.cumsum(xs)
    left_n = cuts.astype(np.float64)
    left = csum[cuts - 1]
    right = csum[-1] - left
    # total SS = sum x^2 - S_l^2/n_l - S_r^2/(n - n_l): the best split maximises the subtracted part
    between = left * left / left_n + right * right / (n - left_n)
    i = int(cuts[int(np.argmax(between))])
    high = np.zeros(n, dtype=bool)
    high[order[i:]] = True
    return high


def seeded_two_means(x: np.ndarray, seed: int, tol: float = 1e-4, max_iter: int = 300) -> np.ndarray | None:
    """The partition that scikit-learn's ``KMeans(n_clusters=2, n_init=1, random_state=seed)``
    finds on ``x`` (n,): k-means++ seeding with two local trials drawn from
    ``numpy.random.RandomState(seed)``, then Lloyd iterations until the labels repeat or the squared
    centre shift falls to ``tol`` times the variance. Returns a bool array, True for the cluster
    with the larger centre; None when all values are equal."""
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    if n < 2 or not np.ptp(x) > 0:
        return None
    tol = float(np.var(x)) * tol
    x = x - x.mean()  # as scikit-learn centres the data for its distances
    xx = x * x
    rng = np.random.RandomState(seed)
    cdf = np.cumsum(np.full(n, 1.0 / n))
    cdf /= cdf[-1]
    first = int(cdf.searchsorted(rng.random_sample(), side="right"))
    closest = np.maximum(-2.0 * (x[first] * x) + xx[first] + xx, 0.0)
    pot = closest.sum()
    cand = np.searchsorted(np.cumsum(closest), rng.uniform(size=2) * pot)
    np.clip(cand, None, n - 1, out=cand)
    dist = np.maximum(-2.0 * (x[cand][:, None] * x[None, :]) + xx[cand][:, None] + xx[None, :], 0.0)
    np.minimum(closest[None, :], dist, out=dist)
    centres = np.array([x[first], x[cand[int(np.argmin(dist.sum(axis=1)))]]])
    labels = np.full(n, -1)
    strict = False
    for _ in range(max_iter):
        old = labels
        labels = _nearest(x, centres)
        new = np.array([x[labels == j].mean() if (labels == j).any() else centres[j] for j in (0, 1)])
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if np.array_equal(labels, old):
            strict = True
            break
        if shift <= tol:
            break
    if not strict:
        labels = _nearest(x, centres)
    return labels == int(np.argmax(centres))


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearer centre, by ||c||^2 - 2 x c as scikit-learn ranks them (ties: the first)."""
    d0 = centres[0] * centres[0] + -2.0 * (x * centres[0])
    d1 = centres[1] * centres[1] + -2.0 * (x * centres[1])
    return (d1 < d0).astype(np.int64)


@dataclass
class Mixture:
    """A fitted 2-component 1-D Gaussian mixture: ``weights``, ``means`` and ``variances`` (2,),
    ``resp`` (n, 2) the posteriors of the fitted data, ``iterations`` and ``converged``."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    resp: np.ndarray
    iterations: int
    converged: bool


def gaussian_mixture(x: np.ndarray, *, seed: int = 0, tol: float = 1e-3, reg_covar: float = 1e-6,
                     max_iter: int = 100, init: np.ndarray | None = None) -> Mixture | None:
    """EM for a 2-component Gaussian mixture on ``x`` (n,), initialised from
    :func:`seeded_two_means` (or ``init``: (n,) bool, True = component 1), as scikit-learn's
    ``GaussianMixture(2, covariance_type="full", random_state=seed)``. None when ``x`` has fewer
    than two distinct values. Defaults are scikit-learn's; FINE uses tol 1e-6."""
    x = np.asarray(x, dtype=np.float64).ravel()
    high = seeded_two_means(x, seed) if init is None else np.asarray(init, dtype=bool)
    if high is None:
        return None
    resp = (~high).astype(np.float64), high.astype(np.float64)
    weights, means, variances = _m_step(x, resp, reg_covar)
    weights = weights / x.size  # scikit-learn's initialisation divides by n, later steps by the sum
    lower_bound, converged, iterations = -np.inf, False, 0
    for iterations in range(1, max_iter + 1):
        previous = lower_bound
        log_norm, resp = _e_step(x, weights, means, variances)
        weights, means, variances = _m_step(x, resp, reg_covar)
        weights = weights / weights.sum()
        lower_bound = float(log_norm.mean())
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    _, resp = _e_step(x, weights, means, variances)
    return Mixture(weights, means, variances, np.stack(resp, axis=1), iterations, converged)


# The two components are kept as separate 1-D arrays: numpy's reductions along a length-2 axis of
# an (n, 2) array cost several times the arithmetic, and FINE fits one mixture per class.


def _m_step(x: np.ndarray, resp: tuple[np.ndarray, np.ndarray],
            reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Component masses (unnormalised weights), means and regularised variances, each (2,), from
    the responsibilities ``resp`` (two (n,) arrays)."""
    eps = 10 * np.finfo(np.float64).eps
    nk = np.array([r.sum() for r in resp]) + eps
    means = np.array([r @ x for r in resp]) / nk
    diff = np.empty_like(x)
    variances = np.empty(2)
    for j, r in enumerate(resp):
        np.subtract(x, means[j], out=diff)
        diff *= diff
        variances[j] = r @ diff / nk[j] + reg_covar
    return nk, means, variances


def _e_step(x: np.ndarray, weights: np.ndarray, means: np.ndarray,
            variances: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Per-sample log-likelihood (n,) and the responsibilities of the two components ((n,), (n,))."""
    prec_chol = 1.0 / np.sqrt(variances)
    weighted = []
    for j in (0, 1):
        y = np.subtract(x, means[j])
        y *= prec_chol[j]
        y *= y
        y += _LOG_2PI
        y *= -0.5
        y += np.log(prec_chol[j]) + np.log(weights[j])
        weighted.append(y)
    log_norm = np.logaddexp(weighted[0], weighted[1])
    for w in weighted:  # in place: w becomes exp(w - log_norm)
        w -= log_norm
        np.exp(w, out=w)
    return log_norm, (weighted[0], weighted[1])

"""kdfine.detect.mixture reproduces scikit-learn's GaussianMixture (the official FINE split) exactly, and
metrics.auroc its roc_auc_score."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture

from kdfine.detect import fine, mixture
from kdfine import metrics


def samples(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "bimodal":  # FINE scores of a class with wrong labels
        noisy = rng.random(n) < rng.uniform(0.05, 0.8)
        return np.clip(np.where(noisy, rng.normal(0.3, 0.1, n), rng.normal(0.85, 0.05, n)), 0, 1)
    if kind == "uniform":
        return rng.random(n)
    if kind == "skewed":
        return rng.beta(5, 1, n)
    if kind == "ties":
        return np.round(rng.random(n) * 5) / 5
    return np.r_[np.zeros(n), 1.0]  # one outlier


def sklearn_p_high(x, seed, **kw) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(2, covariance_type="full", random_state=seed, **kw).fit(x[:, None])
    return g.predict_proba(x[:, None])[:, int(np.argmax(g.means_.ravel()))]


@pytest.mark.parametrize("kind", ["bimodal", "uniform", "skewed", "ties", "outlier"])
@pytest.mark.parametrize("settings", [dict(tol=1e-6), dict(tol=1e-2, reg_covar=5e-4, max_iter=10)],
                         ids=["fine", "small-loss"])
def test_posteriors_equal_scikit_learn(kind, settings):
    rng = np.random.default_rng(len(kind))
    for _ in range(12):
        n, seed = int(rng.integers(3, 1500)), int(rng.integers(0, 2**31 - 1))
        x = samples(kind, n, rng)
        mix = mixture.gaussian_mixture(x, seed=seed, **settings)
        p = mix.resp[:, int(np.argmax(mix.means))]
        np.testing.assert_allclose(p, sklearn_p_high(x, seed, **settings), rtol=0, atol=1e-9)


def test_fine_split_is_the_official_one():
    """The whole per-class split (zeta = 0.5 on P(clean)) against scikit-learn's, class by class."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, 3000)
    scores = samples("bimodal", 3000, rng)
    keep, p_clean, _ = fine.split(scores, labels, seed=3)
    for c in range(5):
        idx = np.flatnonzero(labels == c)
        np.testing.assert_allclose(p_clean[idx], sklearn_p_high(scores[idx], 3, tol=1e-6), atol=1e-9)
    assert keep.tolist() == (p_clean > 0.5).tolist()


def test_two_means_is_the_least_sum_of_squares_split():
    rng = np.random.default_rng(1)
    for _ in range(50):
        x = np.round(rng.random(int(rng.integers(2, 60))) * 10)
        if np.ptp(x) == 0:
            assert mixture.two_means(x) is None
            continue
        high = mixture.two_means(x)
        def sse(m):
            return sum(((x[g] - x[g].mean()) ** 2).sum() for g in (m, ~m) if g.any())
        best = min(sse(x >= t) for t in np.unique(x)[1:])
        assert sse(high) == pytest.approx(best, abs=1e-9)
        assert x[high].min() > x[~high].max()  # the larger values form the "high" cluster


def test_auroc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(40):
        n = int(rng.integers(2, 300))
        s = np.round(rng.random(n) * int(rng.integers(1, 12))) / 3
        pos = rng.random(n) < rng.uniform(0.1, 0.9)
        if pos.all() or not pos.any():
            assert np.isnan(metrics.auroc(s, pos))
            continue
        assert metrics.auroc(s, pos) == pytest.approx(roc_auc_score(pos, s), abs=1e-12)

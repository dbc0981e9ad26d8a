"""``--method auto`` (detect-noise's default): FINE's alignment score and the per-sample loss under the
dump's logits, together (steps 1-5); then a sample is rejected only if its nearest neighbours'
labels reject it too (step 6).

Neither signal wins everywhere: on the benchmark dumps (bench/detectors.py) the small-loss
detector beats FINE on most symmetric noise and FINE wins where a model fits its wrong labels. So
auto lets the data say how far to trust each, without the true labels:

1. two signals per sample: f = the FINE score standardised within its labelled class (FINE's
   scores are compared within a class; their level differs between classes) and
   l = -(the min-max normalised cross-entropy of the label), higher = cleaner for both;
2. one 2-component Gaussian mixture on the points (f, l), full 2 x 2 covariances, started from the
   two detectors' own verdicts (the mean of FINE's per-class posterior and small-loss's posterior),
   so that no seed is drawn and component 1 starts as "clean";
3. keep i if the posterior of the clean component exceeds zeta: the mixture draws a boundary that
   is tilted towards whichever signal separates its two components better;
4. the ranking score (the ``score`` column, what the AUROC measures) is the weighted mean of the
   two signals' ranks, each weighted by min(d, 1), d = |mean_clean - mean_noisy| / pooled standard
   deviation along that signal's axis of the fitted mixture. A rank mean is free of the Gaussian
   shape that the posterior assumes (its far tails are not monotone in either signal).

Why d is capped at 1: a signal that barely differs between the mixture's two components (d well
below 1: a loss of pure noise gets about 0.1) is discounted, but above that the fitted d is no
measure of a signal's worth: it follows whichever signal the mixture's split follows. On the
benchmark's digits asym:0.4 dump the loss's fitted d was 1.50 against a true d of 0.40 (FINE's:
1.15 fitted, 1.00 true); weights d / sum(d) gave the loss 0.57 and an AUROC 0.028 below FINE's.

5. how far the model has fitted the labels FINE rejects decides how much of steps 2-4 to use.
   The loss tells wrong labels apart only while the model has not learnt them (the memorisation
   effect small-loss rests on); FINE's feature-space view does not need that. m = the share of
   the samples FINE rejects that the model still predicts as labelled, estimated from the dump
   alone: (a - (1 - rho)) / rho clipped to [0, 1], a = the share of samples whose label is the
   logits' argmax, rho = FINE's rejected share (the samples it keeps counted as predicted as
   labelled). With m = 1 (a model that fits its labels: the digits dumps, m 0.79-0.99) auto is
   steps 2-4; with m = 0 (a model that fits fewer labels than FINE keeps: the CIFAR-10 dumps of
   a short schedule, m = 0) it is the small-loss detector, whose d there can be as low as 0.2
   while its AUROC is the best (0.79 at sym:0.6, FINE 0.62); in between, weights and posteriors
   are blended by m. Without the fit rate (``fit_rate=None``) m = 1.

6. the neighbours as a second opinion: knn (:mod:`kdfine.detect.knn`, k = 10 cosine neighbours
   in the same features; above 50,000 rows searched through clusters of its 10,000-row reference
   set, which kept the same samples at 100,000 rows and cut auto's time at 1M rows from 262 to
   36-42 CPU s; it runs beside steps 1-5, on its own threads) gives p_knn = (own + 1) / (own + 1 + other): the label's share of the
   votes of the two leading labels among the neighbours, the sample itself voting for its label
   (so p_knn > 0.5 exactly when knn keeps it: its label is a most frequent neighbour label).
   auto's p_clean = max(p of steps 1-5, p_knn); keep if it exceeds zeta: a sample is dropped
   only when both the model's view (FINE and the loss) and the neighbourhood's reject its label.
   The reasoning: the two views tend to err on different samples (a clean but atypical image may
   be far from its class's direction or have a high loss, yet sit among neighbours of its own
   class), while a wrong label is more often rejected by both; with clean = positive, the union
   raised F1 on the sets below (and lowered precision: on bench/fine_scaling.py's synthetic
   features 0.970 against gmm's 0.997). The ranking score is the mean of the ranks of steps 1-5's
   score and of the neighbours' agreement (own / k), the latter weighted by m:
   (r_auto + m r_knn) / (1 + m).

Steps 1-5 were chosen on the twelve dumps of bench/detectors.py (December 2026); step 6 on those,
six digits dumps of another seed and CIFAR-10N's two human label sets, among 13 candidate rules
(bench/detector_rule.py), leave one set out: chosen on the other 19 sets, it is within 0.01 F1
of the best of FINE, small-loss and cleanlab on 19 of the 20 held-out sets and 0.012 below on the
last (bench/RESULTS.md, "auto, leave one set out"). The weights, separations, m and the number of
samples kept by the neighbours alone are reported (``auto`` in the JSON, and each class's note).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kdfine.detect.base import DETECTORS, Detection, class_report
from kdfine.detect.fine import alignment_scores, class_vectors, split
from kdfine.detect.knn import knn_counts
from kdfine.detect.small_loss import label_fit_rate, small_loss_split
from kdfine.runtime.threads import thread_limit

_TINY = 1e-12


@dataclass
class Combined:
    """auto's result: ``keep`` (N,) bool, ``p_clean`` (N,) the blended posterior, ``score`` (N,)
    in (0, 1] the weighted rank mean, ``weights`` {signal: weight of its rank} summing to 1,
    ``separation`` {signal: d along its axis of the fitted mixture}, ``iterations`` of EM,
    ``memorised``: m of step 5 (1.0 without a fit rate)."""

    keep: np.ndarray
    p_clean: np.ndarray
    score: np.ndarray
    weights: dict[str, float]
    separation: dict[str, float]
    iterations: int
    memorised: float = 1.0

    def short(self) -> str:
        """The weights in a few words (each class's note in the stderr table)."""
        return f"auto: FINE {self.weights['fine']:.2f}, loss {self.weights['loss']:.2f}"

    def describe(self) -> str:
        return (f"auto: FINE weight {self.weights['fine']:.2f} (separation {self.separation['fine']:.2f}), "
                f"loss weight {self.weights['loss']:.2f} (separation {self.separation['loss']:.2f}), "
                f"wrong labels fitted by the model {self.memorised:.2f}")


def standardise_within(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(scores - class mean) / class standard deviation, per labelled class; classes with no spread
    get 0. scores, labels: (N,); returns (N,) float64."""
    n = np.bincount(labels, minlength=num_classes).astype(np.float64)
    mean = np.bincount(labels, scores, num_classes) / np.maximum(n, 1)
    var = np.bincount(labels, scores * scores, num_classes) / np.maximum(n, 1) - mean * mean
    sd = np.sqrt(np.maximum(var, 0.0))
    sd_i = sd[labels]
    return np.where(sd_i > _TINY, (scores - mean[labels]) / np.maximum(sd_i, _TINY), 0.0)


def ranks01(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` (N,) scaled to (0, 1], ties sharing their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return ((last - (counts - 1) / 2.0)[inverse.ravel()]) / x.size


def memorisation(fit_rate: float, rejected: float) -> float:
    """m of step 5: the share of the ``rejected`` share of samples (FINE's) that the model still
    predicts as labelled, given the share ``fit_rate`` of all samples it predicts as labelled;
    in [0, 1]."""
    if rejected <= _TINY:
        return 1.0
    return float(np.clip((fit_rate - (1.0 - rejected)) / rejected, 0.0, 1.0))


def combine(fine_scores: np.ndarray, fine_p: np.ndarray, loss: np.ndarray, loss_p: np.ndarray,
            labels: np.ndarray, num_classes: int, *, zeta: float = 0.5, fit_rate: float | None = None,
            max_iter: int = 200, tol: float = 1e-6) -> Combined:
    """The auto detector from FINE's scores and posteriors and the per-sample loss and small-loss
    posteriors, all (N,); labels (N,) in [0, num_classes); ``fit_rate``: the share of samples
    whose label is the argmax of the logits (None: m = 1, see the module's docstring)."""
    span = float(np.ptp(loss))
    f = standardise_within(np.asarray(fine_scores, np.float64), labels, num_classes)
    l_ = -(loss - loss.min()) / span if span > _TINY else np.zeros_like(loss)
    x = np.stack([f, l_], axis=1)
    r = np.clip(0.5 * (np.asarray(fine_p) + np.asarray(loss_p)), 0.0, 1.0)
    r, mix, iterations = two_gaussians(x, r, max_iter=max_iter, tol=tol)
    means, covs = mix
    sd = np.sqrt(0.5 * (covs[0].diagonal() + covs[1].diagonal()))
    d = np.abs(means[1] - means[0]) / np.maximum(sd, _TINY)
    if means[1].sum() < means[0].sum():  # the clean component: the one higher on both axes together
        r = 1.0 - r
    capped = np.minimum(d, 1.0)  # see the module's docstring
    w = capped / capped.sum() if capped.sum() > _TINY else np.full(2, 0.5)
    m = 1.0 if fit_rate is None else memorisation(fit_rate, float(np.mean(np.asarray(fine_p) <= zeta)))
    w = m * w + (1.0 - m) * np.array([0.0, 1.0])  # step 5
    p = m * r + (1.0 - m) * np.asarray(loss_p, np.float64)
    score = w[0] * ranks01(f) + w[1] * ranks01(l_)
    return Combined(p > zeta, p, score, {"fine": float(w[0]), "loss": float(w[1])},
                    {"fine": float(d[0]), "loss": float(d[1])}, iterations, m)


def two_gaussians(x: np.ndarray, r: np.ndarray, *, max_iter: int = 200, tol: float = 1e-6,
                  reg: float = 5e-4) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], int]:
    """EM for a 2-component Gaussian mixture with full covariances on ``x`` (N, 2), from the
    responsibilities ``r`` (N,) of component 1. Stops when the mean log-likelihood gains less
    than ``tol``. Returns the final responsibilities of component 1, (means (2, 2), covariances
    (2, 2, 2)) and the iterations run."""
    previous, it = -np.inf, 0
    for it in range(1, max_iter + 1):
        params = _m_step(x, r, reg)
        log_w = _log_densities(x, *params)
        log_norm = np.logaddexp(log_w[0], log_w[1])
        r = np.exp(log_w[1] - log_norm)
        ll = float(log_norm.mean())
        if abs(ll - previous) < tol:
            break
        previous = ll
    weights, means, covs = _m_step(x, r, reg)
    return r, (means, covs), it


def _m_step(x: np.ndarray, r: np.ndarray, reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (2,), means (2, 2) and regularised covariances (2, 2, 2) of components 0 and 1."""
    resp = np.stack([1.0 - r, r])
    nk = resp.sum(axis=1) + 10 * np.finfo(np.float64).eps
    means = resp @ x / nk[:, None]
    covs = np.empty((2, 2, 2))
    for j in (0, 1):
        diff = x - means[j]
        covs[j] = (resp[j][:, None] * diff).T @ diff / nk[j] + reg * np.eye(2)
    return nk / nk.sum(), means, covs


def _log_densities(x: np.ndarray, weights: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """log(weight_j * N(x | mean_j, cov_j)) for j = 0, 1: (2, N)."""
    out = np.empty((2, x.shape[0]))
    for j in (0, 1):
        (a, b), (_, c) = covs[j]
        det = a * c - b * b
        dx, dy = x[:, 0] - means[j, 0], x[:, 1] - means[j, 1]
        maha = (c * dx * dx - 2 * b * dx * dy + a * dy * dy) / det
        out[j] = np.log(weights[j]) - np.log(2 * np.pi) - 0.5 * np.log(det) - 0.5 * maha
    return out


def neighbour_posterior(own: np.ndarray, other: np.ndarray) -> np.ndarray:
    """knn's say in step 6: (own + 1) / (own + 1 + other), the label's share of the votes of the two
    leading labels among the neighbours with the sample's own label as one more vote: above 0.5
    exactly when the label is a most frequent neighbour label (knn's keep rule, ties kept)."""
    own = np.asarray(own, np.float64) + 1.0
    return own / (own + np.asarray(other, np.float64))


def with_neighbours(c: Combined, p_knn: np.ndarray, agreement: np.ndarray, zeta: float = 0.5
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 6: (keep, p_clean, score) when a sample is rejected only if steps 1-5 *and* its
    neighbours reject it: p_clean = max(p of steps 1-5, ``p_knn``), keep p_clean > zeta; the score is
    the mean of the ranks of steps 1-5's score and of ``agreement`` (the neighbours' share with the
    label), the latter weighted by m of step 5. All (N,)."""
    p = np.maximum(c.p_clean, p_knn)
    m = c.memorised  # the neighbours are as good as the features: weak where the model fits few labels (step 5)
    return p > zeta, p, (ranks01(c.score) + m * ranks01(np.asarray(agreement, np.float64))) / (1.0 + m)


@DETECTORS.register("auto", logits=True, title="auto scores (FINE, the loss and the neighbours together)",
                    xlabel="rank score of FINE's alignment, the label's likelihood and the neighbours' agreement")
def auto_detect(features, labels, num_classes: int, *, zeta: float = 0.5, seed: int = 0, vectors_from=None,
                logits=None, chunk: int | None = None, **_) -> Detection:
    """FINE's scores and split and the small-loss posteriors, combined by :func:`combine`, then
    the neighbours' labels by :func:`with_neighbours`; features (N, D), labels (N,), logits (N, K)."""
    k = num_classes
    stop = threading.Event()
    # knn needs nothing from steps 1-5, so it searches on its own threads meanwhile: each side's
    # serial moments (reading a block, the mixtures, the k-means) leave a core to the other (at
    # 1M x 512: 14.8 s instead of 17.4 in-process); every BLAS pool stays at one thread throughout
    with thread_limit(1), ThreadPoolExecutor(1, thread_name_prefix="kdfine-knn") as side:
        neighbours = side.submit(knn_counts, features, labels, seed=seed, stop=stop)
        try:
            vectors = class_vectors(features, labels, k, vectors_from, chunk)
            scores = alignment_scores(features, labels, vectors, chunk)
            _, p, _ = split(scores, labels, zeta=zeta, method="gmm", seed=seed, num_classes=k)
            _, loss_p, likelihood = small_loss_split(logits, labels, zeta=zeta, seed=seed)
            loss = -np.log(np.maximum(likelihood, np.finfo(np.float64).tiny))
            c = combine(scores, p, loss, loss_p, labels, k, zeta=zeta, fit_rate=label_fit_rate(logits, labels))
            own, other, used = neighbours.result()
        except BaseException:
            stop.set()  # the search ends after its current block instead of running to the end
            raise
    keep, p_clean, score = with_neighbours(c, neighbour_posterior(own, other), own / used, zeta)
    report = class_report(keep, score, labels, k, note=c.short())
    rescued = int((keep & ~c.keep).sum())
    detail = {"weights": c.weights, "separation": c.separation, "memorised": c.memorised,
              "em_iterations": c.iterations, "kept_by_the_neighbours_only": rescued,
              "description": c.describe() + f"; kept only because the neighbours agree: {rescued}"}
    return Detection(np.flatnonzero(keep), score, p_clean, vectors, report, "auto", detail)

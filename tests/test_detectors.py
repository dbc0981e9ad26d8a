"""The auto and knn detectors (kdfine.detect.auto, kdfine.detect.knn) as library functions, on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors

from kdfine.detect import auto, knn
from kdfine import metrics
from kdfine.detect import detect
from kdfine.files import rows


def clusters(seed: int, k: int = 4, per_class: int = 150, d: int = 16, noise: float = 0.3):
    """Features of k well-separated non-negative clusters, a fraction of labels moved to another class."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(k), per_class)
    centres = np.abs(rng.standard_normal((k, d))) * 3
    x = np.maximum(centres[truth] + rng.standard_normal((truth.size, d)), 0).astype(np.float32)
    labels = truth.copy()
    flip = rng.random(truth.size) < noise
    labels[flip] = (truth[flip] + rng.integers(1, k, flip.sum())) % k
    return x, labels, truth


def test_knn_neighbours_equal_scikit_learn_brute_force():
    x, labels, _ = clusters(0)
    got = np.concatenate([nb for _, nb in knn.neighbour_labels(x, labels, k=5, block=97)])
    nn = NearestNeighbors(n_neighbors=6, metric="cosine", algorithm="brute").fit(x)
    _, idx = nn.kneighbors(x)
    want = labels[idx[:, 1:]]  # the first neighbour is the row itself
    assert (got == want).mean() > 0.99  # equal up to ties in the similarities


def test_knn_finds_the_wrong_labels_and_scores_the_agreement():
    x, labels, truth = clusters(1)
    keep, score = knn.knn_split(x, labels)
    q = metrics.detection(keep, labels == truth, score)
    assert q["f1"] > 0.95 and q["auroc"] > 0.95
    assert set(np.unique(score)) <= {i / knn.K for i in range(knn.K + 1)}


def test_knn_reference_subset_is_seeded_and_bounded():
    x, labels, _ = clusters(2, per_class=300)
    a = knn.knn_split(x, labels, reference=200, seed=3)
    b = knn.knn_split(x, labels, reference=200, seed=3)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert knn.reference_rows(1200, 200, 3).size == 200


def test_two_gaussians_matches_scikit_learn_on_a_clear_mixture():
    rng = np.random.default_rng(4)
    x = np.r_[rng.normal([0, 0], 0.3, (400, 2)), rng.normal([2, 1.5], 0.5, (200, 2))]
    r0 = np.r_[np.zeros(400), np.ones(200)] * 0.8 + 0.1
    r, (means, covs), _ = auto.two_gaussians(x, r0, tol=1e-10, reg=1e-6)
    g = GaussianMixture(2, covariance_type="full", tol=1e-10, reg_covar=1e-6, random_state=0,
                        means_init=means).fit(x)
    np.testing.assert_allclose(g.means_, means, atol=1e-6)
    np.testing.assert_allclose(g.predict_proba(x)[:, 1], r, atol=1e-4)  # one EM step apart at most


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_weighs_the_signal_that_separates(seed):
    """A useless loss signal (pure noise) gets the smaller weight and auto stays close to FINE."""
    x, labels, truth = clusters(seed)
    det = detect(x, labels, 4)
    rng = np.random.default_rng(seed)
    loss = rng.random(labels.size)
    c = auto.combine(det.scores, det.p_clean, loss, np.full(labels.size, 0.5), labels, 4)
    assert c.weights["fine"] > 0.8 and c.weights["fine"] + c.weights["loss"] == pytest.approx(1.0)
    clean = labels == truth
    assert metrics.detection(c.keep, clean, c.score)["auroc"] > metrics.detection(det.keep, clean, det.scores)["auroc"] - 0.03


def test_auto_through_detect_uses_both_signals():
    x, labels, truth = clusters(5)
    logits = np.where(np.arange(4)[None, :] == truth[:, None], 2.0, 0.0) + np.random.default_rng(5).normal(0, 1, (labels.size, 4))
    det = detect(x, labels, 4, method="auto", logits=logits)
    assert det.method == "auto" and set(det.detail["weights"]) == {"fine", "loss"}
    assert 0 <= det.detail["kept_by_the_neighbours_only"] <= det.clean_index.size
    assert all(c.note.startswith("auto: FINE") for c in det.classes)
    assert metrics.detection(det.keep, labels == truth, det.scores)["f1"] > 0.9
    with pytest.raises(ValueError, match="needs logits"):
        detect(x, labels, 4, method="auto")


def test_ranks_are_mean_ranks_of_ties():
    assert auto.ranks01(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [0.875, 0.25, 0.875, 0.5]


def test_memorisation_is_the_share_of_rejected_samples_the_model_still_fits():
    assert auto.memorisation(0.99, 0.4) == pytest.approx(0.975)
    assert auto.memorisation(0.6, 0.4) == 0.0  # fits exactly what FINE keeps
    assert auto.memorisation(0.3, 0.6) == 0.0 and auto.memorisation(1.0, 0.0) == 1.0


def test_auto_follows_the_loss_when_the_model_has_not_fitted_the_wrong_labels():
    """With a fit rate at or below FINE's kept share (m = 0), auto is the small-loss detector;
    without one it is the joint mixture (m = 1); in between, a blend."""
    x, labels, truth = clusters(7)
    det = detect(x, labels, 4)
    rng = np.random.default_rng(7)
    loss = np.where(labels == truth, 0.2, 1.5) + rng.normal(0, 0.3, labels.size)
    loss_p = np.clip(1.2 - loss, 0, 1)
    args = (det.scores, det.p_clean, loss, loss_p, labels, 4)
    under = auto.combine(*args, fit_rate=0.1)
    assert under.memorised == 0.0 and under.weights == {"fine": 0.0, "loss": 1.0}
    assert np.array_equal(under.keep, loss_p > 0.5)
    assert np.allclose(np.argsort(under.score, kind="stable"), np.argsort(auto.ranks01(-loss), kind="stable"))
    full = auto.combine(*args)
    assert full.memorised == 1.0 and np.array_equal(full.keep, auto.combine(*args, fit_rate=1.0).keep)
    half = auto.combine(*args, fit_rate=1 - 0.5 * np.mean(det.p_clean <= 0.5))
    assert half.memorised == pytest.approx(0.5)
    assert half.weights["loss"] == pytest.approx(0.5 * full.weights["loss"] + 0.5)


def test_knn_counts_are_the_labels_own_and_best_other_votes():
    x, labels, _ = clusters(8)
    own, other, k = knn.knn_counts(x, labels, k=7)
    nb = np.concatenate([b for _, b in knn.neighbour_labels(x, labels, k=7)])
    for i in range(0, labels.size, 37):
        counts = np.bincount(nb[i], minlength=4)
        assert own[i] == counts[labels[i]]
        assert other[i] == np.delete(counts, labels[i]).max()
    assert k == 7 and np.array_equal(knn.knn_split(x, labels, k=7)[0], own >= other)


def test_neighbour_posterior_is_above_a_half_exactly_when_knn_keeps():
    own, other = np.meshgrid(np.arange(11), np.arange(11))
    ok = own + other <= 10
    p = auto.neighbour_posterior(own[ok], other[ok])
    assert np.array_equal(p > 0.5, own[ok] >= other[ok]) and ((0 < p) & (p <= 1)).all()


def test_with_neighbours_rejects_only_what_both_views_reject():
    """Step 6: keep = steps 1-5 keep OR the neighbours keep; p_clean the larger of the two; the score
    is steps 1-5's alone when m = 0 and the mean of the two ranks when m = 1."""
    x, labels, truth = clusters(9, noise=0.4)
    det = detect(x, labels, 4)
    loss = np.where(labels == truth, 0.2, 1.5) + np.random.default_rng(9).normal(0, 0.8, labels.size)
    c = auto.combine(det.scores, det.p_clean, loss, np.clip(1.2 - loss, 0, 1), labels, 4, fit_rate=1.0)
    own, other, k = knn.knn_counts(x, labels)
    p_knn = auto.neighbour_posterior(own, other)
    keep, p, score = auto.with_neighbours(c, p_knn, own / k)
    assert np.array_equal(keep, c.keep | (own >= other)) and np.array_equal(p, np.maximum(c.p_clean, p_knn))
    assert np.array_equal(keep, p > 0.5)
    clean = labels == truth
    assert metrics.detection(keep, clean)["recall"] >= metrics.detection(c.keep, clean)["recall"]
    assert np.allclose(score, (auto.ranks01(c.score) + c.memorised * auto.ranks01(own / k)) / (1 + c.memorised))
    c.memorised = 0.0
    assert np.array_equal(np.argsort(auto.with_neighbours(c, p_knn, own / k)[2], kind="stable"),
                          np.argsort(auto.ranks01(c.score), kind="stable"))


def test_take_rows_reads_a_memmap_with_positional_reads(tmp_path):
    x = np.random.default_rng(2).random((300, 7)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    idx = np.array([0, 5, 6, 150, 299])
    assert rows.file_rows(mm) is not None
    got = rows.take_rows(mm, idx)
    assert isinstance(got, np.ndarray) and not isinstance(got, np.memmap) and np.array_equal(got, x[idx])
    assert np.array_equal(rows.take_rows(x, idx), x[idx])
    a = knn.knn_split(mm, np.arange(300) % 3, reference=100, seed=1)
    b = knn.knn_split(x, np.arange(300) % 3, reference=100, seed=1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


def _exact_top(x, ref, k):
    """Each row's k nearest reference rows (positions in ``ref``) by cosine, itself excluded: sets."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn[ref].T
    s[ref, np.arange(ref.size)] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_clustered_search_probing_every_cluster_is_the_exact_search(monkeypatch):
    """Above knn.EXACT_MAX rows the reference set is searched through its clusters; probing all of
    them is the exact search (the same neighbours' labels, the row itself never among them)."""
    x, labels, _ = clusters(5, k=6, per_class=200)
    monkeypatch.setattr(knn, "CLUSTERS", 8)
    monkeypatch.setattr(knn, "PROBES", 8)
    monkeypatch.setattr(knn, "CLUSTER_BLOCK", 257)
    got = np.concatenate([nb for _, nb in knn.neighbour_labels(x, labels, k=5, reference=500, exact_max=0)])
    exact = np.concatenate([nb for _, nb in knn.neighbour_labels(x, labels, k=5, reference=500)])
    assert (got == exact).mean() > 0.999  # equal up to ties in the similarities
    ref = knn.reference_rows(x.shape[0], 500)
    want = labels[ref][_exact_top(x, ref, 5)]
    assert (np.sort(got, axis=1) == np.sort(want, axis=1)).all(axis=1).mean() > 0.99


def test_clustered_search_agrees_with_the_exact_search_and_is_off_up_to_exact_max(monkeypatch):
    """With the default probes, the keep decisions agree with the exact search's on well separated
    classes; at N <= EXACT_MAX the exact search runs (results unchanged)."""
    x, labels, _ = clusters(6, k=8, per_class=400)
    monkeypatch.setattr(knn, "CLUSTERS", 20)
    a = knn.knn_split(x, labels, reference=1500, exact_max=0)
    b = knn.knn_split(x, labels, reference=1500)
    assert (a[0] == b[0]).mean() > 0.99
    assert x.shape[0] <= knn.EXACT_MAX
    c = knn.knn_split(x, labels, reference=1500)
    assert all(np.array_equal(u, v) for u, v in zip(b, c))
    assert knn.knn_split(x, labels, reference=1500, exact_max=x.shape[0] - 1)[0].shape == b[0].shape


def test_clustered_search_does_not_depend_on_dtype_block_or_threads(monkeypatch):
    """Each block is cut into one slice per thread, and each slice's rows are reordered by their
    nearest centroid: the neighbours found must not depend on the cut, the block size or the dtype."""
    x, labels, _ = clusters(8, k=6, per_class=300)
    monkeypatch.setattr(knn, "CLUSTERS", 12)
    want = np.concatenate([nb for _, nb in knn.neighbour_labels(x, labels, k=5, reference=900, exact_max=0)])
    monkeypatch.setattr(knn, "CLUSTER_BLOCK", 173)
    monkeypatch.setattr(knn, "cpu_threads", lambda: 3)
    for features in (x, x.astype(np.float64)):
        got = np.concatenate([nb for _, nb in knn.neighbour_labels(features, labels, k=5, reference=900, exact_max=0)])
        np.testing.assert_array_equal(got, want)


def test_knn_counts_stop_after_the_current_block(monkeypatch):
    """A caller that runs the search beside other work and fails sets ``stop``: no further block is searched."""
    import threading

    x, labels, _ = clusters(9, k=4, per_class=200)
    monkeypatch.setattr(knn, "CLUSTER_BLOCK", 100)
    searched = []
    real = knn._search_slice
    monkeypatch.setattr(knn, "_search_slice", lambda *a: searched.append(a[2]) or real(*a))
    stop = threading.Event()
    stop.set()
    knn.knn_counts(x, labels, reference=300, exact_max=0, stop=stop)
    assert searched and max(searched) < 100  # the first block's slices only, of 8
    searched.clear()
    knn.knn_counts(x, labels, reference=300, exact_max=0)
    assert max(searched) >= 700


def test_auto_fails_fast_and_stops_its_neighbour_search(monkeypatch):
    """auto's knn runs on its own thread beside FINE: when FINE fails (a NaN feature), the error
    comes out and the search stops after its current block instead of running to its end."""
    import threading
    import time

    from kdfine.detect.base import NonFiniteFeatures

    x, labels, _ = clusters(10, k=4, per_class=200)
    x[5, 3] = np.nan
    logits = np.eye(4)[labels] * 3.0
    failed = threading.Event()
    real_vectors = auto.class_vectors

    def vectors(*a, **kw):
        try:
            return real_vectors(*a, **kw)
        finally:
            failed.set()

    searched = []
    real_slice = knn._search_slice

    def search_slice(*a):  # the side search waits until FINE has failed
        failed.wait(10)
        time.sleep(0.2)
        searched.append(a[2])
        real_slice(*a)

    monkeypatch.setattr(auto, "class_vectors", vectors)
    monkeypatch.setattr(knn, "_search_slice", search_slice)
    monkeypatch.setattr(knn, "CLUSTER_BLOCK", 50)
    monkeypatch.setattr(auto, "knn_counts", lambda *a, **kw: knn.knn_counts(*a, exact_max=0, **kw))  # clustered
    with pytest.raises(NonFiniteFeatures):
        auto.auto_detect(x, labels, 4, logits=logits)
    assert failed.is_set() and searched and max(searched) < 50  # the first block only, of 16


def test_top_columns_are_the_largest_whatever_the_ties():
    rng = np.random.default_rng(7)
    s = rng.integers(0, 5, (300, 40)).astype(np.float32)  # many ties
    s[:100] = rng.random((100, 40))
    s[5, :] = -np.inf
    top = knn._top_columns(s, 6)
    assert top.shape == (300, 6) and all(np.unique(t).size == 6 for t in top)
    np.testing.assert_array_equal(np.sort(np.take_along_axis(s, top, axis=1), axis=1), np.sort(s, axis=1)[:, -6:])

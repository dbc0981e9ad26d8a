"""Properties of the FINE library (kdfine.detect.fine): eigenvectors, alignment scores, the per-class split,
input kinds (numpy, memory map, torch) and the small-loss detector."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdfine.detect import fine
from kdfine.detect import detect, small_loss

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FAST, max_examples=8)  # each example fits a mixture per class (~20-100 ms each)


def clusters(seed: int, k: int = 4, per_class: int = 80, d: int = 16, noise: float = 0.4):
    """Synthetic penultimate features: each class label covers two well-separated directions, its
    own (the clean samples) and another class's (the ``noise`` fraction whose label is wrong).

    Returns features (N, D) float32 (non-negative, like ReLU features), labels, truth.
    """
    rng = np.random.default_rng(seed)
    basis = np.eye(d)[rng.permutation(d)[:k]]  # k orthogonal unit directions
    labels = np.repeat(np.arange(k), per_class)
    truth = labels.copy()
    for c in range(k):
        members = np.flatnonzero(labels == c)
        wrong = rng.choice(members, size=int(round(noise * per_class)), replace=False)
        truth[wrong] = (c + rng.integers(1, k, size=wrong.size)) % k
    scale = rng.uniform(0.8, 1.5, size=(labels.size, 1))
    feats = basis[truth] * scale + np.abs(rng.normal(scale=0.03, size=(labels.size, d)))
    perm = rng.permutation(labels.size)
    return feats[perm].astype(np.float32), labels[perm], truth[perm]


def precision_recall(keep: np.ndarray, is_clean: np.ndarray) -> tuple[float, float]:
    tp = (keep & is_clean).sum()
    return tp / max(keep.sum(), 1), tp / max(is_clean.sum(), 1)


# ------------------------------------------------------------------------------------ scores

feature_rows = hnp.arrays(np.float32, st.tuples(st.integers(1, 30), st.integers(1, 8)),
                          elements=st.floats(-1e3, 1e3, width=32))


@FAST
@given(x=feature_rows, k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_scores_lie_in_unit_interval(x, k, seed):
    labels = np.random.default_rng(seed).integers(0, k, size=x.shape[0])
    vectors = fine.class_vectors(x, labels, k)
    s = fine.alignment_scores(x, labels, vectors)
    assert s.shape == (x.shape[0],)
    assert np.all(np.isfinite(s)) and np.all((s >= 0) & (s <= 1))
    assert np.all(s[~x.any(axis=1)] == 0)  # zero rows score 0, not NaN (tiny rows keep their direction)


@FAST
@given(seed=st.integers(0, 2**16), factor=st.floats(1e-3, 1e3), power=st.integers(-8, 8), n=st.integers(4, 40))
def test_scores_invariant_to_positive_row_rescaling_and_eigenvector_sign(seed, factor, power, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=n)
    u = fine.class_vectors(x, labels, 3)
    base = fine.alignment_scores(x, labels, u)
    row = int(rng.integers(n))
    scaled = x.copy()
    scaled[row] *= np.float32(factor)
    np.testing.assert_allclose(fine.alignment_scores(scaled, labels, u), base, rtol=1e-5, atol=1e-6)
    signs = rng.choice([-1.0, 1.0], size=(3, 1))
    np.testing.assert_allclose(fine.alignment_scores(x, labels, u * signs), base, rtol=1e-12, atol=1e-12)
    # scaling all rows by one factor scales every gram alike: the same vectors (a power of two keeps
    # the arithmetic exact, so near-ties between eigenvalues cannot swap)
    np.testing.assert_allclose(fine.class_vectors(x * np.float32(2.0 ** power), labels, 3), u, atol=1e-9)


@FAST
@given(seed=st.integers(0, 2**16), k=st.integers(1, 5), d=st.integers(2, 12))
def test_vectors_are_unit_top_eigenvectors_of_the_uncentred_class_gram(seed, k, d):
    rng = np.random.default_rng(seed)
    n = 12 * k
    # a dominant direction per class keeps the top eigenvalue well separated (the vector is unique)
    dirs = rng.normal(size=(k, d))
    labels = rng.integers(0, k, size=n)
    x = (dirs[labels] * rng.uniform(1, 2, size=(n, 1)) * 3 + rng.normal(size=(n, d)) * 0.3).astype(np.float32)
    u = fine.class_vectors(x, labels, k)
    assert u.shape == (k, d)
    for c in range(k):
        xc = x[labels == c].astype(np.float64)
        if xc.shape[0] == 0:
            assert not u[c].any()  # an empty class has no vector
            continue
        w, v = np.linalg.eigh(xc.T @ xc)  # uncentred: no mean subtracted
        assert np.linalg.norm(u[c]) == pytest.approx(1.0, abs=1e-9)
        top = v[:, -1] * np.sign(v[:, -1] @ u[c])
        np.testing.assert_allclose(u[c], top, atol=1e-4)


def test_vectors_are_uncentred_not_covariance():
    # all samples share a large mean along e0 and vary along e1: the uncentred gram's top vector is
    # e0, a centred (covariance) one would give e1
    rng = np.random.default_rng(0)
    x = np.zeros((200, 3), np.float32)
    x[:, 0] = 10.0
    x[:, 1] = rng.normal(scale=2.0, size=200)
    u = fine.class_vectors(x, np.zeros(200, int), 1)
    assert abs(u[0, 0]) > 0.99


# ------------------------------------------------------------------------------------ split


@FEW
@given(seed=st.integers(0, 2**16), z1=st.floats(0.0, 0.98), dz=st.floats(0.0, 0.98))
def test_raising_zeta_never_keeps_more(seed, z1, dz):
    x, y, _ = clusters(seed, per_class=30)
    z2 = min(z1 + dz, 0.99)
    lo = detect(x, y, 4, zeta=z1, seed=seed)
    hi = detect(x, y, 4, zeta=z2, seed=seed)
    assert set(hi.clean_index) <= set(lo.clean_index)


@FEW
@given(seed=st.integers(0, 2**16), method=st.sampled_from(["gmm", "kmeans"]))
def test_same_seed_same_output(seed, method):
    x, y, _ = clusters(seed, per_class=30)
    a = detect(x, y, 4, method=method, seed=seed)
    b = detect(x, y, 4, method=method, seed=seed)
    np.testing.assert_array_equal(a.clean_index, b.clean_index)
    np.testing.assert_array_equal(a.p_clean, b.p_clean)
    np.testing.assert_array_equal(a.scores, b.scores)


@FEW
@given(seed=st.integers(0, 2**16), k=st.integers(2, 6), per_class=st.integers(40, 120),
       method=st.sampled_from(["gmm", "kmeans"]))
def test_separates_clean_and_noisy_clusters(seed, k, per_class, method):
    x, y, truth = clusters(seed, k=k, per_class=per_class, d=max(8, 2 * k))
    det = detect(x, y, k, method=method, seed=0)
    p, r = precision_recall(det.keep, y == truth)
    assert p >= 0.95 and r >= 0.95
    assert np.all((det.p_clean >= 0) & (det.p_clean <= 1))
    assert sum(c.kept for c in det.classes) == det.clean_index.size
    if method == "kmeans":
        assert set(np.unique(det.p_clean)) <= {0.0, 1.0}  # hard assignment


def test_clean_component_is_the_one_with_larger_mean():
    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(0.9, 0.02, 70), rng.normal(0.3, 0.05, 30)]
    keep, p, report = fine.split(scores, np.zeros(100, int))
    assert keep[:70].all() and not keep[70:].any()
    assert report[0].kept == 70 and report[0].threshold == pytest.approx(scores[:70].min())
    assert np.all(p[:70] > 0.5) and np.all(p[70:] < 0.5)


def test_vectors_from_a_subset_use_only_those_rows():
    x, y, truth = clusters(3)
    clean = np.flatnonzero(y == truth)
    np.testing.assert_allclose(fine.class_vectors(x, y, 4, subset=clean),
                               fine.class_vectors(x[clean], y[clean], 4), atol=1e-9)
    mask = np.zeros(len(y), bool)
    mask[clean] = True
    det = detect(x, y, 4, vectors_from=mask)
    np.testing.assert_allclose(det.vectors, fine.class_vectors(x[clean], y[clean], 4), atol=1e-9)


# ------------------------------------------------------------------------------------ inputs


def test_memmap_in_chunks_matches_in_memory(tmp_path):
    x, y, _ = clusters(5, per_class=50)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    a = detect(x, y, 4)
    b = detect(mm, y, 4, chunk=7)  # chunks smaller than N and than a class
    np.testing.assert_allclose(b.vectors, a.vectors, atol=1e-6)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-6)
    np.testing.assert_array_equal(b.clean_index, a.clean_index)


def test_torch_tensors_match_numpy():
    x, y, _ = clusters(6, per_class=50)
    a = detect(x, y, 4)
    b = detect(torch.from_numpy(x), torch.from_numpy(y), 4, chunk=33)
    np.testing.assert_allclose(b.vectors, a.vectors, atol=1e-6)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-6)
    np.testing.assert_array_equal(b.clean_index, a.clean_index)
    mask = torch.from_numpy(np.arange(len(y)) % 2 == 0)
    np.testing.assert_allclose(fine.class_vectors(torch.from_numpy(x), y, 4, subset=mask),
                               fine.class_vectors(x, y, 4, subset=mask.numpy()), atol=1e-6)


def test_labels_outside_the_classes_are_rejected():
    with pytest.raises(ValueError, match="labels must lie"):
        fine.class_vectors(np.ones((3, 2), np.float32), np.array([0, 1, 5]), 2)


# ------------------------------------------------------------------------------------ degenerate classes


def test_tiny_and_flat_classes_are_kept_whole_with_a_warning():
    x, y, _ = clusters(7, k=3, per_class=40)
    # class 3: a single sample; class 4: identical rows (all scores equal); class 5: all-zero rows
    x = np.vstack([x, np.ones((1, x.shape[1])), np.tile(np.arange(x.shape[1]), (6, 1)),
                   np.zeros((4, x.shape[1]))]).astype(np.float32)
    y = np.r_[y, [3], [4] * 6, [5] * 4]
    with pytest.warns(fine.FineWarning) as record:
        det = detect(x, y, 7)  # class 6 is empty: no report row, no crash
    messages = " ".join(str(w.message) for w in record)
    assert "class 3: fewer than 2 samples" in messages and "class 4: all scores equal" in messages
    assert "class 5" in messages
    keep = det.keep
    assert keep[y >= 3].all()
    assert [c.label for c in det.classes] == [0, 1, 2, 3, 4, 5]
    assert {c.label: c.note for c in det.classes}[4] == "all scores equal"


def test_unknown_split_method_is_an_error():
    with pytest.raises(ValueError):
        fine.split(np.r_[0.1, 0.9], np.r_[0, 0], method="nope")


# ------------------------------------------------------------------------------------ small loss


def noisy_logits(seed: int, n: int = 400, k: int = 5, noise: float = 0.4):
    """Logits of a model that learnt the true classes; 40% of the labels are wrong."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, size=n)
    labels = truth.copy()
    wrong = rng.choice(n, size=int(noise * n), replace=False)
    labels[wrong] = (truth[wrong] + rng.integers(1, k, size=wrong.size)) % k
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), truth] += 5.0
    return logits, labels, truth


@FEW
@given(seed=st.integers(0, 2**16))
def test_small_loss_finds_the_wrong_labels(seed):
    logits, labels, truth = noisy_logits(seed)
    keep, p, scores = small_loss.small_loss_split(logits, labels, seed=0)
    prec, rec = precision_recall(keep, labels == truth)
    assert prec >= 0.95 and rec >= 0.95
    # scores are p(label | x): a higher score means a more likely clean label
    sm = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(scores, (sm / sm.sum(1, keepdims=True))[np.arange(len(labels)), labels], rtol=1e-9)
    det = detect(None, labels, 5, method="small-loss", logits=logits)
    np.testing.assert_array_equal(det.clean_index, np.flatnonzero(keep))
    assert det.vectors is None and sum(c.total for c in det.classes) == len(labels)


def test_small_loss_degenerate_and_missing_logits():
    with pytest.warns(fine.FineWarning, match="all losses equal"):
        keep, _, _ = small_loss.small_loss_split(np.zeros((6, 3)), np.r_[0, 1, 2, 0, 1, 2])
    assert keep.all()
    with pytest.raises(ValueError, match="needs logits"):
        detect(np.ones((4, 2)), np.r_[0, 1, 0, 1], 2, method="small-loss")


def test_summary_reports_kept_fraction_and_classes():
    x, y, _ = clusters(9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal split warns about nothing
        det = detect(x, y, 4)
    s = det.summary()
    assert s["n"] == len(y) and s["kept"] == det.clean_index.size
    assert s["kept_fraction"] + s["estimated_noise_rate"] == pytest.approx(1.0)
    assert len(s["classes"]) == 4 and all(c["kept"] <= c["total"] for c in s["classes"])

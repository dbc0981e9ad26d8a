"""Metrics on small arrays with known answers."""

from __future__ import annotations

import numpy as np

from kdfine import metrics


def test_topk_nll_ece():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 3.0], [5.0, 0.0, 1.0]])
    labels = np.array([0, 2, 2, 1])
    assert metrics.topk_accuracy(logits, labels, 1) == 0.5
    assert metrics.topk_accuracy(logits, labels, 2) == 0.75
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.isclose(metrics.nll(logits, labels), -np.log(p[np.arange(4), labels]).mean())
    # one bin per sample here: ECE = mean |correct - confidence|
    conf, correct = p.max(1), p.argmax(1) == labels
    assert np.isclose(metrics.ece(logits, labels, bins=1000), np.abs(correct - conf).mean())


def test_agreement_and_detection():
    s = np.array([[2.0, 0.0], [0.0, 1.0]])
    t = np.array([[1.0, 0.0], [2.0, 0.0]])
    a = metrics.teacher_agreement(s, t)
    assert a["agreement"] == 0.5 and np.isclose(a["logit_l2"], (1 + np.sqrt(5)) / 2)
    assert metrics.teacher_agreement(t, t)["kl_teacher_student"] == 0.0
    kept = np.array([1, 1, 1, 0, 0], bool)
    clean = np.array([1, 1, 0, 0, 1], bool)
    d = metrics.detection(kept, clean, scores=np.array([0.9, 0.8, 0.7, 0.1, 0.2]))
    assert np.isclose(d["precision"], 2 / 3) and np.isclose(d["recall"], 2 / 3) and np.isclose(d["f1"], 2 / 3)
    assert np.isclose(d["auroc"], 5 / 6)  # noisy 0.7 ranks above clean 0.2; the other 5 pairs are right

"""Evaluation metrics on plain arrays: classification, teacher agreement, noise detection."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray, tau: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / tau
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    if len(labels) == 0:
        return float("nan")
    top = np.argpartition(-logits, kth=min(k, logits.shape[1]) - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits)."""
    lp = log_softmax(logits)
    return float(-lp[np.arange(len(labels)), labels].mean())


def ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins."""
    p = np.exp(log_softmax(logits))
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def reliability(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count (for reliability diagrams)."""
    p = np.exp(log_softmax(logits))
    conf, correct = p.max(axis=1), p.argmax(axis=1) == labels
    which = np.clip(np.digitize(conf, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    out = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        m = which == b
        out["confidence"].append(float(conf[m].mean()) if m.any() else float("nan"))
        out["accuracy"].append(float(correct[m].mean()) if m.any() else float("nan"))
        out["count"].append(int(m.sum()))
    return out


def classification(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top1, top5 (when K >= 5), nll, ece (15 bins) and n, as fractions (not percent)."""
    out = {"n": int(len(labels)), "top1": topk_accuracy(logits, labels, 1)}
    if logits.shape[1] >= 5:
        out["top5"] = topk_accuracy(logits, labels, 5)
    out["nll"] = nll(logits, labels)
    out["ece"] = ece(logits, labels)
    return out


def teacher_agreement(student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, mean L2 logit distance and KL(p_t || p_s) at tau = 1 (batch mean)."""
    ls, lt = log_softmax(student), log_softmax(teacher)
    return {
        "agreement": float((student.argmax(1) == teacher.argmax(1)).mean()),
        "logit_l2": float(np.linalg.norm(np.asarray(student, np.float64) - teacher, axis=1).mean()),
        "kl_teacher_student": float((np.exp(lt) * (lt - ls)).sum(axis=1).mean()),
    }


def confusion(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (labels, pred), 1)
    return m


def detection(kept: np.ndarray, is_clean: np.ndarray, scores: np.ndarray | None = None) -> dict[str, float]:
    """Quality of a clean/noisy split against the truth, clean = positive (as FINE reports it).

    kept: (N,) bool, selected as clean; is_clean: (N,) bool, label equals the true label;
    scores: (N,) higher = more likely clean; gives ``auroc`` of finding the *wrong* labels.
    """
    kept = np.asarray(kept, bool)
    is_clean = np.asarray(is_clean, bool)
    tp = float((kept & is_clean).sum())
    precision = tp / kept.sum() if kept.any() else 0.0
    recall = tp / is_clean.sum() if is_clean.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    out = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
           "true_noise_rate": float(1.0 - is_clean.mean()) if len(is_clean) else 0.0}
    if scores is not None:
        out["auroc"] = auroc(-np.asarray(scores, np.float64), ~is_clean)
    return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive``; NaN when one class is absent.

    The Mann-Whitney statistic with tied scores given their average rank, which is what the ROC
    curve's trapezoids add up to (and what scikit-learn's ``roc_auc_score`` returns)."""
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based position of each distinct value in sorted order
    ranks = (first + (counts + 1) / 2.0)[inverse.ravel()]
    n_pos = float(positive.sum())
    n_neg = float(positive.size) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))

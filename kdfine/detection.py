"""``detect-noise``: FINE, small-loss, auto or knn (:data:`kdfine.fine.METHODS`) on a feature dump, and
the CSVs it writes.

Kept free of torch and scikit-learn: reading a dump and detecting needs only numpy and scipy
(the mixture fits are kdfine's own, :mod:`kdfine.mixture`), while importing torch alone would cost
more than a second and hundreds of MB of resident memory per run (CUDA builds load their GPU
libraries at import).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdfine import features, fine, metrics
from kdfine.errors import InputError
from kdfine.io import check_label_range, csv_text, read_index, read_labels
from kdfine.outputs import Outputs


def detect_noise(features_path: str, *, labels: str | None = None, truth: str | None = None, zeta: float = 0.5,
                 method: str = "gmm", vectors_from: str | None = None, seed: int = 0,
                 num_classes: int | None = None) -> tuple[fine.Detection, dict[str, Any], np.ndarray, np.ndarray | None]:
    """``method`` (one of :data:`kdfine.fine.METHODS`) on a feature dump. Returns the detection, a JSON-ready
    report, the labels used and the true labels (when known). The options were validated by
    :class:`kdfine.options.DetectOptions` (see :func:`kdfine.api.detect_noise`)."""
    dump = features.read_dump(features_path)
    n = dump.features.shape[0]
    y = dump.labels
    if labels:
        k_hint = num_classes or int(dump.info.get("num_classes") or 0) or np.iinfo(np.int64).max
        y = read_labels(labels, n, k_hint)
    if y is None:
        raise InputError(f"--features {features_path}: no labels sidecar ({features.sidecar(features_path, 'labels.npy')}); "
                         "pass --labels FILE")
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"labels for {features_path}: expected a 1-D integer array, got {y.dtype} {y.shape}")
    if y.shape[0] != n:
        raise InputError(f"labels for {features_path}: {y.shape[0]} labels for {n} feature rows")
    k = int(num_classes or dump.info.get("num_classes") or (int(y.max()) + 1 if y.size else 1))
    check_label_range(y, k, f"labels for {features_path}")
    true = dump.truth
    if truth:
        true = features.load_npy(truth, "--truth")
        if true.shape != y.shape:
            raise InputError(f"--truth {truth}: has shape {true.shape}, the labels {y.shape}")
    basis = None
    if vectors_from:
        basis = read_index(vectors_from, n, "--vectors-from")
        if basis.size == 0:
            raise InputError(f"--vectors-from {vectors_from}: lists no indices; the eigenvectors need some samples")
    if method in fine.NEEDS_LOGITS:
        if dump.logits is None:
            raise InputError(f"--method {method} needs the logits sidecar {features.sidecar(features_path, 'logits.npy')}"
                             " (written by `kdfine eval --dump-features`)")
        logits = dump.logits  # memory-mapped: read in float64 row blocks by fine.label_log_likelihood
        if logits.ndim != 2 or logits.shape[1] < k:  # the loss of label y reads column y
            raise InputError(f"logits {features.sidecar(features_path, 'logits.npy')}: shape {logits.shape} "
                             f"for {k} classes")
    else:
        logits = None
    if method == "knn":  # the neighbour search does not notice NaN by itself
        _check_finite(dump.features, features_path)
    try:  # the passes over the features notice NaN and inf themselves: no pass of its own for that
        det = fine.detect(dump.features, y, k, zeta=zeta, method=method, seed=seed, vectors_from=basis, logits=logits)
    except fine.NonFiniteLogits:
        raise InputError(f"logits {features.sidecar(features_path, 'logits.npy')}: contain NaN or inf") from None
    except fine.NonFiniteFeatures as e:
        _check_finite(dump.features, features_path, e.row)
        raise InputError(f"--features {features_path}: values too large (their squares overflow float32); "
                         "rescale the features") from None
    report = det.summary()
    report["features"] = str(features_path)
    report["zeta"] = zeta
    if true is not None:
        report["truth"] = metrics.detection(det.keep, y == true, det.scores)
    return det, report, y, true


def _check_finite(x: np.ndarray, path: str, row: int | None = None, chunk: int = fine.CHUNK) -> None:
    """Raise the InputError naming the first row with NaN or inf (``row`` when already known)."""
    if row is not None:
        raise InputError(f"--features {path}: row {row} contains NaN or inf; re-extract the features")
    for lo, block in fine.row_blocks(x, chunk):  # streamed: a memory map never becomes resident
        if not np.isfinite(block).all():
            row = lo + int(np.argwhere(~np.isfinite(block))[0][0])
            raise InputError(f"--features {path}: row {row} contains NaN or inf; re-extract the features")


def write_detection(det: fine.Detection, labels: np.ndarray, outputs: Outputs, out: str,
                    noisy_out: str | None = None) -> None:
    """Stage the ``index,label,score,p_clean`` CSVs of the kept (``out``) and rejected
    (``noisy_out``) rows in ``outputs`` (declared there; nothing lands before its commit)."""
    def rows(idx):
        return [idx, labels[idx], det.scores[idx], det.p_clean[idx]]

    header, fmts = ["index", "label", "score", "p_clean"], ["{}", "{}", "{:.6f}", "{:.6f}"]
    if noisy_out:
        with outputs.open(noisy_out, "w") as f:
            f.write(csv_text(header, rows(np.flatnonzero(~det.keep)), fmts))
    with outputs.open(out, "w") as f:
        f.write(csv_text(header, rows(det.clean_index), fmts))

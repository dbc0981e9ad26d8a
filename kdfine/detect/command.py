"""``detect-noise``: FINE, small-loss, auto or knn (:func:`kdfine.detect.methods`) on a feature dump, and
the CSVs it writes.

Kept free of torch and scikit-learn: reading a dump and detecting needs only numpy and scipy
(the mixture fits are kdfine's own, :mod:`kdfine.detect.mixture`), while importing torch alone would cost
more than a second and hundreds of MB of resident memory per run (CUDA builds load their GPU
libraries at import).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kdfine import metrics
from kdfine.detect import dump as dumps
from kdfine.detect import Detection, detect, fine, needs_logits
from kdfine.detect.suggest import suggest
from kdfine.detect.base import NonFiniteFeatures, NonFiniteLogits
from kdfine.errors import InputError
from kdfine.files.outputs import Outputs
from kdfine.files.rows import CHUNK, load_npy, row_blocks
from kdfine.files.tables import check_label_range, csv_text, read_index, read_labels, text_cells
from kdfine.runtime.memory import available_memory


@dataclass
class Inputs:
    """A dump as detect-noise reads it: ``labels`` (N,) the labels used (the dump's, or ``--labels``),
    ``num_classes``, ``truth`` (N,) when known."""

    path: str
    dump: dumps.Dump
    labels: np.ndarray
    num_classes: int
    truth: np.ndarray | None = None


def read_inputs(features_path: str, *, labels: str | None = None, truth: str | None = None,
                num_classes: int | None = None, method: str = "gmm") -> Inputs:
    """The dump and the labels to check (validated: 1-D integers, one per row, in [0, K)); exit 3
    when ``method`` would need more memory for the labels' classes than the machine has."""
    dump = dumps.read_dump(features_path)
    n = dump.features.shape[0]
    y = dump.labels
    if labels:
        k_hint = num_classes or int(dump.info.get("num_classes") or 0) or np.iinfo(np.int64).max
        y = read_labels(labels, n, k_hint)
    if y is None:
        raise InputError(f"--features {features_path}: no labels sidecar ({dumps.sidecar(features_path, 'labels.npy')}); "
                         "pass --labels FILE")
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"labels for {features_path}: expected a 1-D integer array, got {y.dtype} {y.shape}")
    if y.shape[0] != n:
        raise InputError(f"labels for {features_path}: {y.shape[0]} labels for {n} feature rows")
    k = int(num_classes or dump.info.get("num_classes") or (int(y.max()) + 1 if y.size else 1))
    check_label_range(y, k, f"labels for {features_path}")
    source = "its json's num_classes" if num_classes is None and dump.info.get("num_classes") else "its largest label"
    _check_fits(k, dump.features.shape[1], method, features_path, source)
    true = dump.truth
    if truth:
        true = load_npy(truth, "--truth")
        if true.shape != y.shape or not np.issubdtype(true.dtype, np.integer):
            raise InputError(f"--truth {truth}: holds {true.dtype} {true.shape}, expected integer labels {y.shape}")
    return Inputs(features_path, dump, y, k, true)


def detect_noise(features_path: str, *, labels: str | None = None, truth: str | None = None, zeta: float = 0.5,
                 method: str = "gmm", vectors_from: str | None = None, seed: int = 0,
                 num_classes: int | None = None) -> tuple[Detection, dict[str, Any], np.ndarray, np.ndarray | None]:
    """``method`` (one of :func:`kdfine.detect.methods`) on a feature dump. Returns the detection, a JSON-ready
    report, the labels used and the true labels (when known). The options were validated by
    :class:`kdfine.options.DetectOptions` (see :func:`kdfine.api.detect_noise`)."""
    inp = read_inputs(features_path, labels=labels, truth=truth, num_classes=num_classes, method=method)
    det, report = run_detector(inp, zeta=zeta, method=method, vectors_from=vectors_from, seed=seed)
    return det, report, inp.labels, inp.truth


def run_detector(inp: Inputs, *, zeta: float = 0.5, method: str = "gmm", vectors_from: str | None = None,
                 seed: int = 0) -> tuple[Detection, dict[str, Any]]:
    """The detection on ``inp`` and its JSON-ready report (with precision/recall when the truth is known)."""
    features_path, dump, y, k = inp.path, inp.dump, inp.labels, inp.num_classes
    n = dump.features.shape[0]
    basis = None
    if vectors_from:
        basis = read_index(vectors_from, n, "--vectors-from")
        if basis.size == 0:
            raise InputError(f"--vectors-from {vectors_from}: lists no indices; the eigenvectors need some samples")
    fell_back = method == "auto" and dump.logits is None  # the default on a features-only dump: FINE alone
    method = "gmm" if fell_back else method
    logits = _logits(inp, method) if needs_logits(method) else None
    if method == "knn":  # the neighbour search does not notice NaN by itself
        _check_finite(dump.features, features_path)
    try:  # the passes over the features notice NaN and inf themselves: no pass of its own for that
        det = detect(dump.features, y, k, zeta=zeta, method=method, seed=seed, vectors_from=basis, logits=logits)
    except NonFiniteLogits:
        raise InputError(f"logits {dumps.sidecar(features_path, 'logits.npy')}: contain NaN or inf") from None
    except NonFiniteFeatures as e:
        _check_finite(dump.features, features_path, e.row)
        raise InputError(f"--features {features_path}: values too large (their squares overflow float32); "
                         "rescale the features") from None
    report = det.summary()
    if fell_back:  # in the report (and the table's title), not a warning: an error after it stays one line
        report["requested_method"] = "auto"
        report["note"] = f"auto: {features_path} has no logits sidecar, so the loss is unknown: FINE (gmm) alone"
    names = dumps.class_names(dump.info, k)
    for c in report.get("classes", []) if names else ():  # the class names where the dump has them
        c["name"] = names[c["label"]]
    report["features"] = str(features_path)
    report["zeta"] = zeta
    if inp.truth is not None:
        report["truth"] = metrics.detection(det.keep, y == inp.truth, det.scores)
    return det, report


def _logits(inp: Inputs, method: str) -> np.ndarray:
    """The dump's logits (memory-mapped: read in float64 row blocks by their users), checked."""
    logits = inp.dump.logits
    if logits is None:
        raise InputError(f"--method {method} needs the logits sidecar {dumps.sidecar(inp.path, 'logits.npy')}"
                         " (written by `kdfine eval --dump-features`)")
    if logits.ndim != 2 or logits.shape[1] < inp.num_classes:  # the loss of label y reads column y
        raise InputError(f"logits {dumps.sidecar(inp.path, 'logits.npy')}: shape {logits.shape} "
                         f"for {inp.num_classes} classes")
    return logits


def suggest_labels(inp: Inputs, det: Detection) -> tuple[np.ndarray, np.ndarray, str]:
    """Suggested labels (:func:`kdfine.detect.suggest.suggest`): ``(suggested (N,), suggested_p (N,),
    evidence)``, from the dump's logits when it has them, else from the features and the detection's
    class vectors (FINE's), else from the class vectors computed here."""
    rejected = ~det.keep
    if inp.dump.logits is not None and inp.dump.logits.shape[1] == inp.num_classes:
        return (*suggest(inp.labels, logits=inp.dump.logits, rejected=rejected), "logits")
    vectors = det.vectors if det.vectors is not None else fine.class_vectors(inp.dump.features, inp.labels,
                                                                             inp.num_classes)
    return (*suggest(inp.labels, features=inp.dump.features, vectors=vectors, rejected=rejected), "class vectors")


_GRAM_METHODS = ("gmm", "kmeans", "auto")  # one D x D gram per class (float64 sums and float32 blocks)


def _check_fits(k: int, d: int, method: str, path: str, source: str) -> None:
    """Exit 3 before allocating when ``k`` classes (from ``source``: a number in someone's file) of
    ``d``-dim features need more memory than this machine has available: one D x D gram per class
    for FINE's methods, a few numbers per class for the others."""
    need = 8 * k * (16 + (3 * d * d // 2 if method in _GRAM_METHODS else 0))
    have = available_memory()
    if need > have:
        raise InputError(f"--features {path}: {k:,} classes ({source}) x {d} dims need {need / 2**30:,.1f} GiB for "
                         f"--method {method}, more than the {have / 2**30:,.1f} GiB available; check the dump's labels "
                         "and num_classes")


def _check_finite(x: np.ndarray, path: str, row: int | None = None, chunk: int = CHUNK) -> None:
    """Raise the InputError naming the first row with NaN or inf (``row`` when already known)."""
    if row is not None:
        raise InputError(f"--features {path}: row {row} contains NaN or inf; re-extract the features")
    for lo, block in row_blocks(x, chunk):  # streamed: a memory map never becomes resident
        if not np.isfinite(block).all():
            row = lo + int(np.argwhere(~np.isfinite(block))[0][0])
            raise InputError(f"--features {path}: row {row} contains NaN or inf; re-extract the features")


def suggestion_report(inp: Inputs, det: Detection, suggested: np.ndarray, relabelled: np.ndarray, evidence: str,
                      min_p: float) -> dict[str, Any]:
    """What the suggestions did: the evidence, ``--relabel-min-p``, how many rejected samples a
    ``--labels-out`` relabels and, with the true labels, how often the suggestion is right on the
    rejected samples and on those relabelled, and how many labels are right before and after."""
    rejected = ~det.keep
    swapped = relabelled != inp.labels
    doc: dict[str, Any] = {"evidence": evidence, "relabel_min_p": min_p, "rejected": int(rejected.sum()),
                           "relabelled": int(swapped.sum())}
    if inp.truth is not None:
        right = suggested == inp.truth
        doc.update(top1_rejected=float(right[rejected].mean()) if rejected.any() else None,
                   top1_relabelled=float(right[swapped].mean()) if swapped.any() else None,
                   labels_right_before=float((inp.labels == inp.truth).mean()),
                   labels_right_after=float((relabelled == inp.truth).mean()))
    return doc


def write_detection(det: Detection, labels: np.ndarray, outputs: Outputs, out: str,
                    noisy_out: str | None = None, *, suggested: tuple[np.ndarray, np.ndarray] | None = None,
                    names: list[str] | None = None, paths: list[str] | None = None) -> None:
    """Stage the CSVs of the kept (``out``) and rejected (``noisy_out``) rows in ``outputs`` (declared
    there; nothing lands before its commit), sorted by index: ``index,label,score,p_clean``, then
    ``suggested,suggested_p`` (``suggested``: the classes and their probabilities, (N,) each), then
    ``class,suggested_class`` (``names``: the K class names) and ``path`` (``paths``: each row's
    source file), where given. Names are CSV cells that no spreadsheet evaluates."""
    cols: list[tuple[str, str, Callable[[np.ndarray], Any]]] = [
        ("index", "{}", lambda i: i), ("label", "{}", lambda i: labels[i]),
        ("score", "{:.6f}", lambda i: det.scores[i]), ("p_clean", "{:.6f}", lambda i: det.p_clean[i])]
    if suggested is not None:
        cols += [("suggested", "{}", lambda i: suggested[0][i]), ("suggested_p", "{:.6f}", lambda i: suggested[1][i])]
    if names is not None:
        cells = np.array(text_cells(list(names)), dtype=object)
        cols.append(("class", "{}", lambda i: cells[labels[i]]))
        if suggested is not None:
            cols.append(("suggested_class", "{}", lambda i: cells[suggested[0][i]]))
    if paths is not None:
        cols.append(("path", "{}", lambda i: text_cells([paths[j] for j in i.tolist()])))
    header, fmts = [c[0] for c in cols], [c[1] for c in cols]
    for path, idx in ((noisy_out, np.flatnonzero(~det.keep)), (out, det.clean_index)):
        if path:
            with outputs.open(path, "w") as f:
                f.write(csv_text(header, [get(idx) for _, _, get in cols], fmts))


def write_labels(outputs: Outputs, path: str, labels: np.ndarray) -> None:
    """Stage ``index,label`` for every sample (what ``train-teacher --labels`` reads) in ``outputs``."""
    with outputs.open(path, "w") as f:
        f.write(csv_text(["index", "label"], [np.arange(labels.shape[0]), labels], ["{}", "{}"]))

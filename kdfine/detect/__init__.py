"""Noisy-label detection, torch-free: :func:`detect` runs a detector registered by name
(:data:`kdfine.detect.base.DETECTORS`) on features and/or logits.

- ``gmm``, ``kmeans``: FINE (:mod:`kdfine.detect.fine`), the official method and its 2-means split;
- ``small-loss``: the loss mixture on the logits (:mod:`kdfine.detect.small_loss`);
- ``auto``: FINE and the loss together (:mod:`kdfine.detect.auto`);
- ``knn``: the neighbours' labels (:mod:`kdfine.detect.knn`).

:mod:`kdfine.detect.dump` reads the feature dumps, :mod:`kdfine.detect.command` is ``detect-noise``
on files. Nothing here imports torch or scikit-learn (the mixtures are :mod:`kdfine.detect.mixture`).
"""

from __future__ import annotations

import numpy as np

# each module registers its detectors; the order of these imports is the order --help lists them
from kdfine.detect import fine  # noqa: F401,I001
from kdfine.detect import small_loss  # noqa: F401
from kdfine.detect import auto  # noqa: F401
from kdfine.detect import knn  # noqa: F401
from kdfine.detect.base import DETECTORS, ClassSplit, Detection, FineWarning, as_labels

__all__ = ["detect", "methods", "needs_logits", "Detection", "ClassSplit", "FineWarning", "DETECTORS"]


def methods() -> tuple[str, ...]:
    """The names ``--method`` accepts, in the order the help lists them."""
    return DETECTORS.names()


def needs_logits(method: str) -> bool:
    return bool(DETECTORS.info.get(method, {}).get("logits"))


def detect(features, labels, num_classes: int | None = None, *, zeta: float = 0.5, method: str = "gmm",
           seed: int = 0, vectors_from: np.ndarray | None = None, logits: np.ndarray | None = None,
           chunk: int | None = None) -> Detection:
    """Run the detector ``method`` (one of :func:`methods`).

    features: (N, D) array, memmap or tensor (FINE, auto, knn); labels: (N,) ints in [0, K);
    logits: (N, K) (small-loss, auto); vectors_from: a mask or index array of samples believed clean,
    the source of FINE's class vectors (default all); zeta: keep samples with P(clean) > zeta.
    """
    labels = as_labels(labels)
    k = int(num_classes if num_classes is not None else labels.max(initial=-1) + 1)
    if method not in DETECTORS:
        raise ValueError(f"method must be one of {', '.join(methods())}, got {method!r}")
    if needs_logits(method) and logits is None:
        raise ValueError(f"method {method} needs logits")
    return DETECTORS.get(method)(features, labels, k, zeta=zeta, method=method, seed=seed,
                                 vectors_from=vectors_from, logits=logits, chunk=chunk)

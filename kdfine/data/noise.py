"""Label-noise injection: seeded, drawn from the true labels (never from already-flipped ones).

Specs (``--label-noise``):

- ``sym:R``      exactly round(R*N) labels, each moved to a uniformly chosen *other* class.
- ``uniform:R``  round(R*N) labels redrawn from all K classes (about R(K-1)/K end up wrong).
- ``asym:R``     per source class of the map, exactly round(R*n_c) of its labels move to map[c].
                 CIFAR-10: truck->automobile, bird->airplane, deer->horse, cat<->dog;
                 CIFAR-100: next class within consecutive blocks of 5 indices; others: c -> c+1 mod K.
- ``pairflip:R`` round(R*n_c) labels of *every* class c move to c+1 mod K.
- ``none``       no noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdfine.errors import UsageError

KINDS = ("sym", "uniform", "asym", "pairflip")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# the standard CIFAR-10 class-dependent flips (source -> target), by class name
CIFAR10_FLIPS = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}


@dataclass(frozen=True)
class NoiseSpec:
    kind: str  # one of KINDS, or "none"
    rate: float

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        short = f"{self.rate:g}"  # sym:0.4, not sym:0.40000000000000002; exact when :g would round
        return f"{self.kind}:{short if float(short) == self.rate else repr(self.rate)}"


def parse_noise(spec: str | None) -> NoiseSpec:
    """Parse ``KIND:RATE`` (e.g. ``sym:0.4``); ``None``, ``""`` and ``none`` mean no noise."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return NoiseSpec("none", 0.0)
    kind, sep, rate_text = spec.strip().partition(":")
    kind = kind.lower()
    if not sep or kind not in KINDS:
        raise UsageError(f"--label-noise '{spec}': expected KIND:RATE with KIND one of "
                         f"{', '.join(KINDS)} (e.g. sym:0.4)")
    try:
        rate = float(rate_text)
    except ValueError:
        raise UsageError(f"--label-noise '{spec}': rate '{rate_text}' is not a number") from None
    if not 0.0 <= rate <= 1.0:
        raise UsageError(f"--label-noise '{spec}': rate must lie in [0, 1]")
    return NoiseSpec(kind, rate)


def asym_map(num_classes: int, dataset: str = "", classes: list[str] | None = None) -> np.ndarray:
    """The asymmetric (class-dependent) flip map: ``map[c]`` is where class c's flipped labels go;
    ``map[c] == c`` for classes that are never flipped.

    CIFAR-10 is recognised by its ten class names (in any order, e.g. an image folder of it) or by
    ``dataset == "cifar10"``; CIFAR-100 by ``dataset == "cifar100"``.
    """
    m = np.arange(num_classes)
    name = dataset.lower()
    named = classes is not None and len(classes) == num_classes and set(classes) == set(CIFAR10_CLASSES)
    if named or (name == "cifar10" and num_classes == 10):
        pos = {c: i for i, c in enumerate(classes if named else CIFAR10_CLASSES)}
        for src, dst in CIFAR10_FLIPS.items():
            m[pos[src]] = pos[dst]
    elif name == "cifar100" and num_classes == 100:
        m = (m // 5) * 5 + (m + 1) % 5
    else:
        m = (m + 1) % num_classes
    return m


def apply_noise(labels: np.ndarray, spec: NoiseSpec | str, num_classes: int, seed: int = 0,
                dataset: str = "", classes: list[str] | None = None) -> np.ndarray:
    """Return noisy labels (a new int64 array); ``labels`` are the true labels, unchanged."""
    if isinstance(spec, str):
        spec = parse_noise(spec)
    y = np.asarray(labels, dtype=np.int64)
    noisy = y.copy()
    if spec.kind == "none" or spec.rate == 0.0:
        return noisy
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    if spec.kind in ("sym", "uniform"):
        chosen = rng.choice(n, size=int(round(spec.rate * n)), replace=False)
        if spec.kind == "sym":
            if num_classes < 2:
                raise UsageError("--label-noise sym needs at least 2 classes")
            # an offset in [1, K) added mod K is a uniform draw over the other K-1 classes
            offset = rng.integers(1, num_classes, size=chosen.size)
            noisy[chosen] = (y[chosen] + offset) % num_classes
        else:
            noisy[chosen] = rng.integers(0, num_classes, size=chosen.size)
        return noisy
    target = asym_map(num_classes, dataset, classes) if spec.kind == "asym" else (np.arange(num_classes) + 1) % num_classes
    for c in range(num_classes):
        if target[c] == c:
            continue
        members = np.flatnonzero(y == c)
        k = int(round(spec.rate * members.size))
        if k:
            noisy[rng.choice(members, size=k, replace=False)] = target[c]
    return noisy

"""Data options plus a checkpoint's recorded data -> the datasets a command needs.

:func:`inherit_from` fills what the user did not give from a checkpoint (``eval``, ``distill``
and ``clean`` default to the data a model was trained on); :func:`prepare` loads the source,
replaces or corrupts the training labels and reads ``--keep``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from kdfine.data.noise import apply_noise, parse_noise
from kdfine.data.sources import ArrayDataset, Source, load_source
from kdfine.errors import InputError, KdfineWarning
from kdfine.io import read_index, read_labels
from kdfine.options import DataOptions

_INHERITED = ("data", "data_root", "image_size", "resize", "test_fraction")


def inherit_from(opts: DataOptions, meta: dict[str, Any]) -> DataOptions:
    """With no ``--data``, the data, image size and label noise recorded in a checkpoint's
    metadata ``meta`` (its ``config``, or the bare ``data`` field of older files)."""
    if opts.data is not None:
        return opts
    recorded = meta.get("config") if isinstance(meta.get("config"), dict) else {"data": meta.get("data")}
    upd = {k: recorded.get(k) for k in _INHERITED if recorded.get(k) is not None}
    if opts.label_noise is None and recorded.get("label_noise") not in (None, "none"):
        upd["label_noise"] = recorded["label_noise"]
        upd["noise_seed"] = int(recorded.get("noise_seed", 0))
    return replace(opts, **upd).validate()


@dataclass
class Prepared:
    """Data ready for training or evaluation: ``train`` carries the labels to train on (noisy
    ones included), ``truth`` the true labels when noise was injected, ``keep`` the ``--keep``
    subset (sorted indices)."""

    source: Source
    train: ArrayDataset
    test: ArrayDataset
    truth: np.ndarray | None
    keep: np.ndarray | None
    options: DataOptions

    def config(self) -> dict[str, Any]:
        """The data part of a checkpoint's recorded ``config``."""
        d = asdict(self.options)
        d["label_noise"] = str(parse_noise(self.options.label_noise))
        return d


def prepare(opts: DataOptions, quiet: bool = False) -> Prepared:
    """Load ``opts.data`` (digits when None; ``opts`` validated) and apply ``--labels``,
    ``--label-noise`` and ``--keep``; ``quiet``: no decode progress bar."""
    spec = opts.data or "digits"
    noise = parse_noise(opts.label_noise)
    source = load_source(spec, root=opts.data_root, download=opts.download, image_size=opts.image_size,
                         test_fraction=opts.test_fraction, augment=opts.augment, resize=opts.resize,
                         strict=opts.strict, quiet=quiet)
    train, truth = source.train, None
    if opts.labels:
        train = train.with_labels(read_labels(opts.labels, len(train), train.num_classes))
    if noise.kind != "none":
        truth = train.labels
        train = train.with_labels(apply_noise(truth, noise, train.num_classes, opts.noise_seed, source.name,
                                              train.classes))
    keep = _read_keep(opts.keep, train) if opts.keep else None
    return Prepared(source, train, source.test, truth, keep, replace(opts, data=spec))


def _read_keep(path: str, train: ArrayDataset) -> np.ndarray:
    keep = np.sort(read_index(path, len(train), "--keep"))
    if keep.size == 0:
        raise InputError(f"--keep {path}: keeps no samples; nothing to train on")
    present = np.bincount(train.labels[keep], minlength=train.num_classes)
    empty = [train.classes[c] for c in np.flatnonzero(present == 0)]
    if empty:
        warnings.warn(f"--keep {path} leaves no sample of class {', '.join(empty[:5])}"
                      f"{' ...' if len(empty) > 5 else ''}", KdfineWarning, stacklevel=3)
    return keep


def check_compatible(ckpt: Any, data: ArrayDataset, what: str = "--teacher") -> None:
    """Exit 3 naming the field when a checkpoint (a :class:`kdfine.checkpoint.Checkpoint`)
    cannot run on ``data``."""
    meta, path = ckpt.meta, ckpt.path
    fields = [("num_classes", int(meta["num_classes"]), data.num_classes),
              ("in_channels", int(meta["in_channels"]), data.in_channels),
              ("image_size", int(meta["image_size"]), data.image_size)]
    for name, have, want in fields:
        if have != want:
            raise InputError(f"{what} {path}: {name} is {have} but the data {data.spec} has {want}")
    classes = list(meta.get("classes") or [])
    if classes != data.classes:
        diff = next((i for i, (a, b) in enumerate(zip(classes, data.classes)) if a != b),
                    min(len(classes), len(data.classes)))
        have = classes[diff] if diff < len(classes) else "(none)"
        want = data.classes[diff] if diff < len(data.classes) else "(none)"
        raise InputError(f"{what} {path}: classes differ from the data {data.spec} "
                         f"(class {diff} is '{have}' vs '{want}')")

"""Data options plus a checkpoint's recorded data -> the datasets a command needs.

:func:`inherit_from` fills what the user did not give from a checkpoint (``eval``, ``distill``
and ``clean`` default to the data a model was trained on); :func:`prepare` loads the source,
replaces or corrupts the training labels and reads ``--keep``; :func:`split_validation` holds out
the ``--val-fraction`` validation split from the training samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kdfine.data import identity
from kdfine.data.cache import decode_workers
from kdfine.data.noise import apply_noise, parse_noise
from kdfine.data.sources import (ArrayDataset, Source, expand_path, fingerprint_store, folder_splits, load_source,
                                 parse_data_spec)
from kdfine.errors import InputError, KdfineWarning, UsageError
from kdfine.files.rows import file_sha256
from kdfine.files.tables import read_index, read_labels

_INHERITED = ("data", "data_root", "image_size", "resize", "test_fraction")
_PATH_KINDS = ("imagefolder", "npz")


def absolute_spec(spec: str) -> str:
    """``npz:PATH`` and ``imagefolder:PATH`` with PATH made absolute (what checkpoints record, so
    that a command run elsewhere finds the same data); other specs unchanged."""
    kind, arg = parse_data_spec(spec)
    return f"{kind}:{expand_path(arg, spec).resolve()}" if kind in _PATH_KINDS else spec


def data_fingerprint(spec: str) -> str | None:
    """A fingerprint of the data behind a path spec: the sha256 of an npz file, or an image
    folder's content fingerprint (:mod:`kdfine.data.identity`: every image file's relative path
    and bytes; remembered under the files' stat key, so a folder is read again only after a
    change). None for named datasets or a path that does not exist."""
    kind, arg = parse_data_spec(spec)
    p = expand_path(arg, spec)
    if kind not in _PATH_KINDS or not p.exists():
        return None
    if kind == "npz":
        return file_sha256(p) if p.is_file() else None
    splits, _ = folder_splits(p, 0.2)
    files = [f for fs, _ in splits.values() for f in fs]
    try:
        tree = identity.stat_tree(p, files)
    except FileNotFoundError as e:
        raise InputError(f"--data {spec}: {e.filename} vanished while the folder was read; run again") from None
    return identity.fingerprint(tree, fingerprint_store(), decode_workers())


def legacy_folder_fingerprint(spec: str) -> str | None:
    """The fingerprint that checkpoints from before content fingerprints recorded for an image
    folder: its sorted (relative path, size) list, hidden entries skipped. It does not see edits
    that keep a file's size."""
    p = expand_path(parse_data_spec(spec)[1], spec)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for d, dirs, files in os.walk(p):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            f = Path(d) / name
            with contextlib.suppress(OSError):
                h.update(f"{f.relative_to(p).as_posix()}\0{f.stat().st_size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def inherit_from(opts: Any, meta: dict[str, Any]) -> Any:
    """``opts`` (a :class:`kdfine.options.DataOptions`) or, with no ``--data``, a copy with the data,
    image size, label noise and ``--labels`` recorded in a
    checkpoint's metadata ``meta`` (its ``config``, or the bare ``data`` field of older files).
    A recorded image folder or npz file whose fingerprint changed, or recorded ``--labels`` that are
    missing or changed, are refused (exit 3): pass ``--data`` to choose the data explicitly."""
    if opts.data is not None:
        return opts
    recorded = meta.get("config") if isinstance(meta.get("config"), dict) else {"data": meta.get("data")}
    upd = {k: recorded.get(k) for k in _INHERITED if recorded.get(k) is not None}
    if not isinstance(upd.get("data", ""), str):
        raise InputError(f"the checkpoint records data {upd['data']!r}, not a --data spec; pass --data")
    if opts.label_noise is None and recorded.get("label_noise") not in (None, "none"):
        upd["label_noise"] = recorded["label_noise"]
        upd["noise_seed"] = recorded.get("noise_seed", 0)
    try:
        inherited = replace(opts, **upd).validate()
    except UsageError as e:
        raise InputError(f"the checkpoint's recorded data options are not valid ({e}); pass --data") from None
    _check_recorded_data(inherited.data, recorded.get("data_fingerprint"))
    if opts.labels is None and recorded.get("labels"):
        inherited = replace(inherited, labels=_recorded_labels(recorded))
    return inherited


def _check_recorded_data(spec: str | None, want: Any) -> None:
    if spec is None or not isinstance(want, str):
        return  # named datasets, and checkpoints from before fingerprints
    legacy = spec.startswith("imagefolder:") and not identity.is_content(want)
    have = legacy_folder_fingerprint(spec) if legacy else data_fingerprint(spec)
    if have != want:
        state = "no longer exists" if have is None else "has changed since the checkpoint was trained"
        raise InputError(f"the checkpoint's data {spec} {state}; pass --data to choose the data explicitly")


def _recorded_labels(recorded: dict[str, Any]) -> str:
    """The recorded ``--labels`` file, when it still holds the recorded bytes; else exit 3."""
    path, want = recorded.get("labels"), recorded.get("labels_sha256")
    p = Path(str(path))
    if not isinstance(want, str) or not p.is_absolute():
        raise InputError(f"the checkpoint was trained with --labels {path}, recorded without a fingerprint; "
                         "pass --labels (and --data) explicitly")
    if not p.is_file() or file_sha256(p) != want:
        state = "no longer exists" if not p.is_file() else "has changed since"
        raise InputError(f"the checkpoint was trained with --labels {p}, which {state}; "
                         "pass --labels (and --data) explicitly")
    return str(p)


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
    options: Any  # the kdfine.options.DataOptions the data was prepared from
    data_fingerprint: str | None = None  # see data_fingerprint()
    labels_sha256: str | None = None  # of the --labels file

    def config(self) -> dict[str, Any]:
        """The data part of a checkpoint's recorded ``config``: the options (paths absolute) and
        the fingerprints that commands inheriting the data check."""
        d = asdict(self.options)
        d["label_noise"] = str(parse_noise(self.options.label_noise))
        d.update(data_fingerprint=self.data_fingerprint, labels_sha256=self.labels_sha256)
        return d

    def train_fingerprint(self) -> str:
        """The training set a run trains on (size, labels as trained on, the data's fingerprint):
        the resume state records it, and a resume on other data is refused."""
        h = hashlib.sha256(f"{len(self.train)}:{self.options.data}:{self.data_fingerprint}\n".encode())
        h.update(np.ascontiguousarray(self.train.labels, dtype=np.int64).tobytes())
        if self.keep is not None:
            h.update(np.ascontiguousarray(self.keep, dtype=np.int64).tobytes())
        return f"{len(self.train)} samples, sha256 {h.hexdigest()[:16]}"


def prepare(opts: Any, quiet: bool = False) -> Prepared:
    """Load ``opts.data`` (a validated :class:`kdfine.options.DataOptions`; digits when None) and apply ``--labels``,
    ``--label-noise`` and ``--keep``; ``quiet``: no decode progress bar."""
    spec = opts.data or "digits"  # read as given (messages name what the user typed), recorded absolute
    noise = parse_noise(opts.label_noise)
    source = load_source(spec, root=opts.data_root, download=opts.download, image_size=opts.image_size,
                         test_fraction=opts.test_fraction, augment=opts.augment, resize=opts.resize,
                         strict=opts.strict, quiet=quiet)
    fingerprint = source.fingerprint or data_fingerprint(spec)  # an image folder's comes from its decode
    train, truth = source.train, None
    if opts.labels:
        train = train.with_labels(read_labels(opts.labels, len(train), train.num_classes))
    if noise.kind != "none":
        truth = train.labels
        train = train.with_labels(apply_noise(truth, noise, train.num_classes, opts.noise_seed, source.name,
                                              train.classes))
    keep = _read_keep(opts.keep, train) if opts.keep else None
    absolute = {k: str(Path(getattr(opts, k)).resolve()) for k in ("labels", "keep") if getattr(opts, k)}
    return Prepared(source, train, source.test, truth, keep, replace(opts, data=absolute_spec(spec), **absolute),
                    fingerprint, file_sha256(opts.labels) if opts.labels else None)


def _read_keep(path: str, train: ArrayDataset) -> np.ndarray:
    keep = np.sort(read_index(path, len(train), "--keep"))
    if keep.size == 0:
        raise InputError(f"--keep {path}: keeps no samples; nothing to train on")
    if keep.size == 1:  # a batch of one: BatchNorm cannot train on it, and no model learns from one image
        raise InputError(f"--keep {path}: keeps 1 sample; training needs at least 2")
    present = np.bincount(train.labels[keep], minlength=train.num_classes)
    empty = [train.classes[c] for c in np.flatnonzero(present == 0)]
    if empty:
        warnings.warn(f"--keep {path} leaves no sample of class {', '.join(empty[:5])}"
                      f"{' ...' if len(empty) > 5 else ''}", KdfineWarning, stacklevel=3)
    return keep


def split_validation(labels: np.ndarray, fraction: float, seed: int,
                     within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices), both sorted, of the samples ``within`` (default all).

    Stratified: per class (by ``labels``, the labels training sees, noisy ones included: a user's
    validation set is as noisy as their training set), ``round(fraction * n_class)`` samples drawn
    with ``seed``. FINE's official runs hold out 5,000 of CIFAR's 50,000 images (``fraction`` 0.1).
    """
    pool = np.arange(len(labels), dtype=np.int64) if within is None else np.sort(np.asarray(within, np.int64))
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)[pool]
    val = []
    for c in np.unique(y):
        members = pool[y == c]
        val.append(rng.permutation(members)[:int(round(fraction * members.size))])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    if val_idx.size == 0 or val_idx.size == pool.size:
        raise UsageError(f"--val-fraction {fraction:g}: holds out {val_idx.size} of {pool.size} training samples; "
                         "choose a fraction that leaves samples on both sides")
    return np.setdiff1d(pool, val_idx), val_idx


def validation_subset(train: ArrayDataset, val_index: np.ndarray) -> ArrayDataset:
    """The held-out samples as a dataset (the training split's normalisation, labels as trained on)."""
    return replace(train, images=train.images[val_index], labels=train.labels[val_index], files=None, split="val")


def check_compatible(ckpt: Any, data: ArrayDataset, what: str = "--teacher") -> None:
    """Exit 3 naming the field when a checkpoint (a :class:`kdfine.models.checkpoint.Checkpoint`)
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

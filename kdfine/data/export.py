"""Cleaned-dataset export: the kept training samples (and the whole test split) as an ``npz:``
dataset or an ImageFolder tree. Both are written so that a failure leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kdfine.data.sources import ArrayDataset
from kdfine.errors import InputError
from kdfine.io import atomic_open


def export_npz(train: ArrayDataset, test: ArrayDataset, keep: np.ndarray, path: str) -> None:
    """Arrays ``x, y`` (kept training samples), ``x_test, y_test``, ``classes`` and ``index`` (the
    kept samples' indices in the original training split), readable as ``--data npz:PATH``."""
    with atomic_open(path, "wb", "--export") as f:
        np.savez(f, x=train.images[keep], y=train.labels[keep], x_test=test.images, y_test=test.labels,
                 classes=np.array(train.classes), index=keep)


def export_folder(train: ArrayDataset, test: ArrayDataset, keep: np.ndarray, root: str) -> None:
    """``root/train/<class>/<index>.<ext>`` for kept samples (hard or symbolic links to the source
    files when the data is an image folder, PNGs otherwise) and ``root/test/...`` likewise. Built in
    a temporary directory and renamed into place, so a failure leaves nothing behind."""
    dest = Path(root)
    if not dest.parent.is_dir():
        raise InputError(f"--export-dir {root}: directory {dest.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _write_split(tmp / "train", train, keep)
        _write_split(tmp / "test", test, np.arange(len(test)))
        if dest.exists():
            dest.rmdir()  # empty, checked before
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_split(base: Path, ds: ArrayDataset, idx: np.ndarray) -> None:
    from PIL import Image

    for c in ds.classes:
        (base / c).mkdir(parents=True, exist_ok=True)
    for i in idx.tolist():
        folder = base / ds.classes[int(ds.labels[i])]
        if ds.files is not None:
            src = Path(ds.files[i])
            target = folder / f"{i:06d}{src.suffix.lower()}"
            try:
                os.link(src, target)
            except OSError:
                os.symlink(src, target)
        else:
            a = ds.images[i]
            Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(folder / f"{i:06d}.png")

"""Cleaned-dataset export: the kept training samples (and the whole test split) as an ``npz:``
dataset or an ImageFolder tree.

The caller stages both (:class:`kdfine.files.outputs.Outputs`): they are written to a temporary beside
the target and land only when the whole command succeeds. Class names become folder names only
when each is one safe path component (:func:`check_class_names`); a dataset whose names are not
is refused, so that a file from elsewhere never chooses where kdfine writes.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np

from kdfine.data.sources import ArrayDataset
from kdfine.errors import InputError

NAME_MAX = 255  # bytes in one path component on common file systems


def unsafe_component(name: object) -> str | None:
    """Why ``name`` cannot be a folder name (one path component on every common OS), or None."""
    if not isinstance(name, str) or name == "":
        return "it is empty" if name == "" else "it is not a string"
    if name in (".", ".."):
        return f"'{name}' means a directory itself"
    for sep in ("/", "\\"):
        if sep in name:
            return f"it contains '{sep}'"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "it contains a control character"
    if len(name) >= 2 and name[1] == ":" or name != name.strip() or name.endswith("."):
        return "it looks like a drive, or has leading/trailing spaces or a trailing dot"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size > NAME_MAX - 8:
        return f"it is {size} bytes long"
    return None


def check_class_names(classes: list, option: str = "--export-dir") -> None:
    """Exit 3 naming the first class that cannot be a folder name, or two that would be one
    folder on a case-insensitive file system."""
    seen: dict[str, int] = {}
    for i, c in enumerate(classes):
        why = unsafe_component(c)
        if why:
            raise InputError(f"{option}: class {i} {str(c)[:60]!r} cannot be a folder name ({why}); "
                             "rename the class in the data, or use --export FILE.npz")
        key = unicodedata.normalize("NFC", c).casefold()
        if key in seen:
            raise InputError(f"{option}: classes {seen[key]} {classes[seen[key]]!r} and {i} {c!r} would share "
                             "one folder; rename one of them, or use --export FILE.npz")
        seen[key] = i


def export_npz(train: ArrayDataset, test: ArrayDataset, keep: np.ndarray, path: str | os.PathLike) -> None:
    """Arrays ``x, y`` (kept training samples), ``x_test, y_test``, ``classes`` and ``index`` (the
    kept samples' indices in the original training split), readable as ``--data npz:PATH``."""
    with open(path, "wb") as f:
        np.savez(f, x=train.images[keep], y=train.labels[keep], x_test=test.images, y_test=test.labels,
                 classes=np.array(train.classes), index=keep)


def export_folder(train: ArrayDataset, test: ArrayDataset, keep: np.ndarray, root: str | os.PathLike) -> None:
    """``root/train/<class>/<name>`` for kept samples and ``root/test/...`` likewise, in the existing
    empty directory ``root``: an image folder's files as hard or symbolic links under their own
    names (:func:`link_name`), other data as ``<index>.png``. Every class name is checked before
    anything is written."""
    check_class_names(train.classes)
    check_class_names(test.classes)
    root = Path(root)
    _write_split(root, root / "train", train, keep)
    _write_split(root, root / "test", test, np.arange(len(test)))


def link_name(name: str, index: int, used: set[str]) -> str:
    """The source file's own ``name`` (a reviewer finds the file by it), unless a file of that name
    (compared case-insensitively, as some file systems do) is already in the folder: a sample
    relabelled into another class, or a namesake from a subfolder, gets ``<stem>.<index><suffix>``."""
    stem, suffix = os.path.splitext(name)
    out, k = name, 0
    while out.casefold() in used:
        k += 1
        out = f"{stem}.{index:06d}{suffix}" if k == 1 else f"{stem}.{index:06d}-{k}{suffix}"
    used.add(out.casefold())
    return out


def _write_split(root: Path, base: Path, ds: ArrayDataset, idx: np.ndarray) -> None:
    from PIL import Image

    folders = [base / c for c in ds.classes]
    for f in folders:
        if f.resolve().parent != base.resolve() or not f.resolve().is_relative_to(root.resolve()):
            raise InputError(f"--export-dir: class folder {f.name!r} would lie outside the export")  # unreachable
        f.mkdir(parents=True, exist_ok=True)
    used: dict[Path, set[str]] = {f: set() for f in folders}
    for i in idx.tolist():
        folder = folders[int(ds.labels[i])]
        if ds.files is not None:
            src = Path(ds.files[i])
            target = folder / link_name(src.name, i, used[folder])
            try:
                os.link(src, target)
            except OSError:
                os.symlink(src, target)
        else:
            a = ds.images[i]
            Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(folder / f"{i:06d}.png")

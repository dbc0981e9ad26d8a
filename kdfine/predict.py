"""Class predictions of a checkpoint for image files: ``kdfine predict``.

Images of any size are resized (shorter side to the checkpoint's image size, bilinear, as image
folders are decoded) and centre-cropped to a square, converted to the checkpoint's channels, and
run in batches on the device. Files that cannot be decoded are skipped and reported. The CSV is
``path,label,prob[,label2,prob2,...]`` sorted by path; class names only ever go into its cells.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kdfine.data.sources import IMAGE_SUFFIXES
from kdfine.errors import InputError, KdfineWarning


def find_images(paths: list[str]) -> list[str]:
    """The files among ``paths`` and the image files (by suffix) under the folders among them,
    sorted, without duplicates; a path that does not exist is reported and skipped."""
    found: set[str] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found.update(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.add(str(p))
        else:
            warnings.warn(f"{p}: no such file or folder; skipped", KdfineWarning, stacklevel=2)
    if not found:
        raise InputError(f"predict: no image files in {', '.join(paths[:3])}")
    return sorted(found)


def load_image(path: str, size: int, channels: int) -> np.ndarray:
    """(size, size, channels) uint8: shorter side resized to ``size``, centre crop. Raises
    OSError (or PIL's errors) when the file is no readable image."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _decode(files: list[str], size: int, channels: int) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    from PIL import UnidentifiedImageError

    ok, arrays, skipped = [], [], []
    for f in files:
        try:
            arrays.append(load_image(f, size, channels))
            ok.append(f)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            warnings.warn(f"{f}: not a readable image ({reason}); skipped", KdfineWarning, stacklevel=3)
            skipped.append({"path": f, "reason": reason})
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, channels), np.uint8)
    return ok, images, skipped


def predict(ck: Any, files: list[str], *, top_k: int, device: Any, batch_size: int = 256,
            chunk: int = 2048) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Rows ``{"path", "labels": [top_k class names], "probs": [top_k softmax probabilities]}``
    in path order, and the skipped files ``{"path", "reason"}``. Decodes ``chunk`` files at a time."""
    from kdfine.device import use_channels_last
    from kdfine.features import extract

    size, channels, classes = int(ck.meta["image_size"]), int(ck.meta["in_channels"]), ck.classes
    ck.model.to(device)
    rows, skipped = [], []
    for start in range(0, len(files), chunk):
        ok, images, bad = _decode(files[start:start + chunk], size, channels)
        skipped += bad
        if not ok:
            continue
        _, logits = extract(ck.model, images, ck.meta["mean"], ck.meta["std"], device=device, batch_size=batch_size,
                            features=False, channels_last=use_channels_last("auto", device))
        z = logits.astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
        for f, idx, probs in zip(ok, top, p):
            rows.append({"path": f, "labels": [classes[i] for i in idx], "probs": [float(probs[i]) for i in idx]})
    if not rows:
        raise InputError(f"predict: none of the {len(files)} files is a readable image")
    return rows, skipped


def to_csv(rows: list[dict[str, Any]], top_k: int) -> str:
    """``path,label,prob,label2,prob2,...`` (quoted by the csv module where a cell needs it)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["path", "label", "prob"]
    for i in range(2, top_k + 1):
        header += [f"label{i}", f"prob{i}"]
    w.writerow(header)
    for r in rows:
        cells = [r["path"]]
        for label, prob in zip(r["labels"], r["probs"]):
            cells += [label, f"{prob:.6f}"]
        w.writerow(cells)
    return buf.getvalue()

"""Class predictions for image files: ``kdfine predict``, with a checkpoint or an exported ONNX file.

Every file is decoded by :func:`kdfine.data.decode.decode` with the decoding the model was trained
with (:func:`spec_for`: the checkpoint's image size and channels, and the ``crop``/``squash``
recorded in its config; an ONNX file carries the same record), so predict sees the pixels that
``eval`` sees. Files that cannot be decoded, and files above the pixel limit
(``KDFINE_MAX_PIXELS``), are skipped with a warning; the others are predicted, in chunks that
bound memory. The CSV is ``path,label,prob[,label2,prob2,...]`` sorted by path; its text cells
are made safe for spreadsheets and terminals (:func:`kdfine.files.text.csv_cell`).

Torch-free: the model is a function from uint8 images (N, S, S, C) to logits (N, K), which
:func:`torch_logits` (a checkpoint) or :mod:`kdfine.inference.onnx_run` (an ONNX file) provides.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kdfine.data.cache import decode_workers
from kdfine.data.decode import RESIZE_MODES, DecodeSpec, TooManyPixels, decode
from kdfine.data.sources import IMAGE_SUFFIXES
from kdfine.errors import InputError, KdfineWarning
from kdfine.files.text import csv_cell, printable

#: Bytes of decoded pixels held at once (the chunk of files decoded before a forward pass).
CHUNK_BYTES = 256 * 2**20
Logits = Callable[[np.ndarray], np.ndarray]  # uint8 (N, S, S, C) -> float (N, K)


def _regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:
        return False


def find_images(paths: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The regular files among ``paths`` and the image files (by suffix) under the folders among
    them, sorted, without duplicates; and the paths skipped, as ``{"path", "reason"}`` (the
    result's ``skipped``, like unreadable images): those that do not exist, and FIFOs or devices
    (which would block or never end), each also reported as a warning."""
    found: set[str] = set()
    missing = []
    for p in map(Path, paths):
        if p.is_dir():
            found.update(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and _regular(f))
        elif _regular(p):
            found.add(str(p))
        else:
            why = "not a regular file" if p.exists() else "no such file or folder"
            warnings.warn(f"{printable(str(p))}: {why}; skipped", KdfineWarning, stacklevel=2)
            missing.append({"path": str(p), "reason": why})
    if not found:
        raise InputError(f"predict: no image files in {', '.join(printable(p) for p in paths[:3])}")
    return sorted(found), missing


def spec_for(meta: dict[str, Any], where: str = "--model") -> DecodeSpec:
    """The decoding a checkpoint's metadata records: its image size and channels, and the resize
    mode of its training data (``config.decoded.resize`` for image folders, else ``config.resize``;
    ``crop`` when neither is recorded). Exit 3 for what images cannot be decoded to."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    decoded = config.get("decoded") if isinstance(config.get("decoded"), dict) else {}
    resize = decoded.get("resize") or config.get("resize") or "crop"
    channels = int(meta["in_channels"])
    if resize not in RESIZE_MODES:
        raise InputError(f"{where}: records the resize mode {str(resize)[:40]!r}; expected one of "
                         f"{', '.join(RESIZE_MODES)}")
    if channels not in (1, 3):
        raise InputError(f"{where}: the model takes {channels}-channel input; image files decode to 1 (grey) "
                         "or 3 (RGB) channels")
    return DecodeSpec(int(meta["image_size"]), channels, resize)


def _one(path: str, spec: DecodeSpec) -> np.ndarray | str:
    """The pixels of ``path``, or why it was skipped."""
    try:
        return decode(path, spec).pixels
    except MemoryError:
        raise
    except TooManyPixels as e:
        return str(e)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on damaged files
        text = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        return f"not a readable image ({text})"


def decode_files(files: list[str], spec: DecodeSpec,
                 workers: int | None = None) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    """Decode ``files`` on a thread pool: the readable ones, their pixels (n, S, S, C) uint8 in
    file order, and the skipped ones ``{"path", "reason"}`` (each reported as a warning)."""
    ok, arrays, skipped = [], [], []
    with ThreadPoolExecutor(workers or decode_workers()) as pool:
        for f, got in zip(files, pool.map(lambda f: _one(f, spec), files)):
            if isinstance(got, str):
                warnings.warn(f"{printable(f)}: {got}; skipped", KdfineWarning, stacklevel=2)
                skipped.append({"path": f, "reason": got})
            else:
                ok.append(f)
                arrays.append(got)
    images = np.stack(arrays) if arrays else np.zeros((0, spec.size, spec.size, spec.channels), np.uint8)
    return ok, images, skipped


def chunk_files(spec: DecodeSpec, budget: int = CHUNK_BYTES) -> int:
    """Files decoded per chunk: as many as ``budget`` bytes of pixels hold, 1 to 2048."""
    return int(min(2048, max(1, budget // (spec.size * spec.size * spec.channels))))


def top_k_rows(files: list[str], logits: np.ndarray, classes: list[str], top_k: int) -> list[dict[str, Any]]:
    """``{"path", "labels", "probs"}`` per file: the ``top_k`` classes by softmax probability
    (float64), most likely first (ties: the lower class index)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    return [{"path": f, "labels": [classes[i] for i in idx], "probs": [float(probs[i]) for i in idx]}
            for f, idx, probs in zip(files, top, p)]


def predict(logits: Logits, classes: list[str], files: list[str], spec: DecodeSpec, *,
            top_k: int) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Rows (see :func:`top_k_rows`) in path order and the skipped files ``{"path", "reason"}``.
    ``logits`` maps uint8 (N, S, S, C) images decoded with ``spec`` to (N, K) logits."""
    rows, skipped = [], []
    step = chunk_files(spec)
    for start in range(0, len(files), step):
        ok, images, bad = decode_files(files[start:start + step], spec)
        skipped += bad
        if ok:
            rows += top_k_rows(ok, logits(images), classes, top_k)
    if not rows:
        raise InputError(f"predict: none of the {len(files)} files is a readable image")
    return rows, skipped


def torch_logits(ck: Any, device: Any, batch_size: int) -> Logits:
    """The logits function of a loaded checkpoint on ``device`` (normalised with its mean/std)."""
    from kdfine.features import extract
    from kdfine.runtime.device import use_channels_last

    ck.model.to(device)

    def run(images: np.ndarray) -> np.ndarray:
        _, z = extract(ck.model, images, ck.meta["mean"], ck.meta["std"], device=device, batch_size=batch_size,
                       features=False, channels_last=use_channels_last("auto", device))
        return z

    return run


def to_csv(rows: list[dict[str, Any]], top_k: int) -> str:
    """``path,label,prob,label2,prob2,...``; text cells through :func:`kdfine.files.text.csv_cell`
    (no formulas, no control characters, valid UTF-8), quoted by the csv module where needed."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["path", "label", "prob"]
    for i in range(2, top_k + 1):
        header += [f"label{i}", f"prob{i}"]
    w.writerow(header)
    for r in rows:
        cells = [csv_cell(r["path"])]
        for label, prob in zip(r["labels"], r["probs"]):
            cells += [csv_cell(label), f"{prob:.6f}"]
        w.writerow(cells)
    return buf.getvalue()


def is_onnx(path: str | os.PathLike) -> bool:
    """Whether ``--model`` names an exported ONNX file (by its suffix) rather than a checkpoint."""
    return Path(path).suffix.lower() == ".onnx"

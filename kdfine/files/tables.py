"""Index and label lists: the CSVs that chain kdfine's stages (``index,...`` with a header, or
one integer per line), read with one clear error per bad line; ``-`` for stdin."""

from __future__ import annotations

import csv
import itertools
import os
import sys
from array import array
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from kdfine.errors import InputError, UsageError
from kdfine.files.rows import load_npy
from kdfine.files.text import csv_cell


def csv_text(header: list[str], columns: list[np.ndarray | list], formats: list[str]) -> str:
    """A CSV with ``header`` and one row per element of the ``columns`` (all equal length). Text
    columns must already be cells (:func:`text_cells`).

    When every column is a numpy array of non-negative integers formatted ``{}`` or of floats in
    [0, 1] formatted ``{:.6f}`` (detect-noise's index, label, score and p_clean), the text is built
    by numpy in a few array operations, character for character what ``str.format`` writes (the
    floats correctly rounded: values within 1e-9 of a rounding tie are formatted by Python); else
    one ``str.format`` per row (700,000 rows: 1.3 s)."""
    fast = _numeric_csv(columns, formats)
    if fast is not None:
        return ",".join(header) + "\n" + fast
    row = ",".join(formats) + "\n"  # one format call per row: 3x faster than one per field
    cols = [c.tolist() if isinstance(c, np.ndarray) else c for c in columns]
    return ",".join(header) + "\n" + "".join(map(row.format, *cols))


def _numeric_csv(columns: list, formats: list[str]) -> str | None:
    """The rows of :func:`csv_text` built with numpy, or None when a column is not one it handles."""
    fields = []
    for col, fmt in zip(columns, formats):
        if not isinstance(col, np.ndarray) or col.ndim != 1:
            return None
        if fmt == "{}" and col.dtype.kind in "iu":
            field = _integer_chars(col)
        elif fmt == "{:.6f}" and col.dtype.kind == "f":
            field = _unit_float_chars(col)
        else:
            return None
        if field is None:
            return None
        fields.append(field)
    if not fields or fields[0][0].shape[0] == 0:
        return "" if fields else None
    n = fields[0][0].shape[0]
    # one (n, width) table of right-aligned fields, separators and newlines, and a mask of the
    # characters that are written; the mask's row-major order is the text's order
    width = sum(chars.shape[1] + 1 for chars, _ in fields)
    table = np.empty((n, width), dtype=np.uint8)
    keep = np.ones((n, width), dtype=bool)
    at = 0
    for i, (chars, length) in enumerate(fields):
        w = chars.shape[1]
        table[:, at:at + w] = chars
        keep[:, at:at + w] = np.arange(w) >= (w - length)[:, None]
        table[:, at + w] = ord("\n") if i == len(fields) - 1 else ord(",")
        at += w + 1
    return table[keep].tobytes().decode("ascii")


def _integer_chars(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Decimal digits of non-negative integers, right-aligned in (n, width) uint8, and their lengths."""
    v = values.astype(np.int64, copy=False)
    if v.size and (v.min() < 0 or (values.dtype.kind == "u" and values.max() > np.iinfo(np.int64).max)):
        return None
    width = len(str(int(v.max()))) if v.size else 1
    chars = np.empty((v.size, width), dtype=np.uint8)
    rest = v.copy()
    for j in range(width - 1, -1, -1):
        chars[:, j] = rest % 10 + ord("0")
        rest //= 10
    length = np.ones(v.size, dtype=np.int64)
    for j in range(1, width):
        length += v >= 10 ** j
    return chars, length


def _unit_float_chars(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``{:.6f}`` of floats in [0, 1] (no NaN, no -0.0) as (n, 8) uint8 and their lengths (8)."""
    x = values.astype(np.float64, copy=False)
    if x.size and not (np.all((x >= 0) & (x <= 1)) and not np.signbit(x).any()):
        return None
    y = x * 1e6  # exact to within 1.2e-10 (half an ulp below 2**20): only near-ties need Python's rounding
    whole = np.floor(y)
    frac = y - whole
    q = (whole + (frac > 0.5)).astype(np.int64)
    for i in np.flatnonzero(np.abs(frac - 0.5) <= 1e-9):
        q[i] = int("{:.6f}".format(float(x[i])).replace(".", ""))
    chars = np.empty((x.size, 8), dtype=np.uint8)
    chars[:, 0] = q // 1_000_000 + ord("0")
    chars[:, 1] = ord(".")
    rest = q % 1_000_000
    for j in range(7, 1, -1):
        chars[:, j] = rest % 10 + ord("0")
        rest //= 10
    return chars, np.full(x.size, 8, dtype=np.int64)


def text_cells(values: list[str]) -> list[str]:
    """Names (class names, file paths) as CSV cells (:func:`kdfine.files.text.csv_cell`), quoted
    where a comma or quote needs it."""
    out = []
    for v in values:
        v = csv_cell(v)  # text.csv_cell: undecodable bytes escaped, control characters shown, formulas defused
        out.append('"' + v.replace('"', '""') + '"' if any(c in v for c in ',"\r\n') else v)
    return out


STDIN_BYTES = 1 << 20  # a checkpoint path on stdin: a line, not a file's worth of text
LINE_LIMIT = 1 << 17  # 128 KiB: the longest line an index or label list may have (csv's own field limit)


def read_stdin_path(option: str = "--teacher") -> str:
    """The last non-empty line of stdin: how ``--teacher -`` receives a path through a pipe."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(f"{option} -: expected a checkpoint path on stdin, but stdin is a terminal")
    text = sys.stdin.read(STDIN_BYTES + 1)
    if len(text) > STDIN_BYTES:
        raise InputError(f"{option} -: more than {STDIN_BYTES >> 20} MiB on stdin; pipe in the path of a checkpoint")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"{option} -: nothing was read from stdin; pipe in the path of a checkpoint "
                         "(e.g. `kdfine train-teacher ... | kdfine distill --teacher - ...`)")
    return lines[-1]


def _rows(path: Path, what: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-blank row of a CSV, read a line at a time (no line
    longer than :data:`LINE_LIMIT`): memory stays bounded whatever the file holds."""
    if not path.exists():
        raise InputError(f"{what} {path}: no such file")
    try:
        f = open(path, encoding="utf-8-sig", newline="")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    reader = csv.reader(_bounded_lines(f, path, what))
    with f:
        try:
            for row in reader:
                if row and any(c.strip() for c in row):
                    yield reader.line_num, row
        except csv.Error as e:
            raise InputError(f"{what} {path}, line {reader.line_num}: not a CSV row ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{what} {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _bounded_lines(f: IO[str], path: Path, what: str) -> Iterator[str]:
    number = 0
    while line := f.readline(LINE_LIMIT + 1):
        number += 1
        if len(line) > LINE_LIMIT:
            raise InputError(f"{what} {path}, line {number}: longer than {LINE_LIMIT >> 10} KiB; "
                             "expected a CSV of indices or labels")
        yield line


def _parse_int(text: str, path: Path, line: int, what: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise InputError(f"{what} {path}, line {line}: '{text.strip()[:40]}' is not an integer") from None
    if not -(2**63) <= value < 2**63:  # beyond int64: no index or label can be that large
        raise InputError(f"{what} {path}, line {line}: {text.strip()[:40]} is out of range")
    return value


def _int_array(values: Iterable[int]) -> np.ndarray:
    out = array("q", values)
    return np.frombuffer(out, np.int64).copy() if len(out) else np.zeros(0, np.int64)


def read_index(path: str | os.PathLike, n: int | None = None, what: str = "index list") -> np.ndarray:
    """Read an index list: a CSV whose first column is ``index`` (header required), or one
    integer per line. Returns int64 indices in file order.

    With ``n`` given, indices must lie in ``[0, n)`` and be unique.
    """
    p = Path(path)
    rows = _rows(p, what)
    first = next(rows, None)
    if first is None:
        raise InputError(f"{what} {p}: the file is empty; expected a CSV with an 'index' column")
    head = first[1][0].strip()
    if head.lower() != "index" and not head.lstrip("-").isdigit():
        raise InputError(f"{what} {p}: the first column must be 'index' (found '{head[:40]}')")
    body = rows if head.lower() == "index" else itertools.chain([first], rows)
    values = (_parse_int(r[0], p, line, what) for line, r in body)
    idx = _int_array(values if n is None else itertools.islice(values, n + 1))  # n + 1: reading stops there
    if n is not None:
        if idx.size > n:
            raise InputError(f"{what} {p}: lists more than {n} indices, for {n} samples")
        validate_index(idx, n, f"{what} {p}")
    return idx


def validate_index(idx: np.ndarray, n: int, where: str) -> None:
    if idx.size and idx.min() < 0:
        raise InputError(f"{where}: negative index {int(idx.min())}")
    if idx.size and idx.max() >= n:
        raise InputError(f"{where}: index {int(idx.max())} is out of range for {n} samples")
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"{where}: index {int(uniq[counts > 1][0])} appears more than once")


def read_labels(path: str | os.PathLike, n: int, num_classes: int) -> np.ndarray:
    """Read replacement training labels: ``.npy`` (N,) integers, or a CSV with a ``label`` column
    (and optionally ``index``, then every sample must be listed once), or one label per line."""
    p = Path(path)
    what = "--labels"
    if p.suffix == ".npy":
        labels = load_npy(p, what)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{what} {p}: expected a 1-D integer array, got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    else:
        labels = _csv_labels(p, n, what)
    if labels.shape[0] != n:
        more = "more than " if labels.shape[0] > n else ""
        raise InputError(f"{what} {p}: has {more}{min(labels.shape[0], n)} labels, the training set has {n} samples")
    check_label_range(labels, num_classes, f"{what} {p}")
    return labels


def _csv_labels(p: Path, n: int, what: str) -> np.ndarray:
    """A CSV with a ``label`` column (and an ``index`` one: every sample listed once), or one label per line."""
    rows = _rows(p, what)
    first = next(rows, None)
    if first is None:
        raise InputError(f"{what} {p}: the file is empty")
    head = [c.strip().lower() for c in first[1]]
    if "label" not in head:
        body = itertools.islice(itertools.chain([first], rows), n + 1)
        return _int_array(_parse_int(r[0], p, line, what) for line, r in body)
    li, ii = head.index("label"), head.index("index") if "index" in head else None
    vals, idx = array("q"), array("q")
    for line, r in itertools.islice(rows, n + 1):  # n + 1: enough to tell that there are too many
        vals.append(_parse_int(r[li] if li < len(r) else "", p, line, what))
        if ii is not None:
            idx.append(_parse_int(r[ii] if ii < len(r) else "", p, line, what))
    if ii is None:
        return _int_array(vals)
    index = _int_array(idx)
    if index.size != n:
        raise InputError(f"{what} {p}: lists {'more than ' if index.size > n else ''}{min(index.size, n)} samples, "
                         f"the training set has {n}")
    validate_index(index, n, f"{what} {p}")
    labels = np.empty(n, dtype=np.int64)
    labels[index] = _int_array(vals)
    return labels


def check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise InputError(f"{where}: label {bad} is outside [0, {num_classes})")

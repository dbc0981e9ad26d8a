"""File plumbing: atomic writes, `-` for stdin/stdout, index and label lists.

Every writer either leaves the complete file or nothing: data goes to a temporary file in the
target's directory and is renamed over the target only once it is fully written and flushed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from kdfine.errors import InputError, UsageError


def check_writable(path: str | os.PathLike, option: str = "--out") -> Path:
    """Fail early (before any long work) if ``path`` cannot be written.

    Checks that the parent directory exists and that a file can really be created in it (a probe
    file, removed at once: permission bits say nothing for root, and nothing about read-only
    mounts), so a two-hour training run does not end with "no such directory".
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InputError(f"{option} {p}: is a directory; give a file name")
    if is_special(p):
        return p  # a device or pipe such as /dev/null or /dev/stdout: written in place
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist; create it first"
        raise InputError(f"{option} {p}: {parent} {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise InputError(f"{option} {p}: cannot create files in {parent} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return p


def is_special(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists and is neither a regular file nor a directory (``/dev/null``, a FIFO):
    such targets are written in place, and nothing is written beside them."""
    p = Path(path)
    return p.exists() and not p.is_dir() and not _is_regular(p)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", option: str = "--out") -> Iterator[IO]:
    """Open ``path`` for writing so that readers only ever see the complete file.

    A special file that already exists (``/dev/null``, ``/dev/full``, a FIFO) is written in place,
    since it cannot be replaced by a rename. Write errors (disk full, permission) become
    :class:`InputError` naming the file, and the temporary file is removed.
    """
    p = check_writable(path, option)
    if is_special(p):
        try:
            with open(p, mode) as f:
                yield f
        except OSError as e:
            raise InputError(f"cannot write {p}: {e.strerror or e}") from e
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    except OSError as e:
        raise InputError(f"cannot write {p}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"cannot write {p}: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, option: str = "--out") -> Path:
    with atomic_open(path, "wb", option) as f:
        f.write(data)
    return Path(path)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray, option: str = "--out") -> Path:
    with atomic_open(path, "wb", option) as f:
        np.save(f, array, allow_pickle=False)
    return Path(path)


def pread_rows(fd: int, out: np.ndarray, offset: int, rows) -> bool:
    """Fill ``out`` (len(rows), ...) with the fixed-size rows ``rows`` of a file (row r starts at
    byte ``offset + r * row size``) by positional reads: the page cache serves them and nothing is
    mapped into the process, where scattered rows would leave their read-ahead resident. False
    when the file ends before a row (the caller names the file)."""
    flat = out.reshape(len(out), -1).view(np.uint8)
    size = flat.shape[1] if flat.ndim == 2 else 0
    return all(os.preadv(fd, [flat[k]], offset + int(r) * size) == size for k, r in enumerate(rows))


def write_text(path: str, text: str, option: str = "--out") -> None:
    """Write ``text`` to ``path`` atomically, or to stdout when ``path`` is ``-``."""
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_open(path, "w", option) as f:
        f.write(text)


def csv_text(header: list[str], columns: list[np.ndarray], formats: list[str]) -> str:
    """A CSV with ``header`` and one row per element of the ``columns`` (all equal length)."""
    row = ",".join(formats) + "\n"  # one format call per row: 3x faster than one per field
    return ",".join(header) + "\n" + "".join(map(row.format, *[c.tolist() for c in columns]))


def write_csv(path: str, header: list[str], columns: list[np.ndarray], formats: list[str],
              option: str = "--out") -> None:
    """Write :func:`csv_text` to ``path`` atomically (``-``: stdout)."""
    write_text(path, csv_text(header, columns, formats), option)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (never the whole file in memory)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_stdin_path(option: str = "--teacher") -> str:
    """The last non-empty line of stdin: how ``--teacher -`` receives a path through a pipe."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(f"{option} -: expected a checkpoint path on stdin, but stdin is a terminal")
    lines = [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"{option} -: nothing was read from stdin; pipe in the path of a checkpoint "
                         "(e.g. `kdfine train-teacher ... | kdfine distill --teacher - ...`)")
    return lines[-1]


def _read_rows(path: Path, what: str) -> list[list[str]]:
    if not path.exists():
        raise InputError(f"{what} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path}: cannot read ({getattr(e, 'strerror', None) or e})") from e
    return [row for row in csv.reader(io.StringIO(text)) if row and any(c.strip() for c in row)]


def _parse_int(text: str, path: Path, line: int, what: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise InputError(f"{what} {path}, line {line}: '{text.strip()[:40]}' is not an integer") from None
    if not -(2**63) <= value < 2**63:  # beyond int64: no index or label can be that large
        raise InputError(f"{what} {path}, line {line}: {text.strip()[:40]} is out of range")
    return value


def read_index(path: str | os.PathLike, n: int | None = None, what: str = "index list") -> np.ndarray:
    """Read an index list: a CSV whose first column is ``index`` (header required), or one
    integer per line. Returns int64 indices in file order.

    With ``n`` given, indices must lie in ``[0, n)`` and be unique.
    """
    p = Path(path)
    rows = _read_rows(p, what)
    if not rows:
        raise InputError(f"{what} {p}: the file is empty; expected a CSV with an 'index' column")
    start = 0
    first = rows[0][0].strip()
    if first.lower() == "index":
        start = 1
    elif not first.lstrip("-").isdigit():
        raise InputError(f"{what} {p}: the first column must be 'index' (found '{first}')")
    idx = np.array([_parse_int(r[0], p, i + 1, what) for i, r in enumerate(rows) if i >= start],
                   dtype=np.int64)
    if n is not None:
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
        rows = _read_rows(p, what)
        if not rows:
            raise InputError(f"{what} {p}: the file is empty")
        head = [c.strip().lower() for c in rows[0]]
        if "label" in head:
            li = head.index("label")
            body = rows[1:]
            vals = np.array([_parse_int(r[li] if li < len(r) else "", p, i + 2, what)
                             for i, r in enumerate(body)], dtype=np.int64)
            if "index" in head:
                ii = head.index("index")
                idx = np.array([_parse_int(r[ii], p, i + 2, what) for i, r in enumerate(body)], dtype=np.int64)
                validate_index(idx, n, f"{what} {p}")
                if idx.size != n:
                    raise InputError(f"{what} {p}: lists {idx.size} samples, the training set has {n}")
                labels = np.empty(n, dtype=np.int64)
                labels[idx] = vals
            else:
                labels = vals
        else:
            labels = np.array([_parse_int(r[0], p, i + 1, what) for i, r in enumerate(rows)], dtype=np.int64)
    if labels.shape[0] != n:
        raise InputError(f"{what} {p}: has {labels.shape[0]} labels, the training set has {n} samples")
    check_label_range(labels, num_classes, f"{what} {p}")
    return labels


def check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise InputError(f"{where}: label {bad} is outside [0, {num_classes})")


def load_npy(path: str | os.PathLike, what: str, mmap: bool = False) -> np.ndarray:
    """``np.load`` with pickles refused and errors turned into one-line :class:`InputError`."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p}: no such file")
    try:
        return np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{what} {p}: not a readable .npy array ({e})") from e

"""What an image folder holds: a fingerprint of its files' contents, cheap to check again.

The **content fingerprint** of a tree is ``content-sha256:`` + the sha256 of the sorted lines
``relative path NUL sha256(file bytes)``: it changes with any added, removed, renamed or edited
file and with nothing else (not a copy to another disk, ``touch``, ``chmod`` or a hard link). It is
what checkpoints record (``data_fingerprint``), what a resumed run compares, and what the decode
cache's entries are checked against.

Reading every byte of a million photos on every command would be slow, so the fingerprint is
remembered under the tree's **stat key**: the sha256 of each file's relative path, size, mtime,
ctime and inode number. The file system sets the ctime (inode change time) itself whenever a
file's bytes or metadata change, and no ordinary tool can set it back (``touch -r``, ``os.utime``
and photo tools restore the mtime only), so an in-place edit gives another stat key, and the tree
is read and hashed again. A stat key costs one ``stat`` per file. The store is
``$KDFINE_CACHE/fingerprints/<stat key>.json``; a fingerprint also comes for free from a decode,
which reads every file anyway.

``KDFINE_VERIFY_DATA=1`` skips the store: every file is read and hashed on every command (the
check for file systems whose ctime cannot be trusted, such as some network and FUSE mounts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

PREFIX = "content-sha256:"
_VALID = re.compile(re.escape(PREFIX) + "[0-9a-f]{64}")
STORE_VERSION = 1
UNREADABLE = bytes(32)  # the digest recorded for a file that cannot be read (the decode skips it too)


def verify_all() -> bool:
    """``KDFINE_VERIFY_DATA`` set to anything but empty or 0: hash every file, every time."""
    return os.environ.get("KDFINE_VERIFY_DATA", "").strip() not in ("", "0")


@dataclass
class Tree:
    """The files of a tree in canonical order (sorted by relative path, ``/``-separated):
    ``rel`` and ``paths`` (n,), ``sizes`` and ``mtimes`` (n,) int64 from one ``stat`` each,
    ``stat_key`` (see the module docstring) and ``order`` (n,) int64: the position of each in the
    list that :func:`stat_tree` was given."""

    root: str
    rel: list[str]
    paths: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    stat_key: str
    order: np.ndarray


def stat_tree(root: str | os.PathLike, paths: Sequence[str]) -> Tree:
    """Stat every file of ``paths`` (all under ``root``) once, in canonical order. A file that
    vanished since it was listed raises FileNotFoundError (the caller names it)."""
    base = os.fspath(root).rstrip(os.sep) + os.sep
    rel = [p[len(base):].replace(os.sep, "/") if p.startswith(base) else p for p in paths]
    order = sorted(range(len(paths)), key=rel.__getitem__)
    h = hashlib.sha256(f"{STORE_VERSION}\0{os.path.realpath(root)}\n".encode("utf-8", "surrogateescape"))
    sizes, mtimes = np.empty(len(paths), np.int64), np.empty(len(paths), np.int64)
    for j, i in enumerate(order):
        st = os.stat(paths[i])
        sizes[j], mtimes[j] = st.st_size, st.st_mtime_ns
        h.update(f"{rel[i]}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n"
                 .encode("utf-8", "surrogateescape"))
    return Tree(os.fspath(root), [rel[i] for i in order], [paths[i] for i in order], sizes, mtimes, h.hexdigest(),
                np.asarray(order, np.int64))


def file_digest(path: str) -> bytes:
    """sha256 of a file's bytes (read in 1 MiB blocks); :data:`UNREADABLE` when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError:
        return UNREADABLE
    return h.digest()


def combine(tree: Tree, digests: np.ndarray) -> str:
    """The content fingerprint from per-file digests (n, 32) uint8 in ``tree``'s order."""
    h = hashlib.sha256()
    for rel, d in zip(tree.rel, digests):
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + d.tobytes() + b"\n")
    return PREFIX + h.hexdigest()


def hash_files(paths: Sequence[str], workers: int = 4) -> np.ndarray:
    """(n, 32) uint8 sha256 digests of ``paths``, read on ``workers`` threads (hashlib releases the GIL)."""
    out = np.zeros((len(paths), 32), np.uint8)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, d in enumerate(pool.map(file_digest, paths, chunksize=256)):
            out[i] = np.frombuffer(d, np.uint8)
    return out


def fingerprint(tree: Tree, store: Path | None, workers: int = 4) -> str:
    """The tree's content fingerprint: remembered under its stat key in ``store`` (a directory, or
    None for none), else computed by reading every file (then remembered)."""
    known = recall(tree, store)
    if known is not None:
        return known
    content = combine(tree, hash_files(tree.paths, workers))
    remember(tree, store, content)
    return content


def recall(tree: Tree, store: Path | None) -> str | None:
    """The fingerprint remembered for ``tree``'s stat key, or None (none, damaged, or
    ``KDFINE_VERIFY_DATA``)."""
    if store is None or verify_all():
        return None
    try:
        with open(store / f"{tree.stat_key}.json", "rb") as f:
            doc = json.loads(f.read(4096))
    except (OSError, ValueError, RecursionError):
        return None
    ok = (isinstance(doc, dict) and doc.get("version") == STORE_VERSION and doc.get("key") == tree.stat_key
          and doc.get("files") == len(tree.rel) and isinstance(doc.get("content"), str)
          and _VALID.fullmatch(doc["content"]))
    return doc["content"] if ok else None


def remember(tree: Tree, store: Path | None, content: str) -> None:
    """Record ``content`` under ``tree``'s stat key (atomically; a store that cannot be written
    only costs the next command a read of the tree)."""
    if store is None:
        return
    doc = json.dumps({"version": STORE_VERSION, "key": tree.stat_key, "files": len(tree.rel), "content": content})
    tmp = None
    try:
        store.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fp-", dir=store)
        with os.fdopen(fd, "w") as f:
            f.write(doc)
        os.replace(tmp, store / f"{tree.stat_key}.json")
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def is_content(value: object) -> bool:
    """Whether ``value`` is a content fingerprint (checkpoints from before them hold a bare hex digest)."""
    return isinstance(value, str) and bool(_VALID.fullmatch(value))

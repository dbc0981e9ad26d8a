"""The on-disk decode cache: image files -> uint8 (N, S, S, C) arrays, written once, memory-mapped.

An entry is a directory ``$KDFINE_CACHE/decoded/<key>/`` holding ``.npy`` arrays and a
``manifest.json`` (what was decoded, how, and which files were skipped). It is built in a private
temporary directory and renamed into place only when complete, so a run killed while decoding
leaves nothing that a later run trusts (the orphan is removed by the next build).

Decoding runs on a thread pool (PIL releases the GIL while it decodes and resizes) and keeps at
most a few chunks of images in memory: finished chunks are appended to the array file in order,
so the process never holds the decoded set. Reading an entry back maps the files; nothing is
loaded until it is touched, and :func:`release_pages` drops the touched pages from this process
(the kernel's page cache keeps them), which bounds the resident size of a streamed epoch.

When the cache directory cannot be written (``KDFINE_CACHE`` names a file, a read-only disk, a
disk that fills up while decoding), one warning is issued and the images are decoded into memory
for this run only (rows already written are read back, not decoded again).

An entry is checked when it is opened (:func:`open_entry`): the manifest's own fields, and every
array file against its header and the manifest (a truncated or reshaped file, another dtype);
the caller checks what only it knows (shapes against the decode, labels, kept positions). A
damaged entry is decoded again, with one warning. The entry's key follows the files' names,
sizes and mtimes; that the bytes are still the ones decoded is checked against the tree's content
fingerprint (:mod:`kdfine.data.identity`), which the manifest records.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kdfine.data.decode import DecodeSpec, decode_image
from kdfine.data.identity import UNREADABLE, Tree, file_digest
from kdfine.errors import InputError, KdfineWarning
from kdfine.files.rows import npy_layout
from kdfine.runtime.paths import cache_dir

CACHE_VERSION = 4  # 4: kept positions as arrays (file names come from the tree, never the manifest), content
HEADER_BYTES = 128  # fixed .npy header length, so the row count can be rewritten in place
CHUNK = 64  # images per decode task
MANIFEST_BYTES = 256 << 20  # a manifest larger than this is not one kdfine wrote (its skipped list included)


def decode_workers() -> int:
    """Decode threads: one per core the process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def tree_key(tree: Tree, names: Sequence[str], params: dict[str, Any]) -> str:
    """Cache key of a tree's files (stat once by :func:`kdfine.data.identity.stat_tree`): every
    file's name in the decode (``names``, in the tree's order: split and relative path), byte size
    and mtime, plus ``params`` (image size, resize mode, ...). Any added, removed, renamed or
    touched file, or another decode parameter, gives another key; an edit that keeps the size and
    restores the mtime does not, and is caught by the entry's content fingerprint instead."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, params], sort_keys=True).encode())
    for name, size, mtime in zip(names, tree.sizes.tolist(), tree.mtimes.tolist()):
        h.update(f"{name}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------- decoding

class SizeMismatch(Exception):
    """An image whose (upright) size differs from the one every image must have."""

    def __init__(self, path: str | Path, size: tuple[int, int], expected: tuple[int, int]):
        super().__init__(f"{path} is {size[0]}x{size[1]}, not {expected[0]}x{expected[1]}")
        self.path, self.size, self.expected = path, size, expected


@dataclass
class _Block:
    pixels: np.ndarray  # (n ok, S, S, C)
    errors: list[tuple[int, str]]  # (position in the chunk, reason)
    colour: bool
    sizes: set
    digests: np.ndarray | None = None  # (len(files), 32) sha256 of each file's bytes, when asked for


def _decode_chunk(files: Sequence[str | Path], spec: DecodeSpec, require: tuple[int, int] | None,
                  digests: bool = False) -> _Block:
    """Decode ``files`` into one block; unreadable ones are left out and listed. ``digests``: also
    hash each file's bytes (the tree's content fingerprint), read once for both up to
    :data:`READ_ONCE` bytes."""
    out = np.empty((len(files), spec.size, spec.size, spec.channels), np.uint8)
    block = _Block(out, [], False, set(), np.zeros((len(files), 32), np.uint8) if digests else None)
    n = 0
    for i, f in enumerate(files):
        source: Any = f
        if block.digests is not None:
            data, digest = _read_and_hash(str(f))
            block.digests[i] = np.frombuffer(digest, np.uint8)
            source = f if data is None else io.BytesIO(data)
        try:
            out[n], colour, size = _decode_read(source, f, spec)
        except MemoryError:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on damaged files
            block.errors.append((i, f"{type(e).__name__}: {e}"))
            continue
        if require is not None and size != require:
            raise SizeMismatch(f, size, require)
        n += 1
        block.colour |= colour
        block.sizes.add(size)
    block.pixels = out[:n]
    return block


READ_ONCE = 16 << 20  # files up to this size are read once, hashed and decoded from memory (per decode thread)


def _read_and_hash(path: str) -> tuple[bytes | None, bytes]:
    """(the file's bytes when at most :data:`READ_ONCE`, else None; its sha256). A file that cannot
    be read gets :data:`kdfine.data.identity.UNREADABLE` (decoding it fails too, and says why)."""
    try:
        with open(path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size <= READ_ONCE:
                data = f.read(READ_ONCE + 1)
                if len(data) <= READ_ONCE:
                    return data, hashlib.sha256(data).digest()
    except OSError:
        return None, UNREADABLE
    return None, file_digest(path)


def _decode_read(source: Any, path: str | Path, spec: DecodeSpec) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """:func:`decode_image` of the bytes already read (``source``); when they do not decode, the
    file is decoded by name, so the error reported names it as a direct decode would."""
    try:
        return decode_image(source, spec)
    except MemoryError:
        raise
    except Exception:
        if source is path:
            raise
        return decode_image(path, spec)


def _ordered(pool: ThreadPoolExecutor, fn: Callable, items: list, window: int) -> Iterable:
    """``pool.map(fn, items)`` with at most ``window`` results pending: a bounded buffer."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


@dataclass
class Decoded:
    """The result of :func:`decode_into`: ``kept`` positions (into the file list) of the rows
    written, ``skipped`` ``(position, reason)``, per-channel sums of the pixels and of their
    squares (exact integers in float64, for mean/std without reading the array again), whether
    any image was colour, the distinct upright original sizes (at most 11) and, when asked for,
    every file's sha256 (len(files), 32) uint8."""

    kept: np.ndarray
    skipped: list[tuple[int, str]]
    sums: np.ndarray
    squares: np.ndarray
    colour: bool
    sizes: set
    digests: np.ndarray | None = None


def decode_into(sink: "ArraySink", files: Sequence[str | Path], spec: DecodeSpec, *, quiet: bool = False,
                label: str = "decoding", workers: int | None = None,
                require: tuple[int, int] | None = None, digests: bool = False) -> Decoded:
    """Decode ``files`` in parallel into ``sink``, in file order, skipping unreadable ones.
    ``require``: the upright size every image must have (else :class:`SizeMismatch`);
    ``digests``: also hash every file's bytes (``Decoded.digests``)."""
    workers = workers or decode_workers()
    chunks = [list(range(lo, min(lo + CHUNK, len(files)))) for lo in range(0, len(files), CHUNK)]
    out = Decoded(np.zeros(0, np.int64), [], np.zeros(spec.channels), np.zeros(spec.channels), False, set(),
                  np.zeros((len(files), 32), np.uint8) if digests else None)
    kept: list[int] = []
    with _progress(len(files), label, quiet) as advance, ThreadPoolExecutor(workers) as pool:
        work = lambda rows: (rows, _decode_chunk([files[i] for i in rows], spec, require, digests))
        for rows, block in _ordered(pool, work, chunks, 2 * workers):
            if out.digests is not None:
                out.digests[rows[0]:rows[-1] + 1] = block.digests
            bad = {rows[i] for i, _ in block.errors}
            kept += [r for r in rows if r not in bad]
            out.skipped += [(rows[i], why) for i, why in block.errors]
            sink.append(block.pixels)
            flat = block.pixels.reshape(-1, spec.channels).astype(np.float64)
            out.sums += np.ones(len(flat)) @ flat  # exact: integer sums far below 2**53
            out.squares += np.einsum("ij,ij->j", flat, flat)
            out.colour |= block.colour
            for size in block.sizes:
                if len(out.sizes) < 11:
                    out.sizes.add(size)
            advance(len(rows))
    out.kept = np.asarray(kept, np.int64)
    return out


@contextlib.contextmanager
def _progress(total: int, label: str, quiet: bool):
    """A rich progress bar on stderr for decodes of 2000 images or more; yields ``advance(n)``."""
    if quiet or total < 2000:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


# ---------------------------------------------------------------------------------- array files

def _npy_header(shape: tuple[int, ...]) -> bytes:
    body = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}".encode("latin1")
    pad = HEADER_BYTES - 10 - len(body) - 1
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", HEADER_BYTES - 10) + body + b" " * pad + b"\n"


class ArraySink:
    """Rows of a uint8 array (n, *row_shape) appended in order: to a ``.npy`` file (``path``), so
    that only the chunk being written is in memory, or to memory (``path`` None, at most
    ``capacity`` rows). :meth:`finish` returns the array (memory-mapped when on disk).

    The file is written unbuffered, so every row counted is on disk; when a write fails,
    ``on_error(err)`` is called (it must call :meth:`to_memory`, which reads those rows back) and
    the sink goes on in memory. Without ``on_error`` the error is raised."""

    def __init__(self, row_shape: tuple[int, ...], capacity: int, path: Path | None = None,
                 on_error: Callable[[OSError], None] | None = None):
        self.row_shape, self.path, self.n, self.capacity = tuple(row_shape), path, 0, capacity
        self.on_error, self.done, self.buf = on_error, False, None
        if path is None:
            self.buf = np.empty((capacity, *row_shape), np.uint8)
        else:
            self.file = open(path, "wb", buffering=0)
            self._write(_npy_header((0, *row_shape)))

    def _write(self, data) -> None:
        view = memoryview(data)
        if view.nbytes == 0:
            return
        view = view.cast("B")
        while len(view):
            view = view[self.file.write(view):]

    def _failed(self, err: OSError) -> None:
        if self.on_error is None:
            raise err
        self.on_error(err)
        self.to_memory()

    def append(self, block: np.ndarray) -> None:
        if self.path is not None:
            try:
                self._write(np.ascontiguousarray(block).data)
            except OSError as e:
                self._failed(e)
        if self.path is None:
            self.buf[self.n:self.n + len(block)] = block
        self.n += len(block)

    def to_memory(self) -> None:
        """Go on in memory: the rows written so far are read back from the file, which is closed."""
        if self.path is None or self.done:
            return
        self.file.close()
        buf = np.empty((self.capacity, *self.row_shape), np.uint8)
        with open(self.path, "rb") as f:
            f.seek(HEADER_BYTES)
            view, got = memoryview(buf[:self.n].reshape(-1)), 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise InputError(f"decode cache file {self.path}: shorter than the rows written to it")
                got += k
        self.buf, self.path = buf, None

    def finish(self) -> np.ndarray:
        if self.path is not None:
            try:
                self.file.seek(0)
                self._write(_npy_header((self.n, *self.row_shape)))
                os.fsync(self.file.fileno())
                self.file.close()
                self.done = True
                return open_array(self.path)
            except OSError as e:
                self._failed(e)
        self.done = True
        return self.buf[:self.n]

    def close(self) -> None:
        if self.path is not None and not self.file.closed:
            self.file.close()


def open_array(path: Path) -> np.ndarray:
    """A ``.npy`` file as a copy-on-write :class:`numpy.memmap` (writable, never written back;
    nothing is read until touched)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if fortran or int(np.prod(shape)) == 0:
        return np.load(path, allow_pickle=False)
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of ``array``'s memory map (if it has one) from this process's resident set;
    the kernel's page cache keeps them, so the next read is still fast."""
    _advise(array, "MADV_DONTNEED")


def advise_random(array: np.ndarray) -> None:
    """Tell the kernel that ``array``'s memory map is read in random rows: no read-ahead and no
    mapping of neighbouring pages on a fault, which would swell the resident set of a streamed epoch."""
    _advise(array, "MADV_RANDOM")


def _advise(array: np.ndarray, advice: str) -> None:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, mmap.mmap) and hasattr(mmap, advice):
        with contextlib.suppress(OSError, ValueError):
            base.madvise(getattr(mmap, advice))


# --------------------------------------------------------------------------------------- entries

def entry_dir(key: str) -> Path:
    return cache_dir() / "decoded" / key


class Damaged(ValueError):
    """A cache entry that is not what kdfine wrote (the message says what is wrong)."""


_NAME = re.compile(r"[a-z][a-z0-9_]{0,40}")
_DTYPES = (np.dtype(np.uint8), np.dtype(np.int64))


def open_entry(key: str, check: Callable[[dict[str, Any], dict[str, np.ndarray]], None] | None = None
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """A complete cache entry's manifest and memory-mapped arrays, checked; or None: no entry, one
    of another cache version (both silently), or a damaged one (one warning). The caller then
    decodes it again. ``check(manifest, arrays)`` raises :class:`Damaged` for what only the caller
    can tell (shapes against the decode, labels, positions)."""
    d = entry_dir(key)
    if not os.path.lexists(d):
        return None
    try:
        manifest = _read_manifest(d)
        if manifest.get("version") != CACHE_VERSION:
            return None  # another kdfine version's entry: rebuilt, not damaged
        _check_manifest(manifest, key)
        arrays = {name: checked_array(d / f"{name}.npy", name) for name in manifest["arrays"]}
        if check is not None:
            check(manifest, arrays)
        return manifest, arrays
    except (OSError, ValueError, RecursionError) as e:  # Damaged is a ValueError
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        warnings.warn(f"decode cache entry {d} is damaged ({why[:200]}); decoding the images again",
                      KdfineWarning, stacklevel=3)
        return None


def _read_manifest(d: Path) -> dict[str, Any]:
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise Damaged("it is not a directory")
    with open(d / "manifest.json", "rb", opener=_nofollow) as f:
        raw = f.read(MANIFEST_BYTES + 1)
    if len(raw) > MANIFEST_BYTES:
        raise Damaged(f"manifest.json is larger than {MANIFEST_BYTES >> 20} MiB")
    manifest = json.loads(raw)
    if not isinstance(manifest, dict):
        raise Damaged("manifest.json is not a JSON object")
    return manifest


def _check_manifest(manifest: dict[str, Any], key: str) -> None:
    """The fields every entry has: its key, and the names of its arrays."""
    if manifest.get("key") != key:
        raise Damaged(f"manifest.json names the key {str(manifest.get('key'))[:40]!r}")
    names = manifest.get("arrays")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and _NAME.fullmatch(n) for n in names):
        raise Damaged("manifest.json's 'arrays' is not a list of array names")


def checked_array(path: Path, name: str) -> np.ndarray:
    """``path`` mapped (:func:`open_array`) after checking that it is a regular file (not a link)
    whose length is exactly what its ``.npy`` header declares, of dtype uint8 or int64, C order."""
    with open(path, "rb", opener=_nofollow) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Damaged(f"{name}.npy is not a regular file")
        try:
            shape, fortran, dtype, offset = npy_layout(f)
        except (ValueError, SyntaxError) as e:
            raise Damaged(f"{name}.npy has no valid .npy header ({str(e)[:80]})") from None
    if fortran or dtype not in _DTYPES:
        raise Damaged(f"{name}.npy holds {dtype}{' (Fortran order)' if fortran else ''}, not uint8 or int64")
    want = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if st.st_size != want:
        raise Damaged(f"{name}.npy is {st.st_size} bytes, its header {tuple(shape)} {dtype} says {want}")
    return open_array(path)


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


class EntryWriter:
    """Builds the entry for ``key`` in a private temporary directory; :meth:`commit` writes the
    manifest and renames the directory into place. When the cache directory cannot be written,
    from the start or part-way (a full disk), it warns once and keeps everything in memory."""

    def __init__(self, key: str):
        self.key, self.final, self.arrays = key, entry_dir(key), {}
        self.tmp: Path | None = None
        self.sinks: list[ArraySink] = []
        self.warned = False
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            _remove_orphans(self.final.parent)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{os.getpid()}-", dir=self.final.parent))
        except OSError as e:
            self.to_memory(e)

    def __enter__(self) -> "EntryWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:  # an error or an interrupt while building: leave nothing behind
            self.abort()

    @property
    def on_disk(self) -> bool:
        return self.tmp is not None

    def to_memory(self, err: OSError) -> None:
        """The cache cannot be written (``err``): one warning; every array built so far and every
        sink go on in memory; the temporary directory is removed."""
        if not self.warned:
            self.warned = True
            warnings.warn(f"decode cache {cache_dir()}: cannot write ({err.strerror or err}); decoding into memory "
                          "for this run only (free space there, or set KDFINE_CACHE to a writable directory with room)",
                          KdfineWarning, stacklevel=4)
        for s in self.sinks:
            s.to_memory()
        self.arrays = {k: np.array(v) for k, v in self.arrays.items()}
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def sink(self, name: str, row_shape: tuple[int, ...], capacity: int) -> ArraySink:
        s = None
        if self.tmp is not None:
            try:
                s = ArraySink(row_shape, capacity, self.tmp / f"{name}.npy", on_error=self.to_memory)
            except OSError as e:
                self.to_memory(e)
        s = s or ArraySink(row_shape, capacity)
        self.sinks.append(s)
        return s

    def grey(self, name: str, array: np.ndarray) -> np.ndarray:
        """Keep only channel 0 of ``name``, an (N, S, S, 3) array decoded from grey images (whose
        three channels are equal); streamed, chunk by chunk."""
        sink = self.sink(f"{name}_grey", (*array.shape[1:3], 1), len(array))
        for lo in range(0, len(array), 1024):
            sink.append(array[lo:lo + 1024, ..., :1])
            release_pages(array)
        out = sink.finish()
        if self.tmp is not None:
            try:
                os.replace(self.tmp / f"{name}_grey.npy", self.tmp / f"{name}.npy")  # the map reads the renamed file
            except OSError as e:
                self.to_memory(e)
                out = np.array(out)
        self.arrays[name] = out
        return out

    def add(self, name: str, array: np.ndarray) -> None:
        """Record a finished array (from a sink, or a small one such as labels) under ``name``."""
        if self.tmp is not None and not (self.tmp / f"{name}.npy").exists():
            try:
                with open(self.tmp / f"{name}.npy", "wb") as f:
                    np.save(f, array, allow_pickle=False)
            except OSError as e:
                self.to_memory(e)
        self.arrays[name] = array if self.tmp is not None or not isinstance(array, np.memmap) else np.array(array)

    def commit(self, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
        """Publish the entry; returns its arrays, mapped from the published files (the maps of the
        build name files that the rename moved, and streamed batches open the file by name). A
        failure to publish only costs the next run time."""
        if self.tmp is None:
            return self.arrays
        manifest = {**manifest, "key": self.key, "version": CACHE_VERSION, "arrays": sorted(self.arrays)}
        try:
            with open(self.tmp / "manifest.json", "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.islink(self.final) or os.path.isfile(self.final):
                os.unlink(self.final)
            elif os.path.lexists(self.final):  # a damaged entry that open_entry refused
                shutil.rmtree(self.final, ignore_errors=True)
            os.rename(self.tmp, self.final)
            return {name: open_array(self.final / f"{name}.npy") for name in self.arrays}
        except OSError as e:
            if os.path.isdir(self.final) and e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                self.abort()  # another process published the same entry first: the maps stay valid, unnamed
                return self.arrays
            self.to_memory(e)
        return self.arrays

    def abort(self) -> None:
        for s in self.sinks:
            s.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _remove_orphans(parent: Path) -> None:
    """Delete temporary entries of this user whose building process (same host) is gone: killed
    decodes. Links and other users' directories are left alone."""
    for d in parent.glob(".*.tmp-*"):
        try:
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            pid = int(d.name.split(".tmp-")[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue

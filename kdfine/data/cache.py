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

When the cache directory cannot be written (``KDFINE_CACHE`` names a file, a read-only disk),
one warning is issued and the images are decoded into memory for this run only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kdfine.errors import KdfineWarning

CACHE_VERSION = 3
HEADER_BYTES = 128  # fixed .npy header length, so the row count can be rewritten in place
CHUNK = 64  # images per decode task
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def cache_dir() -> Path:
    """``$KDFINE_CACHE`` or ``~/.cache/kdfine``: decoded image folders live here."""
    return Path(os.environ.get("KDFINE_CACHE") or Path.home() / ".cache" / "kdfine")


def decode_workers() -> int:
    """Decode threads: one per core the process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def tree_key(entries: Iterable[tuple[str, str | Path]], params: dict[str, Any]) -> str:
    """Cache key of a file list: every ``(name, path)``'s name, byte size and mtime, plus
    ``params`` (image size, resize mode, ...). Any added, removed, renamed or touched file, or
    another decode parameter, gives another key."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, params], sort_keys=True).encode())
    for name, path in entries:
        st = os.stat(path)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------- decoding

@dataclass(frozen=True)
class DecodeSpec:
    """How every image is decoded: ``size`` x ``size`` pixels, ``channels`` 1 (all grey) or 3;
    ``resize`` 'crop' (shorter side to ``size``, centre crop) or 'squash' (both sides to
    ``size``); ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when that is still larger
    than needed."""

    size: int
    channels: int
    resize: str = "crop"
    draft: bool = True


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block is no orientation, not an unreadable image
        return 1


def probe(path: str | Path) -> tuple[bool, int, int]:
    """Header only: ``(is colour, width, height)`` of the upright image (EXIF orientation
    applied). Raises on files PIL cannot identify."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if _orientation(im) in (5, 6, 7, 8):
            w, h = h, w
        return im.mode not in GREY_MODES, w, h


def _eight_bit(im, channels: int):
    """Any PIL mode -> 'L' or 'RGB': 16/32-bit and float grey scaled to 0..255 (not clipped),
    palette and alpha composited on white, grey replicated to 3 channels when ``channels`` is 3."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and a.max(initial=0) <= 1.0 else 255.0 if a.max(initial=0) <= 255 else 65535.0
        im = Image.fromarray(np.round(np.clip(a, 0, top) * (255.0 / top)).astype(np.uint8), "L")
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB" if channels == 3 else "L")


def decode_image(path: str | Path, spec: DecodeSpec) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """One file -> ``(pixels, is colour, (width, height))``: pixels (size, size, channels) uint8,
    upright and resized as ``spec`` says; the size is the upright original's."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        w, h = im.size
        colour = im.mode not in GREY_MODES
        orientation = _orientation(im)
        s = spec.size
        if spec.draft and im.format == "JPEG" and min(w, h) > s:
            short = min(w, h)
            want = (s, s) if spec.resize == "squash" else (math.ceil(w * s / short), math.ceil(h * s / short))
            im.draft(im.mode, want)
        if orientation > 1:
            im = ImageOps.exif_transpose(im)
            w, h = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        im = _eight_bit(im, spec.channels)
    if im.size != (s, s):
        box = None
        if spec.resize == "crop":
            cw, ch = im.size
            short = min(cw, ch)
            box = ((cw - short) / 2, (ch - short) / 2, (cw + short) / 2, (ch + short) / 2)
        im = im.resize((s, s), Image.BILINEAR, box=box)
    a = np.asarray(im, dtype=np.uint8)
    return (a[..., None] if a.ndim == 2 else a), colour, (w, h)


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


def _decode_chunk(files: Sequence[str | Path], spec: DecodeSpec, require: tuple[int, int] | None) -> _Block:
    """Decode ``files`` into one block; unreadable ones are left out and listed."""
    out = np.empty((len(files), spec.size, spec.size, spec.channels), np.uint8)
    block = _Block(out, [], False, set())
    n = 0
    for i, f in enumerate(files):
        try:
            out[n], colour, size = decode_image(f, spec)
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
    any image was colour, and the distinct upright original sizes (at most 11)."""

    kept: np.ndarray
    skipped: list[tuple[int, str]]
    sums: np.ndarray
    squares: np.ndarray
    colour: bool
    sizes: set


def decode_into(sink: "ArraySink", files: Sequence[str | Path], spec: DecodeSpec, *, quiet: bool = False,
                label: str = "decoding", workers: int | None = None,
                require: tuple[int, int] | None = None) -> Decoded:
    """Decode ``files`` in parallel into ``sink``, in file order, skipping unreadable ones.
    ``require``: the upright size every image must have (else :class:`SizeMismatch`)."""
    workers = workers or decode_workers()
    chunks = [list(range(lo, min(lo + CHUNK, len(files)))) for lo in range(0, len(files), CHUNK)]
    out = Decoded(np.zeros(0, np.int64), [], np.zeros(spec.channels), np.zeros(spec.channels), False, set())
    kept: list[int] = []
    with _progress(len(files), label, quiet) as advance, ThreadPoolExecutor(workers) as pool:
        work = lambda rows: (rows, _decode_chunk([files[i] for i in rows], spec, require))
        for rows, block in _ordered(pool, work, chunks, 2 * workers):
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
    ``capacity`` rows). :meth:`finish` returns the array (memory-mapped when on disk)."""

    def __init__(self, row_shape: tuple[int, ...], capacity: int, path: Path | None = None):
        self.row_shape, self.path, self.n = tuple(row_shape), path, 0
        if path is None:
            self.buf = np.empty((capacity, *row_shape), np.uint8)
        else:
            self.file = open(path, "wb")
            self.file.write(_npy_header((0, *row_shape)))

    def append(self, block: np.ndarray) -> None:
        if self.path is None:
            self.buf[self.n:self.n + len(block)] = block
        else:
            self.file.write(np.ascontiguousarray(block).data)
        self.n += len(block)

    def finish(self) -> np.ndarray:
        if self.path is None:
            return self.buf[:self.n]
        self.file.seek(0)
        self.file.write(_npy_header((self.n, *self.row_shape)))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return open_array(self.path)

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


def file_rows(array: np.ndarray) -> tuple[str, int] | None:
    """``(file, byte offset of row 0)`` when ``array`` is C-contiguous rows of a memory-mapped
    file, so rows can be read with ``os.preadv`` instead of through the map (whose faults map
    whole neighbourhoods of pages into the process); else None."""
    name = getattr(array, "filename", None)
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if name is None or not isinstance(base, mmap.mmap) or not array.flags.c_contiguous:
        return None
    try:  # the file must still be there under that name, at least as long as the map
        if os.stat(name).st_size < len(base):
            return None
    except OSError:
        return None
    start = np.frombuffer(base, np.uint8).ctypes.data
    return name, array.ctypes.data - start + (getattr(array, "offset", 0) // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY


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


def open_entry(key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """A complete cache entry's manifest and memory-mapped arrays, or None (missing or damaged:
    the caller rebuilds it)."""
    d = entry_dir(key)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        if manifest.get("key") != key or manifest.get("version") != CACHE_VERSION:
            return None
        return manifest, {name: open_array(d / f"{name}.npy") for name in manifest["arrays"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


class EntryWriter:
    """Builds the entry for ``key`` in a private temporary directory; :meth:`commit` writes the
    manifest and renames the directory into place. Without a writable cache directory it warns
    once and keeps everything in memory."""

    def __init__(self, key: str):
        self.key, self.final, self.arrays = key, entry_dir(key), {}
        self.tmp: Path | None = None
        self.sinks: list[ArraySink] = []
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            _remove_orphans(self.final.parent)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{os.getpid()}-", dir=self.final.parent))
        except OSError as e:
            warnings.warn(f"decode cache {cache_dir()} is not writable ({e.strerror or e}); decoding into "
                          "memory for this run only (set KDFINE_CACHE to a writable directory)",
                          KdfineWarning, stacklevel=3)

    def __enter__(self) -> "EntryWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:  # an error or an interrupt while building: leave nothing behind
            self.abort()

    @property
    def on_disk(self) -> bool:
        return self.tmp is not None

    def sink(self, name: str, row_shape: tuple[int, ...], capacity: int) -> ArraySink:
        s = ArraySink(row_shape, capacity, None if self.tmp is None else self.tmp / f"{name}.npy")
        self.sinks.append(s)
        return s

    def grey(self, name: str, array: np.ndarray) -> np.ndarray:
        """Keep only channel 0 of ``name``, an (N, S, S, 3) array decoded from grey images (whose
        three channels are equal); streamed, chunk by chunk."""
        tmp = None if self.tmp is None else self.tmp / f"{name}.grey.npy"
        sink = ArraySink((*array.shape[1:3], 1), len(array), tmp)
        self.sinks.append(sink)
        for lo in range(0, len(array), 1024):
            sink.append(array[lo:lo + 1024, ..., :1])
            release_pages(array)
        out = sink.finish()
        if tmp is not None:
            os.replace(tmp, self.tmp / f"{name}.npy")  # the new map keeps reading the renamed file
        self.arrays[name] = out
        return out

    def add(self, name: str, array: np.ndarray) -> None:
        """Record a finished array (from a sink, or a small one such as labels) under ``name``."""
        if self.tmp is not None and not (self.tmp / f"{name}.npy").exists():
            np.save(self.tmp / f"{name}.npy", array, allow_pickle=False)
        self.arrays[name] = array

    def commit(self, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
        """Publish the entry; returns its arrays, mapped from the published files (the maps of the
        build name files that the rename moved, and streamed batches open the file by name). A
        failure to publish only costs the next run time (the arrays stay mapped, unnamed)."""
        if self.tmp is None:
            return self.arrays
        manifest = {**manifest, "key": self.key, "version": CACHE_VERSION, "arrays": sorted(self.arrays)}
        try:
            with open(self.tmp / "manifest.json", "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
            if self.final.exists():  # a damaged entry that open_entry refused
                shutil.rmtree(self.final, ignore_errors=True)
            os.rename(self.tmp, self.final)
            return {name: open_array(self.final / f"{name}.npy") for name in self.arrays}
        except OSError:  # another process published the same entry first, or the disk is full
            self.abort()
        return self.arrays

    def abort(self) -> None:
        for s in self.sinks:
            s.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _remove_orphans(parent: Path) -> None:
    """Delete temporary entries whose building process (same host) is gone: killed decodes."""
    for d in parent.glob(".*.tmp-*"):
        try:
            pid = int(d.name.split(".tmp-")[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue

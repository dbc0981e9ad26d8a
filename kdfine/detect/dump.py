"""Feature dumps, the files between ``eval --dump-features`` and ``detect-noise``; torch-free.

A dump ``f.npy`` is float32 (N, D), row i = dataset index i, with sidecars ``f.labels.npy`` (the
labels used, noisy ones included), ``f.logits.npy`` (N, K), ``f.json`` (which checkpoint, data
spec, split, noise spec, class names; the row count and the sha256 of every file of the set; for an
image folder its ``root`` and each row's file in ``paths``, relative to the root) and, when noise
was injected, ``f.truth.npy`` (the true labels).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdfine.errors import InputError, UsageError
from kdfine.files.outputs import Outputs, check_writable, is_special
from kdfine.files.rows import file_sha256, load_npy


def sidecar(path: str | Path, suffix: str) -> Path:
    """``f.npy`` -> ``f.<suffix>`` (e.g. ``labels.npy``, ``json``)."""
    p = Path(path)
    stem = p.name[:-4] if p.name.endswith(".npy") else p.name
    return p.with_name(f"{stem}.{suffix}")


SIDECARS = ("labels.npy", "logits.npy", "truth.npy", "json")


def check_dump_path(path: str | Path) -> None:
    """Fail early unless ``path`` names a regular file in a writable directory: its sidecars are
    written beside it, which rules out ``/dev/null`` and other special files."""
    if is_special(path):
        raise UsageError(f"--dump-features {path}: not a regular file; the dump and its sidecars "
                         "(.labels.npy, .logits.npy, .json) need a file name in a directory")
    check_writable(path, "--dump-features")


def declare_dump(outputs: Outputs, path: str | Path) -> None:
    """Declare the dump ``path`` and its sidecars as outputs of a command (checked now)."""
    check_dump_path(path)
    outputs.add(path, "--dump-features", companions=[f".{s}" for s in SIDECARS])
    for suffix in ("labels.npy", "logits.npy", "json"):
        outputs.add(sidecar(path, suffix), "--dump-features")


def write_dump(path: str | Path, features: np.ndarray, logits: np.ndarray, labels: np.ndarray,
               info: dict[str, Any], truth: np.ndarray | None = None, *, outputs: Outputs | None = None) -> None:
    """Write the dump as one set: the array, its sidecars and a json that records the row count and
    the sha256 of every file of the set, so that a reader can refuse files of another dump. A truth
    sidecar of an older dump is deleted. With ``outputs`` (the command's set, which the caller
    commits), the files are only staged there; without, they are committed here."""
    if outputs is None:
        with Outputs() as own:
            write_dump(path, features, logits, labels, info, truth, outputs=own)
            own.commit()
        return
    declare_dump(outputs, path)  # again, when the caller did: declarations repeat freely
    arrays = {"features": (path, np.asarray(features, np.float32)),
              "labels": (sidecar(path, "labels.npy"), np.asarray(labels, np.int64)),
              "logits": (sidecar(path, "logits.npy"), np.asarray(logits, np.float32))}
    if truth is not None:
        outputs.add(sidecar(path, "truth.npy"), "--dump-features")
        arrays["truth"] = (sidecar(path, "truth.npy"), np.asarray(truth, np.int64))
    else:
        outputs.add(sidecar(path, "truth.npy"), "--dump-features", remove=True)
    files = {}
    for name, (p, a) in arrays.items():
        files[name] = outputs.stage(p, functools.partial(_save_npy, a))
    doc = {**info, "n": int(arrays["features"][1].shape[0]), "files": files}
    with outputs.open(sidecar(path, "json"), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)


def _save_npy(array: np.ndarray, tmp: Path) -> str:
    """Write ``array`` to ``tmp``; its sha256."""
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return file_sha256(tmp)


@dataclass
class Dump:
    """A feature dump as read back: ``features`` (and ``logits``) may be memory-mapped."""

    features: np.ndarray
    labels: np.ndarray | None
    logits: np.ndarray | None = None
    truth: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def read_dump(path: str | Path, mmap: bool = True) -> Dump:
    """Read ``f.npy`` (memory-mapped by default) and whichever sidecars exist. Validates shapes
    (labels and truth (N,), logits (N, K)), the json's fields and, when the json records the set
    (``files``), that every sidecar belongs to this array."""
    feats = load_npy(path, "--features", mmap=mmap)
    if feats.ndim != 2:
        raise InputError(f"--features {path}: expected a 2-D (N, D) array, got shape {feats.shape}")
    if feats.shape[0] == 0 or feats.shape[1] == 0:
        raise InputError(f"--features {path}: the array is empty (shape {feats.shape})")
    if not np.issubdtype(feats.dtype, np.floating):
        raise InputError(f"--features {path}: expected float features, got {feats.dtype}")
    n = feats.shape[0]
    info = _read_info(path, n)
    if info.get("dim") is not None and info["dim"] != feats.shape[1]:
        raise InputError(f"--features {path}: has {feats.shape[1]} columns but its json {sidecar(path, 'json')} "
                         f"describes {info['dim']}; the files come from different dumps: "
                         "re-run `kdfine eval --dump-features`")

    def optional(suffix: str, what: str, ndim: int, lazy: bool = False):
        p = sidecar(path, suffix)
        if not p.exists():
            return None
        a = load_npy(p, what, mmap=mmap and lazy)
        if a.ndim and a.shape[0] != n:
            raise InputError(f"{what} {p}: has {a.shape[0]} rows, the features {path} have {n}")
        if a.ndim != ndim:
            raise InputError(f"{what} {p}: has shape {a.shape}, expected {'(N,)' if ndim == 1 else '(N, K)'}")
        kind = np.floating if ndim == 2 else np.integer
        if not np.issubdtype(a.dtype, kind) or a.dtype == np.float16 and ndim == 1:
            raise InputError(f"{what} {p}: holds {a.dtype}, expected {'float' if ndim == 2 else 'integer'} values")
        if ndim == 2 and a.shape[1] == 0:
            raise InputError(f"{what} {p}: has no columns")
        return a

    logits = optional("logits.npy", "logits", 2, lazy=True)
    k = info.get("num_classes")
    if logits is not None and k is not None and logits.shape[1] != k:
        raise InputError(f"logits {sidecar(path, 'logits.npy')}: has {logits.shape[1]} columns, the dump's json "
                         f"says {k} classes")
    return Dump(feats, optional("labels.npy", "labels", 1), logits, optional("truth.npy", "truth", 1), info)


def class_names(info: dict[str, Any], k: int) -> list[str] | None:
    """The K class names a dump's json records, or None (a dump without them, or of another K)."""
    names = info.get("classes")
    if isinstance(names, list) and len(names) == k and all(isinstance(c, str) for c in names):
        return names
    return None


def row_paths(info: dict[str, Any], n: int) -> list[str] | None:
    """Each row's source file (relative to the image folder's ``root``) as the json records it, or
    None for data without files."""
    paths = info.get("paths")
    if paths is None:
        return None
    if len(paths) != n or not all(isinstance(p, str) for p in paths):
        raise InputError(f"the dump's json lists {len(paths)} image paths for {n} rows (or not all are text); "
                         "re-run `kdfine eval --dump-features`")
    return paths


_INFO_TYPES = {"num_classes": int, "n": int, "dim": int, "classes": list, "files": dict, "noise_seed": int,
               "root": str, "paths": list}
JSON_BYTES = 64 << 20  # a dump's json is a few KB (MBs with very many class names): larger is not one


def read_json(p: Path, what: str, limit: int = JSON_BYTES) -> Any:
    """A JSON file that someone else may have written, read with bounded memory: at most
    ``limit`` bytes, nesting within Python's recursion limit; else exit 3 naming the file."""
    try:
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
        if len(raw) > limit:
            raise InputError(f"{what} {p}: larger than {limit >> 20} MiB; not a kdfine JSON file")
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise InputError(f"{what} {p}: nested too deeply; not a kdfine JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{what} {p}: not valid JSON ({getattr(e, 'strerror', None) or e})") from None


def _read_info(path: str | Path, n: int) -> dict[str, Any]:
    """The dump's json (``{}`` when there is none), its fields type-checked and its file set verified."""
    jp = sidecar(path, "json")
    if not jp.exists():
        return {}
    info = read_json(jp, "--features sidecar")
    if not isinstance(info, dict):
        raise InputError(f"--features sidecar {jp}: expected a JSON object, got {type(info).__name__}")
    for key, typ in _INFO_TYPES.items():
        v = info.get(key)
        if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
            raise InputError(f"--features sidecar {jp}: '{key}' must be {'an integer' if typ is int else f'a {typ.__name__}'}"
                             f", got {json.dumps(v)[:40]}")
    if info.get("num_classes") is not None and info["num_classes"] < 1:
        raise InputError(f"--features sidecar {jp}: 'num_classes' must be >= 1, got {info['num_classes']}")
    if info.get("classes") is not None and not all(isinstance(c, str) for c in info["classes"]):
        raise InputError(f"--features sidecar {jp}: 'classes' must be a list of strings")
    for key in ("data", "label_noise", "checkpoint", "split"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise InputError(f"--features sidecar {jp}: '{key}' must be a string")
    if info.get("n") is not None and info["n"] != n:
        raise InputError(f"--features {path}: has {n} rows but its json {jp} describes a dump of {info['n']}; "
                         "the files come from different dumps: re-run `kdfine eval --dump-features`")
    if info.get("files") is not None:
        _check_set(path, info["files"], jp)
    return info


def _check_set(path: str | Path, files: dict[str, Any], jp: Path) -> None:
    """Every file of the dump has the sha256 its json recorded; a sidecar it does not list is foreign."""
    where = {"features": Path(path), **{s.split(".")[0]: sidecar(path, s) for s in SIDECARS if s != "json"}}
    for name, p in where.items():
        want = files.get(name)
        if want is None and not p.exists():
            continue
        if want is None or not p.exists() or file_sha256(p) != want:
            problem = "is missing" if not p.exists() else ("is not part of it" if want is None else "was changed")
            raise InputError(f"--features {path}: {p} {problem} (the json {jp} records another set); "
                             "the files come from different dumps: re-run `kdfine eval --dump-features`")

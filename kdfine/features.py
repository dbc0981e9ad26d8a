"""Penultimate features and logits of a model over a dataset, in dataset order; feature dumps.

A dump ``f.npy`` is float32 (N, D), row i = dataset index i, with sidecars ``f.labels.npy`` (the
labels used, noisy ones included), ``f.logits.npy`` (N, K), ``f.json`` (which checkpoint, data
spec, split, noise spec) and, when noise was injected, ``f.truth.npy`` (the true labels).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdfine.device import autocast
from kdfine.errors import InputError, UsageError
from kdfine.io import check_writable, file_sha256, is_special, load_npy
from kdfine.outputs import Outputs

if TYPE_CHECKING:  # torch is imported where it is used: reading a dump (detect-noise) never loads it
    import torch


def _inference_mode(fn):
    """``torch.inference_mode()`` as a decorator that imports torch only when called."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


@_inference_mode
def extract(model: torch.nn.Module, images: np.ndarray, mean, std, *, device: torch.device,
            batch_size: int = 512, precision: str = "auto", channels_last: bool = False,
            features: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Features (N, D) float32 (or None when ``features`` is False) and logits (N, K) float32 of
    uint8 NHWC ``images``. Under torchrun each rank computes its shard and all ranks receive the
    full arrays in dataset order."""
    import torch

    from kdfine import distributed
    from kdfine.data.batches import eval_batches

    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    n = images.shape[0]
    lo, hi = distributed.shard(n)
    feats, logits = [], []
    with autocast(device, precision):
        for x in eval_batches(images[lo:hi], mean, std, batch_size=batch_size, device=device,
                              channels_last=channels_last):
            if features:
                f, z = model.forward_both(x)
                feats.append(f.float())
            else:
                z = model(x)
            logits.append(z.float())
    model.train(was_training)
    k = _out_dim(model)
    z = torch.cat(logits) if logits else torch.zeros((0, k), device=device)
    z = distributed.gather_rows(z, n).cpu().numpy()
    if not features:
        return None, z
    f = torch.cat(feats) if feats else torch.zeros((0, model.feature_dim), device=device)
    return distributed.gather_rows(f, n).cpu().numpy(), z


def _out_dim(model: torch.nn.Module) -> int:
    from kdfine.checkpoint import unwrap

    return unwrap(model).head.out_features


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

    def optional(suffix: str, what: str, ndim: int, lazy: bool = False):
        p = sidecar(path, suffix)
        if not p.exists():
            return None
        a = load_npy(p, what, mmap=mmap and lazy)
        if a.ndim and a.shape[0] != n:
            raise InputError(f"{what} {p}: has {a.shape[0]} rows, the features {path} have {n}")
        if a.ndim != ndim:
            raise InputError(f"{what} {p}: has shape {a.shape}, expected {'(N,)' if ndim == 1 else '(N, K)'}")
        return a

    logits = optional("logits.npy", "logits", 2, lazy=True)
    k = info.get("num_classes")
    if logits is not None and k is not None and logits.shape[1] != k:
        raise InputError(f"logits {sidecar(path, 'logits.npy')}: has {logits.shape[1]} columns, the dump's json "
                         f"says {k} classes")
    return Dump(feats, optional("labels.npy", "labels", 1), logits, optional("truth.npy", "truth", 1), info)


_INFO_TYPES = {"num_classes": int, "n": int, "dim": int, "classes": list, "files": dict, "noise_seed": int}


def _read_info(path: str | Path, n: int) -> dict[str, Any]:
    """The dump's json (``{}`` when there is none), its fields type-checked and its file set verified."""
    jp = sidecar(path, "json")
    if not jp.exists():
        return {}
    try:
        info = json.loads(jp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--features sidecar {jp}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise InputError(f"--features sidecar {jp}: expected a JSON object, got {type(info).__name__}")
    for key, typ in _INFO_TYPES.items():
        v = info.get(key)
        if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
            raise InputError(f"--features sidecar {jp}: '{key}' must be {'an integer' if typ is int else f'a {typ.__name__}'}"
                             f", got {json.dumps(v)[:40]}")
    if info.get("num_classes") is not None and info["num_classes"] < 1:
        raise InputError(f"--features sidecar {jp}: 'num_classes' must be >= 1, got {info['num_classes']}")
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

"""Penultimate features and logits of a model over a dataset, in dataset order; feature dumps.

A dump ``f.npy`` is float32 (N, D), row i = dataset index i, with sidecars ``f.labels.npy`` (the
labels used, noisy ones included), ``f.logits.npy`` (N, K), ``f.json`` (which checkpoint, data
spec, split, noise spec) and, when noise was injected, ``f.truth.npy`` (the true labels).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdfine.device import autocast
from kdfine.errors import InputError, UsageError
from kdfine.io import atomic_open, atomic_save_npy, check_writable, is_special, load_npy

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


def check_dump_path(path: str | Path) -> None:
    """Fail early unless ``path`` names a regular file in a writable directory: its sidecars are
    written beside it, which rules out ``/dev/null`` and other special files."""
    if is_special(path):
        raise UsageError(f"--dump-features {path}: not a regular file; the dump and its sidecars "
                         "(.labels.npy, .logits.npy, .json) need a file name in a directory")
    check_writable(path, "--dump-features")


def write_dump(path: str | Path, features: np.ndarray, logits: np.ndarray, labels: np.ndarray,
               info: dict[str, Any], truth: np.ndarray | None = None) -> None:
    """Write the dump and its sidecars, each atomically. Sidecars first, the main file last, so
    that a complete ``f.npy`` implies complete sidecars."""
    check_dump_path(path)
    atomic_save_npy(sidecar(path, "labels.npy"), np.asarray(labels, np.int64), "--dump-features")
    atomic_save_npy(sidecar(path, "logits.npy"), np.asarray(logits, np.float32), "--dump-features")
    if truth is not None:
        atomic_save_npy(sidecar(path, "truth.npy"), np.asarray(truth, np.int64), "--dump-features")
    else:
        sidecar(path, "truth.npy").unlink(missing_ok=True)
    with atomic_open(sidecar(path, "json"), "w", "--dump-features") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    atomic_save_npy(path, np.asarray(features, np.float32), "--dump-features")


@dataclass
class Dump:
    """A feature dump as read back: ``features`` (and ``logits``) may be memory-mapped."""

    features: np.ndarray
    labels: np.ndarray | None
    logits: np.ndarray | None = None
    truth: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def read_dump(path: str | Path, mmap: bool = True) -> Dump:
    """Read ``f.npy`` (memory-mapped by default) and whichever sidecars exist; validates shapes."""
    feats = load_npy(path, "--features", mmap=mmap)
    if feats.ndim != 2:
        raise InputError(f"--features {path}: expected a 2-D (N, D) array, got shape {feats.shape}")
    if feats.shape[0] == 0 or feats.shape[1] == 0:
        raise InputError(f"--features {path}: the array is empty (shape {feats.shape})")
    if not np.issubdtype(feats.dtype, np.floating):
        raise InputError(f"--features {path}: expected float features, got {feats.dtype}")
    n = feats.shape[0]

    def optional(suffix: str, what: str, lazy: bool = False):
        p = sidecar(path, suffix)
        if not p.exists():
            return None
        a = load_npy(p, what, mmap=mmap and lazy)
        if a.shape[0] != n:
            raise InputError(f"{what} {p}: has {a.shape[0]} rows, the features {path} have {n}")
        return a

    info = {}
    jp = sidecar(path, "json")
    if jp.exists():
        try:
            info = json.loads(jp.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"--features sidecar {jp}: not valid JSON ({e})") from None
    return Dump(feats, optional("labels.npy", "labels"), optional("logits.npy", "logits", lazy=True),
                optional("truth.npy", "truth"), info)

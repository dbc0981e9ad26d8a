"""Checkpoints: safetensors files holding a model's tensors and string metadata.

Metadata (all strings; JSON where the value is not a plain string): ``format=pt``,
``kdfine_version``, ``schema``, ``arch``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``,
``std``, ``classes``, ``data``, ``label_noise``, ``stage`` (teacher/student), ``loss``, ``tau``,
``alpha``, ``seed``, ``epochs``, ``parents`` (sha256 of every teacher file), ``metrics``, ``config``.
A checkpoint alone is enough to rebuild its model. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

import kdfine
from kdfine.errors import InputError
from kdfine.io import atomic_write_bytes, file_sha256  # noqa: F401 (file_sha256: lineage uses it from here)
from kdfine.models import Classifier, build

SCHEMA = "1"
REQUIRED = ("arch", "num_classes", "in_channels", "image_size", "mean", "std", "classes")
JSON_KEYS = ("num_classes", "in_channels", "image_size", "mean", "std", "classes", "tau", "alpha", "seed",
             "epochs", "parents", "parent_paths", "metrics", "config")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode, on the requested device) and its metadata."""

    path: str
    model: Classifier
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def arch(self) -> str:
        return self.meta["arch"]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


def encode_meta(meta: dict[str, Any]) -> dict[str, str]:
    out = {"format": "pt", "kdfine_version": kdfine.__version__, "schema": SCHEMA}
    for k, v in meta.items():
        if v is None:
            continue
        out[k] = v if isinstance(v, str) and k not in JSON_KEYS else json.dumps(v, sort_keys=True)
    return out


def decode_meta(raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        if k in JSON_KEYS:
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v
        else:
            meta[k] = v
    return meta


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (DDP/compile wrappers unwrapped)."""
    model = unwrap(model)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def save(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> str:
    """Write ``model`` and ``meta`` to ``path`` atomically; returns the file's sha256."""
    data = st_save(state_tensors(model), metadata=encode_meta(meta))
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_meta(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """Metadata of a kdfine checkpoint, validated, without loading the tensors."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p}: no such file")
    if p.is_dir():
        raise InputError(f"{what} {p}: is a directory, not a checkpoint file")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise InputError(f"{what} {p}: not a readable safetensors file: truncated, damaged or another format "
                         f"({_short(e)})") from None
    if raw.get("kdfine_version") is None or any(k not in raw for k in REQUIRED):
        missing = [k for k in ("kdfine_version", *REQUIRED) if k not in raw]
        raise InputError(f"{what} {p}: a safetensors file but not a kdfine checkpoint "
                         f"(metadata lacks {', '.join(missing)})")
    meta = decode_meta(raw)
    try:
        int(meta["num_classes"]), int(meta["in_channels"]), int(meta["image_size"])
        _check_types(meta)
        if len(meta["classes"]) != int(meta["num_classes"]):
            raise ValueError("classes and num_classes disagree")
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} {p}: malformed kdfine metadata ({e})") from None
    return meta


_TYPES = {"classes": (list, str), "mean": (list, (int, float)), "std": (list, (int, float)), "parents": (list, str),
          "parent_paths": (list, str), "metrics": (dict, None), "config": (dict, None)}


def _check_types(meta: dict[str, Any]) -> None:
    """The JSON fields have the types kdfine reads them as (ValueError naming the field)."""
    for key, (outer, inner) in _TYPES.items():
        v = meta.get(key)
        if v is None and key not in REQUIRED:
            continue
        if not isinstance(v, outer) or (inner and not all(isinstance(x, inner) and not isinstance(x, bool) for x in v)):
            raise ValueError(f"'{key}' must be a JSON {'list' if outer is list else 'object'}"
                             f"{' of ' + ('strings' if inner is str else 'numbers') if inner else ''}")


def load(path: str | os.PathLike, device: str | torch.device = "cpu", what: str = "checkpoint") -> Checkpoint:
    """Rebuild the model recorded in ``path`` and load its weights; the model is in eval mode."""
    meta = read_meta(path, what)
    p = Path(path)
    model = build(meta["arch"], int(meta["num_classes"]), int(meta["in_channels"]), int(meta["image_size"]))
    try:
        tensors = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:
        raise InputError(f"{what} {p}: cannot read its tensors; the file is damaged or truncated ({_short(e)})") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k, v in tensors.items() if k in expected and expected[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise InputError(f"{what} {p}: its tensors do not match its recorded arch {meta['arch']} "
                         f"({mismatch(missing, unexpected, wrong)})")
    model.load_state_dict(tensors)
    model.to(device).eval()
    return Checkpoint(str(p), model, meta, file_sha256(p))


def mismatch(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    """The first few missing, unexpected and wrongly shaped keys of a state dict, for messages."""
    return "; ".join(x for x in (
        f"missing {', '.join(missing[:3])}" if missing else "",
        f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
        f"wrong shape {', '.join(wrong[:3])}" if wrong else "") if x)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__

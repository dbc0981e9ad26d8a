"""Checkpoints: safetensors files holding a model's tensors and string metadata.

Metadata (all strings; JSON where the value is not a plain string): ``format=pt``,
``kdfine_version``, ``schema``, ``arch``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``,
``std``, ``classes``, ``data``, ``label_noise``, ``stage`` (teacher/student), ``loss``, ``tau``,
``alpha``, ``seed``, ``epochs``, ``parents`` (sha256 of every teacher file), ``metrics``, ``config``.
A checkpoint alone is enough to rebuild its model. Writes are atomic (through :mod:`kdfine.files.outputs`).
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
from kdfine.errors import InputError, UsageError
from kdfine.files.inputs import regular_file
from kdfine.files.outputs import Outputs
from kdfine.files.rows import file_sha256
from kdfine.models import Classifier, build
from kdfine.models.meta import check_model_meta

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


def to_bytes(model: torch.nn.Module, meta: dict[str, Any]) -> tuple[bytes, str]:
    """The checkpoint file of ``model`` and ``meta`` and its sha256 (the caller writes it through its
    :class:`~kdfine.files.outputs.Outputs`)."""
    data = st_save(state_tensors(model), metadata=encode_meta(meta))
    return data, hashlib.sha256(data).hexdigest()


def save(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> str:
    """Write ``model`` and ``meta`` to ``path`` atomically; returns the file's sha256."""
    data, sha = to_bytes(model, meta)
    with Outputs() as outs:
        outs.add(path, "checkpoint")
        with outs.open(path) as f:
            f.write(data)
        outs.commit()
    return sha


def read_meta(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """Metadata of a kdfine checkpoint, validated (:func:`kdfine.models.meta.check_model_meta`),
    without loading the tensors. Exit 3 for anything but a regular file (a FIFO would block)."""
    p = regular_file(path, what, "a checkpoint file (.safetensors)")
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
        _check_types(meta)
        check_model_meta(meta)
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


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _header(p: Path, what: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of the file's tensors, from the safetensors header alone."""
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:
        raise InputError(f"{what} {p}: cannot read its tensors; the file is damaged or truncated ({_short(e)})") from None


def _skeleton(meta: dict[str, Any]) -> Classifier | None:
    """The recorded arch built on the meta device (no memory), or None when it cannot be."""
    try:
        with torch.device("meta"):
            return build(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"])
    except UsageError:
        raise
    except Exception:  # a network whose constructor needs real tensors: checked after the real build
        return None


def _check_fit(p: Path, meta: dict[str, Any], header: dict[str, tuple[tuple[int, ...], str]],
               model: torch.nn.Module, what: str) -> None:
    """The file's tensor names, shapes and kinds (float or integer) against ``model``'s."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in header]
    unexpected = [k for k in header if k not in expected]
    wrong = [k for k, (shape, dtype) in header.items() if k in expected and (
        shape != tuple(expected[k].shape) or (dtype in _FLOAT_DTYPES) != expected[k].dtype.is_floating_point)]
    if missing or unexpected or wrong:
        raise InputError(f"{what} {p}: its tensors do not match its recorded arch {meta['arch']} "
                         f"({mismatch(missing, unexpected, wrong)})")


def load(path: str | os.PathLike, device: str | torch.device = "cpu", what: str = "checkpoint") -> Checkpoint:
    """Rebuild the model recorded in ``path`` and load its weights; the model is in eval mode.
    Exit 3 for metadata out of bounds, tensors that do not fit the arch (checked on a network
    built on the meta device, before a crafted size allocates anything), NaN or inf weights."""
    meta = read_meta(path, what)
    p = Path(path)
    header = _header(p, what)
    skeleton = _skeleton(meta)
    if skeleton is not None:
        _check_fit(p, meta, header, skeleton, what)
    model = build(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"])
    _check_fit(p, meta, header, model, what)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise InputError(f"{what} {p}: cannot read its tensors; the file is damaged or truncated ({_short(e)})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"{what} {p}: holds NaN or inf weights ({', '.join(bad[:3])}); it cannot predict anything")
    model.load_state_dict(tensors)
    model.to(device).eval()
    return Checkpoint(str(p), model, meta, file_sha256(p))


def mismatch(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    """The first few missing, unexpected and wrongly shaped keys of a state dict, for messages."""
    return "; ".join(x for x in (
        f"missing {', '.join(missing[:3])}" if missing else "",
        f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
        f"wrong shape or type {', '.join(wrong[:3])}" if wrong else "") if x)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__

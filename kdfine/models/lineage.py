"""A checkpoint's lineage: the teachers it was distilled from, found by sha256, recursively.

Each recorded parent sha256 is looked up among the files the user names (``--parent``), the
recorded ``parent_paths`` and the ``.safetensors`` files beside the child; a parent not found is
reported with ``found: false``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdfine.errors import InputError
from kdfine.files.rows import file_sha256
from kdfine.models import checkpoint

NODE_KEYS = ("stage", "arch", "data", "label_noise", "loss", "tau", "alpha", "metrics")


def json_list(v: Any) -> list:
    """Lists are stored as JSON strings; older files may hold them decoded or not at all."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return []
    return list(v) if isinstance(v, list) else []


class LineagePool:
    """Finds checkpoint files by sha256, hashing each candidate file at most once."""

    def __init__(self) -> None:
        self._sha: dict[Path, str] = {}
        self.used: set[str] = set()

    def sha(self, p: Path) -> str:
        key = p.resolve()
        if key not in self._sha:
            self._sha[key] = file_sha256(p)
        return self._sha[key]

    def _find(self, want: str, candidates: list[Path]) -> Path | None:
        for c in candidates:
            try:
                if c.is_file() and self.sha(c) == want:  # regular files only: never /dev/zero or a FIFO
                    return c
            except OSError:
                continue
        return None

    def lineage(self, child: Path, meta: dict[str, Any], given: list[Path], seen: set[str]) -> list[dict[str, Any]]:
        """The parent nodes of ``child`` (metadata ``meta``), each with its own ``parents``."""
        recorded = json_list(meta.get("parent_paths"))
        beside = sorted(child.parent.glob("*.safetensors"))
        return [self._node(want, recorded[i] if i < len(recorded) else None, given, beside, seen)
                for i, want in enumerate(json_list(meta.get("parents")))]

    def _node(self, want: str, hint: Any, given: list[Path], beside: list[Path], seen: set[str]) -> dict[str, Any]:
        hint = hint if isinstance(hint, str) else None
        found = self._find(want, given + ([Path(hint)] if hint else []) + beside)
        node: dict[str, Any] = {"sha256": want, "found": found is not None,
                                "path": str(found) if found else None, "recorded_path": hint, "parents": []}
        if found is None or want in seen:
            return node
        self.used.add(want)
        try:
            pmeta = checkpoint.read_meta(found, "parent")
        except InputError as e:
            node.update(found=False, path=None, error=str(e))
            return node
        node.update({k: pmeta.get(k) for k in NODE_KEYS})
        node["parents"] = self.lineage(found, pmeta, given, seen | {want})
        return node

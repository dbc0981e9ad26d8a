"""Install requirements into this interpreter's environment on two cores: ``python scripts/install.py REQ...``.

pip installs one wheel at a time, and unpacking torch's CUDA libraries (about 5 GB) is one core's work
for a minute or more. So: one resolve (``pip install --dry-run --report``, nothing installed), then
the resolved wheels, split into two groups of about equal size, installed by two ``pip install
--no-deps`` processes at once (each wheel is given by the URL the resolve chose, so neither process
resolves again), editable projects by a third. Whatever goes wrong in planning (an older pip, an
unreadable report) falls back to one plain ``pip install REQ...``, so this never installs less.

Run by the Makefile's install step; quiet unless pip has something to say.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

try:
    import tomllib
except ImportError:  # Python 3.10: editable projects are built for the resolve, as pip does
    tomllib = None

PIP = [sys.executable, "-m", "pip", "install", "--quiet"]
UNKNOWN_SIZE = 1 << 20  # a wheel fetched from an index: its size is not in the report, and such wheels are small


def plan(reqs: list[str]) -> list[dict] | None:
    """What ``pip install REQS`` would install (the report's ``install`` entries), or None."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        r = subprocess.run([*PIP, "--dry-run", "--report", str(report), *reqs])
        if r.returncode != 0 or not report.exists():
            return None
        try:
            return json.loads(report.read_text())["install"]
        except (ValueError, KeyError):
            return None


def size(url: str) -> int:
    """Bytes a wheel unpacks to (the work of installing it: inflate, write, hash), from its zip
    directory when it is a local file."""
    parts = urlparse(url)
    if parts.scheme == "file":
        try:
            with zipfile.ZipFile(unquote(parts.path)) as z:
                return sum(i.file_size for i in z.infolist())
        except (OSError, zipfile.BadZipFile):
            pass
    return UNKNOWN_SIZE


def split(items: list[dict], n: int = 2) -> tuple[list[list[str]], list[str]]:
    """Wheel URLs in ``n`` groups of about equal unpacked bytes (largest first, each to the lightest
    group), and the editable projects' paths."""
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    editable = []
    for item in items:
        info = item["download_info"]
        if info.get("dir_info", {}).get("editable"):
            editable.append(unquote(urlparse(info["url"]).path))
    wheels = sorted(((size(i["download_info"]["url"]), i["download_info"]["url"]) for i in items
                     if "dir_info" not in i["download_info"]), reverse=True)
    for nbytes, url in wheels:
        k = load.index(min(load))
        groups[k].append(url)
        load[k] += nbytes
    return [g for g in groups if g], editable


def _name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", m[1]).lower() if m else ""


def declared(spec: str) -> tuple[str, list[str]] | None:
    """The directory of an editable ``DIR[extra,...]`` and the requirements its pyproject.toml lists
    for it and those extras, or None when they are not all written there (then pip builds it)."""
    m = re.fullmatch(r"(.+?)(?:\[([^\]]*)\])?", spec)
    path, extras = m[1], [e.strip() for e in (m[2] or "").split(",") if e.strip()]
    try:
        project = tomllib.loads((Path(path) / "pyproject.toml").read_text())["project"]
    except (AttributeError, OSError, KeyError, ValueError):
        return None
    optional = project.get("optional-dependencies", {})
    if {"dependencies", "optional-dependencies"} & set(project.get("dynamic", [])) or not set(extras) <= set(optional):
        return None
    deps = [*project.get("dependencies", []), *(d for e in extras for d in optional[e])]
    if any(_name(d) == _name(project.get("name", "")) for d in deps):
        return None  # an extra that names the project itself
    return path, deps


def main(reqs: list[str]) -> int:
    wanted, editable, i = [], [], 0
    while i < len(reqs):
        found = declared(reqs[i + 1]) if reqs[i] in ("-e", "--editable") and i + 1 < len(reqs) else None
        if found:
            editable.append(found[0])
            wanted += found[1]
            i += 2
        else:
            wanted.append(reqs[i])
            i += 1
    items = plan(wanted)
    if items is None or any("dir_info" in i["download_info"] and not i["download_info"]["dir_info"].get("editable")
                            for i in items):
        return subprocess.run([*PIP, *reqs]).returncode  # a local non-editable project: pip's own way
    groups, built = split(items)
    editable += built
    jobs = [subprocess.Popen([*PIP, "--no-deps", *g]) for g in groups]
    # setuptools warns about every editable install (folders named like the package may shadow it), a
    # screenful in each `make test`; the project is installed from its own checkout, where that is so
    quiet = {**os.environ, "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                                  "ignore:Editable installation"]))}
    jobs += [subprocess.Popen([*PIP, "--no-deps", "-e", path], env=quiet) for path in editable]
    codes = [j.wait() for j in jobs]
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

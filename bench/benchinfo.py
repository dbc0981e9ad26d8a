"""What every kdfine benchmark prints besides its numbers: the machine, the command, the date, JSON
lines and Markdown tables. Standard library only, so that it costs nothing to import."""

from __future__ import annotations

import datetime as dt
import json
from importlib import metadata
import os
import platform
import shlex
import sys
from typing import Any, Sequence


def cpu_model() -> str:
    """The CPU's model name, by kdfine's own rule (the precision probe records the same)."""
    from kdfine.runtime.precision import cpu_name

    return cpu_name()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine shows here."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, usable cores, OS and the versions of the libraries that set the speed."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": usable_cpus(), "os": platform.platform(),
                            "python": platform.python_version()}
    for dist in ("numpy", "scipy", "scikit-learn", "threadpoolctl", "torch", "torchvision"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def print_report(title: str, table: str, note: str) -> None:
    """A Markdown section for bench/RESULTS.md: title, table, then the machine, the date, ``note``
    (e.g. the load) and the command that made it."""
    m = machine()
    print(f"\n### {title}\n\n{table}\n\n{m['cpu']}, {m['cores']} cores; torch {m.get('torch', '?')}; "
          f"{now()}; {note}\nCommand: `{command_line()}`", flush=True)


def emit(record: dict[str, Any]) -> None:
    """One measurement as one JSON line on stdout, flushed at once (a long run shows progress)."""
    print(json.dumps(record, sort_keys=False), flush=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def balanced_indices(labels, per_class: int, seed: int = 0):
    """Sorted indices of ``per_class`` samples of every class in ``labels``, drawn without
    replacement with ``numpy.random.default_rng(seed)``, class by class in ascending order: the
    class-balanced subsets of the CIFAR-10 benchmarks (``--keep``)."""
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                   for c in np.unique(labels)]))


def extract_image_tree(archive, dest):
    """Extract ``archive`` (a .tar.gz holding an ImageFolder tree with ``train/`` and ``test/``,
    at its top or one folder down) into ``dest`` once, and return ``dest``. Extraction goes to
    ``dest.partial`` first and is renamed at the end, so an interrupted run never leaves a
    half-extracted tree that a later run would take as complete."""
    import shutil
    import tarfile
    from pathlib import Path

    dest = Path(dest)
    if (dest / "train").is_dir() and (dest / "test").is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"# extracting {archive} into {dest}", file=sys.stderr, flush=True)
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(tmp, filter="data")  # refuses links and paths that leave tmp
        except TypeError:  # a Python without extraction filters
            tar.extractall(tmp)
    inner = next(p.parent for p in sorted(tmp.rglob("train")) if (p.parent / "test").is_dir())
    inner.rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


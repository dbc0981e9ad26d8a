"""Pictures of kdfine's results, written as image files (PNG, PDF or SVG by the file's suffix).

Needs the optional ``plot`` extra (matplotlib); :func:`require` fails with one clear line when
it is missing, before any long work starts. Every function draws into a new figure with the
non-interactive Agg backend, writes it to the path given (a temporary that the command's outputs
commit with its other files) and closes it; nothing is shown on screen.

- :func:`score_histograms`: FINE alignment scores per class, the clean/noisy split marked.
- :func:`reliability_diagram`, :func:`confusion_matrix`: calibration and errors of a classifier.
- :func:`training_curves`: loss and accuracy per epoch of one or more ``--log`` files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdfine.errors import InputError, UsageError

IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
CLEAN_COLOUR, NOISY_COLOUR, NEUTRAL_COLOUR = "#1f77b4", "#d62728", "#7f7f7f"


def require(option: str = "--plot"):
    """Import matplotlib with the Agg backend, or fail (exit 2) naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"{option} needs matplotlib, which is not installed; "
                         "install it with: pip install 'kdfine[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_image_path(path: str, option: str = "--plot") -> Path:
    """``path`` must end in .png, .pdf or .svg and be writable (checked before long work)."""
    from kdfine.files.outputs import check_writable

    p = Path(path)
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"{option} {path}: give an image file ending in {', '.join(IMAGE_SUFFIXES)}")
    return check_writable(p, option)


def _save(fig, path: str | Path, option: str) -> str:
    """Write ``fig`` to ``path`` (a temporary of the command's outputs) in the format named by the
    suffix, then close it."""
    import matplotlib.pyplot as plt

    p = Path(path)
    try:
        with open(p, "wb") as f:
            fig.savefig(f, format=p.suffix.lower().lstrip("."), dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return str(p)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


# ------------------------------------------------------------------------------- FINE scores


MAX_CLASS_PANELS = 100


def score_histograms(path: str | Path, scores: np.ndarray, labels: np.ndarray, keep: np.ndarray,
                     classes: Sequence[str], *, is_clean: np.ndarray | None = None,
                     thresholds: Sequence[float] | None = None, title: str = "",
                     xlabel: str = "alignment score |<u_y, z/|z|>|", option: str = "--plot") -> str:
    """One histogram of alignment scores per class (the first 100 classes at most).

    scores: (N,) in [0, 1]; labels: (N,) the labels used; keep: (N,) bool, kept as clean;
    is_clean: (N,) bool, label equals the true label (bars are then coloured by the truth, else
    by the decision); thresholds: per class, the lowest kept score (NaN when nothing was kept),
    drawn as a vertical line with the rejected side shaded.
    """
    plt = require(option)
    scores, labels, keep = np.asarray(scores, float), np.asarray(labels), np.asarray(keep, bool)
    k = len(classes)
    shown = [c for c in range(min(k, MAX_CLASS_PANELS)) if (labels == c).any()]
    rows, cols = _grid(max(len(shown), 1))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), squeeze=False, sharex=True)
    lo = math.floor(20 * float(scores.min())) / 20 if scores.size else 0.0  # zoom in on the occupied range
    bins = np.linspace(max(0.0, min(lo, 0.95)), 1.0, 31)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, shown):
        m = labels == c
        s = scores[m]
        if is_clean is not None:
            groups = [(s[is_clean[m]], CLEAN_COLOUR, "label correct"), (s[~is_clean[m]], NOISY_COLOUR, "label wrong")]
        else:
            groups = [(s[keep[m]], CLEAN_COLOUR, "kept"), (s[~keep[m]], NEUTRAL_COLOUR, "rejected")]
        ax.hist([g[0] for g in groups], bins=bins, stacked=True, color=[g[1] for g in groups],
                label=[g[2] for g in groups])
        thr = thresholds[c] if thresholds is not None and c < len(thresholds) else None
        if thr is not None and math.isfinite(thr):
            ax.axvline(thr, color="black", linestyle="--", linewidth=1)
            ax.axvspan(bins[0], thr, color=NEUTRAL_COLOUR, alpha=0.15, linewidth=0, zorder=0)  # behind the bars
        ax.set_title(f"{classes[c]}: kept {int(keep[m].sum())}/{int(m.sum())}", fontsize=9)
        ax.tick_params(labelsize=7)
    first = axes.flat[0]
    handles, names = first.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1))
    names.append("split at the lowest kept score (shaded: rejected)")
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    extra = f" (first {MAX_CLASS_PANELS} of {k} classes)" if k > MAX_CLASS_PANELS else ""
    fig.suptitle((title or "FINE alignment scores per class") + extra, fontsize=11)
    fig.supxlabel(xlabel, fontsize=9, y=0.03)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path, option)


# ------------------------------------------------------------------------------- evaluation


def _reliability_axes(ax, logits: np.ndarray, labels: np.ndarray, name: str, bins: int = 15) -> None:
    from kdfine import metrics

    r = metrics.reliability(logits, labels, bins)
    edges = np.linspace(0, 1, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / bins
    acc = np.nan_to_num(np.asarray(r["accuracy"], float))
    conf = np.asarray(r["confidence"], float)
    filled = np.asarray(r["count"]) > 0
    ax.bar(centres[filled], acc[filled], width=width, color=CLEAN_COLOUR, alpha=0.8, edgecolor="white",
           label="accuracy")
    gap_lo = np.minimum(acc, np.nan_to_num(conf))[filled]
    gap = np.abs(np.nan_to_num(conf) - acc)[filled]
    # hatched outline only, so the gap reads the same above (over-) and inside (under-confident) a bar
    ax.bar(centres[filled], gap, bottom=gap_lo, width=width, facecolor="none", edgecolor=NOISY_COLOUR,
           hatch="///", linewidth=1, label="gap to mean confidence")
    counts = np.asarray(r["count"])
    for x, c in zip(centres[filled], counts[filled]):  # how much each bar stands for
        ax.text(x, 0.01, str(c), rotation=90, ha="center", va="bottom", fontsize=7, color="white")
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax); numbers: images per bin")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{name}: ECE {100 * metrics.ece(logits, labels, bins):.2f}%", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)


def _confusion_axes(fig, ax, logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], name: str) -> None:
    from kdfine import metrics

    k = len(classes)
    cm = metrics.confusion(np.asarray(logits).argmax(1), np.asarray(labels), k)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 20:
        ax.set_xticks(range(k), [str(c) for c in classes], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [str(c) for c in classes], fontsize=7)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    ax.set_title(f"{name}: top-1 {100 * float(np.trace(cm)) / max(int(cm.sum()), 1):.2f}%", fontsize=10)


def evaluation_figures(target: str, runs: list[dict[str, Any]], option: str = "--plot") -> list[str]:
    """Reliability diagrams and confusion matrices of evaluated models.

    runs: one dict per model with ``name``, ``logits`` (N, K), ``labels`` (N,), ``classes``.
    ``target`` ending in .png/.pdf/.svg: one file, a row per model (reliability | confusion).
    Any other ``target`` is a prefix: ``PREFIX.reliability.png`` and ``PREFIX.confusion.png``,
    a panel per model in each. Returns the written paths.
    """
    plt = require(option)
    n = len(runs)
    if Path(target).suffix.lower() in IMAGE_SUFFIXES:
        fig, axes = plt.subplots(n, 2, figsize=(11, 4.8 * n), squeeze=False)
        for row, r in zip(axes, runs):
            _reliability_axes(row[0], r["logits"], r["labels"], r["name"])
            _confusion_axes(fig, row[1], r["logits"], r["labels"], r["classes"], r["name"])
        fig.tight_layout()
        return [_save(fig, target, option)]
    written = []
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.8), squeeze=False)
    for ax, r in zip(axes[0], runs):
        _reliability_axes(ax, r["logits"], r["labels"], r["name"])
    fig.tight_layout()
    written.append(_save(fig, f"{target}.reliability.png", option))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 5), squeeze=False)
    for ax, r in zip(axes[0], runs):
        _confusion_axes(fig, ax, r["logits"], r["labels"], r["classes"], r["name"])
    fig.tight_layout()
    written.append(_save(fig, f"{target}.confusion.png", option))
    return written


def evaluation_paths(target: str) -> list[Path]:
    """The files :func:`evaluation_figures` will write for ``target``."""
    if Path(target).suffix.lower() in IMAGE_SUFFIXES:
        return [Path(target)]
    return [Path(f"{target}.reliability.png"), Path(f"{target}.confusion.png")]


# ------------------------------------------------------------------------------- training logs


def read_log(path: str) -> list[dict[str, Any]]:
    """The per-epoch records of a ``--log`` file (one JSON object per line; blank lines skipped)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputError(f"log {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"log {path}: is a directory, not a JSON-lines file") from None
    except UnicodeDecodeError:
        raise InputError(f"log {path}: not a text file; expected one JSON object per line (from --log)") from None
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"log {path}: line {i} is not JSON ({e.msg}); expected the --log of train-teacher "
                             "or distill") from None
        if not isinstance(rec, dict) or "epoch" not in rec:
            raise InputError(f"log {path}: line {i} has no 'epoch'; expected the --log of train-teacher or distill")
        records.append(rec)
    if not records:
        raise InputError(f"log {path}: has no epochs")
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["epoch"])
            ys.append(float(v))
    return xs, ys


def training_curves(path: str | Path, runs: list[tuple[str, list[dict[str, Any]]]], *, title: str = "",
                    option: str = "-o") -> str:
    """Loss, accuracy (train solid, test dashed), test NLL and learning rate per epoch, one colour
    per run; a fifth panel with the FINE selection (kept fraction, precision, recall) when any
    run used dynamic FINE selection."""
    plt = require(option)
    panels = [("loss", "training loss", [("loss", "-")]),
              ("accuracy", "accuracy", [("train_acc", "-"), ("test_acc", "--")]),
              ("test_nll", "test NLL", [("test_nll", "-")]),
              ("lr", "learning rate", [("lr", "-")])]
    fine = any("fine_kept" in r for _, recs in runs for r in recs)
    n = len(panels) + (1 if fine else 0)
    cols = math.ceil(n / 2)
    fig, grid = plt.subplots(2, cols, figsize=(4.6 * cols, 7.0), squeeze=False)
    for ax in grid.flat[n:]:
        ax.axis("off")
    axes = list(grid.flat[:n])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ri, (name, recs) in enumerate(runs):
        colour = colours[ri % len(colours)]
        for ax, (_, ylabel, keys) in zip(axes, panels):
            for key, style in keys:
                xs, ys = _series(recs, key)
                if xs:
                    suffix = {"train_acc": " train", "test_acc": " test"}.get(key, "")
                    ax.plot(xs, ys, style, color=colour, label=f"{name}{suffix}", marker="." if len(xs) < 30 else None)
            ax.set_ylabel(ylabel)
        if fine:
            ax = axes[-1]
            sel = [r for r in recs if "fine_kept" in r]
            if sel:
                ep = [r["epoch"] for r in sel]
                ax.plot(ep, [r["fine_kept"] / max(r["fine_total"], 1) for r in sel], "-", color=colour, marker="o",
                        label=f"{name} kept fraction")
                for key, style in (("fine_precision", "--"), ("fine_recall", ":")):
                    xs, ys = _series(sel, key)
                    if xs:
                        ax.plot(xs, ys, style, color=colour, marker=".", label=f"{name} {key[5:]}")
            ax.set_ylabel("FINE selection")
    for ax, (key, _, _) in zip(axes, panels):
        ax.set_xlabel("epoch")
        if key == "lr" and any(v > 0 for _, recs in runs for v in _series(recs, "lr")[1]):
            ax.set_yscale("log")
        if key == "accuracy":
            ax.set_ylim(None, 1.0)
    if fine:
        axes[-1].set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, option)

"""Tables and text for people: the eval table, the detection report, ``info``'s description and
the one-line training summary. Pure functions of the JSON-ready results that :mod:`kdfine.api`
returns; :mod:`kdfine.cli` prints what they build on stderr (or stdout for ``info``). Text that
comes from files (class names, paths, archs, data specs) goes through
:func:`kdfine.files.text.printable`: a terminal never receives its control characters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kdfine.files.text import printable


def train_summary(result: dict[str, Any]) -> str:
    """``wrote PATH  test top-1 X%  N img/s`` after a training command (with the best-validation
    epoch under ``--keep-best val``)."""
    m = result["metrics"]
    done = "kept {} (finished before)" if result.get("already_finished") else "wrote {}"
    parts = [done.format(printable(str(result["path"])))]
    if "test_top1" in m:
        parts.append(f"test top-1 {100 * m['test_top1']:.2f}%")
    if m.get("best_epoch") is not None:  # --keep-best val: the written weights are the best epoch's
        last = m.get("test_top1_last")
        parts.append(f"(best val {100 * m['val_top1_best']:.2f}% at epoch {m['best_epoch']}"
                     + (f"; last epoch test {100 * last:.2f}%)" if last is not None else ")"))
    if "img_per_s" in m:
        parts.append(f"{m['img_per_s']:.0f} img/s")
    return "  ".join(parts)


def eval_report(res: dict[str, Any]) -> list[Any]:
    """The eval table and its notes (rich renderables and lines)."""
    from rich.table import Table

    models = res["models"]
    t = Table(title=printable(f"{res['data']} {res['split']} ({res['n']} images)"), title_justify="left")
    t.add_column("model")
    cols = [("top1", "top-1"), ("top5", "top-5"), ("nll", "NLL"), ("ece", "ECE"),
            ("top1_true_labels", "top-1 (true labels)"), ("agreement", "agree"), ("logit_l2", "|z_s-z_t|"),
            ("kl_teacher_student", "KL(t||s)")]
    cols = [(k, h) for k, h in cols if any(k in m for m in models)]
    for _, h in cols:
        t.add_column(h, justify="right")
    names = [Path(m["model"]).name for m in models]
    for m, name in zip(models, names):
        shown = name if names.count(name) == 1 else str(m["model"])  # same-named files: their paths tell them apart
        row = [printable(f"{shown} ({m['arch']})")]
        for k, _ in cols:
            v = m.get(k)
            row.append("" if v is None else (f"{100 * v:.2f}%" if k in ("top1", "top5", "agreement", "top1_true_labels")
                                             else f"{v:.4f}"))
        t.add_row(*row)
    out: list[Any] = [t]
    for m in models:
        if m.get("parents"):
            out.append(printable(f"{Path(m['model']).name}: distilled from {', '.join(p[:12] for p in m['parents'])}"))
        if m.get("dump"):
            out.append(printable(f"wrote features {m['dump']}"))
    return out


def detection_report(report: dict[str, Any]) -> list[Any]:
    """The per-class detection table and its summary lines."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=printable(f"{report['method']} on {report.get('features') or report.get('model')}"),
              title_justify="left")
    for h in ("class", "kept", "total", "threshold", "note"):
        t.add_column(h, justify="right" if h in ("kept", "total", "threshold") else "left")
    for c in report["classes"]:
        thr = c["threshold"]
        name = c.get("name")
        label = str(c["label"]) if name in (None, str(c["label"])) else f"{c['label']} {name}"
        t.add_row(Text(printable(label)), str(c["kept"]), str(c["total"]),
                  "" if thr is None or not math.isfinite(thr) else f"{thr:.4f}", printable(c.get("note", "")))
    out: list[Any] = [t, f"kept {report['kept']}/{report['n']} ({100 * report['kept_fraction']:.1f}%), "
                         f"estimated noise rate {100 * report['estimated_noise_rate']:.1f}%"]
    if "truth" in report:
        q = report["truth"]
        out.append(f"against the true labels (noise {100 * q['true_noise_rate']:.1f}%): clean precision "
                   f"{q['precision']:.4f}  recall {q['recall']:.4f}  F1 {q['f1']:.4f}  "
                   f"AUROC {q.get('auroc', float('nan')):.4f}")
    if "suggest" in report:
        out.append(suggestion_line(report["suggest"]))
    if "note" in report:  # e.g. auto without logits ran FINE alone
        out.append(printable(report["note"]))
    return out


def suggestion_line(s: dict[str, Any]) -> str:
    """One line on the suggested labels: how many a --labels-out relabels, and how often they are right."""
    line = (f"suggested labels from {s['evidence']}: {s['relabelled']} of {s['rejected']} rejected samples at "
            f"--relabel-min-p {s['relabel_min_p']:g}")
    if s.get("top1_rejected") is not None:
        line += f"; right on {100 * s['top1_rejected']:.1f}% of the rejected"
        if s.get("top1_relabelled") is not None:
            line += f", {100 * s['top1_relabelled']:.1f}% of those relabelled"
    return line


def pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def _metrics_text(m: dict[str, Any]) -> str:
    names = [("test_top1", "test top-1", pct), ("test_top5", "top-5", pct), ("test_nll", "NLL", None),
             ("test_ece", "ECE", pct), ("train_acc", "train acc", pct), ("img_per_s", "img/s", None)]
    parts = []
    for key, label, fmt in names:
        v = (m or {}).get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{label} {fmt(v) if fmt else (f'{v:.0f}' if key == 'img_per_s' else f'{v:.4f}')}")
    return ", ".join(parts) or "none recorded"


def _training_text(d: dict[str, Any]) -> str:
    loss = d.get("loss") or "?"
    text = f"loss {loss}"
    if loss in ("kl", "kl-std"):
        text += f" (tau {d.get('tau')}, alpha {d.get('alpha')})"
    elif loss == "dkd":  # its own weights and warm-up are in the recorded options, where the record has them
        c = d.get("config") if isinstance(d.get("config"), dict) else {}
        own = "".join(f", {k.replace('_', '-')} {c[k]}" for k in ("dkd_alpha", "dkd_beta", "dkd_warmup") if k in c)
        text += f" (tau {d.get('tau')}, alpha {d.get('alpha')}{own})"
    elif loss in ("mse", "kl-inf"):
        text += f" (alpha {d.get('alpha')})"
    return text


def _lineage_lines(nodes: list[dict[str, Any]], indent: str = "") -> list[str]:
    lines = []
    for i, n in enumerate(nodes):
        last = i == len(nodes) - 1
        branch, cont = ("`-- ", "    ") if last else ("|-- ", "|   ")
        if n["found"]:
            top1 = (n.get("metrics") or {}).get("test_top1")
            desc = (f"{_shown_path(n['path'])}  {n.get('stage') or '?'} {n.get('arch')}, {_training_text(n)}, "
                    f"test top-1 {pct(top1)}  [sha256 {n['sha256'][:12]}]")
        else:
            where = f"; recorded at {n['recorded_path']}" if n.get("recorded_path") else ""
            desc = f"? sha256 {n['sha256'][:12]} not found{where} (pass --parent FILE)"
        lines.append(indent + branch + desc)
        lines += _lineage_lines(n.get("parents") or [], indent + cont)
    return lines


def _shown_path(path: str) -> str:
    """Relative to the working directory when below it (shorter to read), else as found."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def info_text(d: dict[str, Any]) -> str:
    classes = d.get("classes") or []
    shown = ", ".join(map(str, classes[:10])) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    noise = d.get("label_noise") or "none"
    if noise != "none" and d.get("noise_seed") is not None:
        noise += f" (noise seed {d['noise_seed']})"
    params = f"{d['params']:,} parameters" if isinstance(d.get("params"), int) else "parameters unknown"
    rows = [("file", f"{d['path']}  {d['file_size']:,} bytes  sha256 {d['sha256']}"),
            ("stage", f"{d.get('stage') or '?'} (kdfine {d.get('kdfine_version')}, schema {d.get('schema')})"),
            ("model", f"{d.get('arch')}, {params}, input {d.get('in_channels')}x{d.get('image_size')}x"
                      f"{d.get('image_size')}"),
            ("init", d.get("init") or "random"),
            ("classes", f"{d.get('num_classes')}: {shown}"),
            ("data", f"{d.get('data')}, label noise {noise}"),
            ("training", f"{_training_text(d)}, {d.get('epochs')} epochs, seed {d.get('seed')}"),
            ("metrics", _metrics_text(d.get("metrics") or {}))]
    lines = [f"{k:<9} {printable(str(v))}" for k, v in rows]
    if d.get("lineage"):
        lines.append("lineage   distilled from:")
        lines += ["  " + printable(line) for line in _lineage_lines(d["lineage"])]
    else:
        lines.append("lineage   none (trained from labels)")
    return "\n".join(lines)

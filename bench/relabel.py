#!/usr/bin/env python
"""Relabel or drop? The end-to-end test accuracy of a model retrained on detect-noise's decisions.

For each label noise and seed: a teacher is trained on the noisy labels, its training split dumped
(``eval --dump-features``), ``detect-noise`` splits it and suggests labels (``--labels-out`` at each
``--relabel-min-p``), and the same architecture is retrained, from the same seed, on:

- ``noisy``: the noisy labels, nothing removed;
- ``drop``: the kept samples only (``--keep``, what detect-noise has always offered);
- ``relabel@P``: every sample, the rejected ones relabelled where ``suggested_p >= P`` and left
  with their noisy label elsewhere (``--labels``);
- ``relabel@P+drop``: the relabelled ones kept with their new label, the other rejected dropped
  (``--labels`` and ``--keep``: what the review page exports when every suspect is decided by the
  rule);
- ``clean``: the true labels (the ceiling).

Prints one JSON line per retrained model (test top-1 from ``train-teacher --json``) and per
detection (the suggestion's accuracy on the rejected samples), then Markdown tables with the mean
and spread over the seeds. Finished steps are skipped on a rerun (files in ``--out``).

    python bench/relabel.py --out /tmp/relabel --seeds 0 1 2 --noises sym:0.4 asym:0.3 --epochs 12
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402


def kdfine(*args: Any, out: Path | None = None) -> dict[str, Any] | None:
    """Run ``python -m kdfine ARGS --json``; its JSON document (None when ``out`` exists already)."""
    if out is not None and out.exists():
        return None
    cmd = [sys.executable, "-m", "kdfine", *map(str, args), "--json", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return json.loads(r.stdout)


def keep_with_relabelled(clean_csv: Path, labels_csv: Path, noisy_labels: np.ndarray, dest: Path) -> int:
    """Write the kept indices plus the relabelled ones to ``dest``; their count."""
    kept = np.loadtxt(clean_csv, delimiter=",", skiprows=1, usecols=0, dtype=np.int64, ndmin=1)
    new = np.loadtxt(labels_csv, delimiter=",", skiprows=1, usecols=1, dtype=np.int64)
    idx = np.union1d(kept, np.flatnonzero(new != noisy_labels))
    dest.write_text("index\n" + "".join(f"{i}\n" for i in idx))
    return int(idx.size)


def cell(noise: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every retraining of one (noise, seed); the records."""
    d = args.out / f"{noise.replace(':', '-')}-s{seed}"
    d.mkdir(parents=True, exist_ok=True)
    common = ["--data", args.data, "--arch", args.arch, "--epochs", args.epochs, "--seed", seed]
    noisy = ["--label-noise", noise, "--noise-seed", seed]
    teacher = d / "teacher.safetensors"
    kdfine("train-teacher", *common, *noisy, "--out", teacher, out=teacher)
    dump = d / "f.npy"
    kdfine("eval", "--model", teacher, "--split", "train", "--dump-features", dump, out=dump)
    y = np.load(d / "f.labels.npy")
    variants: dict[str, list[Any]] = {"noisy": noisy}
    records = []
    for p in args.min_p:
        labels = d / f"labels-{p}.csv"
        rep = kdfine("detect-noise", "-f", dump, "--method", "gmm", "--out", d / "clean.csv", "--labels-out", labels,
                     "--relabel-min-p", p, out=None)
        records.append({"kind": "detection", "noise": noise, "seed": seed, "min_p": p, **rep["suggest"],
                        "truth": rep.get("truth")})
        keep = d / f"keep-{p}.csv"
        keep_with_relabelled(d / "clean.csv", labels, y, keep)
        variants[f"relabel@{p:g}"] = ["--labels", labels]
        if p > 0:  # at 0 every rejected sample with any other class is relabelled: nothing left to drop
            variants[f"relabel@{p:g}+drop"] = ["--labels", labels, "--keep", keep]
    variants["drop"] = [*noisy, "--keep", d / "clean.csv"]
    variants["clean"] = []  # the true labels: the same model for every noise of a seed
    for name, extra in variants.items():
        model = d / f"{name.replace('@', '-').replace('+', '-')}.safetensors"
        if name == "clean":
            model = args.out / f"clean-s{seed}.safetensors"
        doc = kdfine("train-teacher", *common, *extra, "--out", model, out=model)
        if doc is None:  # trained on an earlier run: the recorded metrics
            doc = kdfine("info", model) or {}
        top1 = (doc.get("metrics") or {}).get("test_top1", doc.get("test_top1"))
        records.append({"kind": "retrain", "noise": noise, "seed": seed, "variant": name, "test_top1": top1})
    return records


def tables(records: list[dict[str, Any]]) -> str:
    retrain = [r for r in records if r["kind"] == "retrain"]
    noises = sorted({r["noise"] for r in retrain})
    variants = list(dict.fromkeys(r["variant"] for r in retrain))
    rows = []
    for noise in noises:
        row = [noise]
        for v in variants:
            acc = [100 * r["test_top1"] for r in retrain if r["noise"] == noise and r["variant"] == v]
            row.append(f"{np.mean(acc):.2f} ± {np.std(acc):.2f}" if acc else "n/a")
        rows.append(row)
    out = "Test top-1 (%) of the retrained model, mean ± std over seeds\n\n"
    out += benchinfo.markdown_table(["noise", *variants], rows)
    det = [r for r in records if r["kind"] == "detection"]
    rows = []
    for noise in noises:
        for p in sorted({r["min_p"] for r in det}):
            rs = [r for r in det if r["noise"] == noise and r["min_p"] == p]
            mean = lambda k: np.mean([r[k] for r in rs if r.get(k) is not None])
            rows.append([noise, f"{p:g}", f"{mean('rejected'):.0f}", f"{mean('relabelled'):.0f}",
                         f"{100 * mean('top1_rejected'):.1f}", f"{100 * mean('top1_relabelled'):.1f}",
                         f"{100 * mean('labels_right_before'):.1f}", f"{100 * mean('labels_right_after'):.1f}"])
    out += "\n\nSuggestions (means over seeds)\n\n" + benchinfo.markdown_table(
        ["noise", "min_p", "rejected", "relabelled", "suggestion right on rejected %", "on relabelled %",
         "labels right before %", "after relabel %"], rows)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noises", nargs="+", default=["sym:0.4", "asym:0.3"])
    ap.add_argument("--min-p", type=float, nargs="+", default=[0.5, 0.0])
    args = ap.parse_args(argv)
    print(f"# {benchinfo.command_line()}  ({benchinfo.now()})", flush=True)
    benchinfo.emit({"machine": benchinfo.machine(), "load": benchinfo.load_average()})
    records = []
    for noise in args.noises:
        for seed in args.seeds:
            for r in cell(noise, seed, args):
                benchinfo.emit(r)
                records.append(r)
    print(tables(records))


if __name__ == "__main__":
    main()

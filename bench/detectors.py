#!/usr/bin/env python
"""Noisy-label detectors side by side: FINE (gmm, kmeans), small-loss, auto, knn and cleanlab.

For each dataset and label noise, a model is trained with cross-entropy on the noisy labels
(``kdfine train-teacher``) and its penultimate features and logits are dumped (the rows it was
trained on). On that dump every detector of ``detect-noise`` runs, and cleanlab's confident
learning as the reference a cleanlab user would run: ``find_label_issues`` on 5-fold
out-of-sample probabilities of a logistic regression on the same features. ``knn`` also runs on
the features of a "pretrained" backbone: a model trained on the *clean* labels of other samples
(CIFAR-10: a disjoint balanced 10k subset; digits: one half of the training split, the
detection on the other half).

Prints one JSON line per (dataset, noise, features, detector) with clean-set precision, recall,
F1 (clean = positive), the AUROC of the score for finding the wrong labels and the detector's wall
time, then Markdown tables. Models and dumps are cached in ``--out``; rerun to resume.

    python bench/detectors.py --datasets digits
    python bench/detectors.py --datasets digits cifar10 --epochs 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402
import reproduce_fine as rf  # noqa: E402

NOISES = ("sym:0.2", "sym:0.4", "sym:0.6", "asym:0.4", "pairflip:0.45", "uniform:0.5")
KDFINE = ("gmm", "kmeans", "small-loss", "auto", "knn")


def setup(name: str, args: argparse.Namespace, out: Path) -> tuple[rf.Setup, np.ndarray, rf.Setup, np.ndarray]:
    """(noisy-label setup, its dump rows, clean backbone setup, the rows its knn is scored on)."""
    if name == "digits":
        from kdfine.data.sources import load_source

        n = len(load_source("digits").train.labels)
        half = np.sort(np.random.default_rng(0).permutation(n)[: n // 2])
        keep_a = out / "digits-half-a.csv"
        if not keep_a.exists():
            rf.write_index(keep_a, half)
        noisy = rf.Setup("digits", "digits", "cnn", 30, [], 0, 0)
        backbone = rf.Setup("digits", "digits", "cnn", 30, [], 0, 0, keep=keep_a)
        return noisy, np.arange(n), backbone, np.setdiff1d(np.arange(n), half)
    ns = argparse.Namespace(cifar_root=args.cifar_root, archive=args.archive)
    root = rf.cifar_root(ns, out)
    keep = rf.balanced_subset(root, out / "subset.csv", per_class=args.per_class)
    other = out / "subset-backbone.csv"
    if not other.exists():
        from kdfine.data.sources import load_source

        labels = load_source(f"imagefolder:{root}").train.labels.copy()
        labels[rf.read_index(keep)] = -1  # disjoint from the detection subset
        rf.write_index(other, _balanced_excluding(labels, args.per_class))
    train = ["--lr", "0.1", "--schedule", "cosine", "--eval-every", "100", "--image-size", str(args.image_size)]
    noisy = rf.Setup("cifar10", f"imagefolder:{root}", args.arch, args.epochs, train, 0, 0, keep=keep)
    backbone = rf.Setup("cifar10", f"imagefolder:{root}", args.arch, args.epochs, train, 0, 0, keep=other)
    return noisy, rf.read_index(keep), backbone, rf.read_index(keep)


def _balanced_excluding(labels: np.ndarray, per_class: int) -> np.ndarray:
    """``per_class`` indices of every class among the rows whose label is >= 0 (seed 1)."""
    ok = np.flatnonzero(labels >= 0)
    return ok[benchinfo.balanced_indices(labels[ok], per_class, seed=1)]


def train(run: rf.Runner, s: rf.Setup, noise: str | None, path: Path, device: str, seed: int = 0) -> None:
    """``train-teacher`` on ``s`` (its ``--keep`` rows), with ``noise`` or clean labels; ``seed``: of the
    training and of the noise; cached."""
    args = ["--data", s.data, "--arch", s.arch, "--epochs", str(s.epochs), *s.train_args, "--device", device,
            "--resume", "--seed", str(seed)]
    if noise:
        args += ["--label-noise", noise, "--noise-seed", str(seed)]
    if s.keep is not None:
        args += ["--keep", s.keep]
    run.kdfine(f"{s.name}/{path.stem}", path, "train-teacher", *args, "--log", path.with_suffix(".jsonl"),
               "--out", path, "-q")


def dump(model: Path, s: rf.Setup, noise: str, rows: np.ndarray, dest: Path, device: str, seed: int = 0) -> Path:
    """Features, logits, noisy labels and truth of ``rows`` under ``model``; cached."""
    if not dest.exists():
        rf.note(f"features of {model.name} on {rows.size} rows ({noise}) -> {dest}")
        size = int(s.train_args[s.train_args.index("--image-size") + 1]) if "--image-size" in s.train_args else None
        rf.subset_dump(model, s, noise, rows, dest, device, image_size=size, noise_seed=seed)
    return dest


def prepare(name: str, args: argparse.Namespace, run: rf.Runner) -> list[tuple[str, str, Path]]:
    """Train and dump everything for one dataset: [(noise, "noisy" or "clean backbone", dump)]."""
    out = run.out / name
    out.mkdir(parents=True, exist_ok=True)
    noisy, rows, backbone, knn_rows = setup(name, args, out)
    clean_model = out / "backbone.safetensors"
    train(run, backbone, None, clean_model, args.device, args.seed)
    dumps = []
    for noise in args.noise:
        model = out / f"ce-{rf.slug(noise)}.safetensors"
        train(run, noisy, noise, model, args.device, args.seed)
        dumps.append((noise, "noisy", dump(model, noisy, noise, rows, out / f"f-{rf.slug(noise)}.npy", args.device,
                                           args.seed)))
        dumps.append((noise, "clean backbone", dump(clean_model, backbone, noise, knn_rows,
                                                   out / f"b-{rf.slug(noise)}.npy", args.device, args.seed)))
    return dumps


def cleanlab_detect(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Confident learning: ``find_label_issues`` on 5-fold out-of-sample probabilities of a
    logistic regression on the standardised features. Returns keep, score (label quality), info."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kdfine.detect import dump as features

    d = features.read_dump(path, mmap=False)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probs = cross_val_predict(model, d.features, d.labels, cv=5, method="predict_proba")
    issues = find_label_issues(d.labels, probs)
    return ~issues, get_label_quality_scores(d.labels, probs), {}


def run_detector(method: str, path: Path) -> tuple[dict[str, Any], float]:
    """Quality against the truth sidecar and wall seconds of one detector on one dump."""
    import warnings

    from kdfine.detect import command
    from kdfine import metrics
    from kdfine.detect import dump as features

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "cleanlab":
            keep, score, info = cleanlab_detect(path)
        else:
            det, report, _, _ = command.detect_noise(str(path), method=method)
            keep, score, info = det.keep, det.scores, report.get(method, {})
    seconds = time.perf_counter() - t0
    d = features.read_dump(path)
    q = metrics.detection(keep, d.labels == d.truth, score)
    return {**{k: round(v, 4) for k, v in q.items()}, **({"chose": info} if info else {})}, seconds


def table(rows: list[dict[str, Any]]) -> str:
    """One Markdown row per (dataset, noise, features): F1 / AUROC of each detector, then auto's gaps."""
    def cell(r, m):
        q = r["detectors"].get(m)
        return "–" if q is None else f"{q['f1']:.3f} / {q['auroc']:.3f}"

    methods = ("gmm", "kmeans", "small-loss", "cleanlab", "auto", "knn")
    out = []
    for r in rows:
        ref = [r["detectors"][m] for m in ("gmm", "small-loss", "cleanlab") if m in r["detectors"]]
        a = r["detectors"].get("auto")
        gap = "" if a is None or not ref else (f"{a['f1'] - max(q['f1'] for q in ref):+.3f} / "
                                               f"{a['auroc'] - max(q['auroc'] for q in ref):+.3f}")
        out.append([r["dataset"], r["noise"], r["features"], f"{100 * r['true_noise']:.1f}",
                    *[cell(r, m) for m in methods], gap])
    return benchinfo.markdown_table(["data", "noise", "features", "true noise %", *[f"{m} F1 / AUROC" for m in methods],
                                     "auto - best of FINE, small-loss, cleanlab"], out)


def times(rows: list[dict[str, Any]]) -> str:
    """Median wall seconds per detector and dataset."""
    out = []
    for name in sorted({r["dataset"] for r in rows}):
        rs = [r for r in rows if r["dataset"] == name and r["features"] == "noisy"]
        cells = [f"{np.median([r['seconds'][m] for r in rs if m in r['seconds']]):.2f}"
                 for m in ("gmm", "kmeans", "small-loss", "cleanlab", "auto", "knn")]
        out.append([name, rs[0]["n"] if rs else "", *cells])
    return benchinfo.markdown_table(["data", "N", "gmm s", "kmeans s", "small-loss s", "cleanlab s", "auto s", "knn s"], out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "cifar10"], choices=("digits", "cifar10"))
    p.add_argument("--noise", type=lambda s: [n.strip() for n in s.split(",") if n.strip()], default=list(NOISES),
                   help="comma-separated noise specs [default: %(default)s]")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "detectors", help="cache [default: %(default)s]")
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="resnet20", help="cifar10: the network of every model [default: resnet20]")
    p.add_argument("--epochs", type=int, default=4, help="cifar10: epochs per model [default: 4]")
    p.add_argument("--image-size", type=int, default=16,
                   help="cifar10: images resized to this (16: a quarter of the compute of 32) [default: 16]")
    p.add_argument("--per-class", type=int, default=1000, help="cifar10: training images per class")
    p.add_argument("--cifar-root", help="the CIFAR-10 JPEG ImageFolder tree [default: the archive, extracted]")
    p.add_argument("--archive", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    p.add_argument("--seed", type=int, default=0, help="seed of the training and of the label noise: another "
                   "seed, other sets (give another --out) [default: 0]")
    p.add_argument("--prepare-only", action="store_true", help="train and dump, detect nothing")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    run = rf.Runner(args.out, args.device)
    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        dumps = prepare(name, args, run)
        if args.prepare_only:
            continue
        for noise, kind, path in dumps:
            methods = ("knn",) if kind == "clean backbone" else KDFINE + ("cleanlab",)
            row = {"dataset": name, "noise": noise, "features": kind, "detectors": {}, "seconds": {}}
            for m in methods:
                row["detectors"][m], row["seconds"][m] = run_detector(m, path)
                row["seconds"][m] = round(row["seconds"][m], 3)
            q = next(iter(row["detectors"].values()))
            row["true_noise"], row["n"] = q["true_noise_rate"], int(np.load(path, mmap_mode="r").shape[0])
            benchinfo.emit(row)
            rows.append(row)
    if rows:
        print(f"\n{benchinfo.now()}, {benchinfo.machine()['cpu']}, {benchinfo.usable_cpus()} cores, load "
              f"{benchinfo.load_average()}\n\n    {benchinfo.command_line()}\n\nF1 (clean = positive) / AUROC of the "
              f"score for finding the wrong labels:\n\n{table(rows)}\n\nWall seconds per detector (median over the "
              f"noise settings, features of the noisy-label models):\n\n{times(rows)}")


if __name__ == "__main__":
    main()

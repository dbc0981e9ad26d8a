#!/usr/bin/env python
"""Detectors and cleaning on real human label noise: CIFAR-10N (Wei et al., ICLR 2022).

For each human label set (``aggre``: majority vote, 9.0% wrong; ``random1``: one annotator, 17.2%
wrong; the folder is the true label), on a class-balanced subset of the CIFAR-10 JPEG training
tree (``--per-class`` images per class, the human labels given with ``train-teacher --labels`` and
the subset with ``--keep``):

1. a model trained with cross-entropy on the human labels (seed 0); its features and logits of the
   subset's rows (the rows it was trained on), and how far it has fitted the wrong labels (the
   share of the wrong given labels that it predicts);
2. every detector on that dump (``detect-noise --method gmm|kmeans|small-loss|auto|knn`` and
   cleanlab's ``find_label_issues`` on 5-fold out-of-sample probabilities, as bench/detectors.py
   runs them): precision, recall, F1 (clean = positive), the AUROC of finding the wrong labels and
   wall seconds;
3. test accuracy (all 10,000 test images) of the same training on each detector's kept samples,
   of F-DivideMix (``--fine-strategy dividemix``) and of plain CE on all the human labels, for
   every ``--seeds`` (the CE model of seed 0 is the model of step 1).

Every step is cached in ``--out`` (models, dumps, kept-index CSVs) and skipped when its result
exists, and training runs with ``--resume``: rerun the same command to continue. A kept-index CSV
is written once; when a detector's selection changes afterwards (a new rule), its rows say so
(``stale``): delete the CSV and the retrained models to redo them. While a file ``PAUSE`` exists
in ``--out`` the run waits before its next step. Prints JSON lines, then Markdown tables with the
command, the date, the machine load and the seconds of each step.

    python bench/real_noise.py --cifar-root /path/to/cifar10-jpeg
    python bench/real_noise.py --cifar-root DIR --arch resnet20 --image-size 32 --per-class 5000 \
        --epochs 60 --device cuda

The defaults (an MLP, 500 images per class at 16 px, 20 epochs) are what two loaded CPU cores
allowed for every row and seed (bench/RESULTS.md, "Real human label noise").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402
import detectors as bd  # noqa: E402
import reproduce_fine as rf  # noqa: E402

#: the shared data folder beside the checkout (or beside the folder of its worktrees)
SHARED = next((p / "shared" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared" / "data").is_dir()),
              ROOT.parent / "shared")
DETECTORS = ("gmm", "kmeans", "small-loss", "auto", "knn", "cleanlab")
SETS = ("aggre", "random1")
#: the accuracy rows, in the order they are trained (F-DivideMix, about 7 CE runs of compute, last)
ROWS = ("ce", "auto", "gmm", "small-loss", "cleanlab", "knn", "kmeans", "dividemix")


def human_setup(args: argparse.Namespace, out: Path) -> rf.Setup:
    """The training recipe shared by every model: ``--arch`` on the ``--keep`` subset of the tree."""
    root = rf.cifar_root(argparse.Namespace(cifar_root=args.cifar_root, archive=args.archive), out)
    keep = rf.balanced_subset(root, out / f"subset-{args.per_class}.csv", per_class=args.per_class)
    train = ["--lr", "0.1", "--schedule", "cosine", "--eval-every", "1000", "--image-size", str(args.image_size)]
    return rf.Setup("cifar10n", f"imagefolder:{root}", args.arch, args.epochs, train, args.warmup, 1, keep=keep)


def train(run: rf.Runner, s: rf.Setup, labels: Path, keep: Path, seed: int, path: Path, device: str,
          extra: tuple[str, ...] = ()) -> None:
    """``train-teacher`` on the human ``labels``, the rows of ``keep``; cached."""
    wait_while_paused(run.out)
    run.kdfine(f"{path.parent.name}/{path.stem}", path, "train-teacher", "--data", s.data, "--labels", labels,
               "--keep", keep, "--arch", s.arch, "--epochs", s.epochs, *s.train_args, "--device", device,
               "--resume", "--seed", seed, *extra, "--log", path.with_suffix(".jsonl"), "--out", path, "-q")


def wait_while_paused(out: Path) -> None:
    """Hold the next step while ``<out>/PAUSE`` exists (someone needs the cores for a while)."""
    while (out / "PAUSE").exists():
        time.sleep(5)


def dump(run: rf.Runner, model: Path, s: rf.Setup, labels: Path, dest: Path, device: str) -> Path:
    """Features, logits, human labels and the folder labels (truth) of the subset's rows; cached."""
    if not dest.exists():
        wait_while_paused(run.out)
        rf.note(f"features of {model.name} on the {s.keep.name} rows -> {dest}")
        t0 = time.perf_counter()
        rf.subset_dump(model, s, "none", rf.read_index(s.keep), dest, device,
                       image_size=int(s.train_args[s.train_args.index("--image-size") + 1]), labels=str(labels))
        run.record(f"{dest.parent.name}/dump", time.perf_counter() - t0)
    return dest


def fitted(path: Path) -> dict[str, float]:
    """How far the dump's model fits its given labels: the share of all labels it predicts, and of
    the wrong ones (those that differ from the truth)."""
    from kdfine.detect import dump as dumps

    d = dumps.read_dump(path, mmap=False)
    hit = np.asarray(d.logits).argmax(axis=1) == d.labels
    wrong = d.labels != d.truth
    return {"given_labels_predicted": round(float(hit.mean()), 4),
            "wrong_labels_predicted": round(float(hit[wrong].mean()), 4) if wrong.any() else None,
            "true_labels_predicted": round(float((np.asarray(d.logits).argmax(axis=1) == d.truth).mean()), 4)}


def detect_all(run: rf.Runner, path: Path, d: Path, index: np.ndarray) -> dict[str, Any]:
    """Every detector on the dump: quality, seconds and a digest of today's selection (compared with
    the kept-index CSV the retrained models used when the rows are reported)."""
    out = {}
    for m in DETECTORS:
        keep, q, seconds = detector_keep(m, path)
        csv = d / f"keep-{m}.csv"
        if not csv.exists():
            rf.write_index(csv, index[keep])
        q["selection"] = _digest(index[keep])  # compared with the CSV when the rows are reported
        q["seconds"], q["kept"] = round(seconds, 3), int(keep.sum())
        out[m] = q
        run.record(f"{d.name}/detect-{m}", seconds)
    return out


def _digest(rows: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def detector_keep(method: str, path: Path) -> tuple[np.ndarray, dict[str, Any], float]:
    """(keep mask over the dump's rows, quality against the truth, wall seconds) of one detector."""
    import warnings

    from kdfine import metrics
    from kdfine.detect import command
    from kdfine.detect import dump as dumps

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "cleanlab":
            keep, score, info = bd.cleanlab_detect(path)
        else:
            det, report, _, _ = command.detect_noise(str(path), method=method)
            keep, score, info = det.keep, det.scores, report.get(method, {})
    seconds = time.perf_counter() - t0
    d = dumps.read_dump(path)
    q = {k: round(v, 4) for k, v in metrics.detection(keep, d.labels == d.truth, score).items()}
    if info:
        q["chose"] = {k: v for k, v in info.items() if k != "description"}
    return keep, q, seconds


def accuracy(path: Path) -> float | None:
    """Test top-1 (%) of a finished model; the F-DivideMix ensemble's when it has one."""
    if not path.exists():
        return None
    from kdfine.models.checkpoint import read_meta

    m = read_meta(path)["metrics"]
    m = json.loads(m) if isinstance(m, str) else m
    v = m.get("test_top1_ensemble", m.get("test_top1"))
    return None if v is None else round(100 * float(v), 2)


def label_set(run: rf.Runner, s: rf.Setup, name: str, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """Steps 1 and 2 for one human label set: (its directory, its dump, the detection results)."""
    d = run.out / name
    d.mkdir(parents=True, exist_ok=True)
    labels = Path(args.labels_dir) / f"{name}.npy"
    train(run, s, labels, s.keep, 0, d / "ce-s0.safetensors", args.device)
    path = dump(run, d / "ce-s0.safetensors", s, labels, d / "features.npy", args.device)
    return d, path, detect_all(run, path, d, rf.read_index(s.keep))


def retrain_all(run: rf.Runner, s: rf.Setup, sets: list[tuple[str, Path]], args: argparse.Namespace) -> None:
    """Step 3, row by row (both seeds and label sets of a row before the next row), in the order of
    ``--rows`` (default :data:`ROWS`): an interrupted run has whole rows of the most asked-for ones. A detector's
    kept-index CSV is rewritten from today's code before the first model trains on it."""
    for row in args.rows:
        for seed in args.seeds:
            for name, d in sets:
                labels = Path(args.labels_dir) / f"{name}.npy"
                dest = d / f"{row}-s{seed}.safetensors"
                if row == "ce":
                    train(run, s, labels, s.keep, seed, dest, args.device)
                elif row == "dividemix":
                    train(run, s, labels, s.keep, seed, dest, args.device,
                          ("--fine-strategy", "dividemix", "--fine-warmup", str(s.warmup), "--fine-every", "1",
                           "--fine-features", "plain"))
                else:
                    if not list(d.glob(f"{row}-s*.safetensors")):  # no model used it yet: today's selection
                        refresh_keep(row, d, rf.read_index(s.keep))
                    train(run, s, labels, d / f"keep-{row}.csv", seed, dest, args.device)


def refresh_keep(method: str, d: Path, index: np.ndarray) -> None:
    """Rewrite ``keep-<method>.csv`` from the detector as it is now (its rule may have changed
    since step 2 ran), before the first model trains on it."""
    keep, _, _ = detector_keep(method, d / "features.npy")
    rf.write_index(d / f"keep-{method}.csv", index[keep])


def result_rows(run: rf.Runner, name: str, d: Path, path: Path, det: dict[str, Any],
                seeds: list[int]) -> dict[str, Any]:
    """One label set's JSON record: detection, fit of the noisy model, accuracy per row and seed."""
    acc = {row: {str(seed): accuracy(d / f"{row}-s{seed}.safetensors") for seed in seeds}
           for row in ("ce", *DETECTORS, "dividemix")}
    for m, q in det.items():  # stale: the models trained on another selection than today's code makes
        q["stale"] = _digest(rf.read_index(d / f"keep-{m}.csv")) != q.pop("selection")
    return {"labels": name, "n": int(np.load(path, mmap_mode="r").shape[0]), "fit": fitted(path),
            "detectors": det, "test_top1": acc,
            "seconds": {k.split("/", 1)[1]: v for k, v in run.times.items() if k.startswith(name + "/")}}


def _mean_sd(values: list[float | None]) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    return f"{np.mean(v):.2f}" + (f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else "") + f" (n={len(v)})"


def markdown(records: list[dict[str, Any]]) -> str:
    """The detection table and the accuracy table, one row per label set."""
    det_rows, acc_rows = [], []
    for r in records:
        for m in DETECTORS:
            q = r["detectors"][m]
            det_rows.append([r["labels"], m, f"{100 * q['true_noise_rate']:.1f}", q["kept"], f"{q['precision']:.3f}",
                             f"{q['recall']:.3f}", f"{q['f1']:.3f}", f"{q['auroc']:.3f}", f"{q['seconds']:.2f}"
                             + (" (stale)" if q["stale"] else "")])
        for row in ("ce", *DETECTORS, "dividemix"):
            acc_rows.append([r["labels"], row, _mean_sd(list(r["test_top1"][row].values())),
                             " / ".join("–" if v is None else f"{v:.2f}" for v in r["test_top1"][row].values())])
    fit = "; ".join(f"{r['labels']}: the noisy model predicts {100 * r['fit']['given_labels_predicted']:.1f}% of "
                    f"the given labels, {100 * r['fit']['wrong_labels_predicted']:.1f}% of the wrong ones, "
                    f"{100 * r['fit']['true_labels_predicted']:.1f}% of the true ones" for r in records)
    return ("Detection (clean = positive; AUROC of the score for finding the wrong labels):\n\n"
            + benchinfo.markdown_table(["labels", "detector", "true noise %", "kept", "precision", "recall", "F1",
                                        "AUROC", "wall s"], det_rows)
            + f"\n\n{fit}.\n\nTest top-1 (%) of the same training on each row's samples (ce: all the human labels; "
              "a detector: its kept samples; dividemix: F-DivideMix, the two networks' ensemble), mean ± sd over "
              "seeds, then each seed:\n\n"
            + benchinfo.markdown_table(["labels", "row", "test top-1 %", "per seed"], acc_rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=list(SETS), help="human label sets [default: %(default)s]")
    p.add_argument("--labels-dir", default=str(SHARED / "data" / "cifar10n"), help="aggre.npy, random1.npy, ... "
                   "[default: %(default)s]")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "real-noise", help="cache [default: %(default)s]")
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="mlp", help="every model's network [default: mlp: on 2 loaded cores a "
                   "conv net of this data's size trained at about 55 images/s, too slow for every row]")
    p.add_argument("--epochs", type=int, default=20, help="epochs of every model [default: 20]")
    p.add_argument("--warmup", type=int, default=6, help="F-DivideMix's CE warm-up epochs [default: 6]")
    p.add_argument("--image-size", type=int, default=16, help="images resized to this [default: 16]")
    p.add_argument("--per-class", type=int, default=500, help="training images per class [default: 500]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the accuracy rows [default: 0 1]")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW",
                   help=f"the accuracy rows to train, in this order [default: all: {' '.join(ROWS)}]")
    p.add_argument("--detect-only", action="store_true", help="steps 1 and 2 only")
    p.add_argument("--cifar-root", help="the CIFAR-10 JPEG ImageFolder tree [default: the archive, extracted]")
    p.add_argument("--archive", default=str(SHARED / "data" / "cifar10-jpeg.tar.gz"))
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    run = rf.Runner(args.out, args.device)
    s = human_setup(args, args.out)
    done = [label_set(run, s, name, args) for name in args.sets]
    if not args.detect_only:
        retrain_all(run, s, [(name, d) for name, (d, _, _) in zip(args.sets, done)], args)
    records = [result_rows(run, name, d, path, det, args.seeds) for name, (d, path, det) in zip(args.sets, done)]
    for r in records:
        benchinfo.emit(r)
    print(f"\n{benchinfo.now()}, {benchinfo.machine()['cpu']}, {benchinfo.usable_cpus()} cores, load "
          f"{benchinfo.load_average()}\n\n    {benchinfo.command_line()}\n\n{markdown(records)}\n\nSeconds per step "
          f"(this and earlier invocations, from {args.out / 'times.json'}):\n\n"
          + "\n".join(f"    {k}: {v}" for k, v in sorted(run.times.items())))


if __name__ == "__main__":
    main()

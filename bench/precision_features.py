#!/usr/bin/env python
"""Does bf16 change what users get from ``eval --dump-features``, FINE and predictions?

One checkpoint, trained in fp32 on noisy labels, is run through the real commands twice, once with
``--precision fp32`` and once with ``--precision bf16``: ``eval --split train --dump-features``
(the features FINE reads), ``detect-noise`` on each dump (FINE: gram eigenvectors, scores, the
per-class mixture), and ``eval --split test --dump-features`` (the logits that ``eval`` scores and
``predict`` turns into labels and probabilities: the same forward pass, ``kdfine.features.extract``).
Printed: how far the features move, how many samples FINE's selection changes (the symmetric
difference of the two kept sets, their Jaccard index, the largest change of a score and of
p_clean), the top-1 agreement and the largest probability change of the logits, both test
accuracies, and the seconds each dump took.

Scales:
  quick    digits (embedded), the default cnn, sym:0.4 noise, 30 epochs: a minute or two on a CPU.
  cifar10  a random --train-images / --test-images subset of the CIFAR-10 JPEG tree (written as an
           npz under --out), wrn-16-1, sym:0.4 noise, --epochs 5.

    python bench/precision_features.py --scale quick
    python bench/precision_features.py --scale cifar10 --cifar-root /path/to/cifar10-jpeg

Steps write into ``--out`` (default ``runs/precision-<scale>``) and are skipped when their result
exists. Prints JSON lines and a Markdown table with the command and the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def kdfine(*args: Any) -> dict[str, Any]:
    """Run ``python -m kdfine ARGS --json -q``; its JSON document and the seconds it took."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "kdfine", *map(str, args), "--json", "-q"], capture_output=True,
                       text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"kdfine {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr.strip()}")
    return {**json.loads(r.stdout), "seconds": time.perf_counter() - t0}


def cifar_npz(root: Path, out: Path, n_train: int, n_test: int, seed: int) -> Path:
    """A random subset of the CIFAR-10 JPEG tree as ``npz`` (x, y, x_test, y_test, classes)."""
    path = out / f"cifar10-{n_train}-{n_test}.npz"
    if path.exists():
        return path
    sys.path.insert(0, str(ROOT))
    from kdfine.data.sources import load_source

    src = load_source(f"imagefolder:{root}")
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.choice(len(src.train), n_train, replace=False))
    te = np.sort(rng.choice(len(src.test), n_test, replace=False))
    np.savez(path, x=src.train.images[tr], y=src.train.labels[tr], x_test=src.test.images[te],
             y_test=src.test.labels[te], classes=np.array(src.train.classes))
    return path


def train(out: Path, data: str, args) -> Path:
    ck = out / "model.safetensors"
    if not ck.exists():
        arch = ["--arch", args.arch] if args.arch else []
        kdfine("train-teacher", "--data", data, *arch, "--label-noise", args.noise, "--epochs", args.epochs,
               "--precision", "fp32", "--seed", "0", "--out", ck)
    return ck


def dumps(out: Path, ck: Path, data: str, noise: str) -> dict[str, dict[str, Any]]:
    """Per precision: the train and test dumps, FINE's kept set, and the dumps' seconds."""
    res: dict[str, dict[str, Any]] = {}
    for p in PRECISIONS:
        r: dict[str, Any] = {}
        for split in ("train", "test"):
            f = out / f"{split}-{p}.npy"
            if not f.exists():
                ev = kdfine("eval", "--model", ck, "--data", data, "--label-noise", noise, "--split", split,
                            "--precision", p, "--dump-features", f)
                (out / f"{split}-{p}.seconds").write_text(f"{ev['seconds']:.2f}\n")
            r[f"{split}_s"] = float((out / f"{split}-{p}.seconds").read_text())
            r[split] = f
        keep = out / f"keep-{p}.csv"
        if not keep.exists():
            kdfine("detect-noise", "--features", r["train"], "--method", "gmm", "--out", keep)
        r["keep"] = keep
        res[p] = r
    return res


def read_keep(path: Path) -> dict[int, tuple[float, float]]:
    with open(path) as f:
        return {int(row["index"]): (float(row["score"]), float(row["p_clean"])) for row in csv.DictReader(f)}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def compare(res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    a, b = res["fp32"], res["bf16"]
    fa, fb = np.load(a["train"]), np.load(b["train"])
    rel = np.linalg.norm(fb - fa, axis=1) / np.maximum(np.linalg.norm(fa, axis=1), 1e-12)
    ka, kb = read_keep(a["keep"]), read_keep(b["keep"])
    both = sorted(set(ka) & set(kb))
    truth = Path(str(a["train"]).replace(".npy", ".truth.npy"))
    labels = np.load(str(a["train"]).replace(".npy", ".labels.npy"))
    out: dict[str, Any] = {
        "n": int(fa.shape[0]), "dim": int(fa.shape[1]),
        "feature_rel_diff_median": float(np.median(rel)), "feature_rel_diff_max": float(rel.max()),
        "kept_fp32": len(ka), "kept_bf16": len(kb), "kept_differ": len(set(ka) ^ set(kb)),
        "jaccard": len(both) / max(len(set(ka) | set(kb)), 1),
    }
    if truth.exists():
        clean = np.load(truth) == labels
        for p, k in (("fp32", ka), ("bf16", kb)):
            idx = np.fromiter(k, dtype=np.int64)
            out[f"precision_{p}"] = float(clean[idx].mean()) if idx.size else 0.0
            out[f"recall_{p}"] = float(clean[idx].sum() / max(clean.sum(), 1))
    if both:
        out["score_diff_max"] = max(abs(ka[i][0] - kb[i][0]) for i in both)
        out["p_clean_diff_max"] = max(abs(ka[i][1] - kb[i][1]) for i in both)
    for split in ("train", "test"):
        za = np.load(str(a[split]).replace(".npy", ".logits.npy")).astype(np.float64)
        zb = np.load(str(b[split]).replace(".npy", ".logits.npy")).astype(np.float64)
        y = np.load(str(a[split]).replace(".npy", ".labels.npy"))
        out[f"{split}_n"] = int(za.shape[0])
        out[f"{split}_top1_agree"] = float((za.argmax(1) == zb.argmax(1)).mean())
        out[f"{split}_top1_differ"] = int((za.argmax(1) != zb.argmax(1)).sum())
        out[f"{split}_prob_diff_max"] = float(np.abs(softmax(za) - softmax(zb)).max())
        out[f"{split}_acc_fp32"], out[f"{split}_acc_bf16"] = (float((z.argmax(1) == y).mean()) for z in (za, zb))
    for p in PRECISIONS:
        out[f"dump_s_{p}"] = res[p]["train_s"]
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ["scale", "N x D", "feature change, median / max (relative L2)", "FINE kept fp32 / bf16",
            "samples whose selection differs", "Jaccard", "max change of score / p_clean",
            "test top-1 fp32 / bf16 (%)", "test predictions that differ", "max probability change",
            "train dump s, fp32 / bf16"]
    body = []
    for r in rows:
        body.append([r["scale"], f"{r['n']:,} x {r['dim']}",
                     f"{r['feature_rel_diff_median']:.2e} / {r['feature_rel_diff_max']:.2e}",
                     f"{r['kept_fp32']:,} / {r['kept_bf16']:,}", f"{r['kept_differ']}", f"{r['jaccard']:.4f}",
                     f"{r.get('score_diff_max', float('nan')):.1e} / {r.get('p_clean_diff_max', float('nan')):.1e}",
                     f"{100 * r['test_acc_fp32']:.2f} / {100 * r['test_acc_bf16']:.2f}",
                     f"{r['test_top1_differ']} of {r['test_n']:,}",
                     f"{r['test_prob_diff_max']:.3f}", f"{r['dump_s_fp32']:.0f} / {r['dump_s_bf16']:.0f}"])
    return benchinfo.markdown_table(head, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="quick", choices=("quick", "cifar10"))
    ap.add_argument("--out", help="working directory [default: runs/precision-SCALE]")
    ap.add_argument("--cifar-root", help="CIFAR-10 JPEG tree (train/ and test/), for --scale cifar10")
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--arch", help="[default: cnn for quick, wrn-16-1 for cifar10]")
    ap.add_argument("--epochs", type=int, help="[default: 30 for quick, 5 for cifar10]")
    ap.add_argument("--noise", default="sym:0.4")
    args = ap.parse_args()
    out = Path(args.out or ROOT / "runs" / f"precision-{args.scale}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"# {benchinfo.command_line()}", flush=True)
    benchinfo.emit({"bench": "precision_features", "machine": benchinfo.machine(), "date": benchinfo.now(),
                    "load": benchinfo.load_average()})
    if args.scale == "cifar10":
        if not args.cifar_root:
            raise SystemExit("--scale cifar10 needs --cifar-root DIR (the CIFAR-10 JPEG tree)")
        data = f"npz:{cifar_npz(Path(args.cifar_root), out, args.train_images, args.test_images, 0)}"
        args.arch, args.epochs = args.arch or "wrn-16-1", args.epochs or 5
    else:
        data, args.epochs = "digits", args.epochs or 30
    ck = train(out, data, args)
    row = {"bench": "precision_features", "scale": args.scale, "data": data, "arch": args.arch or "cnn",
           "noise": args.noise, **compare(dumps(out, ck, data, args.noise)), "load": benchinfo.load_average()}
    benchinfo.emit(row)
    benchinfo.print_report("bf16 against fp32 in eval --dump-features, FINE and predictions", table([row]),
                           f"load {benchinfo.load_average()}.")


if __name__ == "__main__":
    main()

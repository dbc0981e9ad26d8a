#!/usr/bin/env python
"""The two numbers docs/at-scale.md quotes for ``train-teacher`` out of the box.

1. ``digits``: ``kdfine train-teacher --out t.safetensors`` with no other option (the embedded
   digits data, ``cnn``, 30 epochs, CPU): wall time of the whole command, start-up included, and
   test top-1 on the 359 held-out digits. ``--repeats`` runs give a median.
2. ``cifar10-subset``: ``kdfine train-teacher --arch wrn-16-2`` for ``--epochs`` (10) on a
   class-balanced ``--per-class`` (1000) x 10 subset of the CIFAR-10 JPEG train set (``--keep``,
   drawn with seed 0), tested on all 10,000 test images; test top-1, training images/s (the median
   of the epochs' rates) and wall time. The first run decodes the JPEG tree into kdfine's cache;
   that one-off decode is run (and timed) separately, before the measured command.

Both are real subprocess runs of the CLI. Prints one JSON line per measurement and a Markdown
summary with the machine, the date and the command.

    python bench/foundation.py --cifar-root /tmp/kdcache
    python bench/foundation.py --only digits --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402
from reproduce_kd import balanced_keep, cifar_root  # noqa: E402


def kdfine(*args: str) -> tuple[dict, float]:
    """Run ``python -m kdfine ARGS --json -q``; returns its JSON document and the wall time."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "kdfine", *args, "--json", "-q"], capture_output=True, text=True,
                       cwd=ROOT)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"foundation: kdfine {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout), seconds


def bench_digits(tmp: Path, repeats: int) -> dict:
    runs = []
    for i in range(repeats):
        doc, seconds = kdfine("train-teacher", "--out", str(tmp / f"digits-{i}.safetensors"))
        runs.append((seconds, doc["metrics"]["test_top1"]))
    rec = {"bench": "digits", "command": "kdfine train-teacher --out t.safetensors",
           "wall_s": [round(s, 2) for s, _ in runs], "median_wall_s": round(statistics.median(s for s, _ in runs), 2),
           "test_top1": [a for _, a in runs]}
    benchinfo.emit(rec)
    return rec


def bench_cifar(tmp: Path, args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = cifar_root(argparse.Namespace(cifar_root=args.cifar_root, cifar_archive=args.archive), workdir)
    keep = balanced_keep(root, workdir, per_class=args.per_class)
    data = ["--data", f"imagefolder:{root}"]
    t0 = time.perf_counter()  # decode once into the cache (a no-op when it is already there)
    subprocess.run([sys.executable, "-c", "import sys; from kdfine.data.sources import load_source; "
                    "load_source(sys.argv[1])", f"imagefolder:{root}"], check=True, cwd=ROOT)
    decode_s = time.perf_counter() - t0
    log = tmp / "wrn.jsonl"
    argv = ["train-teacher", "--arch", "wrn-16-2", *data, "--keep", str(keep), "--epochs", str(args.epochs),
            "--seed", "0", "--eval-every", str(args.epochs), "--log", str(log), "--out", str(tmp / "wrn.safetensors")]
    doc, seconds = kdfine(*argv)
    epochs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rates = [e["img_per_s"] for e in epochs if e.get("img_per_s")]
    rec = {"bench": "cifar10-subset", "command": "kdfine " + " ".join(argv[:-4] + ["--out", "t.safetensors"]),
           "train_images": 10 * args.per_class, "epochs": args.epochs,
           "test_top1": doc["metrics"]["test_top1"], "img_per_s_median": round(statistics.median(rates), 1),
           "img_per_s_epochs": [round(r, 1) for r in rates], "wall_s": round(seconds, 1),
           "cache_decode_s": round(decode_s, 1)}
    benchinfo.emit(rec)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("digits", "cifar10-subset"), help="run one of the two [default: both]")
    ap.add_argument("--repeats", type=int, default=3, help="digits runs [default: 3]")
    ap.add_argument("--epochs", type=int, default=10, help="cifar10-subset epochs [default: 10]")
    ap.add_argument("--per-class", type=int, default=1000, help="cifar10-subset images per class [default: 1000]")
    ap.add_argument("--cifar-root", help="an extracted CIFAR-10 JPEG tree (train/, test/)")
    ap.add_argument("--archive", help="cifar10-jpeg.tar.gz to extract when no tree is given")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/kdfine/bench/foundation"),
                    help="subset list and extracted data [default: ~/.cache/kdfine/bench/foundation]")
    args = ap.parse_args()
    print(f"# {benchinfo.command_line()}", flush=True)
    info = benchinfo.machine()
    benchinfo.emit({"bench": "machine", **info, "date": benchinfo.now()})
    with tempfile.TemporaryDirectory(prefix="kdfine-foundation-") as d:
        digits = bench_digits(Path(d), args.repeats) if args.only in (None, "digits") else None
        cifar = bench_cifar(Path(d), args) if args.only in (None, "cifar10-subset") else None
    print(f"\n`{benchinfo.command_line()}`, {benchinfo.now()}, {info['cpu']}, {info['cores']} cores, "
          f"torch {info.get('torch')}\n")
    rows = []
    if digits:
        rows.append([f"`{digits['command']}` (digits, cnn, 30 epochs)", "1,438 / 359",
                     " / ".join(f"{100 * a:.2f}" for a in digits["test_top1"]), "n/a",
                     f"{digits['median_wall_s']:.1f} (median of {len(digits['wall_s'])})"])
    if cifar:
        rows.append([f"`train-teacher --arch wrn-16-2`, CIFAR-10 {cifar['train_images']:,}-image balanced subset, "
                     f"{cifar['epochs']} epochs", f"{cifar['train_images']:,} / 10,000", f"{100 * cifar['test_top1']:.2f}",
                     f"{cifar['img_per_s_median']:.0f}", f"{cifar['wall_s']:.0f}"])
    print(benchinfo.markdown_table(["run", "train / test images", "test top-1 (%)", "train img/s", "wall (s)"], rows))


if __name__ == "__main__":
    main()

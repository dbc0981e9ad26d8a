#!/usr/bin/env python
"""Reproduce the FINE comparison (Kim, Ko, Cho et al., NeurIPS 2021) with the kdfine CLI.

For each dataset and label noise (sym 20/50/80%, asym 40% by default):

(a) detection: a model is trained with cross-entropy on the noisy labels, its penultimate
    features are dumped (``eval --dump-features``) and the wrong labels are looked for with FINE
    (``detect-noise``) and with the small-loss 2-GMM detector on the same model's logits
    (``detect-noise --method small-loss``, DivideMix style): clean-set precision, recall, F1 and
    the AUROC of the score for finding the wrong labels;
(b) test accuracy of CE on the noisy labels (the same model), CE retrained on FINE's selection
    (``train-teacher --keep``), dynamic FINE (``--fine-strategy select --fine-warmup W --fine-every
    E``), F-Coteaching (``--fine-strategy coteach``, same W and E), F-DivideMix (``--fine-strategy
    dividemix``, warm-up W, a split every epoch), GCE alone (``--loss gce``) and dynamic FINE with
    GCE (``select`` + ``gce``). Two-network rows report the first network (the checkpoint) and
    the ensemble of both.

Scales:
  quick        digits (embedded), a small CNN: minutes on a CPU.
  cifar10-cpu  a class-balanced 10k-image subset of the CIFAR-10 JPEG train set (``--keep``), all
               10k test images, a small ResNet: about an hour on 2 CPU cores.
  paper        full CIFAR-10 and CIFAR-100 (torchvision) with the official FINE recipe, for a GPU:
               ResNet-34, SGD lr 0.02, momentum 0.9 without Nesterov, weight decay 1e-3 on every
               parameter, batch 128, lr x0.01 at epochs 40 and 80 of 120 (CIFAR-10) or 80 and 120 of
               150 (CIFAR-100), crop+flip, fp32; dynamic FINE after 40 warm-up epochs, every 10, on
               augmented features; uniform:R noise (the official convention); a 45k/5k stratified
               validation split whose best epoch is the checkpoint (last-epoch accuracy beside it).
               The table shows the published accuracies beside ours.

The smaller scales keep CE, FINE's detector and mixture, dynamic selection on augmented features
and kdfine's default optimizer (SGD 0.1 Nesterov, wd 5e-4 not on BatchNorm/biases); they shorten
the data, the network, the epochs and the selection period, use kdfine's ``sym:R`` noise (harder
than ``uniform:R``) and no validation split.

Every step writes its result into ``--out`` (default ``runs/fine-<scale>``) and is skipped when
that result exists, and training runs with ``--resume``: rerun the same command to continue after
an interruption. Prints JSON lines and Markdown tables, with the command and the date, on stdout;
the same go to ``<out>/results.jsonl`` and ``<out>/results.md``.

    python bench/reproduce_fine.py --scale quick
    python bench/reproduce_fine.py --scale cifar10-cpu --cifar-root /path/to/cifar10-jpeg
    python bench/reproduce_fine.py --scale paper --data-root ~/data --download --device cuda
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402

NOISES = ("sym:0.2", "sym:0.5", "sym:0.8", "asym:0.4")
# The paper's "symmetric" noise is the official code's uniform redraw (about r(K-1)/K labels wrong).
PAPER_NOISES = ("uniform:0.2", "uniform:0.5", "uniform:0.8", "asym:0.4")
# Published test accuracy (%) of FINE (dynamic selection, CE, ResNet-34) in the paper's table.
PUBLISHED = {("cifar10", "uniform:0.8"): 69.4, ("cifar10", "asym:0.4"): 89.5,
             ("cifar100", "uniform:0.8"): 25.6, ("cifar100", "asym:0.4"): 61.7}
# The official recipe (Kthyeon/FINE_official), for every training run of the paper scale; the
# schedule's milestones and the epochs are per dataset.
PAPER_RECIPE = ["--optimizer", "sgd", "--lr", "0.02", "--no-nesterov", "--weight-decay", "1e-3", "--decay-all",
                "--batch-size", "128", "--augment", "crop-flip", "--precision", "fp32", "--val-fraction", "0.1",
                "--keep-best", "val", "--fine-features", "augmented", "--eval-every", "10"]
# F-Coteaching (ResNet-34) in the same paper; numbers quoted in kdfine's issue 14, not checked here.
PUBLISHED_COTEACH = {("cifar10", "uniform:0.8"): 74.2, ("cifar10", "asym:0.4"): 90.5}
# the strategy rows beyond select: name -> the train-teacher options (W, E: the setup's warm-up and period)
STRATEGY_ROWS = {
    "coteach": lambda s: ["--fine-strategy", "coteach", "--fine-warmup", s.warmup, "--fine-every", s.every],
    "dividemix": lambda s: ["--fine-strategy", "dividemix", "--fine-warmup", s.warmup, "--fine-every", 1],
    "gce": lambda s: ["--loss", "gce"],
    "select_gce": lambda s: ["--loss", "gce", "--fine-warmup", s.warmup, "--fine-every", s.every],
}


@dataclass
class Setup:
    """One dataset at one scale: what to train and how."""

    name: str  # short name in tables: digits, cifar10, cifar100
    data: str  # the --data spec
    arch: str
    epochs: int
    train_args: list[str]  # lr, schedule, weight decay, batch size, ...
    warmup: int  # dynamic FINE: --fine-warmup
    every: int  # dynamic FINE: --fine-every
    keep: Path | None = None  # a subset of the training set (--keep)
    data_args: list[str] = field(default_factory=list)  # --data-root, --download


def setups(args: argparse.Namespace, out: Path) -> list[Setup]:
    if args.scale == "quick":
        return [Setup("digits", "digits", args.arch or "cnn", args.epochs or 30, [], warmup=args.warmup or 10, every=5)]
    if args.scale == "cifar10-cpu":
        root = cifar_root(args, out)
        keep = balanced_subset(root, out / "subset.csv", per_class=args.per_class)
        # resnet20 trains at roughly 240 img/s on 2 cores here (wrn-16-1: 120): 10 epochs per run
        return [Setup("cifar10", f"imagefolder:{root}", args.arch or "resnet20", args.epochs or 10,
                      ["--lr", "0.1", "--schedule", "cosine", "--eval-every", "100"],
                      warmup=args.warmup or 4, every=2, keep=keep)]
    data_args = (["--data-root", args.data_root] if args.data_root else []) + (["--download"] if args.download else [])
    out_setups = [Setup("cifar10", "cifar10", "resnet34", 120, PAPER_RECIPE + ["--schedule", "multistep:40,80:0.01"],
                        warmup=40, every=10, data_args=data_args),
                  Setup("cifar100", "cifar100", "resnet34", 150, PAPER_RECIPE + ["--schedule", "multistep:80,120:0.01"],
                        warmup=40, every=10, data_args=data_args)]
    return [s for s in out_setups if not args.datasets or s.name in args.datasets]


# ----------------------------------------------------------------------------------- data


def cifar_root(args: argparse.Namespace, out: Path) -> Path:
    """The CIFAR-10 JPEG ImageFolder tree: ``--cifar-root`` when it holds train/ and test/, else the
    archive extracted (once) into ``<out>/cifar10-jpeg``."""
    for cand in [args.cifar_root, out / "cifar10-jpeg"]:
        if cand and (Path(cand) / "train").is_dir() and (Path(cand) / "test").is_dir():
            return Path(cand).resolve()
    archive = Path(args.archive)
    if not archive.exists():
        sys.exit(f"reproduce_fine: no CIFAR-10 JPEG tree (--cifar-root) and no archive {archive} (--archive)")
    dest = benchinfo.extract_image_tree(archive, out / "cifar10-jpeg")
    return dest.resolve()


def balanced_subset(root: Path, path: Path, per_class: int, seed: int = 0) -> Path:
    """``per_class`` training indices of every class (seeded), as a ``--keep`` CSV."""
    if path.exists():
        return path
    from kdfine.data.sources import load_source

    labels = load_source(f"imagefolder:{root}").train.labels
    write_index(path, benchinfo.balanced_indices(labels, per_class, seed))
    return path


def write_index(path: Path, idx: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("index\n" + "".join(f"{i}\n" for i in idx.tolist()))
    tmp.replace(path)


def read_index(path: Path) -> np.ndarray:
    return np.loadtxt(path, dtype=np.int64, delimiter=",", skiprows=1, usecols=0, ndmin=1)


def subset_dump(model: Path, s: "Setup", noise: str, keep: np.ndarray, dest: Path, device: str,
                image_size: int | None = None, labels: str | None = None, noise_seed: int = 0) -> None:
    """What ``eval --split train --dump-features`` writes, for the ``--keep`` rows only (the samples
    the model was trained on), through the library: the CLI's eval always covers the whole split.
    ``labels``: a ``--labels`` file replacing the training labels (then the truth sidecar holds the
    data's own labels). ``<dest>.index.npy`` maps the dump's rows back to dataset indices."""
    from kdfine import api, features
    from kdfine.detect import dump as dumps
    from kdfine.models import checkpoint
    from kdfine.runtime import distributed
    from kdfine.data.prepare import prepare
    from kdfine.runtime.device import use_channels_last

    ctx = distributed.setup(device)
    ck = checkpoint.load(model, "cpu", "--model")
    prep = prepare(api.DataOptions(data=s.data, label_noise=noise, image_size=image_size, labels=labels,
                                   noise_seed=noise_seed))
    train = prep.train
    truth = prep.truth if prep.truth is not None else prep.source.train.labels
    f, z = features.extract(ck.model.to(ctx.device), train.images[keep], ck.meta["mean"], ck.meta["std"],
                            device=ctx.device, channels_last=use_channels_last("auto", ctx.device))
    info = {"checkpoint": str(model), "data": s.data, "split": "train", "label_noise": noise, "noise_seed": noise_seed,
            "num_classes": train.num_classes, "classes": train.classes, "n": int(keep.size), "dim": int(f.shape[1]),
            "keep": str(s.keep), "labels": labels}
    np.save(str(dest)[:-4] + ".index.npy", keep)
    dumps.write_dump(dest, f, z, train.labels[keep], info, truth[keep])


# ----------------------------------------------------------------------------------- running


def note(msg: str) -> None:
    print(f"[reproduce_fine {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Runner:
    """Runs ``kdfine`` subcommands in subprocesses, logs each command, skips finished steps."""

    def __init__(self, out: Path, device: str, dry_run: bool = False, rows: tuple[str, ...] = ()):
        self.out, self.device, self.dry_run, self.rows = out, device, dry_run, rows
        self.env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.times_path = out / "times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}

    def kdfine(self, key: str, done: Path, *args: Any, stdout: Path | None = None) -> None:
        """``kdfine ARGS`` unless ``done`` exists; with ``stdout``, its output saved there."""
        if done.exists():
            return
        argv = [str(a) for a in args]
        shown = "kdfine " + shlex.join(argv)
        with open(self.out / "commands.sh", "a") as f:
            f.write(shown + "\n")
        note(shown)
        if self.dry_run:
            return
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "kdfine", *argv], env=self.env, text=True,
                           stdout=subprocess.PIPE, stderr=None)
        if r.returncode != 0:
            sys.exit(f"reproduce_fine: step {key} failed (exit {r.returncode}): {shown}")
        if stdout is not None:
            tmp = stdout.with_suffix(".tmp")
            tmp.write_text(r.stdout)
            tmp.replace(stdout)
        self.record(key, time.perf_counter() - t0)

    def record(self, key: str, seconds: float) -> None:
        self.times[key] = round(seconds, 1)
        self.times_path.write_text(json.dumps(self.times, indent=1, sort_keys=True))


def slug(noise: str) -> str:
    return noise.replace(":", "-")


def run_cell(run: Runner, s: Setup, noise: str, device: str, scale: str) -> dict[str, Any] | None:
    """All steps for one dataset and noise; returns the result row (None on a dry run)."""
    d = run.out / s.name / slug(noise)
    d.mkdir(parents=True, exist_ok=True)
    key = f"{s.name}/{slug(noise)}"
    base = ["--data", s.data, *s.data_args, "--label-noise", noise, "--arch", s.arch, "--epochs", str(s.epochs),
            *s.train_args, "--device", device, "--resume"]
    subset = ["--keep", s.keep] if s.keep is not None else []

    # (b1) CE on the noisy labels; also the model whose features drive the detection
    run.kdfine(f"{key}/ce", d / "ce.safetensors", "train-teacher", *base, *subset, "--log", d / "ce.jsonl",
               "--out", d / "ce.safetensors", "-q")
    # (a) features of the training set, FINE and small-loss detection
    dump = d / "features.npy"
    if s.keep is None:
        run.kdfine(f"{key}/dump", dump, "eval", "--model", d / "ce.safetensors", "--split", "train",
                   "--dump-features", dump, "--device", device, "-q")
    elif not dump.exists() and not run.dry_run:
        note(f"features of the {s.keep.name} rows of the training set -> {dump}")
        t0 = time.perf_counter()
        subset_dump(d / "ce.safetensors", s, noise, read_index(s.keep), dump, device)
        run.record(f"{key}/dump", time.perf_counter() - t0)
    run.kdfine(f"{key}/fine", d / "fine.json", "detect-noise", "--features", dump, "--method", "gmm", "--out",
               d / "fine_clean.csv", "--json", stdout=d / "fine.json")
    run.kdfine(f"{key}/small-loss", d / "small_loss.json", "detect-noise", "--features", dump, "--method",
               "small-loss", "--out", d / "small_loss_clean.csv", "--json", stdout=d / "small_loss.json")
    # (b2) CE retrained on FINE's selection (indices of the dataset, not of the dump)
    keep_fine = d / "fine_keep.csv"
    if not keep_fine.exists() and not run.dry_run:
        rows = read_index(d / "fine_clean.csv")
        if s.keep is not None:
            rows = np.load(str(dump)[:-4] + ".index.npy")[rows]
        write_index(keep_fine, rows)
    run.kdfine(f"{key}/retrain", d / "retrain.safetensors", "train-teacher", *base, "--keep", keep_fine,
               "--log", d / "retrain.jsonl", "--out", d / "retrain.safetensors", "-q")
    # (b3) dynamic FINE during training
    run.kdfine(f"{key}/dynamic", d / "dynamic.safetensors", "train-teacher", *base, *subset,
               "--fine-warmup", str(s.warmup), "--fine-every", str(s.every), "--log", d / "dynamic.jsonl",
               "--out", d / "dynamic.safetensors", "-q")
    # (b4) FINE's other applications and the noise-robust loss
    for name in run.rows:
        run.kdfine(f"{key}/{name}", d / f"{name}.safetensors", "train-teacher", *base, *subset,
                   *STRATEGY_ROWS[name](s), "--log", d / f"{name}.jsonl", "--out", d / f"{name}.safetensors", "-q")
    if run.dry_run:
        return None
    return result_row(run, s, noise, d, scale)


def result_row(run: Runner, s: Setup, noise: str, d: Path, scale: str) -> dict[str, Any]:
    from kdfine.models.checkpoint import read_meta

    def acc(name: str, key: str = "test_top1") -> float | None:
        """Test top-1 (%) of the written weights (the best-validation epoch's under --keep-best val);
        ``test_top1_last``: the last epoch's (that of the written weights without a validation split)."""
        m = read_meta(d / f"{name}.safetensors")["metrics"]
        m = json.loads(m) if isinstance(m, str) else m
        v = m.get(key, m.get("test_top1") if key == "test_top1_last" else None)
        return None if v is None else round(100 * float(v), 2)

    def detection(name: str) -> dict[str, Any]:
        doc = json.loads((d / f"{name}.json").read_text())
        q = doc.get("truth", {})
        return {"kept_fraction": round(doc["kept_fraction"], 4),
                **{k: round(q[k], 4) for k in ("precision", "recall", "f1", "auroc") if q.get(k) is not None}}

    fine_doc = json.loads((d / "fine.json").read_text())
    selections = [json.loads(line) for line in (d / "dynamic.jsonl").read_text().splitlines() if "fine_kept" in line]
    last = selections[-1] if selections else {}
    key = f"{s.name}/{slug(noise)}"
    return {
        "scale": scale, "dataset": s.name, "noise": noise, "arch": s.arch, "epochs": s.epochs,
        "n_train": fine_doc["n"], "true_noise_rate": round(fine_doc.get("truth", {}).get("true_noise_rate", 0.0), 4),
        "fine": detection("fine"), "small_loss": detection("small_loss"),
        "acc": {"ce_noisy": acc("ce"), "ce_fine_selection": acc("retrain"), "dynamic_fine": acc("dynamic"),
                **{name: acc(name) for name in run.rows},
                **{f"{name}_ensemble": acc(name, "test_top1_ensemble") for name in run.rows
                   if name in ("coteach", "dividemix")}},
        "acc_last": {"ce_noisy": acc("ce", "test_top1_last"), "ce_fine_selection": acc("retrain", "test_top1_last"),
                     "dynamic_fine": acc("dynamic", "test_top1_last")},
        "dynamic_last_selection": {k[5:]: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()
                                   if k.startswith("fine_")},
        "published_fine": PUBLISHED.get((s.name, noise)),
        "published_coteach": PUBLISHED_COTEACH.get((s.name, noise)),
        "seconds": {k.rsplit("/", 1)[1]: v for k, v in run.times.items() if k.startswith(key + "/")},
    }


# ----------------------------------------------------------------------------------- report


def fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.2f}" if isinstance(x, float) else str(x)


def markdown(rows: list[dict[str, Any]], scale: str) -> str:
    paper = scale == "paper"
    def prf(q: dict[str, Any]) -> str:
        return " / ".join(fmt(q.get(k), True) for k in ("precision", "recall", "f1"))

    lines = ["(a) Detection of the wrong labels from one model trained with CE on the noisy labels (its final "
             "epoch): clean-set precision / recall / F1 (%, clean = positive, as the paper reports) and the AUROC "
             "of the score for finding the wrong labels. Last column: the last selection of dynamic FINE during "
             "its training.", "",
             "| data | noise | true noise | FINE P / R / F1 | FINE AUROC | small-loss P / R / F1 | small-loss AUROC "
             "| dynamic FINE P / R / F1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f, s = r["fine"], r["small_loss"]
        lines.append(f"| {r['dataset']} | {r['noise']} | {fmt(r['true_noise_rate'], True)} | {prf(f)} | "
                     f"{fmt(f.get('auroc'))} | {prf(s)} | {fmt(s.get('auroc'))} | {prf(r['dynamic_last_selection'])} |")
    extra = [k for k in STRATEGY_ROWS if rows and k in rows[0]["acc"]]
    titles = {"coteach": "F-Coteaching (ens.)", "dividemix": "F-DivideMix (ens.)", "gce": "GCE",
              "select_gce": "select + GCE"}
    head = ("| data | noise | arch, epochs | CE on noisy labels | CE on FINE's selection | select (dynamic FINE) |"
            + "".join(f" {titles[k]} |" for k in extra))
    sep = "|---|---|---|---:|---:|---:|" + "---:|" * len(extra)
    if paper:
        head += " FINE, published | F-Coteaching, published |"
        sep += "---:|---:|"
    lines += ["", "(b) Test accuracy (%), final epoch; two-network rows: the first network (the checkpoint), "
              "the ensemble of both in brackets.", "", head, sep]
    for r in rows:
        a = r["acc"]
        cells = [fmt(a[k]) + (f" ({fmt(a[k + '_ensemble'])})" if k + "_ensemble" in a else "") for k in extra]
        line = (f"| {r['dataset']} | {r['noise']} | {r['arch']}, {r['epochs']} | {a['ce_noisy']:.2f} | "
                f"{a['ce_fine_selection']:.2f} | {a['dynamic_fine']:.2f} |" + "".join(f" {c} |" for c in cells))
        if paper:
            line += f" {fmt(r['published_fine'])} | {fmt(r['published_coteach'])} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("quick", "cifar10-cpu", "paper"), default="quick")
    p.add_argument("--out", type=Path, help="cache and results directory [default: runs/fine-<scale>]")
    p.add_argument("--noise", help=f"comma-separated noise specs [default: {','.join(NOISES)}; paper scale: "
                                   f"{','.join(PAPER_NOISES)}]")
    p.add_argument("--device", default="auto")
    p.add_argument("--datasets", nargs="*", help="paper scale: cifar10 and/or cifar100 [default: both]")
    p.add_argument("--data-root", help="paper scale: torchvision dataset directory")
    p.add_argument("--download", action="store_true", help="paper scale: download CIFAR-10/100")
    p.add_argument("--cifar-root", default=os.environ.get("KDFINE_CIFAR10_JPEG"),
                   help="cifar10-cpu: the CIFAR-10 JPEG ImageFolder tree [default: $KDFINE_CIFAR10_JPEG, or the "
                        "archive extracted into <out>]")
    p.add_argument("--archive", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"),
                   help="cifar10-cpu: the CIFAR-10 JPEG archive to extract when there is no tree")
    p.add_argument("--per-class", type=int, default=1000, help="cifar10-cpu: training images per class")
    p.add_argument("--arch", help="quick, cifar10-cpu: architecture [default: cnn, resnet20]")
    p.add_argument("--epochs", type=int, help="quick, cifar10-cpu: epochs [default: 30, 10]")
    p.add_argument("--warmup", type=int, help="quick, cifar10-cpu: FINE warm-up epochs [default: 10, 4]")
    p.add_argument("--rows", default=",".join(STRATEGY_ROWS),
                   help="strategy rows beyond CE, retrain and select; '' for none [default: %(default)s]")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = p.parse_args(argv)
    out = (args.out or ROOT / "runs" / f"fine-{args.scale}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/reproduce_fine.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows_wanted = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    unknown = [r for r in rows_wanted if r not in STRATEGY_ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; expected some of {', '.join(STRATEGY_ROWS)}")
    run = Runner(out, args.device, args.dry_run, rows_wanted)
    rows = []
    t0 = time.perf_counter()
    for s in setups(args, out):
        noises = args.noise or ",".join(PAPER_NOISES if args.scale == "paper" else NOISES)
        for noise in [n.strip() for n in noises.split(",") if n.strip()]:
            row = run_cell(run, s, noise, args.device, args.scale)
            if row is not None:
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.dry_run:
        return
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    where = f"{platform.machine()}, {os.cpu_count()} CPUs, device {args.device}"
    steps = sum(sum(r["seconds"].values()) for r in rows)
    md = (f"Scale `{args.scale}`, {date}, {where}: {steps / 60:.0f} min of steps in all (this invocation "
          f"{time.perf_counter() - t0:.0f} s; finished steps cached in the output directory are not rerun).\n\n"
          f"    {command}\n\n" + markdown(rows, args.scale) + "\n")
    print("\n" + md)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "results.md").write_text(md)


if __name__ == "__main__":
    main()

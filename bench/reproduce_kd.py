#!/usr/bin/env python
"""Reproduce the comparison of Kim et al., "Comparing Kullback-Leibler Divergence and Mean Squared
Error Loss in Knowledge Distillation" (IJCAI 2021) with the ``kdfine`` command line.

For every seed, one student architecture is trained with cross-entropy only, and distilled from
one frozen teacher with KL at tau in {1, 3, 5, 20}, with ``kl-inf`` (tau -> inf) and with MSE on
logits (all alpha = 1.0, pure distillation). Sequential rows compare a smaller student distilled
directly from the teacher (large -> small) with one distilled from the MSE student (large ->
medium -> small), both with MSE, next to that small network trained with CE only.

Scales:
  quick        digits (scikit-learn's 8x8), teacher cnn -> student cnn-8 -> small mlp-32; minutes on a CPU.
  cifar10-cpu  a class-balanced 10k-image subset of the CIFAR-10 JPEG train set (kdfine's --keep),
               tested on all 10k test images; wrn-16-2 -> wrn-16-1 -> wrn-10-1; about an hour on 2 cores.
  paper        CIFAR-100, wrn-28-4 -> wrn-16-2 -> wrn-16-1, 200 epochs, SGD lr 0.1 Nesterov, wd 5e-4,
               batch 128, lr x0.1 at epochs 100 and 150; for a GPU. Shows the paper's numbers beside ours.

Every run is one ``python -m kdfine`` command (printed before it runs; ``--dry-run`` prints them
all). Checkpoints, per-epoch logs and per-run results go to ``--workdir``; a file name carries a
hash of the command's options, so a rerun skips finished runs, resumes an interrupted one
(``--resume``) and retrains only what changed. One JSON line per run goes to stdout (and to
``runs.jsonl``), then the Markdown tables (also written to ``results.md``).

    python bench/reproduce_kd.py --scale quick
    flock /tmp/kdfine-cpu.lock python bench/reproduce_kd.py --scale cifar10-cpu --cifar-root /tmp/kdcache
    python bench/reproduce_kd.py --scale paper --device cuda --data-root ~/data --download
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import benchinfo  # noqa: E402

# Table columns: (label, run key, --loss, --tau). alpha = 1.0 everywhere, as in the paper's comparison.
COLUMNS = [("CE only", "ce", "ce", None), ("KL τ=1", "kl-1", "kl", 1), ("KL τ=3", "kl-3", "kl", 3),
           ("KL τ=5", "kl-5", "kl", 5), ("KL τ=20", "kl-20", "kl", 20),
           ("KL τ=∞ (kl-inf)", "kl-inf", "kl-inf", None),
           ("MSE", "mse", "mse", None)]
# Kim et al. (IJCAI 2021), CIFAR-100, WRN-28-4 -> WRN-16-2, KL with alpha = 1: student test top-1 (%).
PAPER_KL = {"kl-1": 72.90, "kl-3": 74.24, "kl-5": 74.88, "kl-20": 75.76, "kl-inf": 75.51}


@dataclass
class Scale:
    """One experimental setting: data, the three architectures, epochs, seeds, shared options."""

    name: str
    data: str
    teacher: str
    student: str
    small: str
    teacher_epochs: int
    epochs: int
    seeds: int
    train_options: list[str] = field(default_factory=list)
    note: str = ""


SCALES = {
    "quick": Scale("quick", "digits", "cnn", "cnn-8", "mlp-32", teacher_epochs=30, epochs=30, seeds=5,
                   note="digits: 1438 train / 359 test images (scikit-learn's 8x8 digits, stratified split)"),
    "cifar10-cpu": Scale("cifar10-cpu", "cifar10-jpeg", "wrn-16-2", "wrn-16-1", "wrn-10-1", teacher_epochs=15,
                         epochs=5, seeds=2, train_options=["--eval-every", "1000"],
                         note="CIFAR-10 JPEG: 10,000 train images (1,000 per class, --keep), all 10,000 test images"),
    "paper": Scale("paper", "cifar100", "wrn-28-4", "wrn-16-2", "wrn-16-1", teacher_epochs=200, epochs=200, seeds=3,
                   train_options=["--lr", "0.1", "--weight-decay", "5e-4", "--batch-size", "128",
                                  "--schedule", "multistep:100,150"],
                   note="CIFAR-100: 50,000 train / 10,000 test images"),
}


# ------------------------------------------------------------------------------------------ data


def cifar_root(args: argparse.Namespace, workdir: Path) -> Path:
    """The extracted CIFAR-10 JPEG tree (train/<class>/*.jpg, test/<class>/*.jpg), extracting the
    archive into the work directory when no tree is given or found."""
    if args.cifar_root:
        root = Path(args.cifar_root).expanduser()
        if not (root / "train").is_dir():
            sys.exit(f"reproduce_kd: --cifar-root {root}: no train/ directory")
        return root
    root = workdir / "cifar10-jpeg"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    archive = Path(args.cifar_archive).expanduser() if args.cifar_archive else next(
        (p for p in (REPO / "shared/data/cifar10-jpeg.tar.gz", REPO.parent / "shared/data/cifar10-jpeg.tar.gz")
         if p.exists()), None)
    if archive is None or not archive.exists():
        sys.exit("reproduce_kd: the CIFAR-10 JPEG archive was not found; pass --cifar-archive PATH or --cifar-root DIR")
    return benchinfo.extract_image_tree(archive, root)


def balanced_keep(root: Path, workdir: Path, per_class: int = 1000, seed: int = 0) -> Path:
    """An index CSV of ``per_class`` training images per class, drawn with a fixed seed, in the
    order in which kdfine enumerates the image folder."""
    from kdfine.data.sources import load_source

    path = workdir / f"balanced-{per_class}-per-class.csv"
    if path.exists():
        return path
    labels = load_source(f"imagefolder:{root}").train.labels
    keep = benchinfo.balanced_indices(labels, per_class, seed)
    path.write_text("index\n" + "\n".join(map(str, keep.tolist())) + "\n")
    return path


def data_options(scale: Scale, args: argparse.Namespace, workdir: Path) -> list[str]:
    if scale.data == "cifar10-jpeg":
        root = cifar_root(args, workdir)
        keep = balanced_keep(root, workdir)
        return ["--data", f"imagefolder:{root}", "--keep", str(keep)]
    opts = ["--data", scale.data]
    if args.data_root:
        opts += ["--data-root", args.data_root]
    if args.download:
        opts.append("--download")
    return opts


# ------------------------------------------------------------------------------------------ runs


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Run:
    """One kdfine command. ``key`` names it in the tables; the checkpoint's file name carries a hash
    of the options, so a changed option never reuses an old result."""

    key: str
    seed: int
    argv: list[str]  # kdfine subcommand and options, without --out
    workdir: Path

    @property
    def stem(self) -> str:
        digest = hashlib.sha256(json.dumps(self.argv).encode()).hexdigest()[:10]
        return f"{self.key}-s{self.seed}.{digest}"

    @property
    def out(self) -> Path:
        return self.workdir / f"{self.stem}.safetensors"

    @property
    def record(self) -> Path:
        return self.workdir / f"{self.stem}.json"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "kdfine", *self.argv, "--out", str(self.out),
                "--log", str(self.workdir / f"{self.stem}.epochs.jsonl"), "--resume", "--json", "-q"]

    def execute(self, device: str) -> dict:
        """Run the command unless its result is recorded; returns the JSON-line record."""
        if self.record.exists() and self.out.exists():
            rec = json.loads(self.record.read_text())
            rec.setdefault("finished", dt.datetime.fromtimestamp(self.record.stat().st_mtime, dt.timezone.utc)
                           .strftime("%Y-%m-%d %H:%M UTC"))
            rec["cached"] = True
            return rec
        cmd = self.command() + ["--device", device]
        log("$ " + shlex.join(["kdfine", *cmd[3:]]))
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            log(r.stderr.strip())
            raise SystemExit(f"reproduce_kd: run {self.stem} failed with exit code {r.returncode}")
        result = json.loads(r.stdout)
        m = result["metrics"]
        rec = {"run": self.key, "seed": self.seed, "command": shlex.join(["kdfine", *cmd[3:]]),
               "checkpoint": str(self.out), "sha256": result["sha256"], "arch": result["arch"],
               "test_top1": m["test_top1"], "test_nll": m.get("test_nll"), "train_acc": m.get("train_acc"),
               "img_per_s": m.get("img_per_s"), "seconds": round(seconds, 1),
               "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        self.record.write_text(json.dumps(rec) + "\n")
        rec["cached"] = False
        return rec


def plan(scale: Scale, seeds: int, data: list[str], common: list[str], teacher_epochs: int, epochs: int,
         workdir: Path) -> tuple[Run, list[Run]]:
    """The teacher run (seed 0) and, seed by seed, every student run."""
    teacher = Run("teacher", 0, ["train-teacher", "--arch", scale.teacher, *data, *common,
                                 "--epochs", str(teacher_epochs), "--seed", "0"], workdir)
    runs = []
    for seed in range(seeds):
        opts = [*data, *common, "--epochs", str(epochs), "--seed", str(seed)]
        mse_student = None
        for _, key, loss, tau in COLUMNS:
            if loss == "ce":
                run = Run(key, seed, ["train-teacher", "--arch", scale.student, *opts], workdir)
            else:
                kd = ["--loss", loss, "--alpha", "1.0"] + (["--tau", str(tau)] if tau is not None else [])
                run = Run(key, seed, ["distill", "--teacher", str(teacher.out), "--arch", scale.student, *kd, *opts],
                          workdir)
            if key == "mse":
                mse_student = run
            runs.append(run)
        runs.append(Run("small-ce", seed, ["train-teacher", "--arch", scale.small, *opts], workdir))
        runs.append(Run("seq-direct", seed, ["distill", "--teacher", str(teacher.out), "--arch", scale.small,
                                             "--loss", "mse", *opts], workdir))
        runs.append(Run("seq-chain", seed, ["distill", "--teacher", str(mse_student.out), "--arch", scale.small,
                                            "--loss", "mse", *opts], workdir))
    return teacher, runs


# ------------------------------------------------------------------------------------------ tables


def summary(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = summary([100 * v for v in values])
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def tables(scale: Scale, records: list[dict], teacher: dict, header: list[str]) -> str:
    by_key: dict[str, list[float]] = {}
    for r in records:
        by_key.setdefault(r["run"], []).append(r["test_top1"])
    n = max((len(v) for v in by_key.values()), default=0)
    lines = [*header, ""]
    lines.append(f"Teacher {scale.teacher}: test top-1 {100 * teacher['test_top1']:.2f}% (seed 0). "
                 f"Students: {scale.student}, alpha = 1.0, test top-1 (%) as mean ± std over {n} seed(s).")
    lines.append("")
    lines.append("| student | " + " | ".join(c[0] for c in COLUMNS) + " |")
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    lines.append(f"| {scale.student} (kdfine) | " + " | ".join(cell(by_key.get(c[1], [])) for c in COLUMNS) + " |")
    if scale.name == "paper":
        lines.append("| WRN-16-2 (Kim et al. 2021) | " + " | ".join(
            f"{PAPER_KL[c[1]]:.2f}" if c[1] in PAPER_KL else "—" for c in COLUMNS) + " |")
    lines += ["", "Sequential distillation (MSE, alpha = 1.0), test top-1 (%):", "",
              "| small student | path | test top-1 |", "|---|---|---|",
              f"| {scale.small} | CE only (no teacher) | {cell(by_key.get('small-ce', []))} |",
              f"| {scale.small} | {scale.teacher} → {scale.small} | {cell(by_key.get('seq-direct', []))} |",
              f"| {scale.small} | {scale.teacher} → {scale.student} → {scale.small} | "
              f"{cell(by_key.get('seq-chain', []))} |", ""]
    lines += ["Ordering checks (the paper: MSE ≥ KL with large τ ≥ KL with small τ > CE only; "
              "large → medium → small ≥ large → small):", ""]
    lines += [f"- {c}" for c in ordering(by_key)]
    return "\n".join(lines) + "\n"


def ordering(by_key: dict[str, list[float]]) -> list[str]:
    """Each of the paper's claims, with our difference of means and the larger of the two stds."""
    claims = [("mse", "kl-20", "MSE ≥ KL τ=20", False), ("mse", "kl-inf", "MSE ≥ KL τ=∞", False),
              ("kl-20", "kl-1", "KL τ=20 ≥ KL τ=1", False), ("kl-5", "kl-1", "KL τ=5 ≥ KL τ=1", False),
              ("kl-1", "ce", "KL τ=1 > CE only", True), ("mse", "ce", "MSE > CE only", True),
              ("seq-chain", "seq-direct", "large → medium → small ≥ large → small", False)]
    out = []
    for a, b, text, strict in claims:
        if not by_key.get(a) or not by_key.get(b):
            continue
        (ma, sa), (mb, sb) = summary([100 * v for v in by_key[a]]), summary([100 * v for v in by_key[b]])
        diff = ma - mb
        spread = max(s for s in (sa, sb, 0.0) if s is not None)
        verdict = "holds" if diff > 0 or (diff == 0 and not strict) else "does not hold"
        if spread and abs(diff) < spread:
            verdict += " (difference within one std across seeds)"
        out.append(f"{text}: {verdict}, {diff:+.2f} points")
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="quick")
    p.add_argument("--workdir", help="checkpoints, logs and results [default: $KDFINE_CACHE/bench/kd-SCALE, "
                                     "KDFINE_CACHE defaulting to ~/.cache/kdfine]")
    p.add_argument("--seeds", type=int, help="student seeds (0..N-1) [default: the scale's]")
    p.add_argument("--epochs", type=int, help="student epochs [default: the scale's]")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs [default: the scale's]")
    p.add_argument("--device", default="auto", help="passed to every kdfine command (auto, cpu, cuda, ...)")
    p.add_argument("--cifar-root", help="cifar10-cpu: an extracted CIFAR-10 JPEG tree (train/, test/)")
    p.add_argument("--cifar-archive", help="cifar10-cpu: the cifar10-jpeg.tar.gz to extract when no tree is given "
                                           "[default: shared/data/cifar10-jpeg.tar.gz beside or inside the repo]")
    p.add_argument("--data-root", help="paper: torchvision data directory, passed as --data-root")
    p.add_argument("--download", action="store_true", help="paper: let torchvision fetch CIFAR-100")
    p.add_argument("--dry-run", action="store_true", help="print the kdfine commands and exit")
    args = p.parse_args(argv)

    scale = SCALES[args.scale]
    seeds = args.seeds or scale.seeds
    epochs = args.epochs or scale.epochs
    teacher_epochs = args.teacher_epochs or scale.teacher_epochs
    cache = Path(os.environ.get("KDFINE_CACHE") or Path.home() / ".cache" / "kdfine")
    workdir = Path(args.workdir).expanduser() if args.workdir else cache / "bench" / f"kd-{scale.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(REPO))

    data = data_options(scale, args, workdir)
    teacher, runs = plan(scale, seeds, data, scale.train_options, teacher_epochs, epochs, workdir)
    if args.dry_run:
        for r in [teacher, *runs]:
            print(shlex.join(["kdfine", *r.command()[3:], "--device", args.device]))
        return

    started = dt.datetime.now(dt.timezone.utc)
    header = [f"### Scale `{scale.name}`", "",
              f"Command: `{shlex.join(['python', 'bench/reproduce_kd.py', *(sys.argv[1:] if argv is None else argv)])}`",
              f"Started {started:%Y-%m-%d %H:%M} UTC on {platform.node() or 'unknown host'} "
              f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"kdfine device `{args.device}`).",
              f"Data: {scale.note}. Teacher {teacher_epochs} epochs, students {epochs} epochs"
              + (f"; options {' '.join(scale.train_options)}" if scale.train_options else "") + "."]
    jsonl = (workdir / "runs.jsonl").open("a")
    total = len(runs) + 1
    t_rec = teacher.execute(args.device)
    emit(t_rec, scale, jsonl, 1, total)
    records = []
    for i, run in enumerate(runs, start=2):
        rec = run.execute(args.device)
        emit(rec, scale, jsonl, i, total)
        records.append(rec)
    jsonl.close()
    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    fresh = sum(r["seconds"] for r in [t_rec, *records] if not r["cached"])
    done = sorted(r["finished"] for r in [t_rec, *records])
    header.append(f"Runs trained {done[0]} to {done[-1]}. Wall time of this invocation {elapsed / 60:.1f} min "
                  f"({fresh / 60:.1f} min of it in runs trained now; cached runs are reused).")
    md = tables(scale, records, t_rec, header)
    (workdir / "results.md").write_text(md)
    print(md, flush=True)


def emit(rec: dict, scale: Scale, jsonl, i: int, total: int) -> None:
    line = json.dumps({"scale": scale.name, **rec})
    print(line, flush=True)
    jsonl.write(line + "\n")
    jsonl.flush()
    state = "cached" if rec["cached"] else f"{rec['seconds']:.0f} s"
    log(f"[{i}/{total}] {rec['run']} seed {rec['seed']} ({rec['arch']}): test top-1 "
        f"{100 * rec['test_top1']:.2f}% ({state})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Reproduce the comparison of Kim et al., "Comparing Kullback-Leibler Divergence and Mean Squared
Error Loss in Knowledge Distillation" (IJCAI 2021) with the ``kdfine`` command line.

For every seed, one student architecture is trained with cross-entropy only, and distilled from
one frozen teacher with KL at tau in {1, 3, 5, 20}, with ``kl-inf`` (tau -> inf), with MSE on
logits, and with the two logit losses the field moved to since: decoupled KD (``dkd``, Zhao et al.,
CVPR 2022, tau 4, dkd_alpha 1, dkd_beta 8, its warm-up scaled to the schedule) and logit
standardisation (``kl-std``, Sun et al., CVPR 2024, tau 2), all alpha = 1.0 (pure distillation). Sequential rows compare a smaller student distilled
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
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import benchinfo  # noqa: E402

# Table columns: (label, run key, --loss, --tau). alpha = 1.0, as in the paper's comparison, except
# the last two: DKD and KL-std with their authors' weights, learning rate and decay (AUTHOR_MIXES).
COLUMNS = [("CE only", "ce", "ce", None), ("KL τ=1", "kl-1", "kl", 1), ("KL τ=3", "kl-3", "kl", 3),
           ("KL τ=5", "kl-5", "kl", 5), ("KL τ=20", "kl-20", "kl", 20),
           ("KL τ=∞ (kl-inf)", "kl-inf", "kl-inf", None),
           ("MSE", "mse", "mse", None), ("DKD τ=4", "dkd", "dkd", 4), ("KL-std τ=2", "kl-std", "kl-std", 2),
           ("DKD + CE†", "dkd-ce", "dkd", 4), ("KL-std ×9 + 0.1 CE†", "kl-std-ce", "kl-std", 2)]
# † The authors' mixes at their lr 0.05 and weight decay 5e-4, in kdfine's terms (--alpha splits a
# total weight of 1; scaling an SGD loss by c = scaling the lr by c and the decay by 1/c):
# mdistiller's CE + DKD = 2 x (0.5 CE + 0.5 DKD); Sun et al.'s 0.1 CE + 9 KL-std = 9.1 x (alpha 9/9.1).
AUTHOR_MIXES = {"dkd-ce": ["--alpha", "0.5", "--lr", "0.1", "--weight-decay", "2.5e-4"],
                "kl-std-ce": ["--alpha", "0.989011", "--lr", "0.455", "--weight-decay", "5.4945e-5"]}
# The label-noise claim: students of a teacher trained on the noisy labels, against CE on the same labels.
NOISE_COLUMNS = [("CE only", "ce", "ce", None), ("KL τ=0.5", "kl-0.5", "kl", 0.5), ("KL τ=1", "kl-1", "kl", 1),
                 ("KL τ=3", "kl-3", "kl", 3), ("KL τ=20", "kl-20", "kl", 20),
                 ("KL τ=∞ (kl-inf)", "kl-inf", "kl-inf", None), ("MSE", "mse", "mse", None)]
# Sequential distillation as the paper ran it, with KL tau = 3 and with MSE.
SEQ_LOSSES = [("KL τ=3", "kl-3", "kl", 3), ("MSE", "mse", "mse", None)]
# Kim et al. (IJCAI 2021), CIFAR-100, WRN-28-4 -> WRN-16-2, KL with alpha = 1: student test top-1 (%).
PAPER_KL = {"kl-1": 72.90, "kl-3": 74.24, "kl-5": 74.88, "kl-20": 75.76, "kl-inf": 75.51}
# KL tau = 3, WRN-16-2 students: from WRN-28-4, from WRN-16-4, and WRN-28-4 -> WRN-16-4 -> WRN-16-2
# (a secondary source's report of the paper's sequential table; not checked against a primary one).
PAPER_SEQ_KL3 = {"direct": 74.24, "medium": 74.52, "chain": 74.84}
# Published logit-loss results on CIFAR-100 for WRN-40-2 -> WRN-16-2: another teacher than the KD paper's
# WRN-28-4, and mdistiller's recipe (240 epochs, SGD 0.05, batch 64, wd 5e-4, x0.1 at 150, 180, 210).
# (source, KD (KL), DKD, KD+LS (kl-std), how each was trained).
PUBLISHED_LOGIT = [
    ("Zhao et al. 2022 (DKD), mdistiller's README", 74.92, 76.23, None,
     "KD: 0.9 KL τ=4 + 0.1 CE; DKD: CE + DKD τ=4, α=1, β=6 (this pair's config), warm-up 20"),
    ("Sun et al. 2024 (logit standardisation), their README", 74.92, 76.24, 76.11,
     "KD+LS: 9 KL-std τ=2 + 0.1 CE; the KD and DKD cells restate Zhao et al.'s (76.24 there, 76.23 in mdistiller)"),
]
# DKD's warm-up: the authors' 20 of 240 epochs, as a share of a shorter schedule (at least 1 epoch).
DKD_WARMUP, DKD_EPOCHS = 20, 240
CLAIMS = ("compare", "sequential", "noise")

# The official recipe (jhoon-oh/kd_data): SGD 0.1, momentum 0.9, Nesterov, wd 5e-4 not on BatchNorm
# or biases, batch 128, 200 epochs, x0.1 at epochs 100 and 150, pad-crop + flip, alpha = 1, fp32.
# The milestones are at 50% and 75% of each run's epochs (Scale.milestones): 100 and 150 of 200.
PAPER_RECIPE = ["--optimizer", "sgd", "--lr", "0.1", "--nesterov", "--weight-decay", "5e-4", "--batch-size", "128",
                "--augment", "crop-flip", "--precision", "fp32"]


@dataclass
class Scale:
    """One experimental setting: data, the networks (teacher -> medium -> student), epochs, seeds,
    the options every run takes (``recipe``), the label noises of the noise claim, and what the
    scale keeps of the paper's recipe (``keeps``)."""

    name: str
    data: str
    teacher: str
    medium: str
    student: str
    teacher_epochs: int
    epochs: int
    seeds: int
    recipe: list[str] = field(default_factory=list)
    noises: tuple[str, ...] = ("sym:0.4", "asym:0.4")
    val_fraction: float = 0.1
    per_class: int = 0  # a class-balanced subset of the training set (--keep); 0: all of it
    noise_teacher: str = ""  # the noise claim's teacher when not ``teacher``
    dkd_warmup: int | None = None  # dkd's --dkd-warmup; None: the authors' share of the student epochs
    milestones: bool = False  # --schedule multistep:E/2,3E/4:0.1 written out for each run's E epochs
    note: str = ""
    keeps: str = ""


SCALES = {
    "quick": Scale("quick", "digits", "cnn", "cnn-16", "cnn-8", teacher_epochs=30, epochs=30, seeds=5,
                   note="digits: 1438 train / 359 test images (scikit-learn's 8x8 digits, stratified split)",
                   keeps="kdfine's default optimizer, which is the paper's (SGD 0.1, momentum 0.9, Nesterov, "
                         "wd 5e-4 not on BatchNorm/biases, batch 128, x0.1 at 50% and 75% of the epochs), "
                         "alpha = 1; shortens the data (digits, no augmentation), the networks and the epochs"),
    "cifar10-cpu": Scale("cifar10-cpu", "cifar10-jpeg", "wrn-16-2", "wrn-16-1", "wrn-10-1", teacher_epochs=15,
                         epochs=15, seeds=2, recipe=["--eval-every", "1000"], val_fraction=0.0, per_class=200,
                         noise_teacher="wrn-16-1",
                         note="CIFAR-10 JPEG: 2,000 train images (200 per class, --keep), all 10,000 test images",
                         keeps="the paper's optimizer and schedule shape (SGD 0.1 Nesterov, wd 5e-4 not on "
                               "BatchNorm/biases, batch 128, x0.1 at 50% and 75%), crop+flip, alpha = 1; shortens "
                               "the data (CIFAR-10, 2k images), the networks (by default WRN-16-2 -> WRN-16-1 -> "
                               "WRN-10-1; the noise claim's teacher is WRN-16-1) and the epochs, to fit 2 shared cores; "
                               "bf16 teachers where the CPU has native bf16"),
    "paper": Scale("paper", "cifar100", "wrn-28-4", "wrn-16-4", "wrn-16-2", teacher_epochs=200, epochs=200, seeds=3,
                   recipe=PAPER_RECIPE, dkd_warmup=DKD_WARMUP, milestones=True,
                   note="CIFAR-100: 50,000 train / 10,000 test images (--val-fraction 0, the paper's own split, "
                        "trains on all 50,000)",
                   keeps="the whole official recipe"),
}


@dataclass
class Plan:
    """The runs of one invocation, in the order they run: the clean teacher and every run of the
    claims asked for (each teacher before its students), plus lookups for the tables."""

    teacher: "Run"
    runs: list["Run"] = field(default_factory=list)

    def add(self, run: "Run") -> "Run":
        if all(r.stem != run.stem for r in self.runs):
            self.runs.append(run)
        return run


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
        keep = balanced_keep(root, workdir, per_class=scale.per_class)
        return ["--data", f"imagefolder:{root}", "--keep", str(keep)]
    opts = ["--data", args.data or scale.data]
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

    def cached(self) -> dict | None:
        """The recorded result of a finished run, else None."""
        if not (self.record.exists() and self.out.exists()):
            return None
        rec = json.loads(self.record.read_text())
        rec.setdefault("finished", dt.datetime.fromtimestamp(self.record.stat().st_mtime, dt.timezone.utc)
                       .strftime("%Y-%m-%d %H:%M UTC"))
        rec["cached"] = True
        return rec

    def execute(self, device: str) -> dict:
        """Run the command unless its result is recorded; returns the JSON-line record."""
        rec = self.cached()
        if rec is not None:
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
        best = m.get("best_epoch") is not None  # --keep-best val: test_top1 is the best-val epoch's
        rec = {"run": self.key, "seed": self.seed, "command": shlex.join(["kdfine", *cmd[3:]]),
               "checkpoint": str(self.out), "sha256": result["sha256"], "arch": result["arch"],
               "test_top1": m["test_top1"], "test_top1_last": m.get("test_top1_last", m["test_top1"]),
               "test_top1_best_val": m["test_top1"] if best else None, "best_epoch": m.get("best_epoch"),
               "val_top1_best": m.get("val_top1_best"), "test_nll": m.get("test_nll"),
               "train_acc": m.get("train_acc"), "img_per_s": m.get("img_per_s"), "seconds": round(seconds, 1),
               "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        self.record.write_text(json.dumps(rec) + "\n")
        rec["cached"] = False
        return rec


def kd_options(loss: str, tau: float | None, dkd_warmup: int) -> list[str]:
    opts = ["--loss", loss, "--alpha", "1.0"] + (["--tau", f"{tau:g}"] if tau is not None else [])
    return opts + (["--dkd-warmup", str(dkd_warmup)] if loss == "dkd" else [])


def with_options(argv: list[str], overrides: list[str]) -> list[str]:
    """``argv`` with each ``--flag value`` pair of ``overrides`` replacing that flag's value where
    ``argv`` has it, appended where it does not (every flag once, so no value hides another)."""
    out = list(argv)
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def dkd_warmup_epochs(scale: Scale, epochs: int) -> int:
    """The scale's dkd warm-up at its own epochs (the paper's: the authors' 20), else the authors'
    share (20 of 240 epochs) of ``epochs``, at least 1: a shortened run still reaches full weight."""
    if scale.dkd_warmup is not None and epochs == scale.epochs:
        return scale.dkd_warmup
    return max(1, math.ceil(epochs * DKD_WARMUP / DKD_EPOCHS))


def epoch_options(scale: Scale, epochs: int) -> list[str]:
    """``--epochs E``, and the paper's step schedule for E epochs (x0.1 at E/2 and 3E/4) where the
    scale writes it out: the 200-epoch recipe's 100 and 150, and the same shape for a shortened run."""
    opts = ["--epochs", str(epochs)]
    return opts + (["--schedule", f"multistep:{epochs // 2},{3 * epochs // 4}:0.1"] if scale.milestones else [])


def plan(scale: Scale, seeds: int, data: list[str], common: list[str], teacher_epochs: int, epochs: int,
         workdir: Path, claims: Sequence[str] = CLAIMS, columns: Sequence[tuple] = COLUMNS) -> Plan:
    """Every run of the claims asked for, claim by claim and seed by seed (the compare claim's
    ``columns`` in their order). Runs shared by two claims (the direct KL tau=3 and MSE students)
    appear once."""
    t_opts = [*data, *common, *epoch_options(scale, teacher_epochs), "--seed", "0"]
    p = Plan(Run("teacher", 0, ["train-teacher", "--arch", scale.teacher, *t_opts], workdir))
    warmup = dkd_warmup_epochs(scale, epochs)

    def student(key: str, seed: int, teacher: Run | None, arch: str, loss: str, tau, extra=()) -> Run:
        opts = [*data, *extra, *common, *epoch_options(scale, epochs), "--seed", str(seed)]
        if teacher is None:
            return Run(key, seed, ["train-teacher", "--arch", arch, *opts], workdir)
        argv = ["distill", "--teacher", str(teacher.out), "--arch", arch, *kd_options(loss, tau, warmup), *opts]
        return Run(key, seed, with_options(argv, AUTHOR_MIXES.get(key, [])), workdir)

    for claim in claims:
        if claim in ("compare", "sequential"):
            p.add(p.teacher)
        if claim == "sequential":  # the medium network as a teacher of its own, trained with CE
            med_t = p.add(Run("medium-teacher", 0, ["train-teacher", "--arch", scale.medium, *t_opts], workdir))
        for seed in range(seeds):
            if claim == "compare":
                for _, key, loss, tau in columns:
                    p.add(student(key, seed, None if loss == "ce" else p.teacher, scale.student, loss, tau))
            elif claim == "sequential":
                for _, key, loss, tau in SEQ_LOSSES:
                    p.add(student(key, seed, p.teacher, scale.student, loss, tau))  # large -> small
                    p.add(student(f"seq-medium-{key}", seed, med_t, scale.student, loss, tau))  # medium -> small
                    mid = p.add(student(f"seq-mid-{key}", seed, p.teacher, scale.medium, loss, tau))
                    p.add(student(f"seq-chain-{key}", seed, mid, scale.student, loss, tau))  # large -> medium -> small
        if claim == "noise":  # seed by seed, every noise: a plan cut short still has seeds of each
            for seed in range(seeds):
                for noise in scale.noises:
                    tag, extra = noise.replace(":", ""), ["--label-noise", noise]
                    t = p.add(Run(f"teacher-{tag}", 0, ["train-teacher", "--arch", scale.noise_teacher or scale.teacher,
                                                        *data, *extra, *common, *epoch_options(scale, teacher_epochs),
                                                        "--seed", "0"], workdir))
                    for _, key, loss, tau in NOISE_COLUMNS:
                        p.add(student(f"{tag}-{key}", seed, None if loss == "ce" else t, scale.student, loss, tau,
                                      extra))
    return p


# ------------------------------------------------------------------------------------------ tables


def summary(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = summary([100 * v for v in values])
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def cells(by_key: dict[str, list[dict]], key: str) -> str:
    """``last-epoch / best-val`` test top-1 over seeds (the best-val part when the runs kept it)."""
    recs = by_key.get(key, [])
    last = cell([r["test_top1_last"] for r in recs])
    best = [r["test_top1_best_val"] for r in recs if r.get("test_top1_best_val") is not None]
    return f"{last} / {cell(best)}" if best else last


def tables(scale: Scale, records: list[dict], teachers: dict[str, dict], header: list[str],
           claims: Sequence[str]) -> str:
    by_key: dict[str, list[dict]] = {}
    for r in records:
        by_key.setdefault(r["run"], []).append(r)
    n = max((len(v) for v in by_key.values()), default=0)
    best = any(r.get("test_top1_best_val") is not None for r in records)
    what = "last-epoch / best-validation-epoch test top-1 (%)" if best else "last-epoch test top-1 (%)"
    lines = [*header, "", f"Cells: {what}, mean ± std over the seeds that finished (at most {n}); "
             "— where no run finished. alpha = 1.0 for every distillation but the columns marked †: the "
             "authors' mixes with CE at their lr 0.05 and weight decay 5e-4, in kdfine's terms "
             "(DKD + CE: --alpha 0.5 --lr 0.1 --weight-decay 2.5e-4; KL-std: --alpha 0.989011 --lr 0.455 "
             "--weight-decay 5.4945e-5).", ""]
    for name, rec in teachers.items():
        kept = (f"; its best-validation epoch {rec['best_epoch']}, the weights the students learn from: "
                f"{100 * rec['test_top1_best_val']:.2f}%" if rec.get("test_top1_best_val") is not None else "")
        lines.append(f"- {name} (seed 0): last-epoch test top-1 {100 * rec['test_top1_last']:.2f}%{kept}")
    if "compare" in claims:
        lines += ["", f"KL against MSE, student {scale.student} of teacher {scale.teacher}:", "",
                  "| student | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|",
                  f"| {scale.student} (kdfine) | " + " | ".join(cells(by_key, c[1]) for c in COLUMNS) + " |"]
        if scale.name == "paper":
            lines.append("| WRN-16-2 (Kim et al. 2021) | " + " | ".join(
                f"{PAPER_KL[c[1]]:.2f}" if c[1] in PAPER_KL else "— (not verified)" if c[1] == "mse" else "—"
                for c in COLUMNS) + " |")
            lines += published_logit_table()
    if "sequential" in claims:
        lines += ["", f"Sequential distillation, student {scale.student}:", "",
                  "| path | " + " | ".join(c[0] for c in SEQ_LOSSES) + " |" + (" KL τ=3, published |"
                                                                                if scale.name == "paper" else ""),
                  "|---" * (len(SEQ_LOSSES) + 1 + (scale.name == "paper")) + "|"]
        for path, fmt_key in [("direct", "{k}"), ("medium", "seq-medium-{k}"), ("chain", "seq-chain-{k}")]:
            label = {"direct": f"{scale.teacher} → {scale.student}",
                     "medium": f"{scale.medium} (CE) → {scale.student}",
                     "chain": f"{scale.teacher} → {scale.medium} → {scale.student}"}[path]
            row = f"| {label} | " + " | ".join(cells(by_key, fmt_key.format(k=c[1])) for c in SEQ_LOSSES) + " |"
            lines.append(row + (f" {PAPER_SEQ_KL3[path]:.2f} |" if scale.name == "paper" else ""))
    if "noise" in claims:
        lines += ["", f"Label noise: teacher {scale.noise_teacher or scale.teacher} and students {scale.student} on the same noisy "
                  "labels; CE only is the student trained on them without a teacher:", "",
                  "| noise | " + " | ".join(c[0] for c in NOISE_COLUMNS) + " |",
                  "|---" * (len(NOISE_COLUMNS) + 1) + "|"]
        for noise in scale.noises:
            tag = noise.replace(":", "")
            lines.append(f"| {noise} | " + " | ".join(cells(by_key, f"{tag}-{c[1]}") for c in NOISE_COLUMNS) + " |")
    lines += ["", "Claims (difference of means of the last-epoch accuracy; the larger std of the two beside it):", ""]
    lines += [f"- {c}" for c in verdicts(by_key, scale, claims)]
    return "\n".join(lines) + "\n"


def published_logit_table() -> list[str]:
    """The published DKD and logit-standardisation numbers, which come from another teacher (WRN-40-2)
    and recipe than the KD paper's row: printed apart, as context, not as a target of this table."""
    fmt = lambda v: "—" if v is None else f"{v:.2f}"
    return ["", "Published logit losses on CIFAR-100, WRN-40-2 → WRN-16-2. The pair does not match the table "
            "above (teacher WRN-40-2, not WRN-28-4), nor does the recipe (mdistiller's: 240 epochs, SGD 0.05, "
            "batch 64, CE in every loss); no number of the KD paper covers this pair:", "",
            "| source | KD | DKD | KD+LS (kl-std) | how |", "|---|---|---|---|---|",
            *(f"| {src} | {fmt(kd)} | {fmt(dkd)} | {fmt(ls)} | {how} |" for src, kd, dkd, ls, how in PUBLISHED_LOGIT)]


def verdicts(by_key: dict[str, list[dict]], scale: Scale, claims: Sequence[str]) -> list[str]:
    """Each of the paper's claims that the finished runs can test: our difference of means."""
    pairs = []
    if "compare" in claims:
        pairs += [("mse", "kl-20", "MSE ≥ KL τ=20", False), ("mse", "kl-inf", "MSE ≥ KL τ=∞", False),
                  ("kl-20", "kl-1", "KL τ=20 ≥ KL τ=1", False), ("kl-5", "kl-1", "KL τ=5 ≥ KL τ=1", False),
                  ("kl-1", "ce", "KL τ=1 > CE only", True), ("mse", "ce", "MSE > CE only", True),
                  # the later papers: DKD and standardised KL beat KL near τ = 4; what of the logits to match
                  ("dkd", "kl-3", "DKD ≥ KL τ=3", False), ("dkd", "kl-5", "DKD ≥ KL τ=5", False),
                  ("kl-std", "kl-3", "KL-std τ=2 ≥ KL τ=3", False), ("kl-std", "kl-5", "KL-std τ=2 ≥ KL τ=5", False),
                  ("kl-std", "mse", "KL-std τ=2 ≥ MSE", False), ("dkd", "mse", "DKD ≥ MSE", False),
                  ("dkd-ce", "kl-3", "DKD + CE† ≥ KL τ=3", False), ("kl-std-ce", "kl-3", "KL-std ×9 + 0.1 CE† ≥ KL τ=3", False),
                  ("dkd-ce", "ce", "DKD + CE† > CE only", True), ("kl-std-ce", "ce", "KL-std ×9 + 0.1 CE† > CE only", True)]
    if "sequential" in claims:
        for label, key, _, _ in SEQ_LOSSES:
            pairs += [(f"seq-chain-{key}", key, f"{label}: large → medium → small ≥ large → small", False),
                      (f"seq-chain-{key}", f"seq-medium-{key}", f"{label}: large → medium → small ≥ medium → small",
                       False)]
    if "noise" in claims:
        for noise in scale.noises:
            t = noise.replace(":", "")
            pairs += [(f"{t}-kl-0.5", f"{t}-ce", f"{noise}: KL τ=0.5 > CE only", True),
                      (f"{t}-kl-1", f"{t}-ce", f"{noise}: KL τ=1 > CE only", True),
                      (f"{t}-kl-0.5", f"{t}-kl-20", f"{noise}: KL τ=0.5 ≥ KL τ=20 (small τ mitigates the noise)",
                       False),
                      (f"{t}-kl-1", f"{t}-mse", f"{noise}: KL τ=1 ≥ MSE", False)]
    out = []
    for a, b, text, strict in pairs:
        if not by_key.get(a) or not by_key.get(b):
            out.append(f"{text}: not tested (runs not finished)")
            continue
        (ma, sa), (mb, sb) = (summary([100 * r["test_top1_last"] for r in by_key[k]]) for k in (a, b))
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
    p.add_argument("--claims", default=",".join(CLAIMS),
                   help="comma-separated, run in this order: compare (KL vs MSE), sequential, noise "
                        "[default: %(default)s]")
    p.add_argument("--workdir", help="checkpoints, logs and results [default: $KDFINE_CACHE/bench/kd-SCALE, "
                                     "KDFINE_CACHE defaulting to ~/.cache/kdfine]")
    p.add_argument("--seeds", type=int, help="student seeds (0..N-1) [default: the scale's]")
    p.add_argument("--epochs", type=int, help="student epochs [default: the scale's]")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs [default: the scale's]")
    p.add_argument("--teacher-arch", help="the teacher's architecture [default: the scale's]")
    p.add_argument("--columns", help="compare: the run keys of the columns to train, in this order (e.g. "
                                     "mse,dkd,kl-std) [default: all: " + ",".join(c[1] for c in COLUMNS) + "]")
    p.add_argument("--data", help="quick, paper: another kdfine --data spec (e.g. imagefolder:DIR where CIFAR-100 "
                                  "cannot be downloaded) [default: the scale's]")
    p.add_argument("--val-fraction", type=float, help="held-out validation share for --keep-best val (0: none) "
                                                      "[default: the scale's]")
    p.add_argument("--device", default="auto", help="passed to every kdfine command (auto, cpu, cuda, ...)")
    p.add_argument("--cifar-root", help="cifar10-cpu: an extracted CIFAR-10 JPEG tree (train/, test/)")
    p.add_argument("--cifar-archive", help="cifar10-cpu: the cifar10-jpeg.tar.gz to extract when no tree is given "
                                           "[default: shared/data/cifar10-jpeg.tar.gz beside or inside the repo]")
    p.add_argument("--data-root", help="paper: torchvision data directory, passed as --data-root")
    p.add_argument("--download", action="store_true", help="paper: let torchvision fetch CIFAR-100")
    p.add_argument("--dry-run", action="store_true", help="print the kdfine commands and exit")
    p.add_argument("--report-only", action="store_true", help="tables from the finished runs only; train nothing")
    args = p.parse_args(argv)

    scale = SCALES[args.scale]
    if args.teacher_arch:
        scale = replace(scale, teacher=args.teacher_arch)
    claims = [c.strip() for c in args.claims.split(",") if c.strip()]
    if not claims or any(c not in CLAIMS for c in claims):
        p.error(f"--claims {args.claims}: expected a comma-separated list of {', '.join(CLAIMS)}")
    by_key = {c[1]: c for c in COLUMNS}
    keys = [k.strip() for k in (args.columns or "").split(",") if k.strip()] or list(by_key)
    if any(k not in by_key for k in keys):
        p.error(f"--columns {args.columns}: expected keys among {', '.join(by_key)}")
    seeds = args.seeds or scale.seeds
    epochs = args.epochs or scale.epochs
    teacher_epochs = args.teacher_epochs or scale.teacher_epochs
    val = scale.val_fraction if args.val_fraction is None else args.val_fraction
    common = [*scale.recipe, *(["--val-fraction", f"{val:g}", "--keep-best", "val"] if val > 0 else [])]
    cache = Path(os.environ.get("KDFINE_CACHE") or Path.home() / ".cache" / "kdfine")
    workdir = Path(args.workdir).expanduser() if args.workdir else cache / "bench" / f"kd-{scale.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(REPO))

    data = data_options(scale, args, workdir)
    runs = plan(scale, seeds, data, common, teacher_epochs, epochs, workdir, claims, [by_key[k] for k in keys]).runs
    if args.dry_run:
        for r in runs:
            print(shlex.join(["kdfine", *r.command()[3:], "--device", args.device]))
        return

    started = dt.datetime.now(dt.timezone.utc)
    header = [f"### Scale `{scale.name}`: {', '.join(claims)}", "",
              f"Command: `{shlex.join(['python', 'bench/reproduce_kd.py', *(sys.argv[1:] if argv is None else argv)])}`",
              f"Started {started:%Y-%m-%d %H:%M} UTC on {platform.node() or 'unknown host'} "
              f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"kdfine device `{args.device}`).",
              f"Data: {f'{args.data}, instead of the scale’s ({scale.note})' if args.data else scale.note}; "
              + (f"{100 * val:g}% of the training images held out for validation (--keep-best val). " if val > 0
                 else "no validation split (last-epoch accuracy only). ")
              + f"Teachers {teacher_epochs} epochs, students {epochs} epochs"
              + (f"; options {' '.join(common)}" if common else "") + ".",
              f"Networks: teacher {scale.teacher}, medium {scale.medium}, student {scale.student}; dkd warm-up "
              f"{dkd_warmup_epochs(scale, epochs)} epoch(s). Load average at the start: {benchinfo.load_average()}; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
              f"Keeps of the paper's recipe: {scale.keeps}."]
    records, teachers = [], {}
    with (workdir / "runs.jsonl").open("a") as jsonl:
        for i, run in enumerate(runs, start=1):
            rec = run.cached() if args.report_only else run.execute(args.device)
            if rec is None:
                continue
            emit(rec, scale, jsonl, i, len(runs))
            if "teacher" in run.key:
                teachers[f"{run.key} {rec['arch']}"] = rec
            else:
                records.append(rec)
    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    done = [rec for rec in [*teachers.values(), *records]]
    fresh = sum(r["seconds"] for r in done if not r["cached"])
    stamps = sorted(r["finished"] for r in done) or ["—"]
    header.append(f"Runs finished {stamps[0]} to {stamps[-1]}: {len(done)} of {len(runs)} "
                  f"({sum(r['seconds'] for r in done) / 60:.0f} min of training in all). Wall time of this "
                  f"invocation {elapsed / 60:.1f} min ({fresh / 60:.1f} min of it in runs trained now).")
    md = tables(scale, records, teachers, header, claims)
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
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C or a time budget: the finished runs are kept, the current one resumes
        sys.exit("reproduce_kd: interrupted; the same command continues where this one stopped")

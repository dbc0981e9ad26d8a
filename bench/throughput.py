#!/usr/bin/env python
"""Training and feature-extraction throughput of kdfine against a conventional pipeline.

kdfine ("A") is measured as users run it: ``kdfine.train.loop.fit`` (what ``train-teacher`` and
``distill`` call) on CIFAR-10 decoded once into memory (``--data imagefolder:DIR``), in each
precision of ``--precisions`` (CPU default: fp32 and bf16, and the table marks the one that
``--precision auto`` picks on this machine; CUDA default: auto, i.e. bf16), channels_last, and
``features.extract`` for ``eval --dump-features`` (its default: fp32 on CPUs). The conventional pipeline ("B") is the one of
the papers' code and torchdistill, implemented here: ``torchvision.datasets.ImageFolder`` over the
JPEG tree, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, a
``DataLoader`` with 2 worker processes (persistent, so worker start-up is not charged to it), fp32
NCHW, teacher under ``torch.no_grad()``. Both train the same model (same initialisation) with the
same optimizer (SGD, momentum 0.9, Nesterov, weight decay 5e-4 on weights), batch 128, the same
loss (CE for teachers, MSE on logits for distillation), the same normalisation statistics.

Measurement: after ``--warmup`` rounds, ``--rounds`` rounds of A then B, each ``--steps`` batches
(A: one epoch of ``fit`` over a fixed random subset; B: the same number of batches); the ratio of
each round, and its median, is reported, per model and precision. The benchmark also measures the
device's GEMM rate in fp32 and bf16 (``torch.mm`` of 2048 x 2048 on CPUs, with torch's threads;
smaller where bf16 is emulated and a 2048 product would take minutes) and each model's training
FLOPs per image (``torch.utils.flop_counter``: forward + backward, plus the teacher's forward when
distilling), and reports every pipeline's share of the ceiling of the precision it ran in
(images/s x FLOP/image / GEMM rate).

``--accuracy`` instead trains kdfine in each precision and the conventional pipeline for
``--acc-epochs`` epochs on a ``--acc-train`` subset for each of ``--acc-seeds`` and compares test
accuracies: bf16 against fp32, and kdfine against the conventional pipeline (the same training
math should give the same accuracy within the seed-to-seed spread).

    python bench/throughput.py                          # CPU: wrn-16-1, wrn-16-2, distill, features
    python bench/throughput.py --models wrn-16-1 --rounds 3 --precisions auto
    python bench/throughput.py --device cuda --steps 60  # bench/gpu_check.sh runs this
    python bench/throughput.py --accuracy --acc-seeds 0,1,2

The CIFAR-10 JPEG tree comes from ``--data DIR`` (``DIR/train/<class>/*.jpg``, ``DIR/test/...``) or
is extracted from ``--archive`` (default ``../shared/data/cifar10-jpeg.tar.gz``) into
``$KDFINE_CACHE/cifar10-jpeg`` once. Prints JSON lines and a Markdown summary with the command.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402
from kdfine.runtime import device as kdevice  # noqa: E402
from kdfine import features as kfeatures  # noqa: E402
from kdfine.data.sources import ArrayDataset, cache_dir, load_source  # noqa: E402
from kdfine.runtime import precision as kprecision  # noqa: E402
from kdfine.train.loop import Job, RunFiles, fit, resolve  # noqa: E402
from kdfine.train.progress import Reporter  # noqa: E402
from kdfine.train.run import TeacherEnsemble  # noqa: E402
from kdfine.train.optim import param_groups  # noqa: E402
from kdfine.options import TrainConfig  # noqa: E402
from kdfine.train.schedule import parse_schedule  # noqa: E402
from kdfine.models import build  # noqa: E402

TARGETS = {"wrn-16-1": 1.8, "wrn-16-2": 1.3, "wrn-16-2->wrn-16-1": 1.6}
AMX_TARGETS = {**TARGETS, "wrn-16-1": 2.5}  # issue 31: the default on a CPU with AMX (bf16 there)
CUDA_TARGETS = {"wrn-16-2": 3.0}
ARCHIVE_CANDIDATES = (ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
                      ROOT / "shared" / "data" / "cifar10-jpeg.tar.gz",
                      Path("/work/shared/data/cifar10-jpeg.tar.gz"))


# ------------------------------------------------------------------------------------------ data


def cifar_tree(data: str | None, archive: str | None) -> Path:
    """The extracted CIFAR-10 JPEG tree: ``--data``, else the archive extracted once into the cache."""
    if data:
        root = Path(data).expanduser()
        if not (root / "train").is_dir():
            raise SystemExit(f"--data {root}: expected {root}/train/<class>/*.jpg")
        return root
    target = cache_dir() / "cifar10-jpeg"
    if (target / "train").is_dir() and (target / "test").is_dir():
        return target
    candidates = [Path(archive).expanduser()] if archive else list(ARCHIVE_CANDIDATES)
    tar = next((p for p in candidates if p.is_file()), None)
    if tar is None:
        raise SystemExit("no CIFAR-10 JPEG tree: pass --data DIR or --archive cifar10-jpeg.tar.gz "
                         f"(looked for {', '.join(map(str, candidates))})")
    return benchinfo.extract_image_tree(tar, target)


@dataclass
class Cifar:
    root: Path
    train: ArrayDataset
    test: ArrayDataset


def load_cifar(root: Path) -> Cifar:
    t0 = time.perf_counter()
    src = load_source(f"imagefolder:{root}")
    print(f"# CIFAR-10 in memory ({len(src.train)} train, {len(src.test)} test) after "
          f"{time.perf_counter() - t0:.1f} s (decoded once, then cached in {cache_dir()})", file=sys.stderr, flush=True)
    return Cifar(root, src.train, src.test)


def conventional_loader(root: Path, split: str, mean, std, *, train: bool, batch: int, workers: int,
                        indices: np.ndarray, seed: int, device: torch.device, shuffle: bool = True):
    """ImageFolder + the standard CIFAR transforms + DataLoader over ``indices`` of the split."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Subset, SubsetRandomSampler
    from torchvision.datasets import ImageFolder

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    tf = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
    ds = ImageFolder(str(root / split), transform=tf)
    g = torch.Generator().manual_seed(seed)
    if shuffle:
        kw = {"sampler": SubsetRandomSampler(indices.tolist(), generator=g)}
        data = ds
    else:
        kw, data = {}, Subset(ds, indices.tolist())
    return DataLoader(data, batch_size=batch, num_workers=workers, drop_last=train,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0, **kw)


# ------------------------------------------------------------------------------------------ ceiling


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LIMIT_S = 5.0  # the longest one product of the GEMM ceiling may take


def timed_mm(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    t0 = time.perf_counter()
    torch.mm(a, b)
    sync(device)
    return time.perf_counter() - t0


def gemm_size(device: torch.device, dtype: torch.dtype, n: int, limit_s: float = LIMIT_S) -> int:
    """``n``, or the largest power of two below it whose product takes under ``limit_s``, judged from
    the best of three products of 256 x 256 (emulated bf16 on a CPU runs 2048 x 2048 in minutes)."""
    a = torch.randn(256, 256, device=device, dtype=dtype)
    timed_mm(a, a, device)
    t = min(timed_mm(a, a, device) for _ in range(3))
    while n > 256 and t * (n / 256) ** 3 > limit_s:
        n //= 2
    return n


def gemm_gflops(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """(peak rate of square ``torch.mm`` on ``device`` in GFLOP/s, the side n it was measured at):
    the fastest of three bursts of calls a moment apart, so that a brief stall of a shared machine
    does not lower the ceiling; n = 2048 on CPUs and 8192 on GPUs, smaller where one product would
    take over LIMIT_S seconds (:func:`gemm_size`), and then a single burst of two calls."""
    n = gemm_size(device, dtype, 2048 if device.type == "cpu" else 8192)
    full = n == (2048 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2 if full else 1):
        torch.mm(a, b)
    sync(device)
    best = float("inf")
    for burst in range(3 if full else 1):
        if burst:
            time.sleep(0.5)
        for _ in range((5 if device.type == "cpu" else 10) if full else 2):
            best = min(best, timed_mm(a, b, device))
    return 2 * n ** 3 / best / 1e9, n


def train_flops_per_image(arch: str, teacher_arch: str | None, device: torch.device, batch: int = 32) -> float:
    """FLOPs of one training step per image: student forward + backward (+ teacher forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(arch, 10).to(device)
    teacher = build(teacher_arch, 10).to(device).eval() if teacher_arch else None
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if teacher is not None:
            with torch.no_grad():
                zt = teacher(x)
            loss = F.mse_loss(out, zt)
        else:
            loss = F.cross_entropy(out, y)
        loss.backward()
    return counter.get_total_flops() / batch


# ------------------------------------------------------------------------------------------ pipelines


def make_teacher(arch: str, device: torch.device, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed + 1000)
    return build(arch, 10).to(device).eval()


class Conventional:
    """The conventional training loop: one model and optimizer that keep training across rounds."""

    def __init__(self, arch: str, teacher: torch.nn.Module | None, cifar: Cifar, subset: np.ndarray, *,
                 device: torch.device, batch: int, workers: int, seed: int, lr: float = 0.1):
        torch.manual_seed(seed)
        self.model = build(arch, 10).to(device)
        self.teacher = teacher
        self.opt = torch.optim.SGD(param_groups(self.model, 5e-4), lr=lr, momentum=0.9, nesterov=True)
        self.loader = conventional_loader(cifar.root, "train", cifar.train.mean, cifar.train.std, train=True,
                                          batch=batch, workers=workers, indices=subset, seed=seed, device=device)
        self.device = device

    def epoch(self, lr_at: Callable[[int], float] | None = None) -> tuple[float, int]:
        """One pass over the loader: (seconds, images)."""
        self.model.train()
        dev, images = self.device, 0
        t0 = time.perf_counter()
        last = None
        for step, (x, y) in enumerate(self.loader):
            if lr_at is not None:
                for g in self.opt.param_groups:
                    g["lr"] = lr_at(step)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            out = self.model(x)
            if self.teacher is not None:
                with torch.no_grad():
                    zt = self.teacher(x)
                loss = F.mse_loss(out, zt)
            else:
                loss = F.cross_entropy(out, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            images += y.shape[0]
            last = loss
        if last is not None:
            last.item()  # waits for the device
        return time.perf_counter() - t0, images


class Alternator(Reporter):
    """A quiet :class:`kdfine.train.progress.Reporter` that times each epoch of ``fit`` and then runs the
    conventional pipeline for the same number of batches: A B A B ... inside one ``fit`` call, so
    that kdfine's state (compiled graphs, optimizer, data on the device) carries over as in a real
    run."""

    def __init__(self, after_epoch: Callable[[int, float, dict], None]):
        super().__init__(quiet=True)
        self.after_epoch = after_epoch
        self.t0 = 0.0
        self.epoch = 0

    def start_epoch(self, epoch: int, *args, **kwargs) -> None:
        self.epoch = epoch
        self.t0 = time.perf_counter()

    def epoch_line(self, rec: dict, *args, **kwargs) -> None:
        self.after_epoch(self.epoch, time.perf_counter() - self.t0, rec)


def gpu_peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    mb = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return round(mb, 1)


def bench_training(name: str, arch: str, teacher_arch: str | None, cifar: Cifar, args, device: torch.device,
                   ceiling: dict[str, float], precision: str) -> dict[str, Any]:
    """Alternating rounds of kdfine (``--precision precision``) and the conventional pipeline."""
    rng = np.random.default_rng(args.seed)
    subset = np.sort(rng.choice(len(cifar.train), args.steps * args.batch_size, replace=False))
    flops = train_flops_per_image(arch, teacher_arch, device)
    gpu_peak_mb(device)  # reset the peak: each pipeline's own use is reported
    teacher_b = make_teacher(teacher_arch, device, args.seed) if teacher_arch else None
    conv = Conventional(arch, teacher_b, cifar, subset, device=device, batch=args.batch_size, workers=args.workers,
                        seed=args.seed)
    teacher_a = None
    if teacher_arch:
        t = copy.deepcopy(teacher_b)
        stats = (cifar.train.mean, cifar.train.std)
        teacher_a = TeacherEnsemble([t], [stats], stats, device)
    cfg = TrainConfig(epochs=args.warmup + args.rounds, batch_size=args.batch_size, lr=0.1, schedule="constant",
                      seed=args.seed, loss="mse" if teacher_arch else "ce", compile=args.compile,
                      precision=precision, channels_last=args.channels_last)
    prec, t_prec = resolve(precision, device)
    rounds: list[dict[str, Any]] = []

    def after_epoch(epoch: int, seconds: float, rec: dict) -> None:
        a_rate = rec["train_images"] / seconds
        a_mem = gpu_peak_mb(device)
        b_seconds, b_images = conv.epoch()
        b_rate = b_images / b_seconds
        b_mem = gpu_peak_mb(device)
        r = {"bench": "throughput", "kind": "train", "name": name, "precision": prec, "device": str(device),
             "round": epoch - args.warmup,
             "warmup": epoch < args.warmup, "kdfine_img_s": round(a_rate, 1), "kdfine_engine_img_s": round(rec["img_per_s"], 1),
             "conventional_img_s": round(b_rate, 1), "ratio": round(a_rate / b_rate, 3),
             "kdfine_gpu_mb": a_mem, "conventional_gpu_mb": b_mem, "load": benchinfo.load_average()}
        benchinfo.emit(r)
        if not r["warmup"]:
            rounds.append(r)

    torch.manual_seed(args.seed)
    model = build(arch, 10)
    fit(Job(model, cifar.train, device, teacher=teacher_a, selection=subset), cfg, RunFiles(reporter=Alternator(after_epoch)))
    a = statistics.median(r["kdfine_img_s"] for r in rounds)
    b = statistics.median(r["conventional_img_s"] for r in rounds)
    summary = {"bench": "throughput", "kind": "train-summary", "name": name, "device": str(device),
               "rounds": len(rounds), "steps": args.steps, "batch_size": args.batch_size,
               "kdfine_img_s": round(a, 1), "conventional_img_s": round(b, 1),
               "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 3),
               "min_ratio": min(r["ratio"] for r in rounds), "max_ratio": max(r["ratio"] for r in rounds),
               "mflop_per_image": round(flops / 1e6, 1),
               "kdfine_ceiling_share": round(a * flops / (ceiling[prec] * 1e9), 3),
               "conventional_ceiling_share": round(b * flops / (ceiling["fp32"] * 1e9), 3),
               "kdfine_precision": prec, "kdfine_precision_option": precision,
               "teacher_precision": t_prec if teacher_arch else None, "is_default": prec == resolve("auto", device)[0],
               "kdfine_gpu_mb": max((r["kdfine_gpu_mb"] or 0) for r in rounds) or None,
               "conventional_gpu_mb": max((r["conventional_gpu_mb"] or 0) for r in rounds) or None,
               "target_ratio": targets(device).get(name)}
    benchinfo.emit(summary)
    return summary


def targets(device: torch.device) -> dict[str, float]:
    """The ratios the default (``--precision auto``) should reach on this device."""
    if device.type == "cuda":
        return CUDA_TARGETS
    return AMX_TARGETS if kprecision.native_bf16(kprecision.cpu_flags()) == "AMX" else TARGETS


def bench_features(arch: str, cifar: Cifar, args, device: torch.device) -> dict[str, Any]:
    """``eval --dump-features`` (kdfine.features.extract on the in-memory images) against the
    conventional loop (ImageFolder + ToTensor + Normalize, DataLoader, no_grad) over the same images."""
    n = args.feature_images
    idx = np.sort(np.random.default_rng(args.seed).choice(len(cifar.train), n, replace=False))
    images = cifar.train.images[idx]
    torch.manual_seed(args.seed)
    model = build(arch, 10).to(device)
    model_b = copy.deepcopy(model)
    loader = conventional_loader(cifar.root, "train", cifar.train.mean, cifar.train.std, train=False, batch=512,
                                 workers=args.workers, indices=idx, seed=args.seed, device=device, shuffle=False)
    cl = kdevice.use_channels_last(args.channels_last, device)

    def run_a() -> float:
        t0 = time.perf_counter()
        f, _ = kfeatures.extract(model, images, cifar.train.mean, cifar.train.std, device=device, batch_size=512,
                                 precision="auto", channels_last=cl)  # eval --dump-features' default
        assert f.shape[0] == n
        return n / (time.perf_counter() - t0)

    @torch.no_grad()
    def run_b() -> float:
        model_b.eval()
        t0 = time.perf_counter()
        feats, logits = [], []
        for x, _ in loader:
            f, z = model_b.forward_both(x.to(device, non_blocking=True))
            feats.append(f.cpu())
            logits.append(z.cpu())
        assert torch.cat(feats).shape[0] == n
        return n / (time.perf_counter() - t0)

    rounds = []
    for r in range(args.warmup + args.rounds):
        a = run_a()
        b = run_b()
        rec = {"bench": "throughput", "kind": "features", "name": arch, "device": str(device), "round": r - args.warmup,
               "warmup": r < args.warmup, "kdfine_img_s": round(a, 1), "conventional_img_s": round(b, 1),
               "ratio": round(a / b, 3), "load": benchinfo.load_average()}
        benchinfo.emit(rec)
        if not rec["warmup"]:
            rounds.append(rec)
    summary = {"bench": "throughput", "kind": "features-summary", "name": arch, "device": str(device),
               "images": n, "kdfine_img_s": round(statistics.median(r["kdfine_img_s"] for r in rounds), 1),
               "conventional_img_s": round(statistics.median(r["conventional_img_s"] for r in rounds), 1),
               "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 3)}
    benchinfo.emit(summary)
    return summary


# ------------------------------------------------------------------------------------------ accuracy


def test_index(cifar: Cifar, args) -> np.ndarray:
    """The test images the accuracy mode scores: all, or a fixed random ``--acc-test`` of them."""
    n = len(cifar.test)
    if not args.acc_test or args.acc_test >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(4321).choice(n, args.acc_test, replace=False))


def conventional_accuracy(model: torch.nn.Module, cifar: Cifar, args, device: torch.device) -> float:
    loader = conventional_loader(cifar.root, "test", cifar.train.mean, cifar.train.std, train=False, batch=512,
                                 workers=args.workers, indices=test_index(cifar, args), seed=0, device=device,
                                 shuffle=False)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            total += y.shape[0]
    return correct / total


def bench_accuracy(cifar: Cifar, args, device: torch.device) -> list[dict[str, Any]]:
    """Test accuracy of kdfine in each of ``--precisions`` and of the conventional pipeline after the
    same epochs on the same subset, per seed."""
    sub = np.sort(np.random.default_rng(1234).choice(len(cifar.train), args.acc_train, replace=False))
    results = []
    for seed in [int(s) for s in args.acc_seeds.split(",")]:
        runs = [(f"kdfine {p}", lambda p=p: kdfine_accuracy(cifar, sub, args, device, seed, p)) for p in args.precisions]
        if args.acc_conventional:
            runs.append(("conventional fp32", lambda: conventional_run(cifar, sub, args, device, seed)))
        for pipeline, run in runs:
            t0 = time.perf_counter()
            top1 = run()
            rec = {"bench": "throughput", "kind": "accuracy", "arch": args.acc_arch, "seed": seed,
                   "epochs": args.acc_epochs, "train_images": len(sub), "test_images": len(test_index(cifar, args)),
                   "device": str(device), "pipeline": pipeline,
                   "top1": round(top1, 4), "seconds": round(time.perf_counter() - t0, 1),
                   "load": benchinfo.load_average()}
            benchinfo.emit(rec)
            results.append(rec)
    return results


def kdfine_accuracy(cifar: Cifar, sub: np.ndarray, args, device: torch.device, seed: int, precision: str) -> float:
    cfg = TrainConfig(epochs=args.acc_epochs, batch_size=args.batch_size, lr=0.1, schedule=args.acc_schedule,
                      seed=seed, eval_every=args.acc_epochs, precision=precision,
                      channels_last=args.channels_last, compile=args.compile)
    torch.manual_seed(seed)
    model = build(args.acc_arch, 10)
    idx = test_index(cifar, args)
    test = replace(cifar.test, images=cifar.test.images[idx], labels=cifar.test.labels[idx], files=None)
    res = fit(Job(model, cifar.train, device, test=test, selection=sub), cfg, RunFiles(reporter=Reporter(quiet=True)))
    return res.test["top1"]


def conventional_run(cifar: Cifar, sub: np.ndarray, args, device: torch.device, seed: int) -> float:
    conv = Conventional(args.acc_arch, None, cifar, sub, device=device, batch=args.batch_size, workers=args.workers,
                        seed=seed)
    lr_at = parse_schedule(args.acc_schedule, args.acc_epochs)
    steps = len(sub) // args.batch_size
    for epoch in range(args.acc_epochs):
        conv.epoch(lambda step, e=epoch: 0.1 * lr_at(e + step / steps))
    return conventional_accuracy(conv.model, cifar, args, device)


def accuracy_table(results: list[dict[str, Any]]) -> str:
    pipelines = list(dict.fromkeys(r["pipeline"] for r in results))
    by = {p: [r["top1"] for r in results if r["pipeline"] == p] for p in pipelines}
    rows, spread = [], 0.0
    for p, accs in by.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        spread = max(spread, max(accs) - min(accs))
        secs = statistics.mean(r["seconds"] for r in results if r["pipeline"] == p)
        rows.append([p, ", ".join(f"{100 * a:.2f}" for a in accs), f"{100 * statistics.mean(accs):.2f}",
                     f"{100 * sd:.2f}", f"{secs:,.0f}"])
    r0 = results[0]
    tested = "full test set" if r0["test_images"] == 10000 else f"{r0['test_images']} test images"
    out = (f"Test accuracy (%) of {r0['arch']} after {r0['epochs']} epochs on {r0['train_images']} CIFAR-10 "
           f"training images, {tested}, one run per seed:\n\n"
           + benchinfo.markdown_table(["pipeline", "per seed", "mean", "std", "s per run"], rows))
    pairs = [("kdfine bf16", "kdfine fp32"), ("kdfine fp32", "conventional fp32")]
    for a, b in [(a, b) for a, b in pairs if a in by and b in by]:
        diff = statistics.mean(by[a]) - statistics.mean(by[b])
        verdict = "within" if abs(diff) <= spread else "OUTSIDE"
        out += (f"\n\n{a} - {b}: {100 * diff:+.2f} points, {verdict} the seed-to-seed spread (largest max-min "
                f"across seeds {100 * spread:.2f} points).")
    return out


# ------------------------------------------------------------------------------------------ main


def throughput_tables(train: list[dict], feats: list[dict], gemm: dict[str, tuple[float, int]], device: torch.device,
                      cpu: str, auto: dict[str, str]) -> str:
    """The training table (one row per model and precision; the first header cell names the CPU),
    the feature-extraction table and the GEMM ceilings."""
    cuda = device.type == "cuda"
    rows = []
    for s in train:
        target = s["target_ratio"] if s["is_default"] else None
        met = "" if target is None else (f">= {target}x: {'met' if s['median_ratio'] >= target else 'NOT met'}")
        prec = s["kdfine_precision"] + (" (auto)" if s["is_default"] else "")
        if s["teacher_precision"]:
            prec += f", teacher {s['teacher_precision']}"
        row = [s["name"], prec, f"{s['kdfine_img_s']:,.0f}", f"{s['conventional_img_s']:,.0f}",
               f"{s['median_ratio']:.2f}x ({s['min_ratio']:.2f}-{s['max_ratio']:.2f})", met,
               f"{s['mflop_per_image']:.0f}", f"{100 * s['kdfine_ceiling_share']:.0f}%",
               f"{100 * s['conventional_ceiling_share']:.0f}%"]
        if cuda:
            row += [f"{s['kdfine_gpu_mb']:,.0f}", f"{s['conventional_gpu_mb']:,.0f}"]
        rows.append(row)
    header = [f"training on {cpu if not cuda else device}", "kdfine precision", "kdfine img/s", "conventional img/s",
              "ratio, median (range)", "target", "MFLOP/img", "kdfine % of its precision's GEMM peak",
              "conventional % of fp32 GEMM peak"]
    if cuda:
        header += ["kdfine GPU MB", "conventional GPU MB"]
    out = benchinfo.markdown_table(header, rows)
    if feats:
        out += "\n\n" + benchinfo.markdown_table(
            [f"eval --dump-features ({kdevice.resolve_precision('auto', device)})", "kdfine img/s", "conventional img/s", "ratio, median"],
            [[f["name"], f"{f['kdfine_img_s']:,.0f}", f"{f['conventional_img_s']:,.0f}", f"{f['median_ratio']:.2f}x"]
             for f in feats])
    rates = ", ".join(f"{k} {v:,.1f} GFLOP/s" + ("" if n in (2048, 8192) else f" (at {n} x {n}: one full-size "
                                                                               f"product would take over {LIMIT_S:g} s)")
                      for k, (v, n) in gemm.items())
    out += (f"\n\nGEMM peak (torch.mm of {2048 if not cuda else 8192} x {2048 if not cuda else 8192}, "
            f"{torch.get_num_threads()} threads, measured): {rates}. `--precision auto` here: {auto['precision']} "
            f"({auto['reason']}); the conventional pipeline runs fp32 NCHW.")
    return out


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    args.precisions = [p.strip() for p in (args.precisions or ("auto" if device.type == "cuda" else "fp32,bf16"))
                       .split(",") if p.strip()]
    print(f"# {benchinfo.command_line()}", flush=True)
    info = benchinfo.machine()
    info.update(torch_threads=torch.get_num_threads(), device=str(device))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1))
    choice = kdevice.training_precision("auto", device)
    auto = {"precision": choice.precision, "reason": choice.reason,
            "native_bf16": kprecision.native_bf16(kprecision.cpu_flags()) if device.type == "cpu" else None}
    benchinfo.emit({"bench": "throughput", "machine": info, "auto": auto, "date": benchinfo.now(),
                    "load": benchinfo.load_average()})
    cifar = load_cifar(cifar_tree(args.data, args.archive))

    if args.accuracy:
        results = bench_accuracy(cifar, args, device)
        print(f"\n### Same accuracy\n\n{accuracy_table(results)}\n\n`--precision auto` here: {auto['precision']} "
              f"({auto['reason']}).\n{machine_line(info)}\nCommand: `{benchinfo.command_line()}`", flush=True)
        return

    gemm = {name: gemm_gflops(device, dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    benchinfo.emit({"bench": "throughput", "kind": "gemm", "device": str(device), "threads": torch.get_num_threads(),
                    **{f"{k}_gflops": round(v, 2) for k, (v, _) in gemm.items()},
                    **{f"{k}_n": n for k, (_, n) in gemm.items()}})
    ceiling = {k: v for k, (v, _) in gemm.items()}
    train = []
    for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
        teacher, _, student = spec.rpartition("->")
        for prec in args.precisions:
            train.append(bench_training(spec, student, teacher or None, cifar, args, device, ceiling, prec))
    feats = [bench_features(args.features, cifar, args, device)] if args.features else []
    print(f"\n### Throughput ({device.type})\n\n{throughput_tables(train, feats, gemm, device, info['cpu'], auto)}"
          f"\n\n{machine_line(info)}\nCommand: `{benchinfo.command_line()}`", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] [default: cpu]")
    ap.add_argument("--models", default="wrn-16-1,wrn-16-2,wrn-16-2->wrn-16-1",
                    help="comma-separated: ARCH (train-teacher) or TEACHER->STUDENT (distill)")
    ap.add_argument("--features", default="wrn-16-2", help="arch for the eval --dump-features comparison ('' to skip)")
    ap.add_argument("--feature-images", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5, help="measured A/B rounds [default: 5]")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured A/B rounds first [default: 1]")
    ap.add_argument("--steps", type=int, default=12, help="batches per round and pipeline [default: 12]")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the conventional pipeline")
    ap.add_argument("--precisions", help="kdfine's --precision values to measure, comma-separated "
                    "[default: fp32,bf16 on CPUs, auto on CUDA]")
    ap.add_argument("--channels-last", default="auto", help="kdfine's --channels-last [default: auto]")
    ap.add_argument("--compile", action="store_true", help="kdfine's --compile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="extracted CIFAR-10 JPEG tree (train/ and test/)")
    ap.add_argument("--archive", help="cifar10-jpeg.tar.gz to extract when --data is not given")
    ap.add_argument("--accuracy", action="store_true", help="compare test accuracy instead of speed")
    ap.add_argument("--acc-arch", default="wrn-16-1")
    ap.add_argument("--acc-epochs", type=int, default=3)
    ap.add_argument("--acc-train", type=int, default=10000, help="training images (a fixed random subset)")
    ap.add_argument("--acc-test", type=int, default=0, help="test images scored (a fixed random subset) [default: all]")
    ap.add_argument("--acc-seeds", default="0,1,2")
    ap.add_argument("--acc-schedule", default="cosine")
    ap.add_argument("--acc-conventional", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the conventional pipeline in --accuracy [default: on]")
    return ap.parse_args()


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", {info['gpu']} ({info['gpu_memory_gb']} GB)" if "gpu" in info else ""
    load = benchinfo.load_average()
    return (f"Machine: {info['cpu']}, {info['cores']} cores{gpu}; torch {info.get('torch', '?')} with "
            f"{info['torch_threads']} threads; {benchinfo.now()}; load average (1, 5, 15 min) at the end "
            f"{', '.join(map(str, load)) if load else 'unknown'}.")


if __name__ == "__main__":
    main()

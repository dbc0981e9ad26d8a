#!/usr/bin/env python
"""Training and feature-extraction throughput of kdfine against a conventional pipeline.

kdfine ("A") is measured as users run it: ``kdfine.engine.fit`` (what ``train-teacher`` and
``distill`` call) on CIFAR-10 decoded once into memory (``--data imagefolder:DIR``), with its
defaults for the device (CPU: fp32, channels_last, distillation teachers in bf16 where the CPU has
native bf16; CUDA: bf16 autocast, channels_last) and
``features.extract`` for ``eval --dump-features``. The conventional pipeline ("B") is the one of
the papers' code and torchdistill, implemented here: ``torchvision.datasets.ImageFolder`` over the
JPEG tree, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, a
``DataLoader`` with 2 worker processes (persistent, so worker start-up is not charged to it), fp32
NCHW, teacher under ``torch.no_grad()``. Both train the same model (same initialisation) with the
same optimizer (SGD, momentum 0.9, Nesterov, weight decay 5e-4 on weights), batch 128, the same
loss (CE for teachers, MSE on logits for distillation), the same normalisation statistics.

Measurement: after ``--warmup`` rounds, ``--rounds`` rounds of A then B, each ``--steps`` batches
(A: one epoch of ``fit`` over a fixed random subset; B: the same number of batches); the ratio of
each round, and its median, is reported. The benchmark also measures the device's GEMM rate
(``torch.mm``, fp32; bf16 too on CUDA) and each model's training FLOPs per image
(``torch.utils.flop_counter``: forward + backward, plus the teacher's forward when distilling), and
reports every pipeline's share of that ceiling (images/s x FLOP/image / GEMM rate).

``--accuracy`` instead trains both pipelines for ``--acc-epochs`` epochs on a ``--acc-train``
subset for each of ``--acc-seeds`` and compares test accuracy (the same training math should give
the same accuracy within the seed-to-seed spread).

    python bench/throughput.py                          # CPU: wrn-16-1, wrn-16-2, distill, features
    python bench/throughput.py --models wrn-16-1 --rounds 3
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402
from kdfine import device as kdevice  # noqa: E402
from kdfine import features as kfeatures  # noqa: E402
from kdfine.data.sources import ArrayDataset, cache_dir, load_source  # noqa: E402
from kdfine.engine import Reporter, TeacherEnsemble, fit  # noqa: E402
from kdfine.optim import param_groups  # noqa: E402
from kdfine.options import TrainConfig, parse_schedule  # noqa: E402
from kdfine.models import build  # noqa: E402

TARGETS = {"wrn-16-1": 1.8, "wrn-16-2": 1.3, "wrn-16-2->wrn-16-1": 1.6}
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


def gemm_gflops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak rate of square ``torch.mm`` on ``device`` (GFLOP/s): the fastest of three bursts of
    calls a moment apart, so that a brief stall of a shared machine does not lower the ceiling."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    sync(device)
    best = float("inf")
    for burst in range(3):
        if burst:
            time.sleep(0.5)
        for _ in range(5 if device.type == "cpu" else 10):
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


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
    """A quiet :class:`kdfine.engine.Reporter` that times each epoch of ``fit`` and then runs the
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
                   ceiling: dict[str, float]) -> dict[str, Any]:
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
                      precision=args.precision, channels_last=args.channels_last)
    rounds: list[dict[str, Any]] = []

    def after_epoch(epoch: int, seconds: float, rec: dict) -> None:
        a_rate = rec["train_images"] / seconds
        a_mem = gpu_peak_mb(device)
        b_seconds, b_images = conv.epoch()
        b_rate = b_images / b_seconds
        b_mem = gpu_peak_mb(device)
        r = {"bench": "throughput", "kind": "train", "name": name, "device": str(device), "round": epoch - args.warmup,
             "warmup": epoch < args.warmup, "kdfine_img_s": round(a_rate, 1), "kdfine_engine_img_s": round(rec["img_per_s"], 1),
             "conventional_img_s": round(b_rate, 1), "ratio": round(a_rate / b_rate, 3),
             "kdfine_gpu_mb": a_mem, "conventional_gpu_mb": b_mem, "load": benchinfo.load_average()}
        benchinfo.emit(r)
        if not r["warmup"]:
            rounds.append(r)

    torch.manual_seed(args.seed)
    model = build(arch, 10)
    fit(model, cifar.train, cfg, device=device, teacher=teacher_a, selection=subset, reporter=Alternator(after_epoch))
    a = statistics.median(r["kdfine_img_s"] for r in rounds)
    b = statistics.median(r["conventional_img_s"] for r in rounds)
    prec = kdevice.resolve_precision(args.precision, device)
    summary = {"bench": "throughput", "kind": "train-summary", "name": name, "device": str(device),
               "rounds": len(rounds), "steps": args.steps, "batch_size": args.batch_size,
               "kdfine_img_s": round(a, 1), "conventional_img_s": round(b, 1),
               "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 3),
               "min_ratio": min(r["ratio"] for r in rounds), "max_ratio": max(r["ratio"] for r in rounds),
               "mflop_per_image": round(flops / 1e6, 1),
               "kdfine_ceiling_share": round(a * flops / (ceiling[prec] * 1e9), 3),
               "conventional_ceiling_share": round(b * flops / (ceiling["fp32"] * 1e9), 3),
               "kdfine_precision": prec, "kdfine_precision_option": args.precision, "kdfine_gpu_mb": max((r["kdfine_gpu_mb"] or 0) for r in rounds) or None,
               "conventional_gpu_mb": max((r["conventional_gpu_mb"] or 0) for r in rounds) or None,
               "target_ratio": (CUDA_TARGETS if device.type == "cuda" else TARGETS).get(name)}
    benchinfo.emit(summary)
    return summary


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
                                 precision=args.precision, channels_last=cl)
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


def conventional_accuracy(model: torch.nn.Module, cifar: Cifar, args, device: torch.device) -> float:
    loader = conventional_loader(cifar.root, "test", cifar.train.mean, cifar.train.std, train=False, batch=512,
                                 workers=args.workers, indices=np.arange(len(cifar.test)), seed=0, device=device,
                                 shuffle=False)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            total += y.shape[0]
    return correct / total


def bench_accuracy(cifar: Cifar, args, device: torch.device) -> list[dict[str, Any]]:
    """Test accuracy of both pipelines after the same epochs on the same subset, per seed."""
    arch = args.acc_arch
    sub = np.sort(np.random.default_rng(1234).choice(len(cifar.train), args.acc_train, replace=False))
    results = []
    for seed in [int(s) for s in args.acc_seeds.split(",")]:
        cfg = TrainConfig(epochs=args.acc_epochs, batch_size=args.batch_size, lr=0.1, schedule=args.acc_schedule,
                          seed=seed, eval_every=args.acc_epochs, precision=args.precision,
                          channels_last=args.channels_last, compile=args.compile)
        torch.manual_seed(seed)
        model = build(arch, 10)
        t0 = time.perf_counter()
        res = fit(model, cifar.train, cfg, device=device, test=cifar.test, selection=sub, reporter=Reporter(quiet=True))
        a = {"pipeline": "kdfine", "top1": res.test["top1"], "seconds": time.perf_counter() - t0}

        conv = Conventional(arch, None, cifar, sub, device=device, batch=args.batch_size, workers=args.workers, seed=seed)
        lr_at = parse_schedule(args.acc_schedule, args.acc_epochs)
        steps = len(sub) // args.batch_size
        t0 = time.perf_counter()
        for epoch in range(args.acc_epochs):
            conv.epoch(lambda step, e=epoch: 0.1 * lr_at(e + step / steps))
        b = {"pipeline": "conventional", "top1": conventional_accuracy(conv.model, cifar, args, device),
             "seconds": time.perf_counter() - t0}
        for r in (a, b):
            rec = {"bench": "throughput", "kind": "accuracy", "arch": arch, "seed": seed, "epochs": args.acc_epochs,
                   "train_images": len(sub), "device": str(device), **r, "load": benchinfo.load_average()}
            rec["top1"] = round(rec["top1"], 4)
            rec["seconds"] = round(rec["seconds"], 1)
            benchinfo.emit(rec)
            results.append(rec)
    return results


def accuracy_table(results: list[dict[str, Any]]) -> str:
    by = {p: [r["top1"] for r in results if r["pipeline"] == p] for p in ("kdfine", "conventional")}
    rows, spread = [], 0.0
    for p, accs in by.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        spread = max(spread, max(accs) - min(accs))
        rows.append([p, ", ".join(f"{100 * a:.2f}" for a in accs), f"{100 * statistics.mean(accs):.2f}", f"{100 * sd:.2f}"])
    diff = statistics.mean(by["kdfine"]) - statistics.mean(by["conventional"])
    r0 = results[0]
    verdict = "within" if abs(diff) <= spread else "OUTSIDE"
    return (f"Test accuracy (%) of {r0['arch']} after {r0['epochs']} epochs on {r0['train_images']} CIFAR-10 "
            f"training images, full test set, one run per seed:\n\n"
            + benchinfo.markdown_table(["pipeline", "per seed", "mean", "std"], rows)
            + f"\n\nDifference of the means {100 * diff:+.2f} points, {verdict} the seed-to-seed spread "
              f"(largest max-min across seeds {100 * spread:.2f} points).")


# ------------------------------------------------------------------------------------------ main


def throughput_tables(train: list[dict], feats: list[dict], ceiling: dict[str, float], device: torch.device) -> str:
    cuda = device.type == "cuda"
    rows = []
    for s in train:
        target = s["target_ratio"]
        met = "" if target is None else (f">= {target}x: {'met' if s['median_ratio'] >= target else 'NOT met'}")
        row = [s["name"], f"{s['kdfine_img_s']:,.0f}", f"{s['conventional_img_s']:,.0f}",
               f"{s['median_ratio']:.2f}x ({s['min_ratio']:.2f}-{s['max_ratio']:.2f})", met,
               f"{s['mflop_per_image']:.0f}", f"{100 * s['kdfine_ceiling_share']:.0f}%",
               f"{100 * s['conventional_ceiling_share']:.0f}%"]
        if cuda:
            row += [f"{s['kdfine_gpu_mb']:,.0f}", f"{s['conventional_gpu_mb']:,.0f}"]
        rows.append(row)
    header = ["training", "kdfine img/s", "conventional img/s", "ratio, median (range)", "target",
              "MFLOP/img", "kdfine % of GEMM peak", "conventional % of GEMM peak"]
    if cuda:
        header += ["kdfine GPU MB", "conventional GPU MB"]
    out = benchinfo.markdown_table(header, rows)
    if feats:
        out += "\n\n" + benchinfo.markdown_table(
            ["eval --dump-features", "kdfine img/s", "conventional img/s", "ratio, median"],
            [[f["name"], f"{f['kdfine_img_s']:,.0f}", f"{f['conventional_img_s']:,.0f}", f"{f['median_ratio']:.2f}x"]
             for f in feats])
    rates = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in ceiling.items())
    t_prec = kdevice.teacher_precision(train[0]["kdfine_precision_option"], device) if train else "?"
    out += (f"\n\nGEMM peak (torch.mm, measured): {rates}. kdfine precision: {train[0]['kdfine_precision'] if train else '?'}"
            f" (distillation teachers: {t_prec})"
            f"; the conventional pipeline runs fp32 NCHW.")
    return out


def main() -> None:
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
    ap.add_argument("--precision", default="auto", help="kdfine's --precision [default: auto]")
    ap.add_argument("--channels-last", default="auto", help="kdfine's --channels-last [default: auto]")
    ap.add_argument("--compile", action="store_true", help="kdfine's --compile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="extracted CIFAR-10 JPEG tree (train/ and test/)")
    ap.add_argument("--archive", help="cifar10-jpeg.tar.gz to extract when --data is not given")
    ap.add_argument("--accuracy", action="store_true", help="compare test accuracy instead of speed")
    ap.add_argument("--acc-arch", default="wrn-16-1")
    ap.add_argument("--acc-epochs", type=int, default=3)
    ap.add_argument("--acc-train", type=int, default=10000, help="training images (a fixed random subset)")
    ap.add_argument("--acc-seeds", default="0,1,2")
    ap.add_argument("--acc-schedule", default="cosine")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    print(f"# {benchinfo.command_line()}", flush=True)
    info = benchinfo.machine()
    info.update(torch_threads=torch.get_num_threads(), device=str(device))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1))
    benchinfo.emit({"bench": "throughput", "machine": info, "date": benchinfo.now(), "load": benchinfo.load_average()})
    cifar = load_cifar(cifar_tree(args.data, args.archive))

    if args.accuracy:
        results = bench_accuracy(cifar, args, device)
        print(f"\n### Same accuracy\n\n{accuracy_table(results)}\n\n{machine_line(info)}\n"
              f"Command: `{benchinfo.command_line()}`", flush=True)
        return

    ceiling = {"fp32": gemm_gflops(device)}
    if kdevice.resolve_precision(args.precision, device) == "bf16":
        ceiling["bf16"] = gemm_gflops(device, torch.bfloat16)
    benchinfo.emit({"bench": "throughput", "kind": "gemm", "device": str(device),
                    **{f"{k}_gflops": round(v, 1) for k, v in ceiling.items()}})
    train = []
    for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
        teacher, _, student = spec.rpartition("->")
        train.append(bench_training(spec, student, teacher or None, cifar, args, device, ceiling))
    feats = [bench_features(args.features, cifar, args, device)] if args.features else []
    print(f"\n### Throughput ({device.type})\n\n{throughput_tables(train, feats, ceiling, device)}\n\n"
          f"{machine_line(info)}\nCommand: `{benchinfo.command_line()}`", flush=True)


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", {info['gpu']} ({info['gpu_memory_gb']} GB)" if "gpu" in info else ""
    return (f"Machine: {info['cpu']}, {info['cores']} cores{gpu}; torch {info.get('torch', '?')} with "
            f"{info['torch_threads']} threads; {benchinfo.now()}.")


if __name__ == "__main__":
    main()

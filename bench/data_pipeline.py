#!/usr/bin/env python
"""The data layer at real size: decode cache speed, draft(), streamed training, peak memory.

Parts (``--parts a,b,c,d``; each a few minutes on 2 cores):

a. Decode the 50,000 CIFAR-10 training JPEGs into a fresh decode cache (``load_source`` on a
   tree holding only ``train/``), against torchvision's ``ImageFolder`` read image by image with
   PIL (a plain loop, and a ``DataLoader`` with one worker process per core), on the same cores.
b. A tree of ``--big`` JPEGs of 256-512 px (CIFAR training images upscaled, random aspect 3:4 to
   4:3, quality 90) decoded and resized to 64 px through the cache's decoder, with and without
   PIL's ``draft()`` (libjpeg's DCT-domain downscaling).
c. Training img/s of wrn-16-1 (CPU, fp32, channels_last, SGD, batch 128, crop-flip) from the
   in-memory batches (one uint8 tensor) and from the streamed batches (memory map of the cache,
   background gather), alternately, ``--rounds`` rounds of ``--steps`` batches after a warm-up.
d. In a fresh process: peak RSS (``ru_maxrss``) while building the cache of the 60,000 CIFAR-10
   JPEGs at image size 128 (3 GB decoded) and then one training epoch over the 50,000 training
   images with ``KDFINE_MEMORY_BUDGET=1G``, so that ``train_batches`` chooses streaming by itself.
   The epoch trains a small convolutional net (one 3x3 conv to 16 channels, stride 2, average pool,
   linear): wrn-16-1 at 128 px would take about an hour on 2 cores, and the memory under test
   is the data pipeline's.

    python bench/data_pipeline.py --data /tmp/cifar10-jpeg            # all parts
    python bench/data_pipeline.py --data /tmp/cifar10-jpeg --parts c --rounds 5

Prints JSON lines, then a Markdown summary with the command and the date.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402


def fresh_cache(work: Path, name: str) -> Path:
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    os.environ["KDFINE_CACHE"] = str(d)
    return d


def train_only(data: Path, work: Path) -> Path:
    """A tree whose only split is CIFAR-10's 50,000 training images (a link to ``data/train``)."""
    root = work / "cifar-train"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "train").exists():
        (root / "train").symlink_to(data / "train")
    return root


def part_a(data: Path, work: Path) -> dict:
    """kdfine's cache build against ImageFolder + PIL, on the 50k training JPEGs."""
    import torch
    import torchvision

    from kdfine.data.sources import load_source

    only_train = train_only(data, work)
    fresh_cache(work, "cache-a")
    t0 = time.perf_counter()
    src = load_source(f"imagefolder:{only_train}", quiet=True)
    t_cache = time.perf_counter() - t0
    n = len(src.train) + len(src.test)
    t0 = time.perf_counter()
    warm = load_source(f"imagefolder:{only_train}", quiet=True)
    t_warm = time.perf_counter() - t0
    assert len(warm.train) == len(src.train)
    ds = torchvision.datasets.ImageFolder(str(data / "train"))
    t0 = time.perf_counter()
    for i in range(len(ds)):
        np.asarray(ds[i][0])
    t_loop = time.perf_counter() - t0
    ds.transform = np.asarray
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=benchinfo.usable_cpus(),
                                         collate_fn=lambda b: np.stack([x for x, _ in b]))
    t0 = time.perf_counter()
    for _ in loader:
        pass
    t_loader = time.perf_counter() - t0
    return {"part": "a", "images": n, "kdfine_cache_img_s": n / t_cache, "kdfine_cached_reload_s": t_warm,
            "imagefolder_loop_img_s": len(ds) / t_loop, "imagefolder_dataloader_img_s": len(ds) / t_loader,
            "dataloader_workers": benchinfo.usable_cpus()}


def make_big_tree(data: Path, dest: Path, count: int) -> list[Path]:
    """``count`` JPEGs of 256-512 px (shorter side), CIFAR images upscaled, aspect 3:4 to 4:3."""
    from PIL import Image

    files = sorted((data / "train").rglob("*.jpg"))[::max(1, 50000 // count)][:count]
    out = []
    rng = np.random.default_rng(0)
    for i, f in enumerate(files):
        target = dest / f.parent.name / f"{i:05d}.jpg"
        out.append(target)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        short, aspect = int(rng.integers(256, 513)), float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        size = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        with Image.open(f) as im:
            im.convert("RGB").resize(size, Image.BICUBIC).save(target, quality=90)
    return out


def part_b(data: Path, work: Path, count: int) -> dict:
    from kdfine.data import cache
    from kdfine.data.decode import DecodeSpec

    files = make_big_tree(data, work / "big-jpegs", count)
    rec = {"part": "b", "images": len(files), "size": 64}
    for draft in (False, True, False, True):  # alternately; the faster of the two runs counts
        sink = cache.ArraySink((64, 64, 3), len(files))
        t0 = time.perf_counter()
        done = cache.decode_into(sink, files, DecodeSpec(64, 3, "crop", draft=draft), quiet=True)
        rate = len(done.kept) / (time.perf_counter() - t0)
        key = "draft_img_s" if draft else "full_decode_img_s"
        rec[key] = max(rec.get(key, 0.0), rate)
    return rec


def _train_rounds(batches_by_name: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Alternate the pipelines: ``steps`` SGD steps of wrn-16-1 each, per round; img/s lists."""
    import torch
    import torch.nn.functional as F

    from kdfine.models import build

    torch.manual_seed(0)
    model = build("wrn-16-1", 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rates: dict[str, list[float]] = {k: [] for k in batches_by_name}
    for r in range(rounds + 1):  # round 0 warms up
        for name, b in batches_by_name.items():
            t0, seen = time.perf_counter(), 0
            for x, y, _ in b.epoch(r):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += x.shape[0]
            if r:
                rates[name].append(seen / (time.perf_counter() - t0))
    return rates


def part_c(data: Path, work: Path, rounds: int, steps: int) -> dict:
    import torch

    from kdfine.data.batches import StreamBatches, TrainBatches
    from kdfine.data.sources import load_source

    os.environ["KDFINE_CACHE"] = str(work / "cache-a")  # part a's cache (or built here)
    src = load_source(f"imagefolder:{train_only(data, work)}", quiet=True).train
    kw = dict(batch_size=128, device=torch.device("cpu"), augment="crop-flip", seed=0, channels_last=True)
    pipes = {"in-memory": TrainBatches(src.images, src.labels, src.mean, src.std, **kw),
             "streamed": StreamBatches(src.images, src.labels, src.mean, src.std, **kw)}
    subset = np.random.default_rng(0).choice(len(src), steps * 128, replace=False)
    for b in pipes.values():
        b.set_selection(subset)
    rates = _train_rounds(pipes, rounds, steps)
    ratios = [s / m for s, m in zip(rates["streamed"], rates["in-memory"])]
    return {"part": "c", "arch": "wrn-16-1", "rounds": rounds, "steps": steps,
            "in_memory_img_s": statistics.median(rates["in-memory"]),
            "streamed_img_s": statistics.median(rates["streamed"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def part_d_child(data: Path, work: Path) -> None:
    """Runs in its own process: build the 128 px cache, train one streamed epoch, print RSS."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from kdfine.data.batches import StreamBatches, train_batches
    from kdfine.data.sources import load_source

    fresh_cache(work, "cache-d")
    t0 = time.perf_counter()
    src = load_source(f"imagefolder:{data}", image_size=128, quiet=True).train
    build_s, rss_build = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    b = train_batches(src.images, src.labels, src.mean, src.std, batch_size=128, device=torch.device("cpu"),
                      augment="crop-flip", seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    t0, seen = time.perf_counter(), 0
    for x, y, _ in b.epoch(0):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += x.shape[0]
    epoch_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    benchinfo.emit({"part": "d", "decoded_bytes": int(src.images.nbytes), "images": seen,
                    "chose_streaming": isinstance(b, StreamBatches), "cache_build_s": build_s,
                    "epoch_s": epoch_s, "peak_rss_after_build_mb": rss_build / 1024, "peak_rss_mb": rss / 1024})


def part_d(data: Path, work: Path) -> dict:
    env = dict(os.environ, KDFINE_MEMORY_BUDGET="1G")
    out = subprocess.run([sys.executable, __file__, "--data", str(data), "--work", str(work), "--parts", "d-child"],
                         env=env, capture_output=True, text=True, check=True)
    import json

    rec = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(work / "cache-d", ignore_errors=True)  # 3 GB
    return rec


def summary(recs: dict) -> str:
    f = benchinfo.fmt
    lines = []
    if "a" in recs:
        r = recs["a"]
        lines.append(benchinfo.markdown_table(
            ["decode 50k CIFAR-10 JPEGs", "img/s"],
            [["kdfine cache build (`load_source`, decode threads)", f(r["kdfine_cache_img_s"], 0)],
             ["torchvision ImageFolder + PIL, plain loop", f(r["imagefolder_loop_img_s"], 0)],
             [f"torchvision ImageFolder + PIL, DataLoader ({r['dataloader_workers']} workers)",
              f(r["imagefolder_dataloader_img_s"], 0)]]))
        lines.append(f"\nReloading the built cache (memory map): {r['kdfine_cached_reload_s']:.2f} s.\n")
    if "b" in recs:
        r = recs["b"]
        lines.append(benchinfo.markdown_table(
            [f"{r['images']} JPEGs of 256-512 px -> 64 px", "img/s"],
            [["full decode + resize", f(r["full_decode_img_s"], 0)], ["draft() + resize", f(r["draft_img_s"], 0)],
             ["speed-up", f"{r['draft_img_s'] / r['full_decode_img_s']:.2f}x"]]) + "\n")
    if "c" in recs:
        r = recs["c"]
        lines.append(benchinfo.markdown_table(
            ["wrn-16-1 training, CPU", "img/s (median)"],
            [["in-memory batches", f(r["in_memory_img_s"], 0)], ["streamed from the cache", f(r["streamed_img_s"], 0)],
             [f"streamed / in-memory, median of {r['rounds']} rounds (range)",
              f"{r['ratio_median']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}); target >= 0.9x: "
              f"{'met' if r['ratio_median'] >= 0.9 else 'NOT met'}"]]) + "\n")
    if "d" in recs:
        r = recs["d"]
        lines.append(f"Cache build at 128 px ({r['decoded_bytes'] / 2**30:.2f} GiB of training images) "
                     f"{r['cache_build_s']:.0f} s, peak RSS {r['peak_rss_after_build_mb']:.0f} MB; one epoch "
                     f"({r['images']} images, streaming chosen by the budget: {r['chose_streaming']}) "
                     f"{r['epoch_s']:.0f} s; peak RSS of the whole run {r['peak_rss_mb']:.0f} MB "
                     f"(target <= 1536 MB: {'met' if r['peak_rss_mb'] <= 1536 else 'NOT met'}).\n")
    m = benchinfo.machine()
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m.get('torch')}; load {benchinfo.load_average()}; "
                 f"{benchinfo.now()}.\nCommand: `{benchinfo.command_line()}`")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/cifar10-jpeg"), help="CIFAR-10 JPEG tree (train/, test/)")
    p.add_argument("--work", type=Path, default=Path("/tmp/kdfine-bench-data"), help="scratch space (caches, trees)")
    p.add_argument("--parts", default="a,b,c,d")
    p.add_argument("--big", type=int, default=2000, help="part b: number of large JPEGs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="part c: batches per round and pipeline")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.parts == "d-child":
        return part_d_child(a.data, a.work)
    recs = {}
    for part in a.parts.split(","):
        rec = {"a": lambda: part_a(a.data, a.work), "b": lambda: part_b(a.data, a.work, a.big),
               "c": lambda: part_c(a.data, a.work, a.rounds, a.steps), "d": lambda: part_d(a.data, a.work)}[part]()
        benchinfo.emit(rec)
        recs[part] = rec
    print(summary(recs))


if __name__ == "__main__":
    main()

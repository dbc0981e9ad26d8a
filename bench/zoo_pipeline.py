#!/usr/bin/env python
"""A pretrained-style pipeline with torchvision networks: kdfine against the conventional one.

On a class-balanced subsample of the CIFAR-10 JPEG tree (``--per-class`` train images per class,
hard links in a temporary tree; the subsample keeps the run to a few minutes on a CPU) at
``--image-size 64``: a ``tv:resnet18`` teacher trained with cross-entropy, then distilled (MSE on
logits) into ``tv:mobilenet_v3_small``, one epoch each. Random initialisation stands in for the
pretrained weights (this machine is offline); the computation is the same.

- kdfine: the commands users run, ``kdfine train-teacher --data imagefolder:SUB --image-size 64
  --arch tv:resnet18`` and ``kdfine distill --arch tv:mobilenet_v3_small``; img/s is what kdfine
  reports for the epoch (the decode into its cache happens once, before training, and is in the
  wall time only).
- conventional: ``torchvision.datasets.ImageFolder`` + ``Resize(64)``, ``RandomCrop(64, 4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``; ``DataLoader`` (batch ``--batch-size``,
  2 workers, shuffled); the same networks (built by kdfine's registry, so identical), SGD with
  Nesterov momentum, fp32 NCHW, teacher under ``torch.no_grad()``; img/s over the epoch after its
  first batch.

    python bench/zoo_pipeline.py --per-class 40
Prints JSON lines and a Markdown table with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402
from kdfine.models import build  # noqa: E402

TEACHER, STUDENT = "tv:resnet18", "tv:mobilenet_v3_small"


def subsample(archive: Path, root: Path, per_class: int, per_class_test: int) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/test/...``: the first images of each class."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tar:
        for m in tar:
            if not m.isfile() or not m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            split, cls, name = Path(m.name).parts[-3:]
            limit = per_class if split == "train" else per_class_test
            if counts.get((split, cls), 0) < limit:
                counts[(split, cls)] = counts.get((split, cls), 0) + 1
                target = root / split / cls / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
    return root


def kdfine_run(args: list[str], env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "kdfine", *args, "--json", "-q"], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"kdfine {' '.join(args)} failed: {r.stderr.strip()}")
    doc = json.loads(r.stdout)
    return {"img_per_s": doc["metrics"]["img_per_s"], "wall_s": time.perf_counter() - t0}


def conventional(tree: Path, size: int, batch: int, teacher: torch.nn.Module | None, arch: str,
                 k: int) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(size), transforms.RandomCrop(size, padding=4),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    loader = DataLoader(datasets.ImageFolder(str(tree / "train"), tf), batch_size=batch, shuffle=True,
                        num_workers=2, drop_last=True)
    torch.manual_seed(0)
    model = build(arch, k, 3, size).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    seen, t0 = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == 1:  # the first batch pays for worker start-up
            seen, t0 = 0, time.perf_counter()
        z = model(x)
        if teacher is None:
            loss = F.cross_entropy(z, y)
        else:
            with torch.no_grad():
                zt = teacher(x)
            loss = F.mse_loss(z, zt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += x.shape[0]
    return {"img_per_s": seen / (time.perf_counter() - t0), "model": model}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
    p.add_argument("--per-class", type=int, default=40, help="train images per class (subsample)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory(prefix="kdfine-zoo-bench-") as tmp:
        tree = subsample(a.archive, Path(tmp) / "cifar", a.per_class, max(2, a.per_class // 5))
        env = {**os.environ, "KDFINE_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(ROOT)}
        common = ["--data", f"imagefolder:{tree}", "--image-size", str(a.image_size), "--epochs", "1",
                  "--batch-size", str(a.batch_size), "--lr", "0.05"]
        t = str(Path(tmp) / "t.safetensors")
        rows = [("teacher " + TEACHER, kdfine_run(["train-teacher", *common, "--arch", TEACHER, "--out", t], env))]
        rows.append((f"distill {TEACHER} -> {STUDENT}", kdfine_run(
            ["distill", "--teacher", t, *common, "--arch", STUDENT, "--out", str(Path(tmp) / "s.safetensors")], env)))
        ct = conventional(tree, a.image_size, a.batch_size, None, TEACHER, 10)
        teacher = ct["model"].eval()
        cs = conventional(tree, a.image_size, a.batch_size, teacher, STUDENT, 10)
    rows_md = []
    for (name, kd), conv in zip(rows, (ct, cs)):
        rec = {"run": name, "kdfine_img_per_s": round(kd["img_per_s"], 1), "kdfine_wall_s": round(kd["wall_s"], 1),
               "conventional_img_per_s": round(conv["img_per_s"], 1),
               "ratio": round(kd["img_per_s"] / conv["img_per_s"], 2), "load_average": benchinfo.load_average()}
        benchinfo.emit(rec)
        rows_md.append([name, benchinfo.fmt(kd["img_per_s"]), benchinfo.fmt(kd["wall_s"]),
                        benchinfo.fmt(conv["img_per_s"]), f"{rec['ratio']:.2f}x"])
    m = benchinfo.machine()
    print(f"\n`{benchinfo.command_line()}`, {benchinfo.now()}, {m['cpu']}, {m['cores']} cores, torch {m.get('torch')}, "
          f"load average {benchinfo.load_average()}\n")
    print(f"{a.per_class * 10} train images (subsample), {a.image_size}px, batch {a.batch_size}, one epoch each\n")
    print(benchinfo.markdown_table(["run", "kdfine img/s", "kdfine wall (s)", "conventional img/s", "ratio"], rows_md))

if __name__ == "__main__":
    main()

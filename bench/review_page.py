#!/usr/bin/env python
"""How the review page (detect-noise --review) scales with the number of suspects.

Builds pages of N suspects whose thumbnails are real CIFAR-10 photos (32x32, from the JPEG archive
in ../shared/data, enlarged to 64x64 as the page does for small images; an npz holds them), and
measures: the time to write the page (thumbnails encoded, JSON, template), its size, and in
headless Chromium (tests/browser.py) the time from navigation to the load event with the first
page of cards in the document, and the time of a page turn by key and of a filter change.

    python bench/review_page.py --sizes 1000 10000 30000 [--archive ../shared/data/cifar10-jpeg.tar.gz]
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import benchinfo  # noqa: E402
from browser import Browser  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def photos(n: int, archive: Path) -> np.ndarray:
    """``n`` CIFAR-10 training photos (repeated when the archive has fewer read)."""
    from PIL import Image

    out = []
    with tarfile.open(archive) as tar:
        for m in tar:
            if m.isfile() and m.name.startswith(("train/", "./train/")) and m.name.endswith((".jpg", ".png")):
                out.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
                if len(out) == min(n, 5000):
                    break
    return np.stack([out[i % len(out)] for i in range(n)])


def page(n: int, work: Path, archive: Path) -> tuple[Path, float]:
    """A page of ``n`` suspects among ``n * 1.25`` samples; its path and the seconds to write it."""
    from kdfine.inference.review import Review, page_html

    total = int(n * 1.25)
    x = photos(total, archive)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, total)
    npz = work / f"photos-{n}.npz"
    np.savez(npz, x=x, y=y, x_test=x[:10], y_test=y[:10])
    rejected = np.zeros(total, bool)
    rejected[rng.permutation(total)[:n]] = True
    review = Review(y, (y + rng.integers(1, 10, total)) % 10, rng.random(total), rng.random(total),
                    rng.random(total) * 0.5, rejected, [f"class {c}" for c in range(10)], None,
                    {"data": f"npz:{npz}", "split": "train", "n": total}, "gmm", "logits", 0.5, f"{n} suspects")
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = page_html(review)
    out = work / f"review-{n}.html"
    out.write_text(text, encoding="utf-8")
    return out, time.perf_counter() - t


def in_browser(path: Path) -> dict[str, float]:
    with Browser() as b:
        b.page("Page.enable")
        t = time.perf_counter()
        b.open(path.as_uri(), timeout=300)
        cards = b.eval("document.querySelectorAll('[data-index]').length")
        load = time.perf_counter() - t
        t = time.perf_counter()
        b.key("n")
        b.eval("document.querySelectorAll('[data-index]').length")
        turn = time.perf_counter() - t
        t = time.perf_counter()
        b.eval("(() => { const s = document.getElementById('f-class'); s.value = '3';"
               " s.dispatchEvent(new Event('change')); return document.querySelectorAll('[data-index]').length; })()")
        filt = time.perf_counter() - t
    return {"load_s": load, "cards": cards, "page_turn_s": turn, "filter_s": filt}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--archive", type=Path, default=ARCHIVE, help="the CIFAR-10 JPEG archive")
    args = ap.parse_args(argv)
    print(f"# {benchinfo.command_line()}  ({benchinfo.now()})", flush=True)
    benchinfo.emit({"machine": benchinfo.machine(), "load": benchinfo.load_average()})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path, write_s = page(n, Path(tmp), args.archive)
            rec = {"suspects": n, "write_s": write_s, "mb": path.stat().st_size / 1e6, **in_browser(path)}
            benchinfo.emit(rec)
            rows.append([n, f"{rec['mb']:.1f}", f"{write_s:.1f}", f"{rec['load_s']:.2f}", rec["cards"],
                         f"{rec['page_turn_s'] * 1000:.0f}", f"{rec['filter_s'] * 1000:.0f}"])
    print(benchinfo.markdown_table(["suspects", "MB", "write s", "open to load s", "cards in the document",
                                    "page turn ms", "filter ms"], rows))


if __name__ == "__main__":
    main()

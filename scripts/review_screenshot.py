#!/usr/bin/env python3
"""Screenshot a review page (``kdfine detect-noise --review PAGE.html``) with headless Chromium.

Opens the page from disk, makes three decisions with the keyboard (relabel, drop, keep), so that
the picture shows decided cards, and writes a palette PNG (small enough for the docs).
docs/make-figures.sh makes docs/review.png with it:

    python scripts/review_screenshot.py runs/docs/review.html docs/review.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import Browser  # noqa: E402  (a standard-library DevTools client, shared with the tests)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=1020)
    args = ap.parse_args(argv)
    from PIL import Image

    with Browser(width=args.width, height=args.height) as b:
        b.page("Page.enable")
        b.open(args.page.resolve().as_uri())
        for key in ("r", "d", "a"):
            b.key(key)
        b.eval("window.scrollTo(0, 0)")
        shot = args.out.with_suffix(".tmp.png")
        b.screenshot(shot, args.width, args.height)
    im = Image.open(shot).convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    args.out.write_bytes(buf.getvalue())
    shot.unlink()
    print(args.out)


if __name__ == "__main__":
    main()

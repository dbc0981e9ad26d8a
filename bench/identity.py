"""What data identity costs (issue 28): the stat key of a tree (one ``stat`` per file, every
command), hashing the files' bytes (a full content check, ``KDFINE_VERIFY_DATA=1``, or after a
change), and hashing during a decode (the first run on a tree) against a decode without it.

    python bench/identity.py --tree /tmp/cifar-jpeg [--files 20000] [--stat-files 200000] [--baseline ../main]

``--tree``: an image folder (e.g. the CIFAR-10 JPEG tree, extracted); the first ``--files`` images
are decoded and hashed; the whole tree is timed as a decoded folder (cache hit + fingerprint, what
every command pays), also with the kdfine of ``--baseline`` when given. ``--stat-files`` empty
files are made in a temporary directory for the stat key alone. Prints a JSON document and a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdfine.data import cache, decode, identity  # noqa: E402
from kdfine.data.sources import IMAGE_SUFFIXES  # noqa: E402


ROUNDS = 5


def _images(root: Path, n: int) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.join(d, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
        if len(out) >= n:
            break
    return out[:n]


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def stat_cost(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdfine-stat-") as d:
        paths = []
        for i in range(n):
            sub = os.path.join(d, f"c{i % 100:02d}")
            os.makedirs(sub, exist_ok=True)
            p = os.path.join(sub, f"{i:07d}.jpg")
            open(p, "wb").close()
            paths.append(p)
        s = _best(lambda: identity.stat_tree(d, paths))
    return {"files": n, "stat_key_s": round(s, 3), "us_per_file": round(1e6 * s / n, 2),
            "million_files_s": round(s / n * 1e6, 1)}


def decode_cost(files: list[str], root: Path) -> dict:
    spec = decode.DecodeSpec(32, 3)
    workers = cache.decode_workers()

    def decode(digests: bool) -> None:
        sink = cache.ArraySink((32, 32, 3), len(files))
        cache.decode_into(sink, files, spec, quiet=True, workers=workers, digests=digests)

    decode(False)  # the page cache holds the files from here on, for every variant alike
    plain, hashed = [], []
    for _ in range(ROUNDS):  # alternating rounds; the overhead is the median of the paired ratios
        plain.append(_best(lambda: decode(False), 1))
        hashed.append(_best(lambda: decode(True), 1))
    ratios = sorted(h / p for p, h in zip(plain, hashed))
    tree = identity.stat_tree(root, files)
    full = _best(lambda: identity.hash_files(tree.paths, workers))
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    return {"files": len(files), "megabytes": round(mb, 1), "workers": workers, "rounds": ROUNDS,
            "decode_s": round(sorted(plain)[ROUNDS // 2], 2), "decode_with_hash_s": round(sorted(hashed)[ROUNDS // 2], 2),
            "hash_overhead": round(ratios[ROUNDS // 2] - 1, 3),
            "hash_overhead_range": [round(ratios[0] - 1, 3), round(ratios[-1] - 1, 3)],
            "hash_only_s": round(full, 2), "hash_files_per_s": round(len(files) / full)}


_HIT = """
import sys, time
from kdfine.data.sources import load_source
from kdfine.data.prepare import data_fingerprint
spec = "imagefolder:" + sys.argv[1]
load_source(spec, image_size=32, quiet=True)
data_fingerprint(spec)
best = 1e9
for _ in range(3):
    t0 = time.perf_counter()
    load_source(spec, image_size=32, quiet=True)
    data_fingerprint(spec)
    best = min(best, time.perf_counter() - t0)
print(best)
"""


def hit_cost(root: Path, checkout: Path) -> float:
    """Seconds (best of 3) of what every command pays on an image folder already decoded: the
    cache hit (load_source) and the data fingerprint, with the kdfine of ``checkout``."""
    with tempfile.TemporaryDirectory(prefix="kdfine-hit-") as cache_dir:
        env = {**os.environ, "PYTHONPATH": str(checkout), "KDFINE_CACHE": cache_dir}
        out = subprocess.run([sys.executable, "-c", _HIT, str(root)], capture_output=True, text=True, env=env,
                             check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, required=True)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--stat-files", type=int, default=200000)
    ap.add_argument("--baseline", type=Path, help="another kdfine checkout whose cache hit to time alongside")
    a = ap.parse_args()
    files = _images(a.tree, a.files)
    doc = {"command": " ".join(["python", *sys.argv]), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "load_average": os.getloadavg()[0], "stat": stat_cost(a.stat_files), "decode": decode_cost(files, a.tree),
           "hit_s": {"this": hit_cost(a.tree, Path(__file__).resolve().parents[1])}}
    if a.baseline:
        doc["hit_s"]["baseline"] = hit_cost(a.tree, a.baseline)
    print(json.dumps(doc, indent=2))
    s, d = doc["stat"], doc["decode"]
    print(f"\n`{doc['command']}`, {doc['when']}, {doc['machine']}\n")
    print("| measure | files | time | per file / rate |\n| --- | --- | --- | --- |")
    print(f"| stat key (every command) | {s['files']:,} empty files | {s['stat_key_s']} s | {s['us_per_file']} us "
          f"(1M files: {s['million_files_s']} s) |")
    lo, hi = d["hash_overhead_range"]
    print(f"| decode to 32 px, no hashing (median of {d['rounds']}) | {d['files']:,} JPEGs, {d['megabytes']} MB | "
          f"{d['decode_s']} s | {d['files'] / d['decode_s']:,.0f} img/s |")
    print(f"| decode to 32 px with the content hash (median of {d['rounds']}) | {d['files']:,} | "
          f"{d['decode_with_hash_s']} s | {100 * d['hash_overhead']:+.1f}% (paired rounds: {100 * lo:+.1f}% to "
          f"{100 * hi:+.1f}%) |")
    print(f"| hash alone (full content check, {d['workers']} threads) | {d['files']:,} | {d['hash_only_s']} s | "
          f"{d['hash_files_per_s']:,} files/s |")
    n = sum(1 for _ in _images(a.tree, 10**9))
    for who, sec in doc["hit_s"].items():
        print(f"| decoded folder, every command: cache hit + fingerprint ({who}) | {n:,} | {sec:.2f} s | "
              f"{1e6 * sec / n:.0f} us |")


if __name__ == "__main__":
    main()

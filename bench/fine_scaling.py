#!/usr/bin/env python
"""``kdfine detect-noise`` at scale, against the official FINE approach, on synthetic features.

For each size (N rows, D = 512 dimensions, K classes) a float32 ``.npy`` of non-negative features is
written once (a shared direction, class-dependent low-rank signal and noise through a ReLU, 30% of
the labels flipped to another class, labels in the ``.labels.npy`` sidecar) and then read by:

- kdfine: the real CLI, ``python -m kdfine detect-noise --features f.npy --out clean.csv``, in a
  subprocess; wall time of the whole command (interpreter start, imports, reading the file,
  detection, writing the CSV) and its peak resident memory (``wait4``'s ``ru_maxrss`` of the child);
- official: the official FINE code's approach, in a subprocess, timed the same way: load the array,
  per class ``numpy.linalg.svd`` of the n_k x D matrix (full matrices, as the official code calls it)
  for the top right singular vector, a score per sample, a 2-component GaussianMixture per class
  (full covariance, tol 1e-6, seed 0), keep P(clean) > 0.5. Where n_k exceeds
  ``--official-max-per-class`` the full SVD would need an n_k x n_k matrix (tens of GB, hours), so
  the same approach with the economy SVD (``full_matrices=False``: the same singular vector) stands
  in, labelled ``official-economy``, up to ``--reference-max-n`` rows.

Both selections are compared (Jaccard index of the kept sets, target >= 0.999). The file is read
once before timing so that both sides find it in the page cache. The parent process stays small
(the data is written by a subprocess) because a child's ``ru_maxrss`` starts from the resident size
of the process that spawned it; ``parent_rss_mb`` in the JSON shows that floor.

    python bench/fine_scaling.py                         # every size: about 15 minutes on 2 cores
    python bench/fine_scaling.py --sizes 50k:10          # the 20x target alone
    python bench/fine_scaling.py --sizes 1M:100          # the 2 GB file: <= 20 s, <= 1 GB target

Prints one JSON line per measurement and a Markdown summary, with the command and the date.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402

DEFAULT_SIZES = "50k:10,50k:100,200k:10,200k:100,1M:10,1M:100"
SEED = 0
NOISE = 0.3  # share of flipped labels
RANK = 4
MAKE_ROWS = 32768


def parse_sizes(spec: str) -> list[tuple[int, int]]:
    """``50k:10,1M:100`` -> [(50000, 10), (1000000, 100)]."""
    out = []
    for item in spec.split(","):
        n, _, k = item.strip().partition(":")
        mult = {"k": 1_000, "m": 1_000_000}.get(n[-1:].lower(), 1)
        try:
            out.append((int(float(n[:-1] if mult > 1 else n) * mult), int(k)))
        except ValueError:
            raise SystemExit(f"--sizes: '{item}' is not N:K (e.g. 50k:10)") from None
    return out


# ------------------------------------------------------------------------------ workers (subprocesses)


def make_features(path: Path, n: int, d: int, k: int, seed: int = SEED) -> None:
    """Write the synthetic (n, d) float32 dump and its labels sidecar, streaming row blocks.

    A direction g shared by all classes, and per class c a non-negative mean direction m_c (half
    of its entries zero) and a rank-4 non-negative subspace B_c; row i of true class c is
    relu(0.3 b_i g + a_i m_c + B_c w_i + e_i) with a_i, b_i ~ U(0.5, 1.5), w_i ~ |N(0, 0.3^2)|,
    e_i ~ N(0, I). 30% of the labels move to another class. The classes overlap enough that some
    samples sit near the clean/noisy boundary (about 99.8% precision, 96% recall).
    """
    import numpy as np

    rng = np.random.default_rng([seed, n, d, k])
    shared = np.abs(rng.standard_normal(d)).astype(np.float32)
    means = np.maximum(rng.standard_normal((k, d)), 0).astype(np.float32)
    basis = np.abs(rng.standard_normal((k, RANK, d))).astype(np.float32) / np.sqrt(d / 8)
    truth = rng.integers(0, k, n)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})
        for lo in range(0, n, MAKE_ROWS):
            c = truth[lo:lo + MAKE_ROWS]
            m = len(c)
            a = rng.uniform(0.5, 1.5, (m, 1)).astype(np.float32)
            w = np.abs(rng.standard_normal((m, RANK), dtype=np.float32)) * 0.3
            b = rng.uniform(0.5, 1.5, (m, 1)).astype(np.float32)
            x = 0.3 * b * shared + means[c] * a + np.einsum("mr,mrd->md", w, basis[c])
            x += rng.standard_normal((m, d), dtype=np.float32)
            np.maximum(x, 0, out=x)
            f.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
    flip = rng.random(n) < NOISE
    labels = truth.copy()
    labels[flip] = (truth[flip] + rng.integers(1, k, int(flip.sum()))) % k
    np.save(path.with_name(path.name[:-4] + ".labels.npy"), labels)
    np.save(path.with_name(path.name[:-4] + "-truth.npy"), truth)  # not a sidecar: detect-noise ignores it
    make_logits(path, truth, k, seed)
    os.replace(tmp, path)


def make_logits(path: Path, truth, k: int, seed: int = SEED) -> None:
    """The ``.logits.npy`` sidecar of ``path`` for ``--method auto`` and ``small-loss``: (n, k)
    float32, N(0, 1) everywhere plus 3 at the true class (a model right on most samples, the
    flipped labels' loss high), streamed in row blocks from its own generator so that the features
    of files written before this sidecar existed stay the same."""
    import numpy as np

    rng = np.random.default_rng([seed, truth.size, k, 1])
    dest = path.with_name(path.name[:-4] + ".logits.npy")
    tmp = dest.with_name(dest.name + ".part")
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (truth.size, k)})
        for lo in range(0, truth.size, MAKE_ROWS):
            c = truth[lo:lo + MAKE_ROWS]
            z = rng.standard_normal((c.size, k), dtype=np.float32)
            z[np.arange(c.size), c] += 3.0
            f.write(np.ascontiguousarray(z, dtype="<f4").tobytes())
    os.replace(tmp, dest)


def official_detect(path: Path, out: Path, economy: bool, seed: int = SEED) -> None:
    """The official FINE approach (per-class SVD, per-sample scores, per-class GMM); writes the
    sorted kept indices to ``out``."""
    import numpy as np
    from sklearn.mixture import GaussianMixture

    features = np.load(path)
    labels = np.load(path.with_name(path.name[:-4] + ".labels.npy"))
    vectors = {}
    for c in np.unique(labels):
        _, _, vt = np.linalg.svd(features[labels == c], full_matrices=not economy)
        vectors[c] = vt[0]
    scores = np.array([np.abs(np.inner(vectors[labels[i]], f / np.linalg.norm(f))) for i, f in enumerate(features)])
    kept = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        s = scores[idx].astype(np.float64).reshape(-1, 1)
        gmm = GaussianMixture(n_components=2, covariance_type="full", tol=1e-6, max_iter=100, random_state=seed).fit(s)
        p = gmm.predict_proba(s)[:, gmm.means_.argmax()]
        kept.append(idx[p > 0.5])
    np.save(out, np.sort(np.concatenate(kept)))


# ------------------------------------------------------------------------------ the orchestrator


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; wall seconds, the child's peak RSS (MB) and its stdout."""
    floor = current_rss_mb()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-2000:]}")
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "parent_rss_mb": round(floor, 1), "stdout": stdout}


def warm_page_cache(path: Path) -> None:
    """Read the file once (into a small reused buffer) so that every timed run finds it cached."""
    buf = bytearray(1 << 24)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def read_index_column(csv: Path):
    import numpy as np

    return np.loadtxt(csv, delimiter=",", skiprows=1, usecols=0, dtype=np.int64, ndmin=1)


def jaccard(a, b) -> float:
    import numpy as np

    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 1.0


def bench_size(n: int, k: int, d: int, args, work: Path) -> list[dict]:
    import numpy as np

    me = [sys.executable, str(Path(__file__).resolve())]
    path = work / f"fine-{n}x{d}-k{k}.npy"
    if not path.exists():
        t0 = time.perf_counter()
        subprocess.run(me + ["--worker-make", str(path), str(n), str(d), str(k)], check=True)
        print(f"# wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
    labels = np.load(path.with_name(path.name[:-4] + ".labels.npy"))
    truth = np.load(path.with_name(path.name[:-4] + "-truth.npy"))
    if not path.with_name(path.name[:-4] + ".logits.npy").exists():  # a file kept from before the sidecar
        make_logits(path, truth, k)
    max_per_class = int(np.bincount(labels).max())
    warm_page_cache(path)
    base = {"bench": "fine_scaling", "n": n, "d": d, "k": k, "file_gb": round(path.stat().st_size / 1e9, 3)}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    records = []

    for method in args.methods:
        csv = work / f"clean-{method}.csv"
        kd = run_timed([sys.executable, "-m", "kdfine", "detect-noise", "--features", str(path), "--method", method,
                        "--out", str(csv), "--json", "-q"], env=env)
        got = read_index_column(csv)
        clean = labels == truth
        rec = {**base, "impl": "kdfine" if method == "gmm" else f"kdfine-{method}",
               **{x: kd[x] for x in ("wall_s", "cpu_s", "peak_rss_mb", "parent_rss_mb")},
               "kept": int(got.size), "precision": round(float(clean[got].mean()), 4) if got.size else 0.0,
               "recall": round(float(clean[got].sum() / clean.sum()), 4), "load": benchinfo.load_average()}
        benchinfo.emit(rec)
        records.append(rec)
        if method == "gmm":
            kept = got
    if "gmm" not in args.methods:
        return records

    economy = max_per_class > args.official_max_per_class
    if not (economy and n > args.reference_max_n):
        out = work / "official.npy"
        ref = run_timed(me + ["--worker-official", str(path), str(out)] + (["--economy"] if economy else []))
        ref_kept = np.load(out)
        rec = {**base, "impl": "official-economy" if economy else "official",
               **{x: ref[x] for x in ("wall_s", "peak_rss_mb", "parent_rss_mb")}, "kept": int(ref_kept.size),
               "jaccard_vs_kdfine": round(jaccard(kept, ref_kept), 6),
               "kdfine_speedup": round(ref["wall_s"] / kd["wall_s"], 2), "load": benchinfo.load_average()}
        benchinfo.emit(rec)
        records.append(rec)
    if not args.keep_files:
        for p in work.glob(path.name[:-4] + "*"):
            p.unlink()
    return records


def summary(records: list[dict]) -> str:
    by = {}
    for r in records:
        by.setdefault((r["n"], r["k"]), {})[r["impl"]] = r
    rows = []
    for (n, k), impls in by.items():
        kd = impls["kdfine"]
        ref = impls.get("official") or impls.get("official-economy")
        rows.append([f"{n:,}", kd["d"], k, f"{kd['file_gb']:.2f}", f"{kd['wall_s']:.2f}", f"{kd['peak_rss_mb']:.0f}",
                     ref["impl"] if ref else "not run", f"{ref['wall_s']:.1f}" if ref else "",
                     f"{ref['kdfine_speedup']:.1f}x" if ref else "", f"{ref['jaccard_vs_kdfine']:.4f}" if ref else ""])
    table = benchinfo.markdown_table(["N", "D", "K", "file GB", "kdfine s", "kdfine peak RSS MB", "reference",
                                      "reference s", "kdfine speed-up", "Jaccard"], rows)
    checks = []
    for (n, k), impls in by.items():
        kd, ref = impls["kdfine"], impls.get("official")
        if (n, k) == (50_000, 10) and ref:
            checks.append(f"- N=50k, K=10: {ref['kdfine_speedup']:.1f}x the official approach (target >= 20x): "
                          f"{'met' if ref['kdfine_speedup'] >= 20 else 'NOT met'}")
        if (n, k) == (1_000_000, 100):
            ok = kd["wall_s"] <= 20 and kd["peak_rss_mb"] <= 1024
            checks.append(f"- N=1M, D=512, K=100 ({kd['file_gb']:.1f} GB): {kd['wall_s']:.1f} s, peak RSS "
                          f"{kd['peak_rss_mb']:.0f} MB (target <= 20 s, <= 1024 MB): {'met' if ok else 'NOT met'}")
    for r in records:
        if r["impl"].startswith("kdfine-"):
            checks.append(f"- N={r['n']:,}, K={r['k']}, --method {r['impl'][7:]}: {r['wall_s']:.1f} s wall, "
                          f"{r['cpu_s']:.1f} CPU s, peak RSS {r['peak_rss_mb']:.0f} MB")
        if "jaccard_vs_kdfine" in r and r["jaccard_vs_kdfine"] < 0.999:
            checks.append(f"- N={r['n']:,}, K={r['k']}: Jaccard {r['jaccard_vs_kdfine']:.4f} < 0.999")
    return table + ("\n\n" + "\n".join(checks) if checks else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"N:K pairs [default: {DEFAULT_SIZES}]")
    ap.add_argument("--dim", type=int, default=512, help="feature dimension D [default: 512]")
    ap.add_argument("--workdir", help="where the synthetic .npy files go [default: a temporary directory]")
    ap.add_argument("--keep-files", action="store_true", help="keep the .npy files (reused by the next run)")
    ap.add_argument("--official-max-per-class", type=int, default=8000,
                    help="largest class for the full-matrices SVD; above, the economy SVD [default: 8000]")
    ap.add_argument("--reference-max-n", type=int, default=1_000_000,
                    help="largest N for which the economy-SVD reference runs [default: 1000000]")
    ap.add_argument("--methods", type=lambda v: [m.strip() for m in v.split(",") if m.strip()], default=["gmm"],
                    help="detect-noise --method values to time, comma-separated; the reference is compared "
                         "with gmm [default: gmm]")
    ap.add_argument("--worker-make", nargs=4, metavar=("PATH", "N", "D", "K"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-official", nargs=2, metavar=("PATH", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--economy", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_make:
        p, n, d, k = args.worker_make
        return make_features(Path(p), int(n), int(d), int(k))
    if args.worker_official:
        return official_detect(Path(args.worker_official[0]), Path(args.worker_official[1]), args.economy)

    sizes = parse_sizes(args.sizes)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kdfine-fine-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {benchinfo.command_line()}", flush=True)
    benchinfo.emit({"bench": "fine_scaling", "machine": benchinfo.machine(), "date": benchinfo.now(),
                    "load": benchinfo.load_average()})
    records = []
    try:
        for n, k in sizes:
            records += bench_size(n, k, args.dim, args, work)
    finally:
        if not args.workdir and not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)
    benchinfo.print_report("detect-noise: kdfine vs the official FINE approach", summary(records),
                           "load before/after in the JSON lines.")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Which rule should ``--method auto`` be? Candidates compared leave-one-set-out.

Inputs: feature dumps with a truth sidecar: the noisy-label dumps of bench/detectors.py (digits and
the CIFAR-10 subset, six noises each: ``<dir>/<data>/f-<noise>.npy``) and the CIFAR-10N dumps of
bench/real_noise.py (``<dir>/<labels>/features.npy``). On each, the base detectors run once (FINE
``gmm``, ``small-loss``, ``knn``, cleanlab as bench/detectors.py runs it, today's ``auto``), then
every candidate rule combines their outputs without the truth. A candidate's *gap* on a set is its
F1 minus the best F1 of FINE, small-loss and cleanlab there (the issue's goal: gap >= -0.01).

Leave-one-set-out: for each set, the candidate with the best worst-case gap on the *other* sets is
chosen, and its gap on the held-out set is reported, with the sets it was chosen on. A candidate
with no fitted constant is itself fitted on nothing; the choice among candidates is the fit.

    python bench/detector_rule.py --synthetic /work/cache/runs/det --real /work/cache/runs/real
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402

REFERENCE = ("gmm", "small-loss", "cleanlab")


def dumps(synthetic: Path | None, real: Path | None) -> list[tuple[str, Path]]:
    """(set name, dump path) of every dump found, synthetic first."""
    out = []
    for data in ("digits", "cifar10"):
        for p in sorted((synthetic / data).glob("f-*.npy")) if synthetic else []:
            if not p.name.endswith((".labels.npy", ".logits.npy", ".truth.npy", ".index.npy")):
                out.append((f"{data} {p.stem[2:]}", p))
    for p in sorted(real.glob("*/features.npy")) if real else []:
        out.append((f"cifar10n {p.parent.name}", p))
    return out


def cached_components(path: Path, cache: Path | None) -> dict[str, Any]:
    """:func:`components`, kept as ``<cache>/<hash of the dump's path and mtime>.npz`` (base
    detectors only: change the cache directory when a base detector changes)."""
    if cache is None:
        return components(path)
    import hashlib

    key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    f = cache / f"{key}.npz"
    if not f.exists():
        got = components(path)
        flat = {f"{m}.{k}": v for m, d in got.items() if isinstance(d, dict) for k, v in d.items() if v is not None}
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(f, **flat, **{k: v for k, v in got.items() if not isinstance(v, dict)})
    with np.load(f) as z:  # arrays only (allow_pickle stays False)
        out: dict[str, Any] = {}
        for name in z.files:
            m, _, k = name.partition(".")
            if k:
                out.setdefault(m, {"p": None})[k] = z[name]
            else:
                out[m] = z[name].item() if z[name].ndim == 0 else z[name]
    return out


def components(path: Path) -> dict[str, Any]:
    """Every base detector's keep mask, posterior and score on one dump, and the truth."""
    import detectors as bd
    from kdfine.detect import command

    got: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in ("gmm", "small-loss", "knn", "auto"):
            det, _, labels, truth = command.detect_noise(str(path), method=m)
            got[m] = {"keep": det.keep, "p": np.asarray(det.p_clean, float), "score": np.asarray(det.scores, float)}
        keep, score, _ = bd.cleanlab_detect(path)
        got["cleanlab"] = {"keep": np.asarray(keep, bool), "p": None, "score": np.asarray(score, float)}
    from kdfine.detect import dump as d

    dump = d.read_dump(path, mmap=False)
    got["clean"] = truth == labels
    got["labels"], got["k"] = labels, int(dump.logits.shape[1])
    got["fit_rate"] = float((np.asarray(dump.logits).argmax(1) == labels).mean())
    return got


def _ranks(x: np.ndarray) -> np.ndarray:
    from kdfine.detect.auto import ranks01

    return ranks01(np.asarray(x, float))


def _vote(c: dict[str, Any], names: tuple[str, ...]) -> np.ndarray:
    return np.sum([c[m]["keep"] for m in names], axis=0) * 2 > len(names)


def _rank_mean(c: dict[str, Any], names: tuple[str, ...]) -> np.ndarray:
    return np.mean([_ranks(c[m]["score"]) for m in names], axis=0)


def _p_mean(c: dict[str, Any], names: tuple[str, ...]) -> np.ndarray:
    return np.mean([c[m]["p"] for m in names], axis=0)


def dawid_skene(votes: np.ndarray, iters: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latent-class EM (Dawid & Skene 1979) on binary votes (N, J), 1 = keep: returns P(clean) (N,),
    sensitivity a (J,) = P(keep | clean) and false-keep rate b (J,) = P(keep | noisy)."""
    v = votes.astype(float)
    p = v.mean(axis=1)  # start: the share of detectors that keep
    for _ in range(iters):
        pi = np.clip(p.mean(), 1e-6, 1 - 1e-6)
        a = np.clip((p @ v) / p.sum(), 1e-6, 1 - 1e-6)
        b = np.clip(((1 - p) @ v) / (1 - p).sum(), 1e-6, 1 - 1e-6)
        lc = np.log(pi) + v @ np.log(a) + (1 - v) @ np.log(1 - a)
        ln = np.log(1 - pi) + v @ np.log(b) + (1 - v) @ np.log(1 - b)
        new = 1 / (1 + np.exp(ln - lc))
        if np.max(np.abs(new - p)) < 1e-9:
            p = new
            break
        p = new
    return p, a, b


def _ds(c: dict[str, Any], names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    p, a, b = dawid_skene(np.stack([c[m]["keep"] for m in names], axis=1))
    w = np.log(a / b) + np.log((1 - b) / (1 - a))  # each voter's weight in the posterior's log-odds
    w = np.maximum(w, 0)
    score = np.sum([wj * _ranks(c[m]["score"]) for wj, m in zip(w, names)], axis=0) / max(w.sum(), 1e-12)
    return p > 0.5, score


#: candidate rules: dump components -> (keep, score); none reads the truth
CANDIDATES: dict[str, Callable[[dict[str, Any]], tuple[np.ndarray, np.ndarray]]] = {
    "auto (today)": lambda c: (c["auto"]["keep"], c["auto"]["score"]),
    "gmm": lambda c: (c["gmm"]["keep"], c["gmm"]["score"]),
    "small-loss": lambda c: (c["small-loss"]["keep"], c["small-loss"]["score"]),
    "knn": lambda c: (c["knn"]["keep"], c["knn"]["score"]),
    "vote gmm, small-loss, knn": lambda c: (_vote(c, ("gmm", "small-loss", "knn")),
                                            _rank_mean(c, ("gmm", "small-loss", "knn"))),
    "mean p gmm, small-loss, knn": lambda c: (_p_mean(c, ("gmm", "small-loss", "knn")) > 0.5,
                                              _p_mean(c, ("gmm", "small-loss", "knn"))),
    "dawid-skene gmm, small-loss, knn": lambda c: _ds(c, ("gmm", "small-loss", "knn")),
    "mean p gmm, small-loss": lambda c: (_p_mean(c, ("gmm", "small-loss")) > 0.5, _p_mean(c, ("gmm", "small-loss"))),
}


def evaluate(comps: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {candidate or reference detector: {f1, auroc, gap}}}."""
    from kdfine import metrics

    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, c in comps.items():
        row = {}
        for m in REFERENCE:
            q = metrics.detection(c[m]["keep"], c["clean"], c[m]["score"])
            row[f"[{m}]"] = {"f1": q["f1"], "auroc": q["auroc"]}
        best = max(row[f"[{m}]"]["f1"] for m in REFERENCE)
        for cand, rule in CANDIDATES.items():
            keep, score = rule(c)
            q = metrics.detection(keep, c["clean"], score)
            row[cand] = {"f1": q["f1"], "auroc": q["auroc"], "gap": q["f1"] - best}
        out[name] = row
    return out


def loso(results: dict[str, dict[str, dict[str, float]]]) -> list[list[Any]]:
    """Per held-out set: the candidate with the best worst-case gap on the other sets, its gap there
    and on the held-out set."""
    rows = []
    names = list(results)
    for held in names:
        fit_on = [n for n in names if n != held]
        worst = {c: min(results[n][c]["gap"] for n in fit_on) for c in CANDIDATES}
        pick = max(worst, key=worst.get)
        rows.append([held, pick, f"{worst[pick]:+.3f}", f"{results[held][pick]['gap']:+.3f}",
                     "all others" if len(fit_on) == len(names) - 1 else ", ".join(fit_on)])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", type=Path, help="bench/detectors.py's --out")
    p.add_argument("--real", type=Path, help="bench/real_noise.py's --out")
    p.add_argument("--cache", type=Path, help="keep the base detectors' outputs here between runs")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    comps = {name: cached_components(path, args.cache) for name, path in dumps(args.synthetic, args.real)}
    results = evaluate(comps)
    cands = list(CANDIDATES)
    table = [[n, f"{100 * (1 - comps[n]['clean'].mean()):.1f}", f"{comps[n]['fit_rate']:.2f}",
              " / ".join(f"{results[n][f'[{m}]']['f1']:.3f}" for m in REFERENCE),
              *[f"{results[n][c]['f1']:.3f} ({results[n][c]['gap']:+.3f})" for c in cands]] for n in results]
    worst = [["worst gap", "", "", "", *[f"{min(results[n][c]['gap'] for n in results):+.3f}" for c in cands]],
             ["sets within 0.01", "", "", "", *[str(sum(results[n][c]['gap'] >= -0.01 for n in results))
                                                for c in cands]]]
    print(f"{benchinfo.now()}, load {benchinfo.load_average()}, {time.perf_counter() - t0:.0f} s\n\n"
          f"    {benchinfo.command_line()}\n\nF1 (gap to the best of gmm, small-loss, cleanlab):\n\n"
          + benchinfo.markdown_table(["set", "true noise %", "labels fitted", "gmm / small-loss / cleanlab F1",
                                      *cands], table + worst)
          + "\n\nAUROC:\n\n" + benchinfo.markdown_table(
              ["set", *[f"[{m}]" for m in REFERENCE], *cands],
              [[n, *[f"{results[n][f'[{m}]']['auroc']:.3f}" for m in REFERENCE],
                *[f"{results[n][c]['auroc']:.3f}" for c in cands]] for n in results])
          + "\n\nLeave one set out (the candidate with the best worst-case gap on the other sets):\n\n"
          + benchinfo.markdown_table(["held out", "chosen", "worst gap where chosen", "gap held out", "chosen on"],
                                     loso(results)))


if __name__ == "__main__":
    main()

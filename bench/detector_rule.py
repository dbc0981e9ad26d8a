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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchinfo  # noqa: E402

REFERENCE = ("gmm", "small-loss", "cleanlab")


def dumps(synthetic: list[Path], real: Path | None) -> list[tuple[str, Path]]:
    """(set name, dump path) of every dump found, synthetic first (a second and later ``synthetic``
    folder's sets are named with its folder's name: other seeds)."""
    out = []
    for i, folder in enumerate(synthetic):
        tag = "" if i == 0 else f" [{folder.name}]"
        for data in ("digits", "cifar10"):
            for p in sorted((folder / data).glob("f-*.npy")):
                if not p.name.endswith((".labels.npy", ".logits.npy", ".truth.npy", ".index.npy")):
                    out.append((f"{data} {p.stem[2:]}{tag}", p))
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


def detector_output(path: Path, method: str) -> dict[str, np.ndarray]:
    """keep, p and score of ``detect-noise --method`` on one dump, as the code is now."""
    from kdfine.detect import command

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det, _, _, _ = command.detect_noise(str(path), method=method)
    return {"keep": det.keep, "p": np.asarray(det.p_clean, float), "score": np.asarray(det.scores, float)}


def components(path: Path) -> dict[str, Any]:
    """Every base detector's keep mask, posterior and score on one dump, and the truth."""
    import detectors as bd
    from kdfine.detect import command

    got: dict[str, Any] = {m: detector_output(path, m) for m in ("gmm", "small-loss", "knn", "auto")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, labels, truth = command.detect_noise(str(path), method="small-loss")
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


_EPS = 1e-6


@dataclass
class LatentFit:
    """The fitted model: ``p_clean`` (N,) = P(clean | the sample's votes), ``sensitivity`` a (J,),
    ``false_keep`` b (J,), ``clean_share`` pi, ``weights`` (J,) each vote's log-odds weight
    log(a (1 - b) / (b (1 - a))) (0 for a detector that keeps noisy samples at least as often as clean
    ones), ``iterations`` of EM."""

    p_clean: np.ndarray
    sensitivity: np.ndarray
    false_keep: np.ndarray
    clean_share: float
    weights: np.ndarray
    iterations: int


def fit_votes(votes: np.ndarray, *, max_iter: int = 500, tol: float = 1e-10) -> LatentFit:
    """EM for the two-class latent-class model on binary ``votes`` (N, J), True = keep.

    Starts from each pattern's share of keep votes as its P(clean), so that the "clean" class is
    the one most detectors keep (and kept so: the class with the higher mean keep rate is "clean");
    stops when no pattern's posterior moves by more than ``tol``.
    """
    votes = np.asarray(votes, dtype=bool)
    n, j = votes.shape
    codes = votes.astype(np.int64) @ (1 << np.arange(j))  # each sample's vote pattern
    counts = np.bincount(codes, minlength=1 << j).astype(np.float64)
    patterns = (np.arange(1 << j)[:, None] >> np.arange(j)) & 1  # (2^J, J) 0/1
    post = patterns.mean(axis=1)
    it = 0
    for it in range(1, max_iter + 1):
        pi, a, b = _m_step(post, counts, patterns)
        new = _e_step(pi, a, b, patterns)
        done = np.max(np.abs(new - post)) < tol
        post = new
        if done:
            break
    pi, a, b = _m_step(post, counts, patterns)
    if a.mean() < b.mean():  # EM swapped the classes: "clean" is the class the detectors keep more
        post, pi, a, b = 1 - post, 1 - pi, b, a
    weights = np.maximum(np.log(a * (1 - b)) - np.log(b * (1 - a)), 0.0)
    return LatentFit(post[codes], a, b, float(pi), weights, it)


def _m_step(post: np.ndarray, counts: np.ndarray, patterns: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """pi, a (J,), b (J,) from the patterns' posteriors (2^J,) and counts (2^J,), clipped into (0, 1)."""
    clean = post * counts
    noisy = (1 - post) * counts
    pi = np.clip(clean.sum() / max(counts.sum(), 1.0), _EPS, 1 - _EPS)
    a = np.clip(clean @ patterns / max(clean.sum(), _EPS), _EPS, 1 - _EPS)
    b = np.clip(noisy @ patterns / max(noisy.sum(), _EPS), _EPS, 1 - _EPS)
    return float(pi), a, b


def _e_step(pi: float, a: np.ndarray, b: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """P(clean | pattern) for every pattern (2^J,)."""
    log_clean = np.log(pi) + patterns @ np.log(a) + (1 - patterns) @ np.log(1 - a)
    log_noisy = np.log(1 - pi) + patterns @ np.log(b) + (1 - patterns) @ np.log(1 - b)
    return 1.0 / (1.0 + np.exp(log_noisy - log_clean))


def _ds(c: dict[str, Any], names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The votes read by :func:`fit_votes`; score: the ranks averaged with the votes' log-odds weights."""
    fit = fit_votes(np.stack([c[m]["keep"] for m in names], axis=1))
    p, w = fit.p_clean, fit.weights
    score = np.sum([wj * _ranks(c[m]["score"]) for wj, m in zip(w, names)], axis=0) / max(w.sum(), 1e-12)
    return p > 0.5, score


def _blend(c: dict[str, Any], rule: Callable) -> tuple[np.ndarray, np.ndarray]:
    """``rule`` where the model fits the labels FINE rejects (m = 1), small-loss where it does not
    (m = 0), linear between: today's auto's step 5 around another combination."""
    from kdfine.detect.auto import memorisation

    m = memorisation(c["fit_rate"], float(np.mean(~c["gmm"]["keep"])))
    keep, score = rule(c)
    p = m * keep + (1 - m) * c["small-loss"]["p"]
    return p > 0.5, m * _ranks(score) + (1 - m) * _ranks(c["small-loss"]["score"])


#: candidate rules: dump components -> (keep, score); none reads the truth
CANDIDATES: dict[str, Callable[[dict[str, Any]], tuple[np.ndarray, np.ndarray]]] = {
    "auto (this code)": lambda c: (c["auto-now"]["keep"], c["auto-now"]["score"]),
    "keep all": lambda c: (np.ones(c["clean"].size, bool), np.zeros(c["clean"].size)),
    "auto (today)": lambda c: (c["auto"]["keep"], c["auto"]["score"]),
    "gmm": lambda c: (c["gmm"]["keep"], c["gmm"]["score"]),
    "small-loss": lambda c: (c["small-loss"]["keep"], c["small-loss"]["score"]),
    "knn": lambda c: (c["knn"]["keep"], c["knn"]["score"]),
    "vote gmm, small-loss, knn": lambda c: (_vote(c, ("gmm", "small-loss", "knn")),
                                            _rank_mean(c, ("gmm", "small-loss", "knn"))),
    "mean p gmm, small-loss, knn": lambda c: (_p_mean(c, ("gmm", "small-loss", "knn")) > 0.5,
                                              _p_mean(c, ("gmm", "small-loss", "knn"))),
    "dawid-skene gmm, small-loss, knn": lambda c: _ds(c, ("gmm", "small-loss", "knn")),
    "m-blend: dawid-skene / small-loss": lambda c: _blend(c, lambda c: _ds(c, ("gmm", "small-loss", "knn"))),
    "m-blend: knn / small-loss": lambda c: _blend(c, lambda c: (c["knn"]["keep"], c["knn"]["score"])),
    "auto (today) or knn": lambda c: (c["auto"]["keep"] | c["knn"]["keep"], _rank_mean(c, ("auto", "knn"))),
    "vote auto (today), small-loss, knn": lambda c: (_vote(c, ("auto", "small-loss", "knn")),
                                                     _rank_mean(c, ("auto", "small-loss", "knn"))),
    "auto (today) keep, rank mean with knn": lambda c: (c["auto"]["keep"], _rank_mean(c, ("auto", "knn"))),
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
        worst = {c: min(results[n][c]["gap"] for n in fit_on) for c in CANDIDATES if c != "keep all"}
        pick = max(worst, key=worst.get)
        rows.append([held, pick, f"{worst[pick]:+.3f}", f"{results[held][pick]['gap']:+.3f}",
                     "all others" if len(fit_on) == len(names) - 1 else ", ".join(fit_on)])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", type=Path, nargs="*", default=[], help="bench/detectors.py's --out (several: "
                   "one per --seed)")
    p.add_argument("--real", type=Path, help="bench/real_noise.py's --out")
    p.add_argument("--cache", type=Path, help="keep the base detectors' outputs here between runs")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    comps = {name: cached_components(path, args.cache) for name, path in dumps(args.synthetic, args.real)}
    for name, path in dumps(args.synthetic, args.real):  # today's auto, never from the cache
        comps[name]["auto-now"] = detector_output(path, "auto")
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

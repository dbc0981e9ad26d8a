"""End to end: `detect-noise` and `clean` on a dump written by `eval --dump-features` (digits with
40% symmetric noise), training on their output, and dynamic FINE inside `train-teacher`. The
commands run in process (conftest.run_kdfine), except where stdout and stderr of a real process
are what is checked."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import read_json, run_cli, run_kdfine

from kdfine.detect import detect


def read_rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    return text.splitlines()[0].split(","), rows


def sidecars(dump: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stem = str(dump)[:-4]
    return np.load(f"{stem}.labels.npy"), np.load(f"{stem}.truth.npy"), np.load(f"{stem}.logits.npy")


@pytest.fixture(scope="module")
def detected(noisy_dump, tmp_path_factory):
    """detect-noise with --json and --noisy-out, run once for the checks below."""
    d = tmp_path_factory.mktemp("detect")
    r = run_kdfine("detect-noise", "--features", noisy_dump, "--out", d / "clean.csv", "--noisy-out", d / "noisy.csv",
                "--json")
    assert r.returncode == 0, r.stderr
    return d, read_json(r.stdout)


def test_csv_format_and_noisy_out_is_the_complement(detected, noisy_dump):
    d, _ = detected
    labels, _, _ = sidecars(noisy_dump)
    header, clean = read_rows((d / "clean.csv").read_text())
    _, noisy = read_rows((d / "noisy.csv").read_text())
    assert header == ["index", "label", "score", "p_clean", "suggested", "suggested_p", "class", "suggested_class"]
    ci = [int(r["index"]) for r in clean]
    ni = [int(r["index"]) for r in noisy]
    assert ci == sorted(ci) and ni == sorted(ni)
    assert sorted(ci + ni) == list(range(labels.size))  # disjoint and complete
    for rows, kept in ((clean, True), (noisy, False)):
        for r in rows:
            assert int(r["label"]) == labels[int(r["index"])]
            assert 0.0 <= float(r["score"]) <= 1.0
            assert (float(r["p_clean"]) > 0.5) == kept


def test_json_report_per_class_and_truth_metrics(detected, noisy_dump):
    from sklearn.metrics import roc_auc_score

    d, doc = detected
    labels, truth, _ = sidecars(noisy_dump)
    _, clean = read_rows((d / "clean.csv").read_text())
    _, noisy = read_rows((d / "noisy.csv").read_text())
    kept = np.zeros(labels.size, bool)
    kept[[int(r["index"]) for r in clean]] = True
    assert doc["method"] == "auto" and doc["n"] == labels.size and doc["kept"] == kept.sum()  # the default
    assert doc["estimated_noise_rate"] == pytest.approx(1 - kept.mean())
    assert [c["label"] for c in doc["classes"]] == list(range(10))
    for c in doc["classes"]:
        assert c["total"] == (labels == c["label"]).sum() and c["kept"] == (kept & (labels == c["label"])).sum()
        kept_scores = [float(r["score"]) for r in clean if int(r["label"]) == c["label"]]
        assert c["threshold"] == pytest.approx(min(kept_scores), abs=1e-6)
    is_clean = labels == truth
    tp = (kept & is_clean).sum()
    q = doc["truth"]
    assert q["precision"] == pytest.approx(tp / kept.sum()) and q["recall"] == pytest.approx(tp / is_clean.sum())
    assert q["f1"] == pytest.approx(2 * q["precision"] * q["recall"] / (q["precision"] + q["recall"]))
    assert q["true_noise_rate"] == pytest.approx(0.4, abs=0.01)
    scores = np.zeros(labels.size)
    for r in clean + noisy:
        scores[int(r["index"])] = float(r["score"])
    assert q["auroc"] == pytest.approx(roc_auc_score(~is_clean, -scores), abs=1e-4)
    assert q["f1"] > 0.9 and q["auroc"] > 0.95  # auto finds the wrong labels on this easy data


def test_out_dash_writes_the_csv_to_stdout_and_the_report_to_stderr(detected, noisy_dump):
    """A real process: its stdout is the CSV and nothing else, whatever writes to the descriptors."""
    d, doc = detected
    r = run_cli("detect-noise", "-f", noisy_dump, "--out", "-")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (d / "clean.csv").read_text()
    assert f"kept {doc['kept']}/{doc['n']}" in r.stderr and "estimated noise rate" in r.stderr
    assert "clean precision" in r.stderr and "AUROC" in r.stderr
    r = run_cli("detect-noise", "-f", noisy_dump, "--out", "-", "--json")
    assert r.returncode == 2 and "stdout" in r.stderr
    assert json.loads(r.stdout)["error"]["code"] == 2  # --json: the error as the one JSON document, no CSV


def test_vectors_from_a_previous_selection(detected, noisy_dump, tmp_path):
    d, _ = detected
    r = run_kdfine("detect-noise", "-f", noisy_dump, "--method", "gmm", "--vectors-from", d / "clean.csv",
                "--out", tmp_path / "c2.csv", "--json")
    assert r.returncode == 0, r.stderr
    labels, _, _ = sidecars(noisy_dump)
    basis = np.array([int(r["index"]) for r in read_rows((d / "clean.csv").read_text())[1]])
    want = detect(np.load(noisy_dump), labels, 10, vectors_from=basis)
    got = [int(r["index"]) for r in read_rows((tmp_path / "c2.csv").read_text())[1]]
    assert got == want.clean_index.tolist()


@pytest.mark.parametrize("method", ["kmeans", "small-loss"])
def test_other_methods(method, noisy_dump, tmp_path):
    r = run_kdfine("detect-noise", "-f", noisy_dump, "--method", method, "--out", tmp_path / "c.csv", "--json")
    assert r.returncode == 0, r.stderr
    doc = read_json(r.stdout)
    assert doc["method"] == method and doc["truth"]["f1"] > 0.85
    header, rows = read_rows((tmp_path / "c.csv").read_text())
    assert header[:6] == ["index", "label", "score", "p_clean", "suggested", "suggested_p"] and len(rows) == doc["kept"]
    if method == "small-loss":  # the score is p(label | x) under the dumped logits
        labels, _, logits = sidecars(noisy_dump)
        z = logits.astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p = (p / p.sum(1, keepdims=True))[np.arange(labels.size), labels]
        for row in rows[:50]:
            assert float(row["score"]) == pytest.approx(p[int(row["index"])], abs=2e-6)
    else:
        assert {float(row["p_clean"]) for row in rows} == {1.0}


def test_auto_and_knn_name_what_they_chose(noisy_dump, tmp_path):
    """auto reports its weights in the JSON and in each class's note on stderr; knn its k and
    reference set; both find the wrong labels of the digits dump."""
    docs = {}
    for method in ("auto", "knn", "small-loss"):
        r = run_kdfine("detect-noise", "-f", noisy_dump, "--method", method, "--out", tmp_path / f"{method}.csv",
                       "--json")
        assert r.returncode == 0, r.stderr
        docs[method] = read_json(r.stdout)
        assert docs[method]["method"] == method
    auto = docs["auto"]["auto"]
    assert set(auto["weights"]) == {"fine", "loss"} and sum(auto["weights"].values()) == pytest.approx(1.0)
    assert docs["auto"]["truth"]["auroc"] > 0.9 and docs["auto"]["truth"]["f1"] > 0.85
    assert docs["knn"]["knn"]["k"] == 10 and docs["knn"]["truth"]["f1"] > 0.85
    r = run_kdfine("detect-noise", "-f", noisy_dump, "--method", "auto", "--out", tmp_path / "a2.csv")
    assert r.returncode == 0 and "auto: FINE" in r.stderr and "loss" in r.stderr
    assert (tmp_path / "a2.csv").read_text() == (tmp_path / "auto.csv").read_text()  # deterministic


def test_auto_without_logits_runs_fine_alone(noisy_dump, tmp_path):
    """The default (auto) on a dump without logits, a features-only one (e.g. a backbone's), is FINE's
    gmm, and the report says so; small-loss, which needs the logits, fails cleanly."""
    bare = tmp_path / "bare.npy"
    np.save(bare, np.load(noisy_dump))
    np.save(tmp_path / "bare.labels.npy", sidecars(noisy_dump)[0])
    r = run_kdfine("detect-noise", "-f", bare, "--out", tmp_path / "c.csv", "--json")
    assert r.returncode == 0, r.stderr
    doc = read_json(r.stdout)
    assert doc["method"] == "gmm" and doc["requested_method"] == "auto" and "no logits sidecar" in doc["note"]
    g = run_kdfine("detect-noise", "-f", bare, "--method", "gmm", "--out", tmp_path / "g.csv")
    assert g.returncode == 0 and (tmp_path / "g.csv").read_text() == (tmp_path / "c.csv").read_text()
    assert "no logits sidecar" not in g.stderr
    r = run_kdfine("detect-noise", "-f", bare, "--out", tmp_path / "c2.csv")
    assert r.returncode == 0 and "gmm on" in r.stderr and "no logits sidecar" in r.stderr
    r = run_kdfine("detect-noise", "-f", bare, "--method", "small-loss", "--out", tmp_path / "s.csv")
    assert r.returncode == 3 and "logits sidecar" in r.stderr and not (tmp_path / "s.csv").exists()


def test_bad_labels_fail_cleanly(noisy_dump, tmp_path):
    np.save(tmp_path / "short.npy", np.zeros(5, np.int64))
    out = tmp_path / "c.csv"
    r = run_kdfine("detect-noise", "-f", noisy_dump, "--labels", tmp_path / "short.npy", "--out", out)
    assert r.returncode == 3 and not out.exists()
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_clean_export_then_train_on_it(noisy_dump, detected, tmp_path):
    d, doc = detected
    model = json.loads(Path(str(noisy_dump)[:-4] + ".json").read_text())["checkpoint"]
    r = run_kdfine("clean", "--model", model, "--out", tmp_path / "c.csv", "--export", tmp_path / "cleaned.npz",
                "--json")
    assert r.returncode == 0, r.stderr
    rep = read_json(r.stdout)
    # the same features and the same split as detect-noise on the dump of the same checkpoint
    assert (tmp_path / "c.csv").read_text() == (d / "clean.csv").read_text()
    assert rep["kept"] == doc["kept"] and rep["truth"]["f1"] == pytest.approx(doc["truth"]["f1"])
    labels, _, _ = sidecars(noisy_dump)
    with np.load(tmp_path / "cleaned.npz") as z:
        keep = z["index"]
        assert z["x"].shape[0] == doc["kept"]
        np.testing.assert_array_equal(z["y"], labels[keep])
    r = run_kdfine("train-teacher", "--data", f"npz:{tmp_path / 'cleaned.npz'}", "--epochs", "1",
                "--out", tmp_path / "t.safetensors")
    assert r.returncode == 0, r.stderr
    assert f"{doc['kept']} train images" in r.stderr


def test_clean_export_dir_then_train_on_it(noisy_dump, detected, tmp_path):
    _, doc = detected
    model = json.loads(Path(str(noisy_dump)[:-4] + ".json").read_text())["checkpoint"]
    out = tmp_path / "cleaned"
    r = run_kdfine("clean", "--model", model, "--out", tmp_path / "c.csv", "--export-dir", out, "-q")
    assert r.returncode == 0, r.stderr
    files = [p for p in (out / "train").rglob("*") if p.is_file()]
    assert len(files) == doc["kept"] and sorted(p.name for p in (out / "train").iterdir()) == [str(i) for i in range(10)]
    assert any((out / "test").rglob("*.png"))
    r = run_kdfine("train-teacher", "--data", f"imagefolder:{out}", "--epochs", "1",
                   "--out", tmp_path / "t.safetensors")
    assert r.returncode == 0, r.stderr
    assert f"{doc['kept']} train images" in r.stderr
    r = run_kdfine("clean", "--model", model, "--out", tmp_path / "c.csv", "--export-dir", out, "-q")
    assert r.returncode == 3 and "not empty" in r.stderr  # never writes into an existing tree


def test_dynamic_fine_in_training_is_logged(tmp_path):
    log = tmp_path / "run.jsonl"
    r = run_kdfine("train-teacher", "--label-noise", "sym:0.4", "--epochs", "5", "--fine-warmup", "3",
                   "--fine-every", "1", "--log", log, "--out", tmp_path / "t.safetensors")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [("fine_kept" in x) for x in recs] == [False, False, False, True, True]
    n = int(re.search(r"(\d+) train images", r.stderr)[1])
    for x in recs[3:]:
        assert x["fine_total"] == n and 0.3 * n < x["fine_kept"] < 0.9 * n
        # the epoch trains on the selection (less the last incomplete batch of 128)
        assert x["fine_kept"] - 128 < x["train_images"] <= x["fine_kept"]
        assert x["fine_precision"] > 0.8 and 0.5 < x["fine_recall"] <= 1.0  # 60% of the labels are right
    assert "FINE kept" in r.stderr and "(P " in r.stderr

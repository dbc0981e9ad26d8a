"""End to end: the `kdfine` commands of the foundation, run in process through the console entry
point (conftest.run_kdfine: the same parsing, exit codes, stdout and stderr)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kdfine
from conftest import read_json, write_png_tree
from kdfine.models import checkpoint


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kdfine {kdfine.__version__}"


def test_default_train_teacher_meets_the_digits_target(cli, tmp_path):
    """`kdfine train-teacher --out t.safetensors` with no other option: digits, >= 95% test top-1."""
    out, log = tmp_path / "t.safetensors", tmp_path / "run.jsonl"
    r = cli("train-teacher", "--out", out, "--json", "--log", log)
    assert r.returncode == 0, r.stderr
    doc = read_json(r.stdout)
    assert doc["path"] == str(out) and doc["metrics"]["test_top1"] >= 0.95
    epochs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, 31))
    assert epochs[-1]["test_acc"] == pytest.approx(doc["metrics"]["test_top1"])
    assert epochs[0]["lr"] == 0.1 and epochs[-1]["lr"] == pytest.approx(0.001)  # multistep at 50% and 75%
    meta = checkpoint.read_meta(out)
    assert meta["arch"] == "cnn" and meta["data"] == "digits" and meta["stage"] == "teacher"
    assert meta["config"]["epochs"] == 30 and meta["metrics"]["test_top1"] == doc["metrics"]["test_top1"]
    assert "epoch 30/30" in r.stderr  # one plain progress line per epoch when stderr is not a terminal


def test_stdout_is_only_the_path(cli, tmp_path):
    out = tmp_path / "t.safetensors"
    r = cli("train-teacher", "--epochs", "1", "--out", out)
    assert r.returncode == 0 and r.stdout == f"{out}\n"
    r = cli("train-teacher", "--epochs", "1", "--out", out, "-q")
    assert r.returncode == 0 and r.stderr == ""


def test_eval_reports_and_dumps_features(cli, digits_teacher, tmp_path):
    r = cli("eval", "--model", digits_teacher, "--json")
    doc = read_json(r.stdout)
    m = doc["models"][0]
    assert doc["split"] == "test" and {"top1", "top5", "nll", "ece"} <= set(m)
    assert 0 <= m["ece"] <= 1 and m["top5"] >= m["top1"]
    dump = tmp_path / "f.npy"
    r = cli("eval", "--model", digits_teacher, "--split", "train", "--label-noise", "sym:0.4",
            "--dump-features", dump)
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stderr and r.stdout == ""
    f = np.load(dump)
    labels, truth = np.load(tmp_path / "f.labels.npy"), np.load(tmp_path / "f.truth.npy")
    logits = np.load(tmp_path / "f.logits.npy")
    info = json.loads((tmp_path / "f.json").read_text())
    assert f.dtype == np.float32 and f.shape == (len(labels), 128) and logits.shape == (len(labels), 10)
    assert (labels != truth).sum() == round(0.4 * len(labels))
    assert info["split"] == "train" and info["label_noise"] == "sym:0.4" and info["checkpoint_sha256"]
    # row i is dataset index i: the logits agree with the head applied to the features
    ck = checkpoint.load(digits_teacher)
    import torch

    with torch.no_grad():
        z = ck.model.head(torch.from_numpy(f[:20]))
    assert np.allclose(z.numpy(), logits[:20], atol=1e-4)


def test_labels_and_keep(cli, tmp_path):
    n = 1438
    labels = np.random.default_rng(0).integers(0, 10, n)
    np.save(tmp_path / "l.npy", labels)
    keep = tmp_path / "keep.csv"
    keep.write_text("index\n" + "\n".join(map(str, range(0, n, 7))) + "\n")
    out, log = tmp_path / "k.safetensors", tmp_path / "k.jsonl"
    r = cli("train-teacher", "--epochs", "2", "--batch-size", "32", "--labels", tmp_path / "l.npy", "--keep", keep,
            "--out", out, "--log", log, "-q")
    assert r.returncode == 0, r.stderr
    rec = json.loads(log.read_text().splitlines()[0])
    assert rec["train_images"] == (len(range(0, n, 7)) // 32) * 32
    dump = tmp_path / "g.npy"
    r = cli("eval", "--model", out, "--data", "digits", "--split", "train", "--labels", tmp_path / "l.npy",
            "--dump-features", dump, "-q")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "g.labels.npy"), labels)


def test_image_folder_end_to_end(cli, tmp_path):
    root = write_png_tree(tmp_path / "pets", per_class=8, size=12)
    out = tmp_path / "pets.safetensors"
    r = cli("train-teacher", "--data", f"imagefolder:{root}", "--arch", "cnn-8", "--epochs", "3",
            "--batch-size", "8", "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    meta = checkpoint.read_meta(out)
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["image_size"] == 12 and meta["in_channels"] == 3
    r = cli("eval", "--model", out, "--json")  # the data spec comes from the checkpoint
    assert r.returncode == 0, r.stderr
    assert read_json(r.stdout)["n"] == 6


@pytest.mark.parametrize("args,code,needle", [
    (["--data", "imagenet"], 2, "unknown data spec"),
    (["--arch", "vgg99"], 2, "unknown architecture"),
    (["--label-noise", "sym:1.5"], 2, "rate must lie in [0, 1]"),
    (["--label-noise", "foo:0.2"], 2, "KIND:RATE"),
    (["--labels", "MISSING"], 3, "no such file"),
    (["--labels", "BADLABELS"], 3, "not an integer"),
    (["--device", "cuda"], 4, "CUDA is not available"),
    (["--data", "cifar10", "--data-root", "NOROOT"], 3, "--download"),
])
def test_train_errors(cli, tmp_path, args, code, needle):
    (tmp_path / "bad_labels.csv").write_text("label\n1\nzero\n")
    subst = {"MISSING": tmp_path / "none.npy", "BADLABELS": tmp_path / "bad_labels.csv",
             "NOROOT": tmp_path / "nothing"}
    out = tmp_path / "t.safetensors"
    r = cli("train-teacher", "--epochs", "1", "--out", out, *[str(subst.get(a, a)) for a in args])
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert not out.exists() and r.stdout == ""


def test_output_and_model_errors(cli, tmp_path, digits_teacher):
    r = cli("train-teacher", "--out", tmp_path / "missing" / "t.safetensors")
    assert r.returncode == 3 and "does not exist" in r.stderr
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 64)
    r = cli("eval", "--model", fake)
    assert r.returncode == 3 and "not a readable safetensors file" in r.stderr and len(r.stderr.splitlines()) == 1
    r = cli("eval", "--model", digits_teacher, "--dump-features", tmp_path / "nowhere" / "f.npy")
    assert r.returncode == 3 and not (tmp_path / "nowhere").exists()
    r = cli("--debug", "eval", "--model", fake)
    assert r.returncode != 0 and "Traceback" in r.stderr

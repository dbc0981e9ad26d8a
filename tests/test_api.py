"""The Python API in-process: one function per command, so a failure points at a function."""

from __future__ import annotations

import numpy as np
import pytest

from kdfine import api
from kdfine.data.prepare import inherit_from, prepare
from kdfine.errors import InputError, UsageError
from kdfine.options import DataOptions, DetectOptions, TrainConfig


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A 2-epoch mlp teacher on noisy digits and a 1-epoch student distilled from it."""
    d = tmp_path_factory.mktemp("api")
    t = api.train_teacher(str(d / "t.safetensors"), arch="mlp-64", data=DataOptions(label_noise="sym:0.3"),
                          cfg=TrainConfig(epochs=2, batch_size=64), device="cpu", quiet=True)
    s = api.distill(str(d / "s.safetensors"), [t["path"]], arch="mlp-32", cfg=TrainConfig(epochs=1, loss="mse"),
                    device="cpu", quiet=True)
    return d, t, s


def test_train_teacher_and_distill_return_their_records(chain):
    d, t, s = chain
    assert t["stage"] == "teacher" and s["stage"] == "student" and [e["epoch"] for e in t["epochs"]] == [1, 2]
    assert 0.0 <= t["metrics"]["test_top1"] <= 1.0 and len(t["sha256"]) == 64


def test_evaluate_dump_and_detect(chain):
    d, t, _ = chain
    dump = str(d / "f.npy")
    ev = api.evaluate([t["path"]], split="train", dump_features=dump, device="cpu")
    n = ev["n"]
    assert ev["split"] == "train" and "top1_true_labels" in ev["models"][0]  # noise inherited: truth is known
    truth, labels = np.load(d / "f.truth.npy"), np.load(d / "f.labels.npy")
    assert (truth != labels).sum() == round(0.3 * n)
    report, det, y, true = api.detect_noise(dump, str(d / "clean.csv"), detect=DetectOptions(method="kmeans"))
    assert report["method"] == "kmeans" and det.keep.shape == (n,) and np.array_equal(y, labels)
    assert report["kept"] == int(det.keep.sum()) == len((d / "clean.csv").read_text().splitlines()) - 1


def test_info_finds_the_lineage(chain):
    _, t, s = chain
    doc = api.info(s["path"])
    assert doc["stage"] == "student" and doc["parents"] == [t["sha256"]]
    node = doc["lineage"][0]
    assert node["found"] and node["sha256"] == t["sha256"] and node["stage"] == "teacher" and node["parents"] == []


def test_inherit_from_a_checkpoints_recorded_data(chain):
    from kdfine.models import checkpoint

    _, t, _ = chain
    opts = inherit_from(DataOptions(), checkpoint.read_meta(t["path"]))
    assert opts.data == "digits" and opts.label_noise == "sym:0.3"
    assert inherit_from(DataOptions(data="digits"), checkpoint.read_meta(t["path"])).label_noise is None
    prepared = prepare(opts)
    assert prepared.truth is not None and prepared.config()["label_noise"] == "sym:0.3"


def test_api_validates_before_loading(tmp_path):
    with pytest.raises(UsageError, match="--lr"):
        api.train_teacher(str(tmp_path / "x.safetensors"), cfg=TrainConfig(lr=float("nan")))
    with pytest.raises(UsageError, match="--zeta"):
        api.detect_noise(str(tmp_path / "missing.npy"), str(tmp_path / "c.csv"), detect=DetectOptions(zeta=2.0))
    with pytest.raises(InputError, match="no such file"):
        api.detect_noise(str(tmp_path / "missing.npy"), str(tmp_path / "c.csv"))
    assert list(tmp_path.iterdir()) == []

"""``--resume`` on a run that had finished (its resume state removed with its end): the same run is
left as it is, anything else is refused with the way forward (``--init``), never trained from
scratch over the finished checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdfine import api
from kdfine.errors import InputError, UsageError
from kdfine.options import TrainConfig

CFG = dict(epochs=2, batch_size=64, seed=0)


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory) -> tuple[Path, dict]:
    """The finished run, trained once for the module, and its record. It is trained with --resume
    over no file at all: test_resume_without_any_file_starts_from_scratch checks that record."""
    out = tmp_path_factory.mktemp("finished") / "t.safetensors"
    doc = api.train_teacher(str(out), cfg=TrainConfig(**CFG), device="cpu", resume=True, quiet=True)
    assert not Path(f"{out}.state.safetensors").exists()
    return out, doc


@pytest.fixture
def finished(finished_once, tmp_path):
    """A copy of the finished run for one test, alone in its directory (no resume state beside it)."""
    out = tmp_path / "t.safetensors"
    shutil.copy(finished_once[0], out)
    return out


def test_resume_of_the_same_finished_run_trains_nothing_and_keeps_the_file(finished, cli):
    before = finished.read_bytes()
    r = cli("train-teacher", "--epochs", "2", "--batch-size", "64", "--seed", "0", "--device", "cpu", "--out", finished,
            "--resume")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(finished) and finished.read_bytes() == before
    assert "is this run, finished (2 epochs); nothing to train" in r.stderr
    assert "epoch 1/2" not in r.stderr
    doc = api.train_teacher(str(finished), cfg=TrainConfig(**CFG), device="cpu", resume=True, quiet=True)
    assert doc["already_finished"] and doc["epochs"] == [] and doc["metrics"]["test_top1"] > 0


def test_more_epochs_on_a_finished_run_are_refused_with_the_way_forward(finished, tmp_path):
    before = finished.read_bytes()
    with pytest.raises(UsageError, match=r"finished run of 2 epochs.*--init .*t\.safetensors --epochs N"):
        api.train_teacher(str(finished), cfg=TrainConfig(**{**CFG, "epochs": 3}), device="cpu", resume=True,
                          force=True, quiet=True)
    with pytest.raises(UsageError, match=r"other options \(lr: 0\.1 -> 0\.05\)"):
        api.train_teacher(str(finished), cfg=TrainConfig(**{**CFG, "lr": 0.05}), device="cpu", resume=True,
                          force=True, quiet=True)
    assert finished.read_bytes() == before
    # the way forward the message names: a new run from the finished weights
    more = tmp_path / "more.safetensors"
    doc = api.train_teacher(str(more), cfg=TrainConfig(**{**CFG, "epochs": 1}),
                            model=api.ModelOptions(init=str(finished)), device="cpu", quiet=True)
    assert doc["metrics"]["test_top1"] > 0.5


def test_resume_over_a_file_that_is_no_checkpoint_is_refused(tmp_path):
    out = tmp_path / "notes.safetensors"
    out.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="has no resume state beside it and is no finished kdfine run"):
        api.train_teacher(str(out), cfg=TrainConfig(**CFG), device="cpu", resume=True, quiet=True)
    assert out.read_bytes() == b"not a checkpoint"


def test_resume_without_any_file_starts_from_scratch(finished_once):
    out, doc = finished_once  # api.train_teacher(out, resume=True) with nothing at out
    assert out.exists() and len(doc["epochs"]) == 2 and not doc.get("already_finished")

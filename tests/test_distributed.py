"""kdfine under real ``torchrun --standalone --nproc-per-node 2`` on CPU (gloo), against the same
commands in one process: the checkpoint, the feature dump and the FINE selection agree; only
rank 0 writes stdout; a failure on one rank ends the whole job instead of hanging it.

The runs are shared by the tests of this module and started side by side to save time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_env, run_cli, torchrun
from kdfine.runtime import distributed
from kdfine.data.batches import TrainBatches

TIMEOUT = 240  # a hang shows up as a timeout, never as a stuck test run
ENV = {"OMP_NUM_THREADS": "1"}
# --bn-stats recompute: the BatchNorm re-estimation under torchrun is checked on the same run
TRAIN = ["train-teacher", "--arch", "mlp", "--epochs", "4", "--seed", "5", "--device", "cpu", "--bn-stats", "recompute"]


def single(*args, input: str | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, input=input, env=ENV, timeout=TIMEOUT)


def kdfine_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("kdfine:")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    r: dict = {"dir": d}
    with ThreadPoolExecutor(4) as pool:
        # phase 1: both trainings, and two jobs that fail on one rank only
        jobs = {
            "ddp_train": pool.submit(torchrun, *TRAIN, "--out", d / "ddp.safetensors", "--log", d / "ddp.jsonl"),
            "one_train": pool.submit(single, *TRAIN, "--out", d / "one.safetensors", "-q"),
            # rank 0 cannot write its log in epoch 1, while rank 1 is inside DDP's all-reduce
            "log_full": pool.submit(torchrun, *TRAIN, "--out", d / "never.safetensors", "--log", "/dev/full"),
            # rank 0 reads stdin for both ranks and finds nothing there
            "no_stdin": pool.submit(torchrun, "distill", "--teacher", "-", "--arch", "mlp", "--epochs", "1",
                                    "--out", d / "never2.safetensors", "--device", "cpu", input=""),
        }
        r.update({k: j.result() for k, j in jobs.items()})
        assert r["ddp_train"].returncode == 0, r["ddp_train"].stderr
        assert r["one_train"].returncode == 0, r["one_train"].stderr
        # phase 2: accuracy of both checkpoints; the train split's features under both launches
        dump = ["eval", "--model", d / "one.safetensors", "--split", "train", "--label-noise", "sym:0.4",
                "--device", "cpu", "--json", "--dump-features"]
        jobs = {
            "accuracy": pool.submit(single, "eval", "--model", d / "ddp.safetensors", "--model",
                                    d / "one.safetensors", "--device", "cpu", "--json"),
            "ddp_dump": pool.submit(torchrun, *dump, d / "ddp_f.npy"),
            "one_dump": pool.submit(single, *dump, d / "one_f.npy"),
        }
        r.update({k: j.result() for k, j in jobs.items()})
        assert r["ddp_dump"].returncode == 0, r["ddp_dump"].stderr
        assert r["one_dump"].returncode == 0, r["one_dump"].stderr
        # phase 3: FINE on each dump
        jobs = {k: pool.submit(single, "detect-noise", "--features", d / f"{k}_f.npy", "--out", d / f"{k}.csv", "-q")
                for k in ("ddp", "one")}
        r.update({f"{k}_detect": j.result() for k, j in jobs.items()})
    return r


def test_ddp_checkpoint_loads_and_matches_single_process_accuracy(runs):
    acc = runs["accuracy"]
    assert acc.returncode == 0, acc.stderr
    ddp, one = json.loads(acc.stdout)["models"]
    assert ddp["arch"] == one["arch"] == "mlp"
    assert one["top1"] > 0.9
    assert abs(ddp["top1"] - one["top1"]) <= 0.02, (ddp["top1"], one["top1"])


def test_only_rank_zero_prints_and_writes(runs):
    r, d = runs["ddp_train"], runs["dir"]
    assert r.stdout.splitlines() == [str(d / "ddp.safetensors")], "exactly one path line on stdout"
    assert sum(ln.startswith("epoch 1/4") for ln in r.stderr.splitlines()) == 1, "progress from rank 0 only"
    assert "x2" in r.stderr  # the run announces its two processes
    log = [json.loads(line) for line in (d / "ddp.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in log] == [1, 2, 3, 4]
    # metrics are all-reduced: each epoch counts the images of both ranks, as one process would
    n = np.load(d / "one_f.labels.npy").shape[0]
    assert {rec["train_images"] for rec in log} == {n // 128 * 128}
    assert not Path(f"{d / 'ddp.safetensors'}.state.safetensors").exists()
    doc = json.loads(runs["ddp_dump"].stdout)  # one JSON document, not one per rank
    assert doc["n"] == n


def test_feature_dump_is_row_for_row_the_single_process_dump(runs):
    d = runs["dir"]
    for suffix in ("npy", "logits.npy"):
        a, b = np.load(d / f"ddp_f.{suffix}"), np.load(d / f"one_f.{suffix}")
        assert a.shape == b.shape and a.shape[0] > 1000
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for suffix in ("labels.npy", "truth.npy"):
        assert np.array_equal(np.load(d / f"ddp_f.{suffix}"), np.load(d / f"one_f.{suffix}"))
    assert json.loads((d / "ddp_f.json").read_text())["n"] == a.shape[0]


def test_detect_noise_on_the_ddp_dump_gives_the_same_selection(runs):
    d = runs["dir"]
    for k in ("ddp", "one"):
        assert runs[f"{k}_detect"].returncode == 0, runs[f"{k}_detect"].stderr
    kept = np.loadtxt(d / "one.csv", delimiter=",", skiprows=1, usecols=0, dtype=np.int64)
    assert 0 < kept.size < np.load(d / "one_f.labels.npy").shape[0]  # a real split of the noisy labels
    assert (d / "ddp.csv").read_text() == (d / "one.csv").read_text()


@pytest.mark.parametrize("case", ["log_full", "no_stdin"])
def test_failure_on_one_rank_ends_every_rank(runs, case):
    r = runs[case]  # finished within TIMEOUT: nobody was left waiting in a collective
    assert r.returncode != 0
    assert r.stdout == ""
    lines = kdfine_lines(r.stderr)
    assert not re.search(r'File ".*kdfine[/\\]', r.stderr), "no traceback from kdfine (torchrun prints its own)"
    first = {"log_full": "kdfine: error: --log /dev/full: cannot write", "no_stdin": "kdfine: error: --teacher -:"}
    assert any(ln.startswith(first[case]) for ln in lines), r.stderr
    others = [ln for ln in lines if ln.startswith("kdfine: error (rank 1):")]
    assert len(others) <= 1 and len(lines) <= 2, lines
    assert not list(runs["dir"].glob("never*"))


def _global_batches(images, labels, world: int, selection=None, epoch: int = 3, batch: int = 12):
    """Every step's global batch, assembled from the ``world`` ranks' slices."""
    ranks = []
    for rank in range(world):
        tb = TrainBatches(images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=batch, device=torch.device("cpu"),
                          augment="crop-flip", seed=11, rank=rank, world_size=world)
        if selection is not None:
            tb.set_selection(selection)
        ranks.append(list(tb.epoch(epoch)))
    steps = []
    for parts in zip(*ranks):
        steps.append(tuple(torch.cat([p[i] for p in parts]) for i in range(3)))
    return steps


@pytest.mark.parametrize("selection", [None, np.arange(0, 100, 3)])
def test_data_order_and_augmentation_do_not_depend_on_the_number_of_processes(selection):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 10, 10, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 100)
    one = _global_batches(images, labels, 1, selection)
    assert len(one) == (100 if selection is None else 34) // 12
    for world in (2, 4):
        many = _global_batches(images, labels, world, selection)
        assert len(many) == len(one)
        for (x1, y1, i1), (xn, yn, iN) in zip(one, many):
            assert torch.equal(i1, iN) and torch.equal(y1, yn) and torch.equal(x1, xn)
    assert not torch.equal(one[0][2], _global_batches(images, labels, 1, selection, epoch=4)[0][2])


def test_batch_that_cannot_be_split_is_a_usage_error():
    ctx = distributed._ctx
    try:
        distributed._ctx = distributed.Context(rank=0, world_size=4)
        with pytest.raises(distributed.UsageError, match="divisible by the 4 processes"):
            distributed.check_split(30, 1000)
        with pytest.raises(distributed.UsageError, match="3 training samples for 4 processes"):
            distributed.check_split(32, 3)
        distributed.check_split(32, 4)
    finally:
        distributed._ctx = ctx


# Runs kdfine's CLI inside each torchrun process and reports, per rank, the exit code and the c10d
# backend threads left after its teardown.
_TEARDOWN_PROBE = """
import runpy, sys
from kdfine.runtime import distributed
from kdfine.runtime.launch import launch_rank

def run(*args):
    sys.argv = ["kdfine", *args]
    try:
        runpy.run_module("kdfine", run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    # one write per line: both ranks share the pipe, and print's separate newline let lines run together
    sys.stderr.write(f"probe rank={launch_rank()} code={code} threads={distributed.backend_threads()}\\n")
    sys.stderr.flush()

train = ["train-teacher", "--arch", "mlp", "--epochs", "1", "--device", "cpu", "-q", "--out"]
run(*train, sys.argv[1])
"""


def test_teardown_leaves_no_backend_thread_for_interpreter_exit(tmp_path):
    """The cause of the random SIGABRT at exit: gloo's threads outliving destroy_process_group
    (DDP's reducer or its late import of torch._dynamo kept the backend alive) into interpreter
    finalisation. After teardown none may be left."""
    script = tmp_path / "probe.py"
    script.write_text(_TEARDOWN_PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           tmp_path / "ok.safetensors"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=cli_env(ENV), timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    probes = sorted(ln.split(" ", 1)[1] for ln in r.stderr.splitlines() if ln.startswith("probe "))
    assert probes == ["rank=0 code=0 threads=[]", "rank=1 code=0 threads=[]"], r.stderr
    assert (tmp_path / "ok.safetensors").exists()


def test_batchnorm_reestimation_under_torchrun_averages_the_ranks_shares(runs):
    """--bn-stats recompute with 2 processes: each takes half of every global batch and the ranks'
    averages are averaged, so the first layer's running means are those of one process on the same
    batches; deeper layers see inputs normalised by half batches, hence close, not equal, values."""
    from kdfine.data.sources import load_source
    from kdfine.models import checkpoint
    from kdfine.train import batchnorm

    r, out = runs["ddp_train"], runs["dir"] / "ddp.safetensors"
    assert sum("BatchNorm statistics re-estimated on" in ln for ln in r.stderr.splitlines()) == 1  # rank 0 says it
    ddp = checkpoint.load(out)
    one = checkpoint.load(out)
    train = load_source("digits").train
    index = batchnorm.sample(np.arange(len(train)), batchnorm.BN_IMAGES, 5)
    batchnorm.recompute(one.model, list(batchnorm.bn_layers(one.model)), train.images, index, one.meta["mean"],
                        one.meta["std"], device=torch.device("cpu"), batch_size=128)
    a, b = batchnorm.bn_layers(ddp.model), batchnorm.bn_layers(one.model)
    assert a.keys() == b.keys() and a
    first = next(iter(a))
    torch.testing.assert_close(a[first].running_mean, b[first].running_mean, rtol=1e-4, atol=1e-5)
    for name in a:
        torch.testing.assert_close(a[name].running_mean, b[name].running_mean, rtol=0.1, atol=0.01)
        torch.testing.assert_close(a[name].running_var, b[name].running_var, rtol=0.1, atol=1e-3)

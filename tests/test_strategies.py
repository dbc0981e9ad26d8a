"""FINE's three applications end to end (``--fine-strategy select|coteach|dividemix``, with
``--loss gce|sce``): CLI runs on digits (in process) whose checkpoints eval, info and distill read;
the log and the record of both networks; resume of a two-network run after SIGKILL is
bit-identical (real processes); torchrun with 2 CPU processes runs each strategy."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import Run, assert_same_weights, run_cli, run_kdfine, state_of, torchrun

ENV = {"OMP_NUM_THREADS": "1"}
TIMEOUT = 300
NOISE = ["--label-noise", "uniform:0.5", "--device", "cpu"]
TRAIN = ["train-teacher", "--arch", "mlp", "--epochs", "3", "--fine-warmup", "1", "--fine-every", "1", *NOISE]
RUNS = {"select": ["--loss", "gce"], "coteach": ["--fine-strategy", "coteach", "--loss", "sce"],
        "dividemix": ["--fine-strategy", "dividemix"]}
LOSS_OF = {"select": "gce", "coteach": "sce", "dividemix": "ce"}
# test_resume's command (its --arch cnn is replaced by --arch mlp: two networks of its cnn are too slow)
RESUME_BASE = ["train-teacher", "--batch-size", "32", "--epochs", "3", "--seed", "3", "--device", "cpu", "-q"]


def meta_of(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each strategy trained for 3 epochs (selections before epochs 2 and 3), in process."""
    d = tmp_path_factory.mktemp("strategies")
    results = {name: run_kdfine(*TRAIN, *RUNS[name], "--out", d / f"{name}.safetensors", "--log", d / f"{name}.jsonl",
                                "--json", env=ENV) for name in RUNS}
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.stderr}"
    return d, results


@pytest.mark.parametrize("name", list(RUNS))
def test_strategy_writes_a_checkpoint_that_eval_info_and_distill_read(trained, name, cli):
    d, results = trained
    out = d / f"{name}.safetensors"
    doc = json.loads(results[name].stdout)
    log = [json.loads(line) for line in (d / f"{name}.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert "fine_kept" not in log[0] and all(0 < r["fine_kept"] <= r["fine_total"] == 1438 for r in log[1:])
    assert all(0 <= r["fine_precision"] <= 1 and 0 <= r["fine_recall"] <= 1 for r in log[1:])
    metrics = doc["metrics"]
    if name != "select":  # two networks: both selections, both accuracies, the ensemble
        assert all(0 < r["fine2_kept"] <= 1438 and "fine2_precision" in r for r in log[1:])
        assert all({"test_acc_net2", "test_acc_ensemble"} <= r.keys() for r in log)
        assert 0 < metrics["test_top1_ensemble"] <= 1
        if doc["batchnorm"] is None:  # the final metrics are the last epoch's
            assert metrics["test_top1_ensemble"] == log[-1]["test_acc_ensemble"]
        else:  # a short run: both networks' BatchNorm statistics re-estimated, then evaluated again
            assert metrics["bn_recomputed_images"] > 0 and "BatchNorm statistics re-estimated" in results[name].stderr
        assert "ensemble" in results[name].stderr
    ev = cli("eval", "--model", out, "--device", "cpu", "--json", env=ENV)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["models"][0]["top1"] == pytest.approx(metrics["test_top1"], abs=1e-9)
    info = cli("info", out, "--json")
    assert info.returncode == 0, info.stderr
    cfg = json.loads(info.stdout)
    assert cfg["config"]["fine_strategy"] == name and cfg["loss"] == LOSS_OF[name]
    student = d / f"{name}-student.safetensors"
    st = cli("distill", "--teacher", out, "--arch", "mlp", "--epochs", "1", "--device", "cpu", "--out", student,
             "-q", env=ENV)
    assert st.returncode == 0, st.stderr
    assert st.stdout.strip() == str(student)


def test_bad_strategy_options_are_one_line_usage_errors(cli, tmp_path):
    cases = [(["train-teacher", "--fine-strategy", "coteach"], "--fine-every"),
             (["train-teacher", "--loss", "gce", "--gce-q", "0"], "--gce-q 0.0: must lie in (0, 1]"),
             (["train-teacher", "--loss", "mse"], "'mse' is not one of"),
             (["distill", "--teacher", "t.safetensors", "--loss", "gce"], "'gce' is not one of"),
             (["train-teacher", "--fine-strategy", "dividemix", "--fine-every", "1", "--ssl-temperature", "0"],
              "--ssl-temperature")]
    for args, message in cases:
        out = tmp_path / "never.safetensors"
        r = cli(*args, "--out", out)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r.stderr)
        assert not out.exists()


@pytest.mark.parametrize("name", ["coteach", "dividemix"])
def test_two_network_run_resumes_bit_identically_after_sigkill(tmp_path, name):
    """SIGKILL inside epoch 3 (selections before epochs 2 and 3), --resume, the same weights as an
    uninterrupted run: both networks, both optimizers and both selections come back."""
    args = [*NOISE, "--arch", "mlp", "--fine-strategy", name, "--fine-warmup", "1", "--fine-every", "1"]
    ref_out, out, log = tmp_path / "ref.safetensors", tmp_path / "run.safetensors", tmp_path / "run.jsonl"
    with ThreadPoolExecutor(2) as pool:
        ref = pool.submit(run_cli, *RESUME_BASE, *args, "--out", ref_out, env=ENV, timeout=TIMEOUT)
        run = Run([*RESUME_BASE, *args], out, log, TIMEOUT)
        try:
            killed = run.stop_inside_epoch(3, signal.SIGKILL)
        finally:
            run.kill()
        assert killed.returncode == -signal.SIGKILL
        with safe_open(str(state_of(out)), framework="pt") as f:
            saved = set(f.keys())
        assert any(k.startswith("model1.") for k in saved) and any(k.startswith("optim1.") for k in saved)
        assert {"own0", "own1"} <= saved or {"labelled0", "labelled1", "p_clean0", "p_clean1"} <= saved
        resumed = run_cli(*RESUME_BASE, *args, "--out", out, "--resume", "--log", log, env=ENV, timeout=TIMEOUT)
        assert resumed.returncode == 0, resumed.stderr
        assert ref.result().returncode == 0, ref.result().stderr
    assert_same_weights(out, ref_out)
    m_run, m_ref = (json.loads(meta_of(p)["metrics"]) for p in (out, ref_out))
    m_run.pop("img_per_s"), m_ref.pop("img_per_s")  # speed is the one number a resume may change
    assert m_run == m_ref and "test_top1_ensemble" in m_run
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_torchrun_two_processes_run_each_strategy(tmp_path):
    def job(name):
        out = tmp_path / f"{name}.safetensors"
        return name, torchrun(*TRAIN[:4], "2", *TRAIN[5:], *RUNS[name], "--out", out, "--log",
                              tmp_path / f"{name}.jsonl")

    with ThreadPoolExecutor(3) as pool:
        results = dict(pool.map(job, RUNS))
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.stderr}"
        assert r.stdout.strip() == str(tmp_path / f"{name}.safetensors"), "only rank 0 prints the path"
        log = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert len(log) == 2 and log[1]["fine_kept"] > 0 and log[1]["train_images"] > 0
        if name != "select":
            assert log[1]["fine2_kept"] > 0 and "test_acc_ensemble" in log[1]

"""``--precision auto`` on CPUs: the decision as a pure function of the CPU's flags and the probe's
timings, the per-machine cache of the probe, the training header and the checkpoint's record, and
resumes that would change the resolved precision (refused) or keep it (bit-identical).

Nothing here assumes the test machine's CPU: the decision is tested on given flags and timings,
and the CLI runs set ``KDFINE_BF16_PROBE=0`` (``auto`` is then fp32 on every CPU) or an explicit
``--precision``.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import cli_env, run_cli, run_kdfine, saved_epoch
from kdfine.options import resume_keys
from kdfine.runtime import precision as P
from kdfine.runtime.device import resolve_precision, teacher_precision, training_precision
from kdfine.train.resume import upgrade_precision

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("flags,isa", [
    ({"avx2", "fma", "amx_tile", "amx_bf16", "avx512_bf16"}, "AMX"),  # Sapphire Rapids
    ({"avx512f", "avx512_bf16"}, "AVX512-BF16"),  # Zen 4
    ({"fp", "asimd", "bf16", "i8mm"}, "Arm BF16"),  # aarch64 Features (Graviton 3)
    ({"avx2", "fma", "f16c", "avx512f"}, None),  # AVX-512 without BF16
    (set(), None),
])
def test_native_bf16_is_named_by_the_flags(flags, isa):
    assert P.native_bf16(flags) == isa


def test_decision_needs_native_bf16_and_a_probe_that_pays():
    fast, slow = P.Probe(fp32_s=0.030, bf16_s=0.010), P.Probe(fp32_s=0.030, bf16_s=0.028)
    assert P.decide(None, fast).precision == "fp32"  # emulated: never bf16, whatever a probe says
    assert "no native bf16" in P.decide(None, None).reason
    off = P.decide("AMX", None)
    assert off.precision == "fp32" and P.PROBE_ENV in off.reason
    on = P.decide("AMX", fast)
    assert on.precision == "bf16" and "AMX" in on.reason and "3.00x" in on.reason
    no = P.decide("AVX512-BF16", slow)
    assert no.precision == "fp32" and "1.07x" in no.reason and f"{P.MIN_SPEEDUP:g}x" in no.reason


def test_the_threshold_is_the_speedup_bf16_must_reach():
    at = P.Probe(fp32_s=P.MIN_SPEEDUP * 0.01, bf16_s=0.01)
    below = P.Probe(fp32_s=P.MIN_SPEEDUP * 0.0099, bf16_s=0.01)
    assert P.decide("AMX", at).precision == "bf16"
    assert P.decide("AMX", below).precision == "fp32"
    assert P.decide("AMX", below, min_speedup=1.1).precision == "bf16"
    assert P.Probe(1.0, 0.0).speedup == 0.0


def test_training_precision_honours_the_option_and_the_device(monkeypatch):
    assert training_precision("fp32", CPU).precision == "fp32"
    assert training_precision("bf16", CPU).precision == "bf16"
    assert training_precision("auto", torch.device("cuda")).precision == "bf16"
    assert training_precision("auto", torch.device("mps")).precision == "fp32"
    monkeypatch.setenv(P.PROBE_ENV, "0")
    auto = training_precision("auto", CPU)
    assert auto.precision == "fp32" and auto.reason.startswith("auto: ")
    # outside training (eval, feature dumps, predict) auto stays fp32 on CPUs, bf16 on CUDA
    assert resolve_precision("auto", CPU) == "fp32" and resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert teacher_precision("fp32", CPU) == "fp32" and teacher_precision("bf16", CPU) == "bf16"


def test_cpus_without_native_bf16_train_in_fp32_without_probing(monkeypatch, tmp_path):
    monkeypatch.setenv("KDFINE_CACHE", str(tmp_path))
    choice = P.cpu_choice()
    if P.native_bf16(P.cpu_flags()) is None:
        assert choice.precision == "fp32" and "no native bf16" in choice.reason
        assert not (tmp_path / "precision").exists(), "nothing is timed where bf16 is emulated"
    assert P.cpu_choice() is choice, "decided once per process"


# ------------------------------------------------------------------------------- the probe and its cache


def test_the_probe_is_measured_once_and_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KDFINE_CACHE", str(tmp_path))
    key = P.probe_key("Some CPU", "AMX", torch.__version__)
    rng = torch.get_rng_state()
    first = P.cached_probe(key, lambda: P.measure(rounds=1))
    assert torch.equal(rng, torch.get_rng_state()), "the probe leaves torch's random state alone"
    assert math.isfinite(first.fp32_s) and first.fp32_s > 0 and first.bf16_s > 0
    path = P.cache_file(key)
    assert path.parent == tmp_path / "precision" and path.is_file()

    def must_not_run():
        raise AssertionError("a cached probe is not measured again")

    assert P.cached_probe(key, must_not_run) == first
    other = P.probe_key("Some CPU", "AMX", "0.0.1")  # another torch: its own entry
    assert P.cache_file(other) != path and P.read_probe(path, other) is None


PROBE_CHILD = """
import json, sys
from kdfine.runtime import precision as P
print("ready", flush=True)
p = P.cached_probe(json.loads(sys.argv[1]))
print(p.fp32_s, p.bf16_s, flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_runs_started_together_take_turns_at_the_probe(monkeypatch, tmp_path):
    """While one process holds the probe's lock, another waits and then reads its timings."""
    import fcntl

    monkeypatch.setenv("KDFINE_CACHE", str(tmp_path))
    key = P.probe_key("Some CPU", "AMX", "9.9")
    path = P.cache_file(key)
    path.parent.mkdir(parents=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        child = subprocess.Popen([sys.executable, "-c", PROBE_CHILD, json.dumps(key)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=cli_env())
        assert child.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        assert child.poll() is None, "the second process waits for the first one's probe"
        assert P.write_probe(path, key, P.Probe(0.125, 0.05))
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.split() == ["0.125", "0.05"], "it read the first one's timings instead of measuring"


def test_a_bad_cache_entry_is_ignored_and_an_unwritable_cache_is_harmless(tmp_path):
    key = P.probe_key("Some CPU", "AVX512-BF16", "2.0")
    path = tmp_path / "p.json"
    assert P.write_probe(path, key, P.Probe(0.02, 0.01))
    assert P.read_probe(path, key) == P.Probe(0.02, 0.01)
    doc = json.loads(path.read_text())
    assert doc["key"] == key and doc["speedup"] == 2.0
    path.write_text(json.dumps({**doc, "bf16_s": float("nan")}))
    assert P.read_probe(path, key) is None
    path.write_text("{truncated")
    assert P.read_probe(path, key) is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert not P.write_probe(blocker / "sub" / "p.json", key, P.Probe(0.02, 0.01))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "p.json"], "no temporary file left behind"


# ------------------------------------------------------------------------------- header and record


def test_the_header_line_says_which_precision_and_why():
    from kdfine.train.run import RunPrecision

    bf16 = RunPrecision(P.decide("AMX", P.Probe(0.02, 0.01)), "bf16")
    assert bf16.line().startswith("precision bf16 (native bf16 (AMX) ran") and "2.00x" in bf16.line()
    assert "weights, optimizer state and loss stay fp32" in bf16.line() and "teachers" not in bf16.line()
    assert bf16.record("auto") == {"precision": "bf16", "precision_option": "auto",
                                   "precision_reason": bf16.student.reason, "teacher_precision": None}
    fp32 = RunPrecision(P.decide(None, None), "bf16", distilling=True)
    assert fp32.line().startswith("precision fp32 (") and "teachers in bf16" in fp32.line()
    assert "stay fp32" not in fp32.line() and fp32.record("fp32")["teacher_precision"] == "bf16"


def config_of(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"])


@pytest.mark.parametrize("option,resolved,why", [("auto", "fp32", "(auto: "), ("bf16", "bf16", "(--precision bf16")])
def test_header_and_checkpoint_record_the_resolved_precision(tmp_path, option, resolved, why):
    out = tmp_path / "t.safetensors"
    r = run_kdfine("train-teacher", "--epochs", "0", "--precision", option, "--out", out, env={P.PROBE_ENV: "0"})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("precision "))
    assert line.startswith(f"precision {resolved} {why}")
    config = config_of(out)
    assert (config["precision"], config["precision_option"]) == (resolved, option)
    assert config["precision_reason"] in line and config["teacher_precision"] is None


def test_resume_keys_compare_the_resolved_precisions():
    assert {"precision", "teacher_precision"} <= set(resume_keys())


def test_states_of_older_versions_read_auto_as_it_meant_then():
    old = {"precision": "auto", "lr": 0.1}
    assert upgrade_precision(old, "cpu", "fp32") == {"precision": "fp32", "lr": 0.1, "teacher_precision": None}
    assert upgrade_precision(old, "cuda", "bf16")["precision"] == "bf16"
    distilled = {"precision": "fp32", "teachers": ["ab"]}
    assert upgrade_precision(distilled, "cpu", "bf16")["teacher_precision"] == "bf16"
    new = {"precision": "bf16", "teacher_precision": None}
    assert upgrade_precision(new, "cpu", "fp32") is new


# ------------------------------------------------------------------------------- resume

# cnn on 160 digits, batch 32: 5 steps an epoch; one thread, so that the runs can go side by side
BASE = ["train-teacher", "--arch", "cnn", "--batch-size", "32", "--epochs", "2", "--seed", "5", "--device", "cpu",
        "-q"]
ENV = {"OMP_NUM_THREADS": "1", P.PROBE_ENV: "0"}
TIMEOUT = 300


def killed_after_epoch_one(out: Path, args: list[str]) -> int:
    """Start a run, SIGKILL it once its state after epoch 1 is saved; returns that epoch."""
    proc = subprocess.Popen([sys.executable, "-m", "kdfine", *BASE, *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(ENV))
    deadline = time.monotonic() + TIMEOUT
    try:
        while saved_epoch(out) < 1:
            assert proc.poll() is None, f"run ended early: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "epoch 1 did not finish in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return saved_epoch(out)


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """References in bf16 and fp32; a bf16 run killed after epoch 1, resumed with other precisions
    (refused) and with its own (finished); an fp32 run killed likewise and resumed with auto."""
    d = tmp_path_factory.mktemp("precision-resume")
    keep = d / "keep.csv"
    keep.write_text("index\n" + "\n".join(map(str, range(0, 1440, 9))) + "\n")
    base = ["--keep", str(keep)]
    res: dict = {"dir": d}

    def reference(name, args):
        return run_cli(*BASE, *base, *args, "--out", d / name, env=ENV, timeout=TIMEOUT)

    def bf16_chain():
        out = d / "bf16.safetensors"
        res["bf16_saved"] = killed_after_epoch_one(out, [*base, "--precision", "bf16"])
        state = Path(f"{out}.state.safetensors")
        before = state.read_bytes()
        res["to_fp32"] = run_cli(*BASE, *base, "--precision", "fp32", "--resume", "--out", out, env=ENV)
        res["to_auto"] = run_cli(*BASE, *base, "--resume", "--out", out, env=ENV)
        res["state_kept"] = state.read_bytes() == before
        res["bf16_final"] = run_cli(*BASE, *base, "--precision", "bf16", "--resume", "--out", out, env=ENV,
                                    timeout=TIMEOUT)
        res["bf16_out"] = out

    def fp32_chain():
        out = d / "fp32.safetensors"
        res["fp32_saved"] = killed_after_epoch_one(out, [*base, "--precision", "fp32"])
        res["fp32_final"] = run_cli(*BASE, *base, "--precision", "auto", "--resume", "--out", out, env=ENV,
                                    timeout=TIMEOUT)
        res["fp32_out"] = out

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(reference, "bf16_ref.safetensors", ["--precision", "bf16"]),
                pool.submit(reference, "fp32_ref.safetensors", ["--precision", "fp32"]),
                pool.submit(bf16_chain), pool.submit(fp32_chain)]
        res["refs"] = [j.result() for j in jobs[:2]]
        for j in jobs[2:]:
            j.result()
    return res


def test_a_resume_that_would_change_the_precision_is_refused(resumed):
    assert resumed["bf16_saved"] == 1
    for name in ("to_fp32", "to_auto"):  # auto resolves to fp32 here: the resolved value is compared
        r = resumed[name]
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdfine: error: --resume:"), r.stderr
        assert "precision: 'bf16' -> 'fp32'" in lines[0] and "--force" in lines[0]
        assert r.stdout == ""
    assert resumed["state_kept"], "a refused resume leaves the state alone"


def test_a_resume_in_the_same_precision_is_bit_identical(resumed):
    for r in resumed["refs"]:
        assert r.returncode == 0, r.stderr
    final = resumed["bf16_final"]
    assert final.returncode == 0, final.stderr
    d = resumed["dir"]
    assert same_weights(resumed["bf16_out"], d / "bf16_ref.safetensors")
    assert not same_weights(d / "bf16_ref.safetensors", d / "fp32_ref.safetensors"), "bf16 did train in bf16"
    # an fp32 state resumed with --precision auto, which resolves to fp32 here, continues it
    assert resumed["fp32_saved"] == 1
    assert resumed["fp32_final"].returncode == 0, resumed["fp32_final"].stderr
    assert same_weights(resumed["fp32_out"], d / "fp32_ref.safetensors")
    assert config_of(resumed["fp32_out"])["precision"] == "fp32"


def test_distillation_records_its_teachers_precision(tmp_path, digits_teacher):
    out = tmp_path / "s.safetensors"
    r = run_kdfine("distill", "--teacher", digits_teacher, "--epochs", "0", "--precision", "fp32", "--out", out,
                   env={P.PROBE_ENV: "0"})
    assert r.returncode == 0, r.stderr
    assert "precision fp32 (--precision fp32); teachers in fp32" in r.stderr
    config = config_of(out)
    assert (config["precision"], config["teacher_precision"]) == ("fp32", "fp32")


# ------------------------------------------------------------------------------- what a run records


def test_bf16_training_records_the_accuracy_that_eval_reports():
    """Where ``auto`` trains in bf16 on a CPU (native bf16 and a probe that pays), the test and
    validation passes and the BatchNorm re-estimation still run as ``kdfine eval`` runs (fp32), so the
    accuracy the run records is the one eval reports for the written weights. The bf16 steps are
    given here (``Job.precision``), so this holds on any CPU."""
    from conftest import digits_slice, tiny_cnn
    from kdfine.options import TrainConfig
    from kdfine.train.loop import Job, RunFiles, evaluate, fit
    from kdfine.train.progress import Reporter

    train, test = digits_slice(320, 200)
    cfg = TrainConfig(epochs=2, batch_size=64, seed=3, lr=0.05, bn_stats="recompute", val_fraction=0.2)
    run = fit(Job(tiny_cnn(train, 3), train, CPU, test=test, precision=("bf16", "bf16"),
                  val_index=np.arange(0, 320, 5)), cfg, RunFiles(reporter=Reporter(quiet=True)))
    assert run.batchnorm is not None and run.batchnorm["images"] > 0
    m = evaluate(run.model, test, CPU)  # what eval computes: precision auto, fp32 on a CPU
    assert m["top1"] == run.test["top1"] and m["nll"] == pytest.approx(run.test["nll"], rel=1e-12)
    assert evaluate(run.model, test, CPU, "bf16")["nll"] != m["nll"]  # the two precisions do differ here

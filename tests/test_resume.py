"""Resume after interruption: real CLI runs stopped by SIGKILL, SIGINT and SIGTERM in the middle of
an epoch, resumed with --resume, end with exactly the weights of an uninterrupted run.

Two chains share the module's runs (each run a real ``python -m kdfine`` subprocess):

- plain: SIGKILL in epoch 2, resumed; SIGTERM in epoch 3, resumed to the end;
- dynamic FINE (a selection at the start of epochs 2 and 3): SIGINT in epoch 3, resumed to the
  end; the resumed FINE round takes its class vectors from the selection saved in the state.

Each is compared with an uninterrupted run of the same command (torch.equal on every tensor).
"""

from __future__ import annotations

import json
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors import safe_open

from conftest import Run, assert_same_weights, run_cli, saved_epoch, state_of

# cnn on digits with batch 32: about half a second per epoch on one core, long enough to land a
# signal inside an epoch; OMP_NUM_THREADS=1 so that the reference and the chains can run side by side.
BASE = ["train-teacher", "--arch", "cnn", "--batch-size", "32", "--epochs", "3", "--seed", "3",
        "--device", "cpu", "-q"]
FINE = ["--label-noise", "sym:0.4", "--fine-warmup", "1", "--fine-every", "1"]
SENTINEL = b"an older checkpoint that an interrupted run must not touch"
ENV = {"OMP_NUM_THREADS": "1"}
TIMEOUT = 180


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run both references and both interrupted chains (references in parallel with the chains);
    returns a dict of every step's outcome for the tests to check."""
    d = tmp_path_factory.mktemp("resume")
    res: dict = {"dir": d}
    started: list[Run] = []

    def reference(name, args):
        return run_cli(*BASE, *args, "--out", d / name, env=ENV, timeout=TIMEOUT)

    def plain_chain():
        out, log = d / "plain.safetensors", d / "plain.jsonl"
        out.write_bytes(SENTINEL)
        run = Run(BASE, out, log, TIMEOUT)
        started.append(run)
        res["sigkill"] = run.stop_inside_epoch(2, signal.SIGKILL)
        res["sigkill_saved"], res["sigkill_out"] = saved_epoch(out), out.read_bytes()
        res["state_bytes"] = state_of(out).read_bytes()
        # options that differ from the recorded ones are refused, the state left as it was
        res["refused"] = run_cli(*BASE, "--out", out, "--resume", "--lr", "0.05", "--epochs", "2", env=ENV)
        res["state_after_refusal"] = state_of(out).read_bytes()
        forced = d / "forced.safetensors"
        shutil.copy(state_of(out), state_of(forced))
        res["forced"] = run_cli(*BASE, "--out", forced, "--resume", "--force", "--lr", "0.05", "--epochs", "2",
                                env=ENV)
        res["forced_out"] = forced
        run = Run([*BASE, "--resume"], out, log, TIMEOUT)
        started.append(run)
        res["sigterm"] = run.stop_inside_epoch(3, signal.SIGTERM)
        res["sigterm_saved"], res["sigterm_out"] = saved_epoch(out), out.read_bytes()
        res["plain_final"] = run_cli(*BASE, "--out", out, "--resume", "--log", log, env=ENV, timeout=TIMEOUT)
        res["plain_out"], res["plain_log"] = out, log

    def fine_chain():
        out, log = d / "fine.safetensors", d / "fine.jsonl"
        out.write_bytes(SENTINEL)
        run = Run([*BASE, *FINE], out, log, TIMEOUT)
        started.append(run)
        res["sigint"] = run.stop_inside_epoch(3, signal.SIGINT)
        res["sigint_saved"], res["sigint_out"] = saved_epoch(out), out.read_bytes()
        res["fine_final"] = run_cli(*BASE, *FINE, "--out", out, "--resume", "--log", log, env=ENV, timeout=TIMEOUT)
        res["fine_out"], res["fine_log"] = out, log

    try:
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(reference, "plain_ref.safetensors", []),
                    pool.submit(reference, "fine_ref.safetensors", FINE),
                    pool.submit(plain_chain), pool.submit(fine_chain)]
            refs = [j.result() for j in jobs[:2]]
            for j in jobs[2:]:
                j.result()
    finally:
        for r in started:
            r.kill()
    for r in refs:
        assert r.returncode == 0, r.stderr
    res["plain_ref"], res["fine_ref"] = d / "plain_ref.safetensors", d / "fine_ref.safetensors"
    return res


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(runs):
    assert runs["sigkill"].returncode == -signal.SIGKILL
    assert runs["sigkill_saved"] == 1, "the kill should land inside epoch 2, after epoch 1 was saved"
    assert runs["sigkill_out"] == SENTINEL
    final = runs["plain_final"]
    assert final.returncode == 0, final.stderr
    assert final.stdout.strip() == str(runs["plain_out"])
    assert_same_weights(runs["plain_out"], runs["plain_ref"])
    assert not state_of(runs["plain_out"]).exists(), "a finished run removes its resume state"
    epochs = [json.loads(line)["epoch"] for line in runs["plain_log"].read_text().splitlines()]
    assert epochs == [1, 2, 3], "the resumed log lists every epoch once"


@pytest.mark.parametrize("step,chain", [("sigint", "fine"), ("sigterm", "plain")])
def test_signal_stops_at_batch_boundary_with_resume_hint(runs, step, chain):
    r = runs[step]
    assert r.returncode == 130, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("kdfine: error: interrupted in epoch 3;")
    assert "--resume" in lines[0] and str(state_of(runs[f"{chain}_out"])) in lines[0]
    assert r.stdout == ""
    assert runs[f"{step}_saved"] == 2, "the last complete state is kept"
    assert runs[f"{step}_out"] == SENTINEL, "an interrupted run leaves the output file alone"
    leftovers = [p.name for p in runs["dir"].iterdir() if p.name.startswith(f".{chain}.")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_dynamic_fine_selection_resumes_identically(runs):
    final = runs["fine_final"]
    assert final.returncode == 0, final.stderr
    assert_same_weights(runs["fine_out"], runs["fine_ref"])
    kept = {r["epoch"]: r.get("fine_kept") for r in map(json.loads, runs["fine_log"].read_text().splitlines())}
    total = json.loads(runs["fine_log"].read_text().splitlines()[1])["fine_total"]
    assert kept[1] is None and 0 < kept[2] < total and 0 < kept[3] < total, kept


def test_resume_with_other_options_is_refused_unless_forced(runs):
    r = runs["refused"]
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "lr: 0.1 -> 0.05" in lines[0] and "epochs: 3 -> 2" in lines[0] and "--force" in lines[0]
    assert runs["state_after_refusal"] == runs["state_bytes"], "a refused resume leaves the state alone"
    forced = runs["forced"]
    assert forced.returncode == 0, forced.stderr
    with safe_open(str(runs["forced_out"]), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["lr"] == 0.05 and json.loads(meta["epochs"]) == 2

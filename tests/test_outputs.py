"""All-or-nothing outputs, feature dumps as one set, run locks, divergence, resume and inherited-data
fingerprints, broken pipes: the library in-process where that is the real thing, the CLI otherwise."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, run_kdfine, start_cli
from kdfine.errors import InputError, UsageError
from kdfine.detect.dump import read_dump, write_dump
from kdfine.files.tables import read_index
from kdfine.files.lock import lock_path, run_lock
from kdfine.files.outputs import Outputs, check_name


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _small_npz(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), y=np.arange(n) % 3,
             x_test=rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8), y_test=np.arange(12) % 3)
    return path


TRAIN = ["--arch", "mlp-16", "--batch-size", "16", "--device", "cpu"]

# ------------------------------------------------------------------------------------ Outputs


def test_outputs_commit_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("old a\n")
    with Outputs() as outs:
        outs.add(a, "--out")
        outs.add(b, "--noisy-out")
        with outs.open(a, "w") as f:
            f.write("new a\n")
        with pytest.raises(RuntimeError):
            with outs.open(b, "w") as f:
                raise RuntimeError("the command failed half-way")
    assert _snapshot(tmp_path) == {"a.csv": b"old a\n"}, "old file untouched, no temporary left"
    with Outputs() as outs:
        outs.add(a, "--out")
        outs.add(b, "--noisy-out")
        for p in (a, b):
            with outs.open(p, "w") as f:
                f.write(f"new {p.name}\n")
        assert a.read_text() == "old a\n"  # nothing lands before the commit
        outs.commit()
    assert _snapshot(tmp_path) == {"a.csv": b"new a.csv\n", "b.csv": b"new b.csv\n"}


def test_outputs_refuse_inputs_and_duplicates(tmp_path):
    t = tmp_path / "t.safetensors"
    t.write_bytes(b"x")
    os.link(t, tmp_path / "hard.safetensors")
    outs = Outputs()
    outs.input(t, "--teacher")
    with pytest.raises(UsageError, match="is the input --teacher"):
        outs.add(tmp_path / "hard.safetensors", "--out")  # another name of the same inode
    outs.add(tmp_path / "c.csv", "--out")
    (tmp_path / "sub").mkdir()
    with pytest.raises(UsageError, match="--noisy-out .* and --out .* are the same file"):
        outs.add(tmp_path / "sub" / ".." / "c.csv", "--noisy-out")


def test_names_checked_up_front(tmp_path):
    with pytest.raises(UsageError, match="too long"):
        check_name(tmp_path / ("x" * 227), "--out", (".state.safetensors",))
    check_name(tmp_path / ("x" * 200), "--out", (".state.safetensors",))
    with pytest.raises(UsageError, match="not valid UTF-8"):
        check_name(os.fsdecode(bytes(tmp_path) + b"/\xff.safetensors"), "--out")


def test_csv_readers_accept_a_bom(tmp_path):
    p = tmp_path / "keep.csv"
    p.write_bytes("\ufeffindex\n3\n1\n".encode("utf-8"))
    assert read_index(p, 5).tolist() == [3, 1]


# ------------------------------------------------------------------------------------ dumps


def _write(tmp_path, seed, truth=True):
    rng = np.random.default_rng(seed)
    f, z, y = rng.normal(size=(20, 4)).astype(np.float32), rng.normal(size=(20, 3)), rng.permutation(np.arange(20) % 3)
    write_dump(tmp_path / "f.npy", f, z, y, {"num_classes": 3}, y if truth else None)
    return f


def test_dump_is_one_set_and_readers_refuse_foreign_sidecars(tmp_path):
    _write(tmp_path, 0, truth=True)
    first = _snapshot(tmp_path)
    f = _write(tmp_path, 1, truth=False)
    second = _snapshot(tmp_path)
    assert "f.truth.npy" not in second, "the old truth sidecar goes with the old set"
    d = read_dump(tmp_path / "f.npy")
    assert np.array_equal(d.features, f) and d.truth is None and d.info["n"] == 20
    (tmp_path / "f.labels.npy").write_bytes(first["f.labels.npy"])  # one file of the other set
    with pytest.raises(InputError, match="f.labels.npy was changed .* different dumps"):
        read_dump(tmp_path / "f.npy")
    (tmp_path / "f.labels.npy").write_bytes(second["f.labels.npy"])
    (tmp_path / "f.truth.npy").write_bytes(first["f.truth.npy"])
    with pytest.raises(InputError, match="f.truth.npy is not part of it"):
        read_dump(tmp_path / "f.npy")


@pytest.mark.parametrize("doc", ["[]", "null", '{"num_classes": "ten"}', '{"n": 3}'])
def test_dump_json_fields_are_checked(tmp_path, doc):
    np.save(tmp_path / "f.npy", np.ones((5, 2), np.float32))
    (tmp_path / "f.json").write_text(doc)
    with pytest.raises(InputError):
        read_dump(tmp_path / "f.npy")


def test_failed_dump_leaves_the_old_set(tmp_path, digits_teacher):
    """Under `ulimit -f`, eval --dump-features fails (exit 3) and the previous dump stays whole."""
    cwd = tmp_path
    r = run_kdfine("eval", "--model", digits_teacher, "--split", "train", "--label-noise", "sym:0.2",
                   "--dump-features", "f.npy", "-q", "--device", "cpu", cwd=cwd)
    assert r.returncode == 0, r.stderr
    before = _snapshot(cwd)
    assert "f.truth.npy" in before
    limit = max(len(v) for v in before.values()) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([sys.executable, "-m", "kdfine", "eval", "--model", str(digits_teacher), "--split", "train",
                        "--dump-features", "f.npy", "-q", "--device", "cpu"], cwd=cwd, env=cli_env(),
                       capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert p.returncode == 3, p.stderr
    assert "cannot write" in p.stderr and "f.npy" in p.stderr and ".kdfine-" not in p.stderr
    assert _snapshot(cwd) == before
    r = run_kdfine("detect-noise", "-f", "f.npy", "-o", "c.csv", "-q", cwd=cwd)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------ locks


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    out = tmp_path / "t.safetensors"
    code = ("import sys, time; from kdfine.files.lock import run_lock\n"
            f"with run_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"another kdfine run is writing it \\(pid {holder.pid} "):
            with run_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out).exists(), "a killed holder leaves its lock file behind"
    with run_lock(out) as lock:  # stale: taken over
        assert lock.read_text().startswith(f"{os.getpid()} ")
    assert not lock_path(out).exists()


def test_second_training_run_on_the_same_out_is_refused(tmp_path):
    data = _small_npz(tmp_path / "small.npz")
    first = start_cli("train-teacher", "--data", f"npz:{data}", *TRAIN, "--epochs", "500", "--out", "t.safetensors",
                      "-q", cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "t.safetensors.lock").exists() and time.time() < deadline:
            time.sleep(0.02)
        r = run_kdfine("train-teacher", "--data", f"npz:{data}", *TRAIN, "--epochs", "1", "--out", "t.safetensors",
                       "-q", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert f"pid {first.pid}" in r.stderr and len(r.stderr.splitlines()) == 1
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert not (tmp_path / "t.safetensors").exists()


# ------------------------------------------------------------------------------------ training


def test_divergence_stops_with_exit_3_and_no_checkpoint(tmp_path):
    data = _small_npz(tmp_path / "small.npz")
    r = run_kdfine("train-teacher", "--data", f"npz:{data}", "--arch", "mlp-16", "--device", "cpu", "--epochs", "2",
                   "--batch-size", "4", "--lr", "10000", "--weight-decay", "1", "--schedule", "constant",
                   "--out", "d.safetensors", "-q", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "diverged in epoch 1" in r.stderr and "--lr 10000" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.npz"]


def test_resume_on_changed_data_is_refused(tmp_path):
    data = _small_npz(tmp_path / "small.npz")
    run = start_cli("train-teacher", "--data", "npz:small.npz", *TRAIN, "--epochs", "500", "--out", "t.safetensors",
                    "-q", cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "t.safetensors.state.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    _small_npz(data, n=57)  # three images deleted
    r = run_kdfine("train-teacher", "--data", "npz:small.npz", *TRAIN, "--epochs", "500", "--out", "t.safetensors",
                   "--resume", "-q", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "train_set: '60 samples" in r.stderr and "57 samples" in r.stderr


def test_recorded_data_is_absolute_and_checked(tmp_path):
    """A checkpoint trained on npz:small.npz --labels shift.npy, evaluated from a directory with its
    own small.npz, uses the recorded files; once they change, eval refuses to guess."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _small_npz(a / "small.npz")
    _small_npz(b / "small.npz", n=30, seed=1)
    np.save(a / "shift.npy", (np.arange(60) + 1) % 3)
    r = run_kdfine("train-teacher", "--data", "npz:small.npz", "--labels", "shift.npy", *TRAIN, "--epochs", "1",
                   "--out", "t.safetensors", "-q", cwd=a)
    assert r.returncode == 0, r.stderr
    r = run_kdfine("eval", "--model", a / "t.safetensors", "--split", "train", "--json", "--device", "cpu", cwd=b)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n"] == 60 and doc["data"] == f"npz:{a / 'small.npz'}"
    np.save(a / "shift.npy", np.arange(60) % 3)
    r = run_kdfine("eval", "--model", a / "t.safetensors", "--split", "train", "--device", "cpu", cwd=b)
    assert r.returncode == 3 and "--labels" in r.stderr and "has changed" in r.stderr, r.stderr
    _small_npz(a / "small.npz", seed=2)
    r = run_kdfine("eval", "--model", a / "t.safetensors", "--device", "cpu", cwd=b)
    assert r.returncode == 3 and "has changed since the checkpoint was trained" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ pipes


def _closed_reader(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI with stdout a pipe whose reader is gone before anything is written."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "kdfine", *map(str, args)], stdout=w, stderr=subprocess.PIPE,
                              cwd=cwd, env=cli_env(), text=True, timeout=300)
    finally:
        os.close(w)


def test_broken_pipe_exits_141_silently(tmp_path, noisy_dump, digits_teacher):
    p = _closed_reader(["detect-noise", "-f", noisy_dump, "-o", "-", "--noisy-out", "n.csv", "-q"], tmp_path)
    assert (p.returncode, p.stderr) == (141, "")
    assert not (tmp_path / "n.csv").exists(), "nothing else lands when stdout cannot take the result"
    p = _closed_reader(["clean", "--model", digits_teacher, "-o", "-", "-q", "--device", "cpu"], tmp_path)
    assert (p.returncode, p.stderr) == (141, "")

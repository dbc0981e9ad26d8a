"""`kdfine info`: what a checkpoint records, its size and parameter count, and its lineage found by
sha256 through recorded paths, files beside it, or --parent. The commands run in process
(conftest.run_kdfine); a reader closing the pipe early is a real process."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, run_kdfine


@pytest.fixture(scope="module")
def chain(tmp_path_factory, digits_teacher) -> dict[str, Path]:
    """teacher -> s1 (kl) -> s2 (mse), one epoch per student."""
    d = tmp_path_factory.mktemp("chain")
    t = d / "teacher.safetensors"
    shutil.copy(digits_teacher, t)
    s1, s2 = d / "s1.safetensors", d / "s2.safetensors"
    r = run_kdfine("distill", "--teacher", t, "--loss", "kl", "--tau", "2", "--epochs", "1", "--out", s1, "-q")
    assert r.returncode == 0, r.stderr
    r = run_kdfine("distill", "--teacher", s1, "--arch", "cnn-8", "--epochs", "1", "--out", s2, "-q")
    assert r.returncode == 0, r.stderr
    return {"teacher": t, "s1": s1, "s2": s2}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def info_json(*args) -> dict:
    r = run_kdfine("info", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_fields_size_parameter_count_and_lineage(chain):
    from kdfine.models import build, param_count

    doc = info_json(chain["s2"])
    s2 = chain["s2"]
    assert doc["file_size"] == s2.stat().st_size and doc["sha256"] == sha(s2)
    assert doc["params"] == param_count(build("cnn-8", 10, 1, 8))
    assert (doc["arch"], doc["stage"], doc["loss"], doc["data"]) == ("cnn-8", "student", "mse", "digits")
    assert doc["classes"] == [str(i) for i in range(10)] and doc["num_classes"] == 10
    assert 0.0 <= doc["metrics"]["test_top1"] <= 1.0 and doc["epochs"] == 1
    assert doc["parents"] == [sha(chain["s1"])]
    # the lineage, found through the paths recorded when each student was distilled
    (s1,) = doc["lineage"]
    assert s1["found"] and Path(s1["path"]).resolve() == chain["s1"].resolve()
    assert (s1["arch"], s1["loss"], s1["tau"]) == ("cnn-16", "kl", 2.0)
    (t,) = s1["parents"]
    assert t["found"] and t["sha256"] == sha(chain["teacher"]) and t["stage"] == "teacher" and t["parents"] == []


def test_lineage_beside_it_after_a_move_and_with_parent(chain, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    for k in ("s2", "s1"):
        shutil.copy(chain[k], moved / f"renamed-{k}.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(chain["teacher"], elsewhere / "t.safetensors")
    for p in chain.values():  # the recorded parent paths no longer exist
        p.rename(p.with_suffix(".gone"))
    try:
        (s1,) = info_json(moved / "renamed-s2.safetensors")["lineage"]
        assert s1["found"] and Path(s1["path"]).name == "renamed-s1.safetensors"
        assert s1["parents"][0]["found"] is False  # the teacher is neither beside s1 nor at its recorded path
        doc = info_json(moved / "renamed-s2.safetensors", "--parent", elsewhere / "t.safetensors")
        assert Path(doc["lineage"][0]["parents"][0]["path"]).name == "t.safetensors"
        text = run_kdfine("info", moved / "renamed-s2.safetensors")
        assert text.returncode == 0 and "not found" in text.stdout and "pass --parent" in text.stdout
    finally:
        for p in chain.values():
            p.with_suffix(".gone").rename(p)


def test_human_output_and_unrelated_parent_warning(chain, digits_teacher, tmp_path):
    from kdfine.models import checkpoint
    from kdfine.models import build

    other = tmp_path / "other.safetensors"  # a real (untrained) checkpoint outside the lineage
    meta = {k: v for k, v in checkpoint.read_meta(digits_teacher).items() if k not in ("kdfine_version", "schema")}
    checkpoint.save(other, build("mlp-16", 10, 1, 8), {**meta, "arch": "mlp-16"})
    r = run_kdfine("info", chain["s2"], "--parent", other)
    assert r.returncode == 0, r.stderr
    assert "cnn-8" in r.stdout and "distilled from" in r.stdout and "teacher cnn" in r.stdout
    assert "not an ancestor" in r.stderr


def test_bad_input_is_one_line_exit_3(chain, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    r = run_kdfine("info", junk)
    assert r.returncode == 3 and r.stdout == "" and r.stderr.count("\n") == 1 and "junk.safetensors" in r.stderr
    r = run_kdfine("info", chain["s2"], "--parent", junk)
    assert r.returncode == 3 and r.stdout == "" and "--parent" in r.stderr


def test_a_reader_that_stops_early_ends_it_quietly(chain):
    # `true` exits at once, so the write meets a closed pipe
    cmd = f'"{sys.executable}" -m kdfine info "{chain["s2"]}" | true; echo "rc=${{PIPESTATUS[0]}}"'
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.stdout.strip() == "rc=141" and r.stderr == ""

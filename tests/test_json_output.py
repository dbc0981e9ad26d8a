"""Machine-readable output: with --json every command prints exactly one JSON document on stdout
and nothing else; -q leaves stderr empty unless there is an error; progress bars appear only
when stderr is a terminal. Each command's success runs as a real process (whatever writes to its
stdout descriptor counts); the error documents are checked in process."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import cli_env, run_cli, run_kdfine


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_teacher, noisy_dump):
    """Each command once with --json (and -q), from one small pipeline, two processes at a time
    (the second phase reads what the first wrote); name -> (args, result)."""
    d = tmp_path_factory.mktemp("json")
    # train-teacher with stderr on a terminal (progress bar) and distill with stderr on a pipe (one
    # line per epoch), both without -q: stdout must still be pure JSON
    first = {"train-teacher": ("train-teacher", "--epochs", "2", "--out", d / "t.safetensors", "--log", d / "t.jsonl",
                               "--json"),
             "distill": ("distill", "--teacher", digits_teacher, "--epochs", "2", "--out", d / "s.safetensors",
                         "--json"),
             "detect-noise": ("detect-noise", "--features", noisy_dump, "--out", d / "clean.csv", "--json", "-q"),
             "clean": ("clean", "--model", digits_teacher, "--out", d / "kept.csv", "--json", "-q")}
    then = {"eval": ("eval", "--model", digits_teacher, "--model", d / "t.safetensors", "--json", "-q"),
            "info": ("info", d / "s.safetensors", "--json", "-q"),
            "plot-log": ("plot-log", d / "t.jsonl", "-o", d / "curves.png", "--json", "-q")}

    def go(name, args):
        return name, (args, run_with_tty_stderr(args) if name == "train-teacher" else run_cli(*args))

    out = {}
    with ThreadPoolExecutor(2) as pool:
        out.update(pool.map(go, *zip(*first.items())))
        assert out["train-teacher"][1].returncode == 0, out["train-teacher"][1].stderr
        assert out["distill"][1].returncode == 0, out["distill"][1].stderr
        out.update(pool.map(go, *zip(*then.items())))
    return out


COMMANDS = ["train-teacher", "distill", "eval", "detect-noise", "clean", "info", "plot-log"]


@pytest.mark.parametrize("name", COMMANDS)
def test_stdout_is_exactly_one_json_document(runs, name):
    args, r = runs[name]
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # fails on anything before or after the document
    assert isinstance(doc, dict) and r.stdout.endswith("}\n")
    if "-q" in args:
        assert r.stderr == "", f"{name} -q wrote to stderr:\n{r.stderr}"


def test_json_shapes(runs):
    t = json.loads(runs["train-teacher"][1].stdout)
    assert {"path", "sha256", "stage", "arch", "metrics", "epochs"} <= set(t)
    assert t["stage"] == "teacher" and len(t["epochs"]) == 2 and 0 <= t["metrics"]["test_top1"] <= 1
    s = json.loads(runs["distill"][1].stdout)
    assert s["stage"] == "student" and Path(s["path"]).is_file()
    e = json.loads(runs["eval"][1].stdout)
    assert e["split"] == "test" and [m["arch"] for m in e["models"]] == ["cnn", "cnn"]
    assert all({"top1", "top5", "nll", "ece"} <= set(m) for m in e["models"])
    dn = json.loads(runs["detect-noise"][1].stdout)
    assert dn["kept"] + sum(c["total"] - c["kept"] for c in dn["classes"]) == dn["n"]
    assert 0.0 <= dn["truth"]["precision"] <= 1.0  # the dump has a truth sidecar
    c = json.loads(runs["clean"][1].stdout)
    assert c["data"] == "digits" and c["kept"] <= c["n"]
    i = json.loads(runs["info"][1].stdout)
    assert i["stage"] == "student" and i["lineage"][0]["found"] is True
    p = json.loads(runs["plot-log"][1].stdout)
    assert p["runs"][0]["epochs"] == 2 and Path(p["path"]).is_file()


def test_quiet_still_reports_errors_in_one_line(tmp_path):
    r = run_kdfine("plot-log", tmp_path / "missing.jsonl", "-o", tmp_path / "x.png", "--json", "-q")
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and "missing.jsonl" in r.stderr
    # --json: stdout still holds one JSON document, the error, with the exit code and the stderr line's message
    assert json.loads(r.stdout) == {"error": {"code": 3, "kind": "input",
                                              "message": r.stderr.strip().removeprefix("kdfine: error: ")}}


def test_a_usage_error_under_json_is_a_json_document_too(tmp_path):
    r = run_kdfine("detect-noise", "--features", tmp_path / "f.npy", "--out", tmp_path / "k.csv", "--zeta", "2",
                   "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["kind"] == "usage" and "--zeta" in r.stderr
    r = run_kdfine("eval", "--model", tmp_path / "m.safetensors", "--split", "bogus", "--json")  # refused by the parser
    assert r.returncode == 2 and "bogus" in json.loads(r.stdout)["error"]["message"]


def test_csv_and_json_cannot_share_stdout(noisy_dump):
    r = run_kdfine("detect-noise", "--features", noisy_dump, "--out", "-", "--json")
    assert r.returncode == 2 and "--json" in r.stderr
    assert list(json.loads(r.stdout)) == ["error"]  # no CSV: the error document alone


def run_with_tty_stderr(args) -> subprocess.CompletedProcess:
    """Run the CLI with stderr on a pseudo-terminal (stdout on a pipe), as a user at a terminal
    who redirects the output; ``stderr`` is what the terminal received."""
    master, slave = pty.openpty()
    env = cli_env({"TERM": "xterm-256color", "COLUMNS": "100"})
    p = subprocess.Popen([sys.executable, "-m", "kdfine", *map(str, args)], stdout=subprocess.PIPE, stderr=slave,
                         env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = p.stdout.read().decode()
    code = p.wait(timeout=300)
    return subprocess.CompletedProcess(args, code, out, b"".join(chunks).decode(errors="replace"))


def test_progress_bar_only_on_a_terminal(runs):
    tty = runs["train-teacher"][1].stderr
    assert "\x1b[" in tty and "\u2501" in tty  # ANSI control and rich's bar glyph
    plain = runs["distill"][1].stderr  # a training command with stderr on a pipe
    assert "\x1b" not in plain and "\u2501" not in plain
    assert "epoch 1/2" in plain and "epoch 2/2" in plain

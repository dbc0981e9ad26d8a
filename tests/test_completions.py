"""Shell completion: the committed scripts are current, and bash really completes with them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

COMPLETIONS = ROOT / "completions"


@pytest.fixture(scope="module")
def kdfine_on_path(tmp_path_factory) -> dict[str, str]:
    """An environment whose PATH has a `kdfine` that runs this checkout (as an installed one would)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    exe = bin_dir / "kdfine"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kdfine "$@"\n')
    exe.chmod(0o755)
    env = cli_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp_path_factory.mktemp("home"))
    return env


def bash_complete(script: Path, words: list[str], env: dict[str, str]) -> list[str]:
    """Source ``script`` in a non-interactive bash, run the function it registered for kdfine
    with COMP_WORDS/COMP_CWORD set as bash sets them on TAB, and return COMPREPLY."""
    words_src = " ".join(f"'{w}'" for w in words)
    prog = f"""
source '{script}'
spec=$(complete -p kdfine) || exit 90
func=$(sed -E 's/.* -F ([^ ]+) .*/\\1/' <<< "$spec")
COMP_WORDS=({words_src}); COMP_CWORD={len(words) - 1}
COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}
"$func" kdfine "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_committed_scripts_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_completions.py"), "--check"],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr + "\nrun `make completions` and commit completions/"


def test_each_file_is_its_shells_script():
    bash = (COMPLETIONS / "kdfine.bash").read_text()
    zsh = (COMPLETIONS / "_kdfine").read_text()
    fish = (COMPLETIONS / "kdfine.fish").read_text()
    assert "complete -o default -F _kdfine_completion kdfine" in bash and "compdef" not in bash
    assert zsh.splitlines()[0] == "#compdef kdfine"  # compinit reads this from the first line only
    assert "compdef _kdfine_completion kdfine" in zsh and "complete -o" not in zsh
    assert fish.count("complete --command kdfine") == 1 and "compdef" not in fish
    r = subprocess.run(["bash", "-n", str(COMPLETIONS / "kdfine.bash")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bash_completes_subcommands_and_options(kdfine_on_path):
    script = COMPLETIONS / "kdfine.bash"
    assert bash_complete(script, ["kdfine", "di"], kdfine_on_path) == ["distill"]
    assert set(bash_complete(script, ["kdfine", "distill", "--lo"], kdfine_on_path)) == {"--log", "--loss"}
    every = set(bash_complete(script, ["kdfine", ""], kdfine_on_path))
    assert {"train-teacher", "distill", "eval", "detect-noise", "clean", "info", "plot-log"} <= every


def test_install_completion_writes_the_same_bash_script(kdfine_on_path):
    home = Path(kdfine_on_path["HOME"])
    # run from a bash process so that the shell is detected as it is for a user
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", "kdfine --install-completion; echo rc=$?"],
                       capture_output=True, text=True, env=kdfine_on_path, timeout=120)
    assert "rc=0" in r.stdout, r.stdout + r.stderr
    installed = home / ".bash_completions" / "kdfine.sh"
    assert installed.is_file(), r.stdout
    assert f"source '{installed}'" in (home / ".bashrc").read_text()
    committed = (COMPLETIONS / "kdfine.bash").read_text()
    body = committed[committed.index("_kdfine_completion()"):]
    assert installed.read_text().strip() == body.strip()
    assert bash_complete(installed, ["kdfine", "detect-n"], kdfine_on_path) == ["detect-noise"]

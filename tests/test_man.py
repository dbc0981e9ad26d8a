"""Man pages and help texts: pages are current, render without groff warnings and list every
option with its default; every command's help has a summary and an example; `kdfine --help`
groups the commands by pipeline stage."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, run_cli

MAN = ROOT / "man"


def command_tree():
    """(name, click command, context) for every subcommand of the real app."""
    import typer.main
    from typer import _click as click

    from kdfine.cli import app

    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="kdfine")
    return group, [(n, group.get_command(ctx, n), ctx) for n in group.list_commands(ctx)]


def render(page) -> str:
    groff = shutil.which("groff")
    if groff is None:
        pytest.fail("groff is not installed (Debian: apt-get install groff-base); `make test` installs it")
    r = subprocess.run([groff, "-man", "-Tutf8", "-ww", str(page)], capture_output=True, text=True,
                       env={**cli_env(), "MANWIDTH": "200"}, timeout=60)
    assert r.returncode == 0 and r.stderr == "", f"{page.name}: groff warned:\n{r.stderr}"
    return re.sub(r".\x08", "", r.stdout)  # drop overstrike bold/underline


def test_committed_pages_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_man.py"), "--check"], capture_output=True,
                       text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr + "\nrun `make man` and commit man/"


def test_pages_render_cleanly_and_list_every_option_with_its_default():
    _, commands = command_tree()
    pages = sorted(MAN.glob("*.1"))
    assert {p.name for p in pages} == {"kdfine.1"} | {f"kdfine-{n}.1" for n, _, _ in commands}
    root = render(MAN / "kdfine.1")
    for name, cmd, _ in commands:
        assert f"kdfine-{name}(1)" in root
        text = " ".join(render(MAN / f"kdfine-{name}.1").split())
        for p in cmd.params:
            if getattr(p, "hidden", False) or not p.opts[0].startswith("-"):
                continue
            assert p.opts[0] in text, f"kdfine-{name}.1 lacks {p.opts[0]}"
            first_words = " ".join((p.help or "").replace("\\[", "[").split()[:4])  # rich escapes [ as \\[
            assert first_words in text, f"kdfine-{name}.1 lacks the help of {p.opts[0]}"
            if p.default not in (None, False) and not p.multiple and not p.required:
                shown = repr(p.default) if isinstance(p.default, float) else str(p.default)
                if p.default is True:  # an on-by-default --flag/--no-flag shows the flag that is on
                    shown = p.opts[0]
                assert f"Default: {shown}." in text, f"kdfine-{name}.1: no default for {p.opts[0]}"
        assert "EXIT STATUS" in text and "EXAMPLES" in text


def test_every_command_has_a_summary_an_example_json_and_quiet():
    group, commands = command_tree()
    assert "Example:" in group.help
    for name, cmd, _ in commands:
        paragraphs = [p.strip() for p in (cmd.help or "").split("\n\n") if p.strip()]
        assert paragraphs and "\n" not in paragraphs[0].strip(), f"{name}: no one-line summary"
        assert any(p.startswith("Example: kdfine ") for p in paragraphs), f"{name}: no example"
        opts = {o for p in cmd.params for o in p.opts}
        assert {"--json", "-q", "--quiet"} <= opts, f"{name}: lacks --json or -q/--quiet"


def test_help_groups_commands_by_stage():
    r = run_cli("--help", env={"COLUMNS": "120"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    stages = ["1. Train", "2. Evaluate", "3. Find noisy labels", "4. Inspect and plot"]
    positions = [out.index(s) for s in stages]
    assert positions == sorted(positions)
    members = {"1. Train": ["train-teacher", "distill"], "2. Evaluate": ["eval"],
               "3. Find noisy labels": ["detect-noise", "clean"], "4. Inspect and plot": ["info", "plot-log"]}
    bounds = positions + [len(out)]
    for i, s in enumerate(stages):
        section = out[bounds[i]:bounds[i + 1]]
        for cmd in members[s]:
            assert re.search(rf"\b{re.escape(cmd)}\b", section), f"{cmd} is not under {s}"

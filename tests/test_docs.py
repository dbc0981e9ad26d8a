"""The examples of README.md and docs/*.md are tests (docs/development.md, "The guide's examples
are tests").

Every fenced block must declare what it is (``sh``, ``bash``, ``console``, ``python``, ``text``);
shell blocks may add ``needs=REASON`` to be checked for option names only. Every ``kdfine COMMAND``
in a shell block may use only that command's options, as ``--help`` shows them. The runnable
blocks of each page run in order in one temporary directory, through a fork server (one process
that imported torch once, forking a child per ``kdfine`` command: start-up in milliseconds instead
of seconds), and their documented results are checked: exit codes, the files named by output
options, and the keys of every ``--json`` document against reference.md's table.

Run as ``python tests/test_docs.py --serve SOCKET`` it is that server.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import zygote

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL, OTHER = ("sh", "bash", "console"), ("python", "text")
#: why a shell example may not run in the test suite (docs/development.md lists them).
REASONS = {"gpu", "download", "own-files", "manual", "slow", "system"}
#: options whose value is a file (or, for --export-dir, a directory) that the command writes.
OUTPUTS = ("--out", "-o", "--noisy-out", "--labels-out", "--review", "--dump-features", "--export",
           "--export-dir", "--log", "--plot")
TRAINING = ("train-teacher", "distill")
FENCE = re.compile(r"^( *)```(.*)$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    info: str
    text: str

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def needs(self) -> set[str]:
        found = [w[len("needs="):] for w in self.info.split()[1:] if w.startswith("needs=")]
        return {r for w in found for r in w.split(",")}

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page (indented fences included), in order."""
    out, lines, i = [], page.read_text().split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start, body = len(m[1]), i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        out.append(Block(page, start + 1, m[2].strip(), "\n".join(body)))
        i += 1
    return out


ALL = [b for p in PAGES for b in blocks(p)]


# ---------------------------------------------------------------- commands in a shell block

def logical_lines(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, comments and console output dropped."""
    text = block.text
    if block.lang == "console":
        text = "\n".join(console_commands(block))
    joined = re.sub(r"\\\n", " ", text)
    return [ln for ln in joined.split("\n") if ln.strip() and not ln.lstrip().startswith("#")]


def words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars="|&;()<>")
    lex.whitespace_split, lex.commenters = True, "#"
    return list(lex)


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """``(program, args)`` of each simple command of a shell line: ``kdfine`` (also ``python -m
    kdfine`` and ``torchrun ... -m kdfine [--]``) or a ``bench/`` script; others are skipped."""
    out, cmd = [], []
    for w in words(line) + [";"]:
        if w and set(w) <= set("|&;()<>"):
            out += _program(cmd)
            cmd = []
        else:
            cmd.append(w)
    return out


def _program(cmd: list[str]) -> list[tuple[str, list[str]]]:
    while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
        cmd = cmd[1:]  # VAR=value before the command
    for i, w in enumerate(cmd):
        if w == "kdfine" and i == 0 or (w == "kdfine" and i > 0 and cmd[i - 1] == "-m"):
            rest = cmd[i + 1:]
            return [("kdfine", rest[1:] if rest[:1] == ["--"] else rest)]
        if re.match(r"^bench/\w+\.(py|sh)$", w):
            return [(w, cmd[i + 1:])]
    return []


def console_commands(block: Block) -> list[str]:
    """The ``$ `` lines of a console block, with their continuation lines."""
    out, cont = [], False
    for ln in block.text.split("\n"):
        if ln.startswith("$ ") or cont:
            out.append(ln[2:] if ln.startswith("$ ") else ln)
            cont = ln.rstrip().endswith("\\")
    return out


def kdfine_commands(block: Block) -> list[tuple[str, list[str]]]:
    return [(p, a) for ln in logical_lines(block) for p, a in invocations(ln) if p == "kdfine"]


# ---------------------------------------------------------------- the options --help shows

def _click_root():
    import typer

    from kdfine.cli.app import app

    return typer.main.get_command(app)


def command_options() -> dict[str | None, set[str]]:
    """Each command's option names (None: the root's), from the Typer app that --help prints."""
    import click

    root = _click_root()
    ctx = click.Context(root)
    opts = {None: {o for p in root.params for o in (*p.opts, *p.secondary_opts)}}
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        opts[name] = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    return opts


def flag_errors(args: list[str], options: dict[str | None, set[str]]) -> list[str]:
    """What is wrong with one ``kdfine ARGS``: an unknown command or an unknown option."""
    name = args[0] if args and not args[0].startswith("-") else None
    if name is not None and name not in options:
        return [f"no command {name!r}"]
    allowed = options[name] | {"--debug", "--help", "-h"}
    flags = [a.split("=", 1)[0] for a in args if re.match(r"^--?[A-Za-z]", a)]
    return [f"kdfine {name or ''}: no option {f}" for f in flags if f not in allowed]


def bench_flag_errors(script: str, args: list[str]) -> list[str]:
    source = (ROOT / script).read_text()
    return [f"{script}: no {a}" for a in args if a.startswith("--") and a.split("=")[0] not in source]


# ---------------------------------------------------------------- tests of every block

def test_every_block_is_classified():
    """A block without a known language, or a shell block with an unknown reason, fails: no
    example is silently ignored."""
    bad = [f"{b.where}: info string {b.info!r}" for b in ALL
           if b.lang not in SHELL + OTHER or (b.lang in OTHER and b.needs) or b.needs - REASONS]
    assert not bad, "classify these blocks (docs/development.md):\n" + "\n".join(bad)
    assert sum(b.lang in SHELL and not b.needs for b in ALL) >= 20, "the guide lost its runnable examples"


def test_every_option_exists():
    """Each ``kdfine COMMAND --flag`` in every shell block (runnable or not) is an option of that
    command; each ``bench/`` script's ``--flag`` is one of that script."""
    options, bad = command_options(), []
    for b in (b for b in ALL if b.lang in SHELL):
        for line in logical_lines(b):
            for prog, args in invocations(line):
                errs = flag_errors(args, options) if prog == "kdfine" else bench_flag_errors(prog, args)
                bad += [f"{b.where}: {e}" for e in errs]
    assert not bad, "\n".join(bad)


def test_the_option_check_catches_a_wrong_option():
    options = command_options()
    assert flag_errors(["distill", "--teacher", "t", "--temperature", "4"], options) == \
        ["kdfine distill: no option --temperature"]
    assert flag_errors(["distil"], options) == ["no command 'distil'"]
    assert invocations("X=1 torchrun --nproc-per-node 2 -m kdfine -- eval --model m | jq .") == \
        [("kdfine", ["eval", "--model", "m"])]


def test_python_blocks_compile():
    for b in (b for b in ALL if b.lang == "python"):
        compile(b.text, b.where, "exec")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^ *```.*?^ *```", "", page.read_text(), flags=re.M | re.S)  # no '#' of code blocks
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_point_somewhere():
    """Every relative link of the README and the guide names an existing file, and its
    ``#anchor`` a heading of that file."""
    bad = []
    for page in PAGES:
        text = re.sub(r"^ *```.*?^ *```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, frag = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target}: no such file")
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                bad.append(f"{page.name}: {target}: no such heading")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- documented JSON keys

def documented_keys() -> dict[str, tuple[set[str], set[str]]]:
    """reference.md's JSON table: command -> (required top-level keys, optional ones)."""
    text = (ROOT / "docs" / "reference.md").read_text()
    table = text[text.index("## JSON output"):text.index("## Errors under `--json`")]
    out = {}
    for row in re.findall(r"^\| ((?:`[\w-]+`(?:, )?)+) \| `(\{[^`]*)`", table, re.M):
        keys = _top_keys(row[1].replace("\\|", "|"))
        for cmd in re.findall(r"`([^`]+)`", row[0]):
            out[cmd] = keys
    return out


def _top_keys(doc: str) -> tuple[set[str], set[str]]:
    required, optional, depth = set(), set(), 0
    for m in re.finditer(r'[{}\[\]]|"([^"]*)"(\?)?', doc):
        tok = m[0]
        if tok in "{[":
            depth += 1
        elif tok in "}]":
            depth -= 1
        elif depth == 1 and doc[:m.start()].rstrip()[-1:] in "{,":
            (optional if m[2] else required).add(m[1])
    return required, optional


def test_documented_keys_are_read():
    keys = documented_keys()
    assert {"train-teacher", "distill", "eval", "detect-noise", "info", "plot-log"} <= set(keys)
    assert {"path", "sha256", "metrics", "epochs"} <= keys["train-teacher"][0]
    assert "already_finished" in keys["distill"][1] and "models" in keys["eval"][0]


# ---------------------------------------------------------------- the fork server

def serve(path: str) -> None:
    """Import everything a command needs once, then fork a child per client connection."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import kdfine.api  # noqa: F401
    import kdfine.cli  # noqa: F401
    import kdfine.inference.onnx  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch.onnx  # noqa: F401

    _warm_up()
    zygote.accept_forever(path, functools.partial(zygote.supervise, run=_run_command))


def _warm_up() -> None:
    """A small pipeline before the first fork: every child inherits the modules it imported and
    the kernels oneDNN compiled for the digits' shapes instead of paying for them again."""
    import threading

    from kdfine import api
    from kdfine.options import TrainConfig

    with tempfile.TemporaryDirectory(prefix="kdfine-docs-warm-") as d:
        os.environ["KDFINE_CACHE"] = d
        t = api.train_teacher(f"{d}/t.safetensors", cfg=TrainConfig(epochs=1), quiet=True)
        api.distill(f"{d}/s.safetensors", [t["path"]], cfg=TrainConfig(epochs=1), quiet=True)
        api.evaluate([t["path"]], split="train", dump_features=f"{d}/f.npy", quiet=True)
    assert threading.active_count() == 1, "a thread outlived the warm-up: forking would copy its locks"


def capped(args: list[str]) -> list[str]:
    """Training commands run at most one epoch (docs/development.md)."""
    if not args or args[0] not in TRAINING:
        return args
    out = list(args)
    if "--epochs" in out:
        i = out.index("--epochs") + 1
        out[i] = str(min(int(out[i]), 1))
    else:
        out += ["--epochs", "1"]
    return out


def _run_command(argv: list[str]) -> int:
    """One ``kdfine ARGS`` of a page, in the forked child, its stdout recorded for the checks."""
    return _run_recorded(argv, Path(os.environ["KDFINE_DOCS_RECORD"]) / f"{time.monotonic_ns()}-{os.getpid()}")


def _run_recorded(argv: list[str], record: Path) -> int:
    from kdfine.cli import main

    real_stdout = os.dup(1)
    with open(f"{record}.out", "wb") as f:
        os.dup2(f.fileno(), 1)
    sys.argv, code, start = ["kdfine", *capped(argv)], 1, time.monotonic()
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(real_stdout, 1)
    data = Path(f"{record}.out").read_bytes()
    Path(f"{record}.json").write_text(json.dumps({"argv": argv, "code": code, "cwd": os.getcwd(),
                                                          "seconds": round(time.monotonic() - start, 2), "cpu_s": _cpu_seconds()}))
    try:
        os.write(1, data)
    except BrokenPipeError:
        pass
    return code


def _cpu_seconds() -> float:
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)  # a forked child's own, from the fork on
    return round(use.ru_utime + use.ru_stime, 2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The fork server, and ``kdfine`` and ``python`` on a PATH of their own."""
    home = tmp_path_factory.mktemp("docs")
    sock = os.path.join(tempfile.mkdtemp(prefix="kdfine-docs-", dir="/tmp"), "s")  # AF_UNIX: <= 107 bytes
    bin_dir = home / "bin"
    bin_dir.mkdir()
    (bin_dir / "kdfine").write_text(zygote.CLIENT.format(python=sys.executable))
    (bin_dir / "kdfine").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.Popen([sys.executable, __file__, "--serve", sock], env=env)
    deadline = time.monotonic() + 120
    while not os.path.exists(sock):
        assert proc.poll() is None and time.monotonic() < deadline, "the docs' fork server did not start"
        time.sleep(0.05)
    env.update(KDFINE_ZYGOTE=sock, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
               KDFINE_CACHE=str(home / "cache"))
    env.pop("KDFINE_DEBUG", None)
    yield env
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------- running a page

def make_files(root: Path) -> None:
    """The made-up files the examples use: a tiny image folder, new photos, single images."""
    from PIL import Image

    for k, (cls, colour) in enumerate({"cat": (200, 60, 40), "dog": (40, 180, 60), "fox": (50, 70, 210)}.items()):
        for i in range(8):
            (root / "photos" / cls).mkdir(parents=True, exist_ok=True)
            shade = tuple(min(255, c + 6 * i) for c in colour)
            Image.new("RGB", (12 + 2 * (i % 3), 12), shade).save(root / "photos" / cls / f"{i}.png")
        (root / "new_photos").mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), colour).save(root / "new_photos" / f"{cls}.png")
    Image.new("RGB", (20, 14), (200, 60, 40)).save(root / "more.jpg")
    Image.new("RGB", (14, 14), (40, 180, 60)).save(root / "photo.png")


def records(rec: Path) -> list[dict]:
    out = []
    for f in sorted(rec.glob("*.json")):
        out.append(dict(json.loads(f.read_text()), stdout=f.with_suffix(".out").read_bytes().decode()))
        f.unlink()
        f.with_suffix(".out").unlink()
    return out


def check_record(r: dict, keys: dict, expect_code: int = 0) -> list[str]:
    """The documented results of one ``kdfine`` command: its exit code, its output files, its
    ``--json`` keys."""
    argv, cwd = r["argv"], Path(r["cwd"])
    if r["code"] != expect_code:
        return [f"kdfine {' '.join(argv)}: exit {r['code']}, expected {expect_code}"]
    bad = []
    for i, a in enumerate(argv[:-1]):
        value = argv[i + 1]
        if a in OUTPUTS and value != "-" and r["code"] == 0 and not _written(cwd, value, a):
            bad.append(f"kdfine {' '.join(argv)}: {a} {value} was not written")
    if "--json" in argv and argv[0] in keys and r["code"] == 0:
        got = set(json.loads(r["stdout"]))
        missing = keys[argv[0]][0] - got
        bad += [f"kdfine {' '.join(argv)}: --json lacks the documented {sorted(missing)}"] if missing else []
    return bad


def _written(cwd: Path, value: str, option: str) -> bool:
    path = cwd / os.path.expanduser(value)
    return path.exists() or (option == "--plot" and any(path.parent.glob(path.name + ".*")))


def run_shell(block: Block, cwd: Path, env: dict) -> list[str]:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        return [f"exit {r.returncode}; stderr:\n{r.stderr[-2000:]}"]
    return []


def run_console(block: Block, cwd: Path, env: dict) -> list[str]:
    """Each ``$ `` command with its shown output: JSON with the same keys; ``echo $?``'s line
    is the previous command's exit code."""
    bad, steps = [], console_steps(block)
    for k, (cmd, shown) in enumerate(steps):
        if cmd.strip() == "echo $?":
            continue
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        nxt = steps[k + 1] if k + 1 < len(steps) else None
        want = int(nxt[1].strip()) if nxt and nxt[0].strip() == "echo $?" else 0
        if r.returncode != want:
            bad.append(f"$ {cmd}: exit {r.returncode}, shown {want}; stderr:\n{r.stderr[-1500:]}")
        if shown.lstrip().startswith("{") and _key_tree(json.loads(r.stdout)) != _key_tree(json.loads(shown)):
            bad.append(f"$ {cmd}: its JSON has other keys than shown:\n{r.stdout}")
    return bad


def console_steps(block: Block) -> list[tuple[str, str]]:
    steps, cont = [], False
    for ln in block.text.split("\n"):
        if ln.startswith("$ ") or cont:
            if cont:
                steps[-1] = (steps[-1][0][:-1] + ln, "")
            else:
                steps.append((ln[2:], ""))
            cont = ln.rstrip().endswith("\\")
        elif steps:
            steps[-1] = (steps[-1][0], steps[-1][1] + ln + "\n")
    return steps


def _key_tree(doc):
    return {k: _key_tree(v) for k, v in doc.items()} if isinstance(doc, dict) else None


RUNNABLE = [p for p in PAGES if any(b.lang in SHELL and not b.needs for b in blocks(p))]


def run_page(page: Path, server: dict, cwd: Path) -> list[str]:
    """Run the page's runnable blocks in order in ``cwd``; what went against the documentation."""
    make_files(cwd)
    rec = cwd.parent / f"{cwd.name}-records"
    rec.mkdir()
    env, keys, bad = dict(server, KDFINE_DOCS_RECORD=str(rec)), documented_keys(), []
    for b in (b for b in blocks(page) if b.lang in SHELL and not b.needs):
        console = b.lang == "console"
        errs = run_console(b, cwd, env) if console else run_shell(b, cwd, env)
        ran = records(rec)
        if not console:
            errs += [e for r in ran for e in check_record(r, keys)]
            errs += [] if ran or not kdfine_commands(b) else ["no kdfine command ran"]
        bad += [f"{b.where}: {e}" for e in errs]
    return bad


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.stem.lower() for p in RUNNABLE])
def test_examples_run(page: Path, server: dict, tmp_path: Path):
    """The page's runnable blocks, in order, in one directory: every block and every kdfine
    command succeeds (or exits as shown), writes its outputs and prints the documented JSON."""
    bad = run_page(page, server, tmp_path)
    assert not bad, "\n".join(bad)


BROKEN = """```sh
kdfine detect-noise --features missing.npy --out k.csv || true
```

```sh
kdfine list-archs > /dev/null
```

```console
$ kdfine detect-noise --features missing.npy --out k.csv --json
{"error": {"code": 3, "kind": "input", "text": "no such file"}}
$ echo $?
2
```
"""


def test_a_broken_example_is_reported(server: dict, tmp_path: Path):
    """The checks can fail: a kdfine command that fails behind ``|| true``, and a console block
    whose JSON keys and exit code differ from the ones shown."""
    page = tmp_path / "broken.md"
    page.write_text(BROKEN)
    (tmp_path / "run").mkdir()
    bad = run_page(page, server, tmp_path / "run")
    assert [e.split(":")[1] for e in bad] == ["1", "9", "9"], bad
    assert "exit 3, expected 0" in bad[0] and "exit 3, shown 2" in bad[1] and "other keys" in bad[2]


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2])

#!/usr/bin/env python3
"""Write man/kdfine.1 and one page per subcommand (man/kdfine-distill.1, ...).

The pages are built by walking the Click command tree that Typer builds from ``kdfine.cli.app``:
every option of every command with its type, default, allowed range and help text, grouped by
the same panels as ``--help``; each command's docstring gives NAME (first paragraph),
DESCRIPTION (the rest) and EXAMPLES (paragraphs starting with "Example:"). Output is plain
man(7) macros, deterministic (no date), ASCII (other characters become groff escapes).

    python scripts/gen_man.py            # (re)write man/
    python scripts/gen_man.py --check    # exit 1 if man/ is stale
    man -l man/kdfine-distill.1          # read a page without installing it
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import typer.main  # noqa: E402
from typer import _click as click  # noqa: E402  (Typer >= 0.26 vendors Click)
from typer.core import TyperArgument  # noqa: E402

import kdfine  # noqa: E402
from kdfine import errors  # noqa: E402
from kdfine.cli import EXIT_BROKEN_PIPE, app  # noqa: E402
from kdfine.options import declared_flag  # noqa: E402

PROG = "kdfine"
MANUAL = "kdfine manual"
DEFAULT_PANEL = "Options"

EXIT_STATUS = [
    (errors.EXIT_OK, "success"),
    (1, "internal error (a bug: rerun with --debug and report the traceback)"),
    (errors.EXIT_USAGE, "usage error: unknown option, bad option value, data spec, arch or noise spec"),
    (errors.EXIT_INPUT, "bad input data or file: corrupt or foreign checkpoint, shape or class mismatch, "
                        "NaN features, bad index list, unwritable output"),
    (errors.EXIT_DEVICE, "the requested device is not available"),
    (errors.EXIT_INTERRUPTED, "interrupted (Ctrl-C or SIGTERM); training saves its state first"),
    (EXIT_BROKEN_PIPE, "the reader of stdout stopped early (as in kdfine info x | head); nothing is printed"),
]

ENVIRONMENT = [
    ("KDFINE_CACHE", "Cache of decoded image folders, of the CPU precision probe and default --data-root parent "
                     "(default: ~/.cache/kdfine; without a home directory, a private kdfine-cache-UID "
                     "in the temporary directory)."),
    ("KDFINE_VERIFY_DATA", "Set to 1 to read and hash every image file of an image folder on every "
                           "command (the full content check) instead of trusting the fingerprint "
                           "remembered under the files' size, mtime, ctime and inode."),
    ("KDFINE_BF16_PROBE", "Set to 0 to skip the timed bf16 probe on CPUs with native bf16: --precision auto "
                          "then trains in fp32 on every CPU."),
    ("KDFINE_DEBUG", "Set to 1 to show tracebacks on errors, like --debug."),
    ("KDFINE_MAX_PIXELS", "Largest image file decoded, in pixels as its header declares (a number, or with a "
                          "K, M or G suffix: 200M; default 120M). Larger files, decompression bombs included, "
                          "are skipped with a warning, by predict and in image folders alike."),
    ("WORLD_SIZE, RANK, LOCAL_RANK", "Set by torchrun; kdfine then trains with DistributedDataParallel "
                                     "across the ranks."),
]

CONVENTIONS = ("stdout is data, stderr is for people. Progress (a bar on a terminal, one line per epoch "
               "otherwise) and summaries go to stderr; stdout carries only the result: the written path, "
               "CSV with --out -, or exactly one JSON document with --json. -q silences stderr except errors. "
               "Errors are one line on stderr naming the file and the fix; no command leaves a partial "
               "output file.")


# ------------------------------------------------------------------------------------- roff


def esc(text: str) -> str:
    """Escape free text for roff: backslashes, hyphens, and non-ASCII characters."""
    out = []
    for ch in text.replace("\\", "\\e"):
        if ch == "-":
            out.append("\\-")
        elif ord(ch) > 126 or (ord(ch) < 32 and ch not in "\n"):
            out.append(f"\\[u{ord(ch):04X}]")
        else:
            out.append(ch)
    return "".join(out)


def line(text: str) -> str:
    """One input line of text: a leading '.' or "'" would be read as a request."""
    t = esc(" ".join(text.split()))
    return "\\&" + t if t[:1] in (".", "'") else t


def bold(text: str) -> str:
    return f"\\fB{esc(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{esc(text)}\\fR"


# ------------------------------------------------------------------------------------- model


@dataclass
class Opt:
    names: list[str]  # long first, e.g. ["--out", "-o"]
    negative: list[str]
    metavar: str | None  # None for flags
    help: str
    default: str | None
    required: bool
    repeatable: bool
    range: str | None
    panel: str
    argument: bool = False


def _metavar(param, ctx) -> tuple[str | None, bool]:
    """(metavar, repeatable) from Typer's displayed type, e.g. '<int range>' -> 'INT'."""
    if getattr(param, "is_flag", False):
        return None, False
    shown = (param.display_type_rich(ctx=ctx) or "").strip("<>")
    repeatable = bool(getattr(param, "multiple", False))
    inner = re.sub(r"^list\[(.*)\]$", r"\1", shown)
    base = inner.split()[0] if inner else "value"
    name = {"str": "TEXT", "int": "INT", "float": "FLOAT", "bool": "BOOL", "path": "PATH"}.get(base, base.upper())
    return name, repeatable


def _default(param) -> str | None:
    d = param.default
    if getattr(param, "is_flag", False):
        if param.secondary_opts:
            return param.opts[0] if d else param.secondary_opts[0]
        return "on" if d else None  # a plain flag is off unless given
    if d is None or getattr(param, "multiple", False) or param.required:
        return None
    if isinstance(d, float):
        return repr(d)
    return str(d)


def _range(param, command: str) -> str | None:
    """The declared range of a kdfine option (:mod:`kdfine.options`), else Typer's (CLI-only options)."""
    meta = declared_flag(command, param.name)
    if meta is not None:
        return meta.range_text()
    typer_range = param._get_number_range_help_str() if hasattr(param, "_get_number_range_help_str") else None
    return _range_text(typer_range) if typer_range else None


def options(cmd, ctx) -> list[Opt]:
    out = []
    params = list(cmd.params)
    help_opt = cmd.get_help_option(ctx)
    if help_opt is not None:
        params.append(help_opt)
    for p in params:
        if getattr(p, "hidden", False):
            continue
        is_arg = isinstance(p, TyperArgument)
        metavar, repeatable = _metavar(p, ctx)
        if is_arg:
            metavar = p.metavar or p.name.upper()
        names = sorted(p.opts, key=lambda s: (not s.startswith("--"), s)) if not is_arg else [metavar]
        out.append(Opt(names=names, negative=list(p.secondary_opts), metavar=metavar,
                       help=_unescape(" ".join((p.help or "").split())), default=_default(p) if not is_arg else None,
                       required=bool(p.required), repeatable=repeatable,
                       range=None if is_arg else _range(p, cmd.name),
                       panel=getattr(p, "rich_help_panel", None) or ("Arguments" if is_arg else DEFAULT_PANEL),
                       argument=is_arg))
    return out


def _unescape(text: str) -> str:
    """Help text as people read it: ``\\[`` is rich markup's escape of a literal ``[`` (``kdfine[export]``)."""
    return text.replace("\\[", "[")


def split_doc(doc: str) -> tuple[str, list[str], list[str]]:
    """(summary, description paragraphs, examples) of a command docstring."""
    paras = [" ".join(p.split()) for p in inspect.cleandoc(doc or "").split("\n\n") if p.strip()]
    if not paras:
        return "", [], []
    examples = [p.split(":", 1)[1].strip() for p in paras[1:] if p.lower().startswith("example")]
    rest = [p for p in paras[1:] if not p.lower().startswith("example")]
    return paras[0], rest, examples


# ------------------------------------------------------------------------------------- pages


def _th(name: str) -> str:
    # no hyphenation and ragged right: option names and paths stay whole and readable
    return f'.TH {esc(name.upper())} 1 "" "{PROG} {kdfine.__version__}" "{MANUAL}"\n.nh\n.ad l'


def _option_block(o: Opt) -> list[str]:
    if o.argument:
        head = italic(o.names[0]) + (" ..." if o.repeatable else "")
    else:
        spelled = [bold(n) + (" " + italic(o.metavar) if o.metavar else "") for n in o.names]
        spelled += [bold(n) for n in o.negative]
        head = ", ".join(spelled)
    notes = []
    if o.required:
        notes.append("Required.")
    if o.repeatable:
        notes.append("Repeatable.")
    if o.range:
        notes.append(f"{o.range}.")
    if o.default is not None:
        notes.append(f"Default: {o.default}.")
    return [".TP", head, line(" ".join([o.help] + notes).strip())]


def _range_text(r: str) -> str:
    """Typer's 'x>=1', '0<=x<=1' as words."""
    r = r.replace(" ", "")
    m = re.fullmatch(r"([-\d.e]+)<=x<=([-\d.e]+)", r)
    if m:
        return f"From {m[1]} to {m[2]}"
    m = re.fullmatch(r"x([<>]=?)([-\d.e]+)", r)
    if m:
        return {">=": "At least", "<=": "At most", ">": "Above", "<": "Below"}[m[1]] + f" {m[2]}"
    return f"Range: {r}"


def _options_section(opts: list[Opt], title: str = "OPTIONS") -> list[str]:
    panels: dict[str, list[Opt]] = {}
    for o in opts:
        panels.setdefault(o.panel, []).append(o)
    order = [p for p in ("Arguments", DEFAULT_PANEL) if p in panels] + \
            [p for p in panels if p not in ("Arguments", DEFAULT_PANEL)]
    out = [f".SH {title}"]
    for panel in order:
        if len(panels) > 1:
            out.append(f".SS {line(panel)}")
        for o in panels[panel]:
            out += _option_block(o)
    return out


def _synopsis(full: str, opts: list[Opt]) -> list[str]:
    words = [bold(full)]
    for o in opts:
        if o.argument:
            words.append(italic(o.names[0]) + (" ..." if o.repeatable else ""))
        elif o.required:
            words.append(bold(o.names[0]) + " " + italic(o.metavar or ""))
    words.append(f"[{italic('OPTIONS')}]")
    return [".SH SYNOPSIS", " ".join(words)]


def _examples(examples: list[str]) -> list[str]:
    if not examples:
        return []
    out = [".SH EXAMPLES"]
    for ex in examples:
        out += [".PP", ".RS 4", ".nf", line(ex), ".fi", ".RE"]
    return out


def _common_tail(see_also: list[str]) -> list[str]:
    out = [".SH EXIT STATUS"]
    for code, text in EXIT_STATUS:
        out += [".TP", bold(str(code)), line(text)]
    out += [".SH SEE ALSO", ",\n".join(f".BR {esc(n)} (1)" for n in see_also)]
    return out


def command_page(name: str, cmd, ctx, all_names: list[str]) -> str:
    summary, desc, examples = split_doc(cmd.help)
    opts = options(cmd, ctx)
    full = f"{PROG} {name}"
    out = [_th(f"{PROG}-{name}"), ".SH NAME", f"{esc(PROG + '-' + name)} \\- {line(summary)}"]
    out += _synopsis(full, opts)
    out += [".SH DESCRIPTION", line(summary)]
    for p in desc:
        out += [".PP", line(p)]
    out += [".PP", line(CONVENTIONS)]
    out += _options_section(opts)
    out += _examples(examples)
    out += _common_tail([PROG] + [f"{PROG}-{n}" for n in all_names if n != name])
    return "\n".join(out) + "\n"


def root_page(group, ctx, names: list[str]) -> str:
    summary, desc, examples = split_doc(group.help)
    first = summary.split(":")[0].rstrip(".")
    out = [_th(PROG), ".SH NAME", f"{esc(PROG)} \\- {line(first[0].lower() + first[1:])}"]
    out += [".SH SYNOPSIS",
            f"{bold(PROG)} [{bold('--version')}] [{bold('--debug')}] {italic('COMMAND')} [{italic('OPTIONS')}]"]
    out += [".SH DESCRIPTION", line(summary)]
    for p in desc:
        out += [".PP", line(p)]
    out += [".PP", line(f"Each command has its own page, {PROG}-COMMAND(1), and its own --help.")]
    out += [".SH COMMANDS"]
    panels: dict[str, list[str]] = {}
    for n in names:
        panels.setdefault(getattr(group.get_command(ctx, n), "rich_help_panel", None) or "Commands", []).append(n)
    for panel, members in panels.items():
        out.append(f".SS {line(panel)}")
        for n in members:
            s, _, _ = split_doc(group.get_command(ctx, n).help)
            out += [".TP", f"{bold(n)} (see {bold(f'{PROG}-{n}')}(1))", line(s)]
    out += _options_section(options(group, ctx), "GLOBAL OPTIONS")
    out += [".SH CONVENTIONS", line(CONVENTIONS)]
    out += [".SH ENVIRONMENT"]
    for var, text in ENVIRONMENT:
        out += [".TP", bold(var), line(text)]
    out += [".SH FILES", ".TP", bold("completions/kdfine.bash, completions/_kdfine, completions/kdfine.fish"),
            line("Shell completion scripts for bash, zsh and fish (or run kdfine --install-completion).")]
    out += _examples(examples)
    out += _common_tail([f"{PROG}-{n}" for n in names])
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    """File name -> page text, for the root command and every subcommand."""
    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name=PROG)
    names = group.list_commands(ctx)
    out = {f"{PROG}.1": root_page(group, ctx, names)}
    for n in names:
        cmd = group.get_command(ctx, n)
        if getattr(cmd, "hidden", False):
            continue
        out[f"{PROG}-{n}.1"] = command_page(n, cmd, click.Context(cmd, info_name=n, parent=ctx), names)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(ROOT / "man"), help="where to write (default: man/)")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out-dir; exit 1 if stale")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    want = pages()
    if args.check:
        have = {p.name for p in out.glob("*.1")} if out.is_dir() else set()
        stale = sorted(n for n, t in want.items() if not (out / n).is_file() or (out / n).read_text() != t)
        extra = sorted(have - set(want))
        if stale or extra:
            print(f"stale: {', '.join(stale + extra)}; run `make man`", file=sys.stderr)
            return 1
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{PROG}*.1"):
        if old.name not in want:
            old.unlink()
    for name, text in want.items():
        (out / name).write_text(text)
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Typer app and what every command shares: errors to exit codes, stdout for results, stderr
for people, the entry point.

stdout carries only results (a written path, CSV with ``--out -``, or one JSON document with
``--json``); people read stderr. Errors are one line on stderr with a documented exit code:
2 usage, 3 bad input data or file, 4 device unavailable, 130 interrupted, 141 broken pipe. Under
``--json`` an error is also one JSON document on stdout, ``{"error": {"code", "kind", "message"}}``
(:func:`error_document`), so that a program reading stdout always gets JSON.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import traceback
import warnings
from typing import Annotated, Any, Callable

import typer

import kdfine
from kdfine.errors import EXIT_INPUT, EXIT_INTERRUPTED, KdfineError, os_error
from kdfine.files.text import printable

app = typer.Typer(
    name="kdfine",
    help="Distil small, accurate image classifiers from imperfect data: knowledge distillation "
         "(KL and MSE on logits) and FINE noisy-label detection.\n\n"
         "Pipeline: train-teacher -> eval --dump-features -> detect-noise -> train-teacher --keep -> distill -> eval. "
         "Every command has --help with an example; --json prints one JSON document on stdout.\n\n"
         "Example: kdfine train-teacher --out t.safetensors | kdfine distill --teacher - --out s.safetensors",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

TRAIN, EVAL, NOISE, UTIL = "1. Train", "2. Evaluate", "3. Find noisy labels", "4. Inspect and plot"
_state = {"debug": bool(os.environ.get("KDFINE_DEBUG")), "quiet": False, "rank": 0, "json": False}
#: the ``kind`` of each exit code in the JSON error document.
ERROR_KINDS = {1: "internal", 2: "usage", 3: "input", 4: "device", 130: "interrupted"}


def _stderr_line(text: str) -> None:
    """One line on stderr in one write: under torchrun every rank shares the pipe, and print's
    separate write of the newline lets another rank's line land in between. Control characters
    (from a file or class name in the message) are escaped: the terminal never obeys them."""
    sys.stderr.write(printable(text) + "\n")
    sys.stderr.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if not _state["quiet"] and not _state["rank"]:  # under torchrun, rank 0 speaks for all
        _stderr_line(f"kdfine: warning: {str(message).splitlines()[0]}")


def command(fn: Callable) -> Callable:
    """Turn kdfine's exceptions into one stderr line and the documented exit code (with
    ``--debug``, the traceback first). SIGTERM is treated like Ctrl-C (exit 130). Under torchrun,
    only rank 0 writes stdout, and other ranks name themselves in their error lines."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kdfine.runtime.launch import launch_rank

        _state["quiet"] = bool(kwargs.get("quiet"))
        _state["json"] = bool(kwargs.get("json_out"))
        _state["rank"] = launch_rank()
        warnings.showwarning = _show_warning
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", module="torch")
        from kdfine.runtime.signals import sigterm_as_interrupt

        stdout, restore_sigterm = sys.stdout, sigterm_as_interrupt()
        if _state["rank"]:
            sys.stdout = open(os.devnull, "w")  # results are rank 0's to print
        ok = False  # teardown waits for the peers only after a success
        try:
            result = fn(*args, **kwargs)
            ok = True
            return result
        except KdfineError as e:
            _fail(str(e), e.exit_code, e)
        except KeyboardInterrupt as e:
            _fail("interrupted", EXIT_INTERRUPTED, e)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BrokenPipeError:  # the reader of stdout stopped early (`| head`, `| true`): quiet, like any tool
            _broken_pipe()
        except OSError as e:
            _fail(str(os_error(e)), EXIT_INPUT, e)
        except Exception as e:
            dist = sys.modules.get("kdfine.runtime.distributed")
            if dist is not None and dist.lost_peer(e):
                _fail("another process of this torchrun job stopped; its error is reported above", 1, e)
            _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1, e)
        finally:
            if sys.stdout is not stdout:
                sys.stdout.close()
                sys.stdout = stdout
            restore_sigterm()
            if "kdfine.runtime.distributed" in sys.modules:  # never imported (detect-noise, info): nothing to tear down
                sys.modules["kdfine.runtime.distributed"].teardown(clean=ok)

    return wrapper


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    if _state["debug"] and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    who = f" (rank {_state['rank']})" if _state.get("rank") else ""
    line = message.splitlines()[0] if message else "failed"
    _stderr_line(f"kdfine: error{who}: {line}")
    if _state["json"] and not _state["rank"]:
        _json_error(line, code)
    raise typer.Exit(code)


def error_document(message: str, code: int) -> dict[str, Any]:
    """What ``--json`` prints on stdout when a command fails: the exit code, its kind (usage,
    input, device, interrupted, internal) and the message of the stderr line."""
    return {"error": {"code": code, "kind": ERROR_KINDS.get(code, "error"), "message": message}}


def _json_error(message: str, code: int) -> None:
    try:
        sys.stdout.write(json.dumps(error_document(message, code), indent=2) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass  # stdout is gone: the stderr line and the exit code still tell


def emit_json(doc: Any) -> None:
    write_stdout(json.dumps(_clean(doc), indent=2, sort_keys=False) + "\n")


def emit_line(text: str) -> None:
    write_stdout(text + "\n")


EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE


def write_stdout(text: str) -> None:
    """The result, on rank 0. A reader that stopped early (``kdfine info x | head``) ends the
    command quietly, as it would any Unix tool."""
    if not is_main():
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _broken_pipe()


def _broken_pipe() -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    raise typer.Exit(EXIT_BROKEN_PIPE) from None


def _clean(x):
    """JSON has no NaN: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


#: the width of text for people when stderr is not a terminal: wide enough that nothing is cut
#: (rich would use 80 columns and truncate table cells, e.g. two models' paths).
UNBOUNDED_WIDTH = 10_000


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else UNBOUNDED_WIDTH)


def is_main() -> bool:
    """Rank 0 of a torchrun job, or the only process; never imports torch for commands that do not."""
    mod = sys.modules.get("kdfine.runtime.distributed")
    return mod is None or mod.context().is_main


def note(text: str, quiet: bool) -> None:
    """One line for people on stderr (rank 0, unless quiet)."""
    if not quiet and is_main():
        _stderr().print(printable(text), markup=False)


def show(items: list[Any], quiet: bool) -> None:
    """Tables and lines from :mod:`kdfine.cli.render` on stderr (rank 0, unless quiet)."""
    if quiet or not is_main():
        return
    con = _stderr()
    for item in items:
        if isinstance(item, str):
            con.print(printable(item), markup=False, soft_wrap=True)  # one line each, never wrapped
        else:
            con.print(item)


def _version(value: bool) -> None:
    if value:
        print(f"kdfine {kdfine.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors (also KDFINE_DEBUG=1).")] = False,
) -> None:
    if debug:
        _state["debug"] = True


def main() -> None:
    """Console entry point. ``--debug`` is accepted anywhere on the command line. A usage error
    (a bad option value, a missing option) is one line on stderr and exit 2, like kdfine's own."""
    try:  # typer >= 0.23 carries its own copy of click
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
    except ImportError:  # pragma: no cover - older typer on click
        from click.exceptions import ClickException, NoArgsIsHelpError

    if "--debug" in sys.argv[1:]:
        _state["debug"] = True
        sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--debug"]
    try:
        code = app(prog_name="kdfine", standalone_mode=False)
    except NoArgsIsHelpError as e:
        e.show()
        code = e.exit_code
    except ClickException as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = " ".join(e.format_message().replace("Value error, ", "").split())
        _stderr_line(f"kdfine: error: {message}{hint}")
        code = e.exit_code
        if "--json" in sys.argv[1:]:  # a usage error found before the command ran: still one JSON document
            _json_error(f"{message}{hint}", code)
    except typer.Abort:
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)

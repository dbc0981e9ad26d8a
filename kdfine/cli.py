"""The ``kdfine`` command line: one function per subcommand, a thin shell over :mod:`kdfine.api`.

stdout carries only results (a written path, CSV with ``--out -``, or one JSON document with
``--json``); people read stderr. Errors are one line on stderr with a documented exit code:
2 usage, 3 bad input data or file, 4 device unavailable, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import traceback
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer

import kdfine
from kdfine.errors import EXIT_INPUT, EXIT_INTERRUPTED, KdfineError
from kdfine.options import (P_DEVICE, P_OUT, P_TRAIN, TEACHER_LOSS_FLAG, TEACHER_ONLY, DataOptions, DetectOptions,
                            EvalOptions, Flag, ModelOptions, TrainConfig)

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
_state = {"debug": bool(os.environ.get("KDFINE_DEBUG")), "quiet": False, "rank": 0}

# ------------------------------------------------------------------------------------- options
# Options shared by several commands are fields of the dataclasses in kdfine.options, declared
# there once; `takes` adds them to a command. The few below belong to the CLI alone.

DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.",
                                        rich_help_panel=P_DEVICE)]
LogOpt = Annotated[Optional[str], typer.Option("--log", help="Write one JSON line per epoch to this file.",
                                               rich_help_panel=P_OUT)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the state saved beside --out after "
                                         "every epoch.", rich_help_panel=P_TRAIN)]
ForceOpt = Annotated[bool, typer.Option("--force", help="With --resume: accept options that differ from the "
                                        "recorded ones.", rich_help_panel=P_TRAIN)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead.",
                                       rich_help_panel=P_OUT)]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress or summaries on stderr (errors still).",
                                        rich_help_panel=P_OUT)]
NoisyOutOpt = Annotated[Optional[str], typer.Option("--noisy-out", help="Also write the rejected samples as CSV.",
                                                    rich_help_panel=P_OUT)]


ArchOpt = Annotated[Optional[str], typer.Option(
    "--arch", help="Architecture: a built-in name or family, tv:NAME (torchvision) or timm:NAME; `kdfine list-archs` "
                   "lists them. Default: by image size (under 64 px a small CNN, else a torchvision network).",
    rich_help_panel=P_TRAIN)]


def _option_param(name: str, meta: Flag, hint: Any, default: Any) -> inspect.Parameter:
    """A command parameter declared by the metadata of an option-dataclass field."""
    typ = hint
    if meta.choices is not None:
        typ = Literal[tuple(meta.choices())]  # Typer shows, completes and checks the library's own list
        if type(None) in typing.get_args(hint):
            typ = Optional[typ]
    decls = [meta.flag] + ([meta.short] if meta.short else [])
    complete = None if meta.completions is None else (
        lambda incomplete: [v for v in meta.completions() if v.startswith(incomplete)])
    info = typer.Option(*decls, help=meta.help, rich_help_panel=meta.panel, min=meta.min, autocompletion=complete)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[typ, info])


def takes(exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
          flags: dict[str, Flag] | None = None, **groups: type) -> Callable:
    """Add the fields of option dataclasses to a command: ``@takes(data=DataOptions,
    cfg=TrainConfig)`` gives the command every field as an option and calls it with
    ``data=DataOptions(...)`` and ``cfg=TrainConfig(...)``. ``exclude`` names fields the command
    does not take (they keep their dataclass defaults, or ``defaults``); ``defaults`` overrides a
    field's default for this command; ``flags`` its declaration (another help, other choices)."""
    defaults, flags = defaults or {}, flags or {}

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for n, p in sig.parameters.items() if n not in groups]
        added: dict[str, tuple[str, str]] = {}  # parameter name -> (group, field)
        params = []
        for group, cls in groups.items():
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if "cli" not in f.metadata or f.name in exclude:
                    continue
                if f.name in added or any(p.name == f.name for p in own):
                    raise TypeError(f"{fn.__name__}: option {f.name} declared twice")
                added[f.name] = (group, f.name)
                params.append(_option_param(f.name, flags.get(f.name, f.metadata["cli"]), hints[f.name],
                                            defaults.get(f.name, f.default)))

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values: dict[str, dict[str, Any]] = {g: {} for g in groups}
            for name, (group, field_name) in added.items():
                values[group][field_name] = kwargs.pop(name)
            for group, cls in groups.items():
                fixed = {k: v for k, v in defaults.items() if k in exclude and k in {f.name for f in dataclasses.fields(cls)}}
                kwargs[group] = cls(**{**fixed, **values[group]})
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + params)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + params}
        return wrapper

    return decorate


# ------------------------------------------------------------------------------------- plumbing


def _stderr_line(text: str) -> None:
    """One line on stderr in one write: under torchrun every rank shares the pipe, and print's
    separate write of the newline lets another rank's line land in between."""
    sys.stderr.write(text + "\n")
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
        from kdfine.launch import launch_rank

        _state["quiet"] = bool(kwargs.get("quiet"))
        _state["rank"] = launch_rank()
        warnings.showwarning = _show_warning
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", module="torch")
        from kdfine.signals import sigterm_as_interrupt

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
            where = f" {e.filename}" if getattr(e, "filename", None) else ""
            _fail(f"cannot access{where}: {e.strerror or e}", EXIT_INPUT, e)
        except Exception as e:
            dist = sys.modules.get("kdfine.distributed")
            if dist is not None and dist.lost_peer(e):
                _fail("another process of this torchrun job stopped; its error is reported above", 1, e)
            _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1, e)
        finally:
            if sys.stdout is not stdout:
                sys.stdout.close()
                sys.stdout = stdout
            restore_sigterm()
            if "kdfine.distributed" in sys.modules:  # never imported (detect-noise, info): nothing to tear down
                sys.modules["kdfine.distributed"].teardown(clean=ok)

    return wrapper


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    if _state["debug"] and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    who = f" (rank {_state['rank']})" if _state.get("rank") else ""
    _stderr_line(f"kdfine: error{who}: {message.splitlines()[0] if message else 'failed'}")
    raise typer.Exit(code)


def _emit_json(doc: Any) -> None:
    _write_stdout(json.dumps(_clean(doc), indent=2, sort_keys=False) + "\n")


def _emit_line(text: str) -> None:
    _write_stdout(text + "\n")


EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE


def _write_stdout(text: str) -> None:
    """The result, on rank 0. A reader that stopped early (``kdfine info x | head``) ends the
    command quietly, as it would any Unix tool."""
    if not _is_main():
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


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _is_main() -> bool:
    """Rank 0 of a torchrun job, or the only process; never imports torch for commands that do not."""
    mod = sys.modules.get("kdfine.distributed")
    return mod is None or mod.context().is_main


def _note(text: str, quiet: bool) -> None:
    """One line for people on stderr (rank 0, unless quiet)."""
    if not quiet and _is_main():
        _stderr().print(text, markup=False)


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


# ------------------------------------------------------------------------------------- commands


def _show(items: list[Any], quiet: bool) -> None:
    """Tables and lines from :mod:`kdfine.render` on stderr (rank 0, unless quiet)."""
    if quiet or not _is_main():
        return
    con = _stderr()
    for item in items:
        if isinstance(item, str):
            con.print(item, markup=False, soft_wrap=True)  # one line each, never wrapped
        else:
            con.print(item)


def _training_done(result: dict[str, Any], as_json: bool, quiet: bool) -> None:
    from kdfine.render import train_summary

    _show([train_summary(result)], quiet)
    _emit_result(result, as_json)


def _emit_result(doc: dict[str, Any], as_json: bool) -> None:
    """stdout of a command that writes one file: the JSON document, or the file's path alone."""
    if as_json:
        _emit_json(doc)
    else:
        _emit_line(doc["path"])


@app.command("train-teacher", rich_help_panel=TRAIN)
@command
@takes(data=DataOptions, cfg=TrainConfig, model=ModelOptions, exclude=("tau", "alpha"), flags={"loss": TEACHER_LOSS_FLAG})
def train_teacher(
    out: Annotated[str, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors).", rich_help_panel=P_OUT)],
    data: DataOptions, cfg: TrainConfig, model: ModelOptions,
    arch: ArchOpt = None, device: DeviceOpt = "auto", resume: ResumeOpt = False, force: ForceOpt = False,
    log: LogOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Train a classifier (a teacher); print the checkpoint path. Noisy labels: --loss gce|sce, --fine-strategy.

    Example: kdfine train-teacher --data cifar10 --arch wrn-28-4 --label-noise sym:0.4 --out teacher.safetensors
    """
    from kdfine import api

    result = api.train_teacher(out, arch=arch, data=data, cfg=cfg, model=model, device=device, log=log,
                               resume=resume, force=force, quiet=quiet)
    _training_done(result, json_out, quiet)


@app.command("distill", rich_help_panel=TRAIN)
@command
@takes(data=DataOptions, cfg=TrainConfig, model=ModelOptions, defaults={"loss": "mse"}, exclude=TEACHER_ONLY)
def distill(
    teacher: Annotated[list[str], typer.Option("--teacher", "-t", help="Teacher checkpoint; repeat for an ensemble "
                                               "(logits averaged); '-' reads the path from stdin.",
                                               rich_help_panel=P_TRAIN)],
    out: Annotated[str, typer.Option("--out", "-o", help="Student checkpoint to write.", rich_help_panel=P_OUT)],
    data: DataOptions, cfg: TrainConfig, model: ModelOptions,
    arch: ArchOpt = None, device: DeviceOpt = "auto", resume: ResumeOpt = False, force: ForceOpt = False,
    log: LogOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Distil teacher(s) into a smaller student; print the student's path.

    Example: kdfine train-teacher --out t.safetensors | kdfine distill --teacher - --loss mse --out s.safetensors
    """
    from kdfine import api

    result = api.distill(out, teacher, arch=arch, data=data, cfg=cfg, model=model, device=device, log=log,
                         resume=resume, force=force, quiet=quiet)
    _training_done(result, json_out, quiet)


@app.command("eval", rich_help_panel=EVAL)
@command
@takes(data=DataOptions, ev=EvalOptions, exclude=("augment", "keep", "stream"))
def eval_(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Checkpoint to evaluate; repeat to compare.")],
    data: DataOptions, ev: EvalOptions,
    teacher: Annotated[Optional[list[str]], typer.Option(
        "--teacher", "-t", help="Also report agreement with this teacher (logits averaged when repeated).")] = None,
    dump_features: Annotated[Optional[str], typer.Option(
        "--dump-features", help="Write penultimate features (N, D) .npy with sidecars (labels, logits, json, truth).",
        rich_help_panel=P_OUT)] = None,
    device: DeviceOpt = "auto",
    plot: Annotated[Optional[str], typer.Option(
        "--plot", help="Draw reliability diagrams and confusion matrices: FILE.png (or .pdf, .svg) for one figure, "
                       "any other PREFIX for PREFIX.reliability.png and PREFIX.confusion.png (needs matplotlib).",
        rich_help_panel=P_OUT)] = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Top-1/top-5, NLL and ECE of checkpoints; teacher agreement; feature dumps for detect-noise.

    Example: kdfine eval --model s.safetensors --teacher t.safetensors --plot s-eval.png --json
    """
    from kdfine.outputs import Outputs

    runs: list[dict[str, Any]] = []
    outs = Outputs()  # the dump and the plots land together, or none of them
    if plot:  # before importing the library: a missing matplotlib fails at once
        from kdfine import plots

        plots.require()
        for p in plots.evaluation_paths(plot):
            outs.add(p, "--plot")

    def collect(ck, logits, ds) -> None:  # the logits of each model, for --plot
        runs.append({"name": Path(ck.path).name, "logits": logits, "labels": ds.labels, "classes": ds.classes})

    from kdfine import api
    from kdfine.render import eval_report

    with outs:
        res = api.evaluate(model, data=data, split=ev.split, teachers=teacher, dump_features=dump_features,
                           device=device, batch_size=ev.batch_size, precision=ev.precision,
                           on_logits=collect if plot else None, outputs=outs, quiet=quiet)
        if plot and _is_main():
            res["plots"] = _stage_eval_plots(outs, plot, runs)
        if _is_main():
            outs.commit()
    if json_out:
        _emit_json(res)
    else:
        _show(eval_report(res), quiet)
    if res.get("plots"):
        _note(f"wrote {', '.join(res['plots'])}", quiet)


def _stage_eval_plots(outs, plot: str, runs: list[dict[str, Any]]) -> list[str]:
    """Draw the evaluation figures under a temporary prefix beside ``plot``, claimed by ``outs``."""
    from kdfine import plots

    p = Path(plot)
    tmp = str(p.with_name(f".kdfine-{os.urandom(4).hex()}-{p.name}"))
    finals = plots.evaluation_paths(plot)
    for final, staged in zip(finals, plots.evaluation_paths(tmp)):
        outs.claim(final, staged)
    plots.evaluation_figures(tmp, runs)
    return [str(f) for f in finals]


@app.command("detect-noise", rich_help_panel=NOISE)
@command
@takes(detect=DetectOptions)
def detect_noise(
    features: Annotated[str, typer.Option("--features", "-f", help="Feature dump (N, D) .npy from eval "
                                          "--dump-features; its sidecars give labels, logits and truth.")],
    out: Annotated[str, typer.Option("--out", "-o", help="CSV of the samples kept as clean "
                                     "(index,label,score,p_clean); '-' for stdout.", rich_help_panel=P_OUT)],
    detect: DetectOptions,
    labels: Annotated[Optional[str], typer.Option("--labels", help="Labels (.npy or CSV) instead of the dump's "
                                                  "sidecar.")] = None,
    vectors_from: Annotated[Optional[str], typer.Option(
        "--vectors-from", help="Compute class eigenvectors from these indices only (a previous clean CSV).")] = None,
    noisy_out: NoisyOutOpt = None,
    truth: Annotated[Optional[str], typer.Option("--truth", help="True labels .npy, to report precision/recall "
                                                 "(default: the dump's truth sidecar).")] = None,
    plot: Annotated[Optional[str], typer.Option(
        "--plot", help="Draw per-class score histograms with the split, coloured by the truth when known "
                       "(.png, .pdf or .svg; needs matplotlib).", rich_help_panel=P_OUT)] = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Find wrong labels with FINE: per-class eigenvector alignment, 2-component mixture split.

    Example: kdfine detect-noise --features f.npy --out clean_idx.csv --noisy-out noisy_idx.csv
    """
    from kdfine.errors import UsageError

    if out == "-" and json_out:
        raise UsageError("--out - and --json both want stdout; write the CSV to a file")
    from kdfine.outputs import Outputs

    outs = Outputs()  # the CSVs and the plot land together, or none of them
    if plot:  # before importing the library: a missing matplotlib fails at once
        from kdfine import plots

        plots.require()
        plots.check_image_path(plot)
        outs.add(plot, "--plot")
    from kdfine import api  # torch-free: detect-noise never loads torch
    from kdfine.render import detection_report

    with outs:
        report, det, y, true = api.detect_noise(features, out, detect=detect, labels=labels, truth=truth,
                                                vectors_from=vectors_from, noisy_out=noisy_out, outputs=outs)
        if plot:
            outs.stage(plot, lambda tmp: _plot_detection(str(tmp), features, det, y, true))
            report["plot"] = plot
        outs.commit()
    if json_out:
        _emit_json(report)
    else:
        _show(detection_report(report), quiet)
        if plot:
            _note(f"wrote {plot}", quiet)


def _plot_detection(path: str, features_path: str, det, labels, true) -> str:
    from kdfine import plots
    from kdfine.features import read_dump
    from kdfine.render import METHOD_TITLES

    names = read_dump(features_path).info.get("classes")
    k = int(labels.max()) + 1 if labels.size else 1
    k = max(k, max((c.label + 1 for c in det.classes), default=k))
    if not names or len(names) < k:
        names = [str(c) for c in range(k)]
    thresholds = [float("nan")] * len(names)
    for c in det.classes:
        thresholds[c.label] = c.threshold
    return plots.score_histograms(path, det.scores, labels, det.keep, names,
                                  is_clean=None if true is None else labels == true, thresholds=thresholds,
                                  title=f"{METHOD_TITLES.get(det.method, det.method)} of {Path(features_path).name}",
                                  **({"xlabel": "p(label | x) from the logits"} if det.method == "small-loss" else {}))


@app.command("clean", rich_help_panel=NOISE)
@command
@takes(data=DataOptions, detect=DetectOptions, exclude=("augment", "keep", "stream"))
def clean(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint whose features drive the detection.")],
    out: Annotated[str, typer.Option("--out", "-o", help="CSV of the kept training indices; '-' for stdout.",
                                     rich_help_panel=P_OUT)],
    data: DataOptions, detect: DetectOptions,
    export: Annotated[Optional[str], typer.Option("--export", help="Write the kept samples as an npz: dataset.",
                                                  rich_help_panel=P_OUT)] = None,
    export_dir: Annotated[Optional[str], typer.Option("--export-dir", help="Write the kept samples as an "
                                                      "ImageFolder tree (links where possible).",
                                                      rich_help_panel=P_OUT)] = None,
    noisy_out: NoisyOutOpt = None, device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Feature-extraction batch size.")] = 512,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Features + FINE in one step: write the clean index list and, optionally, the cleaned dataset.

    Example: kdfine clean --model t.safetensors --label-noise sym:0.4 --out clean_idx.csv --export cleaned.npz
    """
    from kdfine import api
    from kdfine.errors import UsageError
    from kdfine.render import detection_report

    if out == "-" and json_out:
        raise UsageError("--out - and --json both want stdout; write the CSV to a file")
    report = api.clean(model, out, data=data, detect=detect, export=export, export_dir=export_dir,
                       noisy_out=noisy_out, device=device, batch_size=batch_size, quiet=quiet)
    if json_out:
        _emit_json(report)
    else:
        _show(detection_report(report) + ([f"wrote {report['export']}"] if report.get("export") else []), quiet)


@app.command("export", rich_help_panel=EVAL)
@command
def export(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint to export.")],
    out: Annotated[str, typer.Option("--out", "-o", help="File to write (FILE.onnx or FILE.pt).",
                                     rich_help_panel=P_OUT)],
    fmt: Annotated[str, typer.Option("--format", help="onnx (needs kdfine[export]) or torchscript.")] = "onnx",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: torch's).")] = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Write a checkpoint as ONNX or TorchScript, normalisation inside, checked before writing.

    Input float32 NCHW in [0, 1] with a dynamic batch axis; the class names are in the metadata.

    Example: kdfine export --model s.safetensors --out s.onnx
    """
    from kdfine import api

    doc = api.export(model, out, fmt=fmt, opset=opset)
    _note(f"wrote {doc['path']} ({doc['format']}, {doc['bytes']:,} bytes; outputs match the checkpoint's on "
          f"{doc['checked_on']})", quiet)
    _emit_result(doc, json_out)


@app.command("predict", rich_help_panel=EVAL)
@command
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files and folders (searched recursively).",
                                               metavar="PATH...")],
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint that predicts.")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="CSV to write (path,label,prob,...); default "
                                               "stdout.", rich_help_panel=P_OUT)] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes per image, most likely first.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    device: DeviceOpt = "auto", json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Predict the classes of image files and folders; print CSV (path,label,prob,...) or JSON.

    Images of any size are resized and centre-cropped to the checkpoint's size; unreadable files
    are reported on stderr and skipped.

    Example: kdfine predict --model s.safetensors photos/ --top-k 3 --out preds.csv
    """
    from kdfine import api
    from kdfine.io import atomic_write_bytes, check_writable
    from kdfine.predict import to_csv

    if out is not None and out != "-":
        check_writable(out)
    doc = api.predict(model, paths, top_k=top_k, device=device, batch_size=batch_size)
    text = to_csv(doc["predictions"], doc["top_k"])
    if out is not None and out != "-":
        atomic_write_bytes(out, text.encode())
        doc["out"] = out
    if json_out:
        _emit_json(doc)
    elif out is None or out == "-":
        _write_stdout(text)
    else:
        _emit_line(out)
    _note(f"{doc['n']} images predicted" + (f", {len(doc['skipped'])} skipped" if doc["skipped"] else ""), quiet)


@app.command("info", rich_help_panel=UTIL)
@command
def info(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint (.safetensors) to describe.", metavar="CKPT")],
    parent: Annotated[Optional[list[str]], typer.Option(
        "--parent", help="A teacher checkpoint to match against the recorded lineage (by sha256); repeatable. "
                         "The recorded parent paths and the files beside each checkpoint are searched too.")] = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Describe a checkpoint: model, classes, data, noise, loss, metrics, lineage, size.

    Example: kdfine info s2.safetensors --parent ../runs/teacher.safetensors --json
    """
    from kdfine import api
    from kdfine.render import info_text

    doc = api.info(ckpt, parents=parent or [])
    if json_out:
        _emit_json(doc)
    else:
        _emit_line(info_text(doc))


@app.command("list-archs", rich_help_panel=UTIL)
@command
def list_archs(
    pattern: Annotated[Optional[str], typer.Argument(help="Shell-style pattern, e.g. 'wrn*', 'resnet?0', or "
                                                     "'tv:mobilenet*' / 'timm:resnet*' for the libraries' networks.",
                                                     metavar="[PATTERN]")] = None,
    num_classes: Annotated[int, typer.Option("--num-classes", min=1, help="Head size of the parameter counts.")] = 10,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """List the architectures that --arch accepts, optionally matching PATTERN.

    Built-in names and families, and the torchvision (tv:) and timm (timm:) networks matching a
    PATTERN with their prefix; those with their parameter count (tab-separated).

    Example: kdfine list-archs 'tv:mobilenet*' --json
    """
    from kdfine import api

    doc = api.list_archs(pattern, num_classes)
    if json_out:
        _emit_json(doc)
    elif doc["archs"]:
        params = doc["params"]
        _emit_line("\n".join(f"{n}\t{params[n]}" if n in params else n for n in doc["archs"]))
    else:
        _note(f"no architecture matches '{pattern}'", quiet)


@app.command("plot-log", rich_help_panel=UTIL)
@command
def plot_log(
    logs: Annotated[list[str], typer.Argument(help="Per-epoch logs written by --log (one JSON object per line).",
                                              metavar="RUN.jsonl...")],
    out: Annotated[str, typer.Option("--out", "-o", help="Image to write (.png, .pdf or .svg).",
                                     rich_help_panel=P_OUT)],
    title: Annotated[str, typer.Option("--title", help="Figure title.")] = "",
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Plot loss, accuracy, NLL and learning rate per epoch of one or more runs; print the image path.

    Example: kdfine plot-log teacher.jsonl student.jsonl -o curves.png
    """
    from kdfine import plots

    plots.require("plot-log")
    plots.check_image_path(out, "--out")
    records = [plots.read_log(p) for p in logs]
    stems = [Path(p).stem for p in logs]
    names = stems if len(set(stems)) == len(stems) else list(logs)
    path = plots.training_curves(out, list(zip(names, records)), title=title, option="--out")
    if json_out:
        _emit_json({"path": path, "runs": [{"log": p, "name": n, "epochs": len(r), "last": r[-1]}
                                           for p, n, r in zip(logs, names, records)]})
    else:
        _emit_line(path)


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
    except typer.Abort:
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)

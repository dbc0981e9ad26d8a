"""The ``kdfine`` command line: one function per subcommand, a thin shell over :mod:`kdfine.api`.

stdout carries only results (a written path, CSV with ``--out -``, or one JSON document with
``--json``); people read stderr. Errors are one line on stderr with a documented exit code:
2 usage, 3 bad input data or file, 4 device unavailable, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

import kdfine
from kdfine.errors import EXIT_INPUT, EXIT_INTERRUPTED, KdfineError

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
P_DATA, P_TRAIN, P_OUT, P_FINE = "Data", "Training", "Output", "Dynamic FINE selection"
P_DEVICE = "Device"
_state = {"debug": bool(os.environ.get("KDFINE_DEBUG")), "quiet": False, "rank": 0}

# ------------------------------------------------------------------------------------- options
# One definition per option, so the same option means the same thing in every command.

DataOpt = Annotated[Optional[str], typer.Option(
    "--data", help="Dataset: digits (default for new teachers), cifar10, cifar100, mnist, fashion-mnist, svhn, "
                   "imagefolder:PATH, npz:PATH. Commands given a checkpoint default to its recorded data.",
    rich_help_panel=P_DATA)]
DataRootOpt = Annotated[Optional[str], typer.Option(
    "--data-root", help="Directory of torchvision datasets (default: $KDFINE_CACHE/data, else ~/.cache/kdfine/data).",
    rich_help_panel=P_DATA)]
DownloadOpt = Annotated[bool, typer.Option("--download", help="Fetch torchvision datasets into --data-root.",
                                           rich_help_panel=P_DATA)]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", min=4, help="Resize images to N x N.",
                                                     rich_help_panel=P_DATA)]
TestFractionOpt = Annotated[float, typer.Option(
    "--test-fraction", help="Test share when a folder or npz has no test split.", rich_help_panel=P_DATA)]
AugmentOpt = Annotated[Optional[str], typer.Option(
    "--augment", help="crop-flip, crop, flip or none (default: by dataset; crop-flip for CIFAR-like images, none for "
                      "digits and MNIST).",
    rich_help_panel=P_DATA)]
NoiseOpt = Annotated[Optional[str], typer.Option(
    "--label-noise", help="Inject label noise into the training split: sym:R, uniform:R, asym:R, pairflip:R or none.",
    rich_help_panel=P_DATA)]
NoiseSeedOpt = Annotated[int, typer.Option("--noise-seed", help="Seed of the injected label noise.",
                                           rich_help_panel=P_DATA)]
LabelsOpt = Annotated[Optional[str], typer.Option(
    "--labels", help="Replace the training labels: .npy (N,) or CSV with a 'label' column.", rich_help_panel=P_DATA)]
KeepOpt = Annotated[Optional[str], typer.Option(
    "--keep", help="Train on these training indices only (CSV with an 'index' column, e.g. from detect-noise).",
    rich_help_panel=P_DATA)]
ArchOpt = Annotated[str, typer.Option("--arch", help="Architecture: wrn-D-W, resnet20/32/56/110, resnet8x4, "
                                      "resnet32x4, preact-resnet18, resnet34, cnn[-W], mlp[-W].",
                                      rich_help_panel=P_TRAIN)]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.", rich_help_panel=P_TRAIN)]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Global batch size (split across torchrun ranks).",
                                       rich_help_panel=P_TRAIN)]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate (SGD, momentum 0.9, Nesterov).",
                                      rich_help_panel=P_TRAIN)]
WdOpt = Annotated[float, typer.Option("--weight-decay", help="Weight decay (not on BatchNorm or biases).",
                                      rich_help_panel=P_TRAIN)]
ScheduleOpt = Annotated[str, typer.Option(
    "--schedule", help="multistep (x0.1 at 50% and 75%), multistep:E1,E2, cosine or constant.",
    rich_help_panel=P_TRAIN)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of initialisation, data order and augmentation.",
                                      rich_help_panel=P_TRAIN)]
FitSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the mixture fit (GMM or 2-means).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.",
                                        rich_help_panel=P_DEVICE)]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto (bf16 autocast on CUDA; fp32 on a CPU, "
                                           "where distillation teachers run in bf16 if the CPU has native bf16), "
                                           "fp32 or bf16.", rich_help_panel=P_DEVICE)]
ChannelsLastOpt = Annotated[str, typer.Option("--channels-last", help="auto (on for CUDA and CPU), on or off.",
                                              rich_help_panel=P_DEVICE)]
CompileOpt = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the training step.",
                                          rich_help_panel=P_DEVICE)]
EvalEveryOpt = Annotated[int, typer.Option("--eval-every", min=1, help="Test-set evaluation every N epochs.",
                                           rich_help_panel=P_TRAIN)]
LogOpt = Annotated[Optional[str], typer.Option("--log", help="Write one JSON line per epoch to this file.",
                                               rich_help_panel=P_OUT)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the state saved beside --out after "
                                         "every epoch.", rich_help_panel=P_TRAIN)]
ForceOpt = Annotated[bool, typer.Option("--force", help="With --resume: accept options that differ from the "
                                        "recorded ones.", rich_help_panel=P_TRAIN)]
FineWarmupOpt = Annotated[int, typer.Option("--fine-warmup", min=0, help="Epochs before the first FINE selection.",
                                            rich_help_panel=P_FINE)]
FineEveryOpt = Annotated[int, typer.Option("--fine-every", min=0, help="Re-select the training set with FINE every "
                                           "N epochs (0: off).", rich_help_panel=P_FINE)]
FineZetaOpt = Annotated[float, typer.Option("--fine-zeta", help="Keep samples with P(clean) above this.",
                                            rich_help_panel=P_FINE)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead.",
                                       rich_help_panel=P_OUT)]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress or summaries on stderr (errors still).",
                                        rich_help_panel=P_OUT)]
PlotOpt = Annotated[Optional[str], typer.Option("--plot", help="Also draw a picture (needs the plot extra, "
                                                "matplotlib).", rich_help_panel=P_OUT)]


# ------------------------------------------------------------------------------------- plumbing


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if not _state["quiet"] and not _state["rank"]:  # under torchrun, rank 0 speaks for all
        print(f"kdfine: warning: {str(message).splitlines()[0]}", file=sys.stderr)


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
        stdout, sigterm = sys.stdout, _sigterm_as_interrupt()
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
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
            if "kdfine.distributed" in sys.modules:  # never imported (detect-noise, info): nothing to tear down
                sys.modules["kdfine.distributed"].teardown(clean=ok)

    return wrapper


def _sigterm_as_interrupt():
    """Make SIGTERM raise KeyboardInterrupt like Ctrl-C (so it ends with exit 130 and cleans up
    temporary files); returns the previous handler, or None off the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    if _state["debug"] and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    who = f" (rank {_state['rank']})" if _state.get("rank") else ""
    print(f"kdfine: error{who}: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr, flush=True)
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


def _data(data, data_root, download, image_size, test_fraction, augment, label_noise, noise_seed, labels, keep):
    from kdfine.api import DataOptions

    return DataOptions(data, data_root, download, image_size, test_fraction, augment, label_noise, noise_seed,
                       labels, keep)


def _train_report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _emit_json({k: v for k, v in result.items()})
    else:
        _emit_line(result["path"])


# ------------------------------------------------------------------------------------- commands


@app.command("train-teacher", rich_help_panel=TRAIN)
@command
def train_teacher(
    out: Annotated[str, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors).", rich_help_panel=P_OUT)],
    arch: ArchOpt = "cnn",
    data: DataOpt = None, data_root: DataRootOpt = None, download: DownloadOpt = False,
    image_size: ImageSizeOpt = None, test_fraction: TestFractionOpt = 0.2, augment: AugmentOpt = None,
    label_noise: NoiseOpt = None, noise_seed: NoiseSeedOpt = 0, labels: LabelsOpt = None, keep: KeepOpt = None,
    epochs: EpochsOpt = 30, batch_size: BatchOpt = 128, lr: LrOpt = 0.1, weight_decay: WdOpt = 5e-4,
    schedule: ScheduleOpt = "multistep", seed: SeedOpt = 0, device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto", channels_last: ChannelsLastOpt = "auto", compile: CompileOpt = False,
    eval_every: EvalEveryOpt = 1, fine_warmup: FineWarmupOpt = 10, fine_every: FineEveryOpt = 0,
    fine_zeta: FineZetaOpt = 0.5, resume: ResumeOpt = False, force: ForceOpt = False, log: LogOpt = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Train a classifier (a teacher) with cross-entropy; print the checkpoint path.

    Example: kdfine train-teacher --data cifar10 --arch wrn-28-4 --label-noise sym:0.4 --out teacher.safetensors
    """
    from kdfine import api

    cfg = api.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                          seed=seed, precision=precision, channels_last=channels_last, compile=compile,
                          eval_every=eval_every, fine_warmup=fine_warmup, fine_every=fine_every, fine_zeta=fine_zeta)
    result = api.train_teacher(out, arch=arch, data=_data(data, data_root, download, image_size, test_fraction, augment,
                                                          label_noise, noise_seed, labels, keep),
                               cfg=cfg, device=device, log=log, resume=resume, force=force, quiet=quiet)
    _summary(result, quiet)
    _train_report(result, json_out)


@app.command("distill", rich_help_panel=TRAIN)
@command
def distill(
    teacher: Annotated[list[str], typer.Option("--teacher", "-t", help="Teacher checkpoint; repeat for an ensemble "
                                               "(logits averaged); '-' reads the path from stdin.",
                                               rich_help_panel=P_TRAIN)],
    out: Annotated[str, typer.Option("--out", "-o", help="Student checkpoint to write.", rich_help_panel=P_OUT)],
    arch: ArchOpt = "cnn-16",
    loss: Annotated[str, typer.Option("--loss", help="mse (logit matching), kl, kl-inf (tau -> inf) or ce.",
                                      rich_help_panel=P_TRAIN)] = "mse",
    tau: Annotated[float, typer.Option("--tau", help="KL temperature.", rich_help_panel=P_TRAIN)] = 4.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the distillation term; 1 - alpha goes to CE "
                                         "on the labels.", rich_help_panel=P_TRAIN)] = 1.0,
    data: DataOpt = None, data_root: DataRootOpt = None, download: DownloadOpt = False,
    image_size: ImageSizeOpt = None, test_fraction: TestFractionOpt = 0.2, augment: AugmentOpt = None,
    label_noise: NoiseOpt = None, noise_seed: NoiseSeedOpt = 0, labels: LabelsOpt = None, keep: KeepOpt = None,
    epochs: EpochsOpt = 30, batch_size: BatchOpt = 128, lr: LrOpt = 0.1, weight_decay: WdOpt = 5e-4,
    schedule: ScheduleOpt = "multistep", seed: SeedOpt = 0, device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto", channels_last: ChannelsLastOpt = "auto", compile: CompileOpt = False,
    eval_every: EvalEveryOpt = 1, fine_warmup: FineWarmupOpt = 10, fine_every: FineEveryOpt = 0,
    fine_zeta: FineZetaOpt = 0.5, resume: ResumeOpt = False, force: ForceOpt = False, log: LogOpt = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Distil teacher(s) into a smaller student; print the student's path.

    Example: kdfine train-teacher --out t.safetensors | kdfine distill --teacher - --loss mse --out s.safetensors
    """
    from kdfine import api

    cfg = api.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                          seed=seed, precision=precision, channels_last=channels_last, compile=compile,
                          loss=loss, tau=tau, alpha=alpha, eval_every=eval_every, fine_warmup=fine_warmup,
                          fine_every=fine_every, fine_zeta=fine_zeta)
    result = api.distill(out, teacher, arch=arch,
                         data=_data(data, data_root, download, image_size, test_fraction, augment, label_noise,
                                    noise_seed, labels, keep),
                         cfg=cfg, device=device, log=log, resume=resume, force=force, quiet=quiet)
    _summary(result, quiet)
    _train_report(result, json_out)


def _summary(result: dict[str, Any], quiet: bool) -> None:
    from kdfine import distributed

    if quiet or not distributed.context().is_main:
        return
    m = result["metrics"]
    parts = [f"wrote {result['path']}"]
    if "test_top1" in m:
        parts.append(f"test top-1 {100 * m['test_top1']:.2f}%")
    if "img_per_s" in m:
        parts.append(f"{m['img_per_s']:.0f} img/s")
    _stderr().print("  ".join(parts), markup=False)


@app.command("eval", rich_help_panel=EVAL)
@command
def eval_(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Checkpoint to evaluate; repeat to compare.")],
    teacher: Annotated[Optional[list[str]], typer.Option(
        "--teacher", "-t", help="Also report agreement with this teacher (logits averaged when repeated).")] = None,
    split: Annotated[str, typer.Option("--split", help="train or test.")] = "test",
    dump_features: Annotated[Optional[str], typer.Option(
        "--dump-features", help="Write penultimate features (N, D) .npy with sidecars (labels, logits, json, truth).",
        rich_help_panel=P_OUT)] = None,
    data: DataOpt = None, data_root: DataRootOpt = None, download: DownloadOpt = False,
    image_size: ImageSizeOpt = None, test_fraction: TestFractionOpt = 0.2,
    label_noise: NoiseOpt = None, noise_seed: NoiseSeedOpt = 0, labels: LabelsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Evaluation batch size.")] = 512,
    device: DeviceOpt = "auto", precision: PrecisionOpt = "auto",
    plot: Annotated[Optional[str], typer.Option(
        "--plot", help="Draw reliability diagrams and confusion matrices: FILE.png (or .pdf, .svg) for one figure, "
                       "any other PREFIX for PREFIX.reliability.png and PREFIX.confusion.png (needs matplotlib).",
        rich_help_panel=P_OUT)] = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Top-1/top-5, NLL and ECE of checkpoints; teacher agreement; feature dumps for detect-noise.

    Example: kdfine eval --model s.safetensors --teacher t.safetensors --plot s-eval.png --json
    """
    if split not in ("train", "test"):
        raise typer.BadParameter("expected train or test", param_hint="--split")
    runs: list[dict[str, Any]] = []
    collect = None
    if plot:  # before importing the library: a missing matplotlib fails at once
        from kdfine import plots
        from kdfine.io import check_writable

        plots.require()
        for p in plots.evaluation_paths(plot):
            check_writable(p, "--plot")

        def collect(ck, logits, ds):
            runs.append({"name": Path(ck.path).name, "logits": logits, "labels": ds.labels, "classes": ds.classes})

    from kdfine import api, distributed

    res = api.evaluate(model, data=_data(data, data_root, False if not download else True, image_size, test_fraction,
                                         None, label_noise, noise_seed, labels, None),
                       split=split, teachers=teacher, dump_features=dump_features, device=device,
                       batch_size=batch_size, precision=precision, on_logits=collect)
    if plot and distributed.context().is_main:
        res["plots"] = plots.evaluation_figures(plot, runs)
    if json_out:
        _emit_json(res)
    elif not quiet and distributed.context().is_main:
        _eval_table(res)
    if res.get("plots"):
        _note(f"wrote {', '.join(res['plots'])}", quiet)


def _eval_table(res: dict[str, Any]) -> None:
    from rich.table import Table

    models = res["models"]
    t = Table(title=f"{res['data']} {res['split']} ({res['n']} images)", title_justify="left")
    t.add_column("model")
    cols = [("top1", "top-1"), ("top5", "top-5"), ("nll", "NLL"), ("ece", "ECE"),
            ("top1_true_labels", "top-1 (true labels)"), ("agreement", "agree"), ("logit_l2", "|z_s-z_t|"),
            ("kl_teacher_student", "KL(t||s)")]
    cols = [(k, h) for k, h in cols if any(k in m for m in models)]
    for _, h in cols:
        t.add_column(h, justify="right")
    for m in models:
        row = [f"{Path(m['model']).name} ({m['arch']})"]
        for k, _ in cols:
            v = m.get(k)
            row.append("" if v is None else (f"{100 * v:.2f}%" if k in ("top1", "top5", "agreement", "top1_true_labels")
                                             else f"{v:.4f}"))
        t.add_row(*row)
    con = _stderr()
    con.print(t)
    for m in models:
        if m.get("parents"):
            con.print(f"{Path(m['model']).name}: distilled from {', '.join(p[:12] for p in m['parents'])}",
                      markup=False)
        if m.get("dump"):
            con.print(f"wrote features {m['dump']}", markup=False)


@app.command("detect-noise", rich_help_panel=NOISE)
@command
def detect_noise(
    features: Annotated[str, typer.Option("--features", "-f", help="Feature dump (N, D) .npy from eval "
                                          "--dump-features; its sidecars give labels, logits and truth.")],
    out: Annotated[str, typer.Option("--out", "-o", help="CSV of the samples kept as clean "
                                     "(index,label,score,p_clean); '-' for stdout.", rich_help_panel=P_OUT)],
    labels: Annotated[Optional[str], typer.Option("--labels", help="Labels (.npy or CSV) instead of the dump's "
                                                  "sidecar.")] = None,
    zeta: Annotated[float, typer.Option("--zeta", help="Keep samples with P(clean) above this.")] = 0.5,
    method: Annotated[str, typer.Option("--method", help="gmm (FINE), kmeans (FINE with 2-means) or small-loss "
                                        "(GMM on cross-entropy, from the logits sidecar).")] = "gmm",
    vectors_from: Annotated[Optional[str], typer.Option(
        "--vectors-from", help="Compute class eigenvectors from these indices only (a previous clean CSV).")] = None,
    noisy_out: Annotated[Optional[str], typer.Option("--noisy-out", help="Also write the rejected samples as CSV.",
                                                     rich_help_panel=P_OUT)] = None,
    truth: Annotated[Optional[str], typer.Option("--truth", help="True labels .npy, to report precision/recall "
                                                 "(default: the dump's truth sidecar).")] = None,
    seed: FitSeedOpt = 0,
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
    if plot:  # before importing the library: a missing matplotlib fails at once
        from kdfine import plots

        plots.require()
        plots.check_image_path(plot)
    from kdfine import detection  # not api: detect-noise never imports torch

    det, report, y, true = detection.detect_noise(features, labels=labels, truth=truth, zeta=zeta, method=method,
                                                  vectors_from=vectors_from, seed=seed)
    detection.write_detection(det, y, out, noisy_out)
    report.update(out=out, noisy_out=noisy_out)
    if plot:
        report["plot"] = _plot_detection(plot, features, det, y, true)
    if json_out:
        _emit_json(report)
    elif not quiet:
        _detection_table(report)
        if plot:
            _note(f"wrote {plot}", quiet)


def _detection_table(report: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"{report['method']} on {report.get('features') or report.get('model')}", title_justify="left")
    for h in ("class", "kept", "total", "threshold", "note"):
        t.add_column(h, justify="right" if h in ("kept", "total", "threshold") else "left")
    for c in report["classes"]:
        thr = c["threshold"]
        t.add_row(str(c["label"]), str(c["kept"]), str(c["total"]),
                  "" if thr is None or not math.isfinite(thr) else f"{thr:.4f}", c.get("note", ""))
    con = _stderr()
    con.print(t)
    con.print(f"kept {report['kept']}/{report['n']} ({100 * report['kept_fraction']:.1f}%), "
              f"estimated noise rate {100 * report['estimated_noise_rate']:.1f}%", markup=False, soft_wrap=True)
    if "truth" in report:
        q = report["truth"]
        con.print(f"against the true labels (noise {100 * q['true_noise_rate']:.1f}%): clean precision "
                  f"{q['precision']:.4f}  recall {q['recall']:.4f}  F1 {q['f1']:.4f}  AUROC {q.get('auroc', float('nan')):.4f}",
                  markup=False, soft_wrap=True)


def _plot_detection(path: str, features_path: str, det, labels, true) -> str:
    from kdfine import plots
    from kdfine.features import read_dump

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
                                  title=f"{_METHOD_TITLES.get(det.method, det.method)} of {Path(features_path).name}",
                                  **({"xlabel": "p(label | x) from the logits"} if det.method == "small-loss" else {}))


_METHOD_TITLES = {"gmm": "FINE alignment scores (GMM split)", "kmeans": "FINE alignment scores (2-means split)",
                  "small-loss": "small-loss scores (GMM on the cross-entropy)"}


@app.command("clean", rich_help_panel=NOISE)
@command
def clean(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint whose features drive the detection.")],
    out: Annotated[str, typer.Option("--out", "-o", help="CSV of the kept training indices; '-' for stdout.",
                                     rich_help_panel=P_OUT)],
    export: Annotated[Optional[str], typer.Option("--export", help="Write the kept samples as an npz: dataset.",
                                                  rich_help_panel=P_OUT)] = None,
    export_dir: Annotated[Optional[str], typer.Option("--export-dir", help="Write the kept samples as an "
                                                      "ImageFolder tree (links where possible).",
                                                      rich_help_panel=P_OUT)] = None,
    noisy_out: Annotated[Optional[str], typer.Option("--noisy-out", help="Also write the rejected samples as CSV.",
                                                     rich_help_panel=P_OUT)] = None,
    zeta: Annotated[float, typer.Option("--zeta", help="Keep samples with P(clean) above this.")] = 0.5,
    method: Annotated[str, typer.Option("--method", help="gmm, kmeans or small-loss.")] = "gmm",
    data: DataOpt = None, data_root: DataRootOpt = None, download: DownloadOpt = False,
    image_size: ImageSizeOpt = None, test_fraction: TestFractionOpt = 0.2,
    label_noise: NoiseOpt = None, noise_seed: NoiseSeedOpt = 0, labels: LabelsOpt = None,
    seed: FitSeedOpt = 0, device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Feature-extraction batch size.")] = 512,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Features + FINE in one step: write the clean index list and, optionally, the cleaned dataset.

    Example: kdfine clean --model t.safetensors --label-noise sym:0.4 --out clean_idx.csv --export cleaned.npz
    """
    from kdfine import api, distributed
    from kdfine.errors import UsageError

    if out == "-" and json_out:
        raise UsageError("--out - and --json both want stdout; write the CSV to a file")
    report = api.clean(model, out, data=_data(data, data_root, download, image_size, test_fraction, None,
                                              label_noise, noise_seed, labels, None),
                       zeta=zeta, method=method, seed=seed, export=export, export_dir=export_dir,
                       noisy_out=noisy_out, device=device, batch_size=batch_size)
    if json_out:
        _emit_json(report)
    elif not quiet and distributed.context().is_main:
        _detection_table(report)
        if report.get("export"):
            _stderr().print(f"wrote {report['export']}", markup=False)


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

    doc = api.info(ckpt, parents=parent or [])
    if json_out:
        _emit_json(doc)
    else:
        _emit_line(_info_text(doc))


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def _metrics_text(m: dict[str, Any]) -> str:
    names = [("test_top1", "test top-1", _pct), ("test_top5", "top-5", _pct), ("test_nll", "NLL", None),
             ("test_ece", "ECE", _pct), ("train_acc", "train acc", _pct), ("img_per_s", "img/s", None)]
    parts = []
    for key, label, fmt in names:
        v = (m or {}).get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{label} {fmt(v) if fmt else (f'{v:.0f}' if key == 'img_per_s' else f'{v:.4f}')}")
    return ", ".join(parts) or "none recorded"


def _training_text(d: dict[str, Any]) -> str:
    loss = d.get("loss") or "?"
    text = f"loss {loss}"
    if loss in ("kl",):
        text += f" (tau {d.get('tau')}, alpha {d.get('alpha')})"
    elif loss in ("mse", "kl-inf"):
        text += f" (alpha {d.get('alpha')})"
    return text


def _lineage_lines(nodes: list[dict[str, Any]], indent: str = "") -> list[str]:
    lines = []
    for i, n in enumerate(nodes):
        last = i == len(nodes) - 1
        branch, cont = ("`-- ", "    ") if last else ("|-- ", "|   ")
        if n["found"]:
            top1 = (n.get("metrics") or {}).get("test_top1")
            desc = (f"{_shown_path(n['path'])}  {n.get('stage') or '?'} {n.get('arch')}, {_training_text(n)}, "
                    f"test top-1 {_pct(top1)}  [sha256 {n['sha256'][:12]}]")
        else:
            where = f"; recorded at {n['recorded_path']}" if n.get("recorded_path") else ""
            desc = f"? sha256 {n['sha256'][:12]} not found{where} (pass --parent FILE)"
        lines.append(indent + branch + desc)
        lines += _lineage_lines(n.get("parents") or [], indent + cont)
    return lines


def _shown_path(path: str) -> str:
    """Relative to the working directory when below it (shorter to read), else as found."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _info_text(d: dict[str, Any]) -> str:
    classes = d.get("classes") or []
    shown = ", ".join(map(str, classes[:10])) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    noise = d.get("label_noise") or "none"
    if noise != "none" and d.get("noise_seed") is not None:
        noise += f" (noise seed {d['noise_seed']})"
    params = f"{d['params']:,} parameters" if isinstance(d.get("params"), int) else "parameters unknown"
    rows = [("file", f"{d['path']}  {d['file_size']:,} bytes  sha256 {d['sha256']}"),
            ("stage", f"{d.get('stage') or '?'} (kdfine {d.get('kdfine_version')}, schema {d.get('schema')})"),
            ("model", f"{d.get('arch')}, {params}, input {d.get('in_channels')}x{d.get('image_size')}x"
                      f"{d.get('image_size')}"),
            ("classes", f"{d.get('num_classes')}: {shown}"),
            ("data", f"{d.get('data')}, label noise {noise}"),
            ("training", f"{_training_text(d)}, {d.get('epochs')} epochs, seed {d.get('seed')}"),
            ("metrics", _metrics_text(d.get("metrics") or {}))]
    lines = [f"{k:<9} {v}" for k, v in rows]
    if d.get("lineage"):
        lines.append("lineage   distilled from:")
        lines += ["  " + line for line in _lineage_lines(d["lineage"])]
    else:
        lines.append("lineage   none (trained from labels)")
    return "\n".join(lines)


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
    """Console entry point. ``--debug`` is accepted anywhere on the command line."""
    if "--debug" in sys.argv[1:]:
        _state["debug"] = True
        sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--debug"]
    app(prog_name="kdfine")

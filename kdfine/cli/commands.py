"""One function per subcommand: parse the options, call :mod:`kdfine.api`, print the result (stdout)
and the human summary (stderr, :mod:`kdfine.cli.render`). No file writing and no math here."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from kdfine.cli.app import EVAL, NOISE, TRAIN, UTIL, app, command, emit_json, emit_line, note, show, write_stdout
from kdfine.cli.bridge import (ArchOpt, DeviceOpt, ForceOpt, JsonOpt, LogOpt, NoisyOutOpt, QuietOpt, ResumeOpt,
                               takes)
from kdfine.errors import UsageError
from kdfine.options import P_OUT, P_TRAIN, DataOptions, DetectOptions, EvalOptions, ModelOptions, TrainConfig


def _training_done(result: dict[str, Any], as_json: bool, quiet: bool) -> None:
    from kdfine.cli.render import train_summary

    show([train_summary(result)], quiet)
    _emit_result(result, as_json)


def _emit_result(doc: dict[str, Any], as_json: bool) -> None:
    """stdout of a command that writes one file: the JSON document, or the file's path alone."""
    if as_json:
        emit_json(doc)
    else:
        emit_line(doc["path"])


def _stdout_once(out: str, as_json: bool, detect: DetectOptions | None = None) -> None:
    """Refuse two results on stdout: ``-`` for more than one of --out, --labels-out and --review, or with --json."""
    wanting = [f for f, v in (("--out", out), ("--labels-out", detect and detect.labels_out),
                              ("--review", detect and detect.review)) if v == "-"] + (["--json"] if as_json else [])
    if len(wanting) > 1:
        raise UsageError(f"{wanting[0]} - and {wanting[1]} both want stdout; write one of them to a file")


@app.command("train-teacher", rich_help_panel=TRAIN)
@command
@takes("train-teacher", data=DataOptions, cfg=TrainConfig, model=ModelOptions)
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
@takes("distill", data=DataOptions, cfg=TrainConfig, model=ModelOptions)
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
@takes("eval", data=DataOptions, ev=EvalOptions)
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
    from kdfine import api
    from kdfine.cli.render import eval_report

    res = api.evaluate(model, data=data, split=ev.split, teachers=teacher, dump_features=dump_features,
                       device=device, batch_size=ev.batch_size, precision=ev.precision, plot=plot, quiet=quiet)
    if json_out:
        emit_json(res)
    else:
        show(eval_report(res), quiet)
    if res.get("plots"):
        note(f"wrote {', '.join(res['plots'])}", quiet)


@app.command("detect-noise", rich_help_panel=NOISE)
@command
@takes("detect-noise", detect=DetectOptions)
def detect_noise(
    features: Annotated[str, typer.Option("--features", "-f", help="Feature dump (N, D) .npy from eval "
                                          "--dump-features; its sidecars give labels, logits and truth.")],
    out: Annotated[str, typer.Option("--out", "-o", help="CSV of the samples kept as clean (index,label,score,"
                                     "p_clean,suggested,suggested_p, then class,suggested_class and path where "
                                     "the data has names and files); '-' for stdout.", rich_help_panel=P_OUT)],
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

    Each sample also gets a suggested label and its probability (from the dump's logits); --labels-out
    applies the likely ones, --review writes a page to look at the suspects and decide.

    Example: kdfine detect-noise --features f.npy --out clean_idx.csv --noisy-out noisy_idx.csv

    Example: kdfine detect-noise --features f.npy --out clean_idx.csv --labels-out labels.csv --review review.html
    """
    _stdout_once(out, json_out, detect)
    from kdfine import api  # torch-free: detect-noise never loads torch
    from kdfine.cli.render import detection_report

    report, _, _, _ = api.detect_noise(features, out, detect=detect, labels=labels, truth=truth,
                                       vectors_from=vectors_from, noisy_out=noisy_out, plot=plot)
    if json_out:
        emit_json(report)
    else:
        show(detection_report(report) + _wrote(report, plot), quiet)


def _wrote(report: dict[str, Any], *extra: str | None) -> list[str]:
    """"wrote ..." lines for the side files of detect-noise and clean."""
    files = [report.get("labels_out"), report.get("review"), *extra]
    return [f"wrote {f}" for f in files if f and f != "-"]


@app.command("clean", rich_help_panel=NOISE)
@command
@takes("clean", data=DataOptions, detect=DetectOptions, ev=EvalOptions)
def clean(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint whose features drive the detection.")],
    out: Annotated[str, typer.Option("--out", "-o", help="CSV of the kept training indices; '-' for stdout.",
                                     rich_help_panel=P_OUT)],
    data: DataOptions, detect: DetectOptions, ev: EvalOptions,
    export: Annotated[Optional[str], typer.Option("--export", help="Write the kept samples as an npz: dataset.",
                                                  rich_help_panel=P_OUT)] = None,
    export_dir: Annotated[Optional[str], typer.Option("--export-dir", help="Write the kept samples as an "
                                                      "ImageFolder tree (links where possible).",
                                                      rich_help_panel=P_OUT)] = None,
    noisy_out: NoisyOutOpt = None, device: DeviceOpt = "auto",
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Features + FINE in one step: write the clean index list and, optionally, the cleaned dataset.

    Example: kdfine clean --model t.safetensors --label-noise sym:0.4 --out clean_idx.csv --export cleaned.npz
    """
    _stdout_once(out, json_out, detect)
    from kdfine import api
    from kdfine.cli.render import detection_report

    report = api.clean(model, out, data=data, detect=detect, export=export, export_dir=export_dir,
                       noisy_out=noisy_out, device=device, batch_size=ev.batch_size, precision=ev.precision,
                       quiet=quiet)
    if json_out:
        emit_json(report)
    else:
        show(detection_report(report) + _wrote(report, report.get("export")), quiet)


@app.command("export", rich_help_panel=EVAL)
@command
def export(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint to export.")],
    out: Annotated[str, typer.Option("--out", "-o", help="File to write (FILE.onnx or FILE.pt; not '-': the "
                                     "model is binary).", rich_help_panel=P_OUT)],
    fmt: Annotated[str, typer.Option("--format", help="onnx (needs kdfine\\[export]) or torchscript.")] = "onnx",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: torch's).")] = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Write a checkpoint as ONNX or TorchScript, normalisation inside, checked before writing.

    Input float32 NCHW in [0, 1] with a dynamic batch axis, decoded from image files as the
    training data was; the class names and that decoding are in the metadata. kdfine predict
    --model FILE.onnx runs the file without torch.

    Example: kdfine export --model s.safetensors --out s.onnx
    """
    from kdfine import api

    doc = api.export(model, out, fmt=fmt, opset=opset)
    note(f"wrote {doc['path']} ({doc['format']}, {doc['bytes']:,} bytes; outputs match the checkpoint's on "
         f"{doc['checked_on']})", quiet)
    _emit_result(doc, json_out)


@app.command("predict", rich_help_panel=EVAL)
@command
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files and folders (searched recursively).",
                                               metavar="PATH...")],
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint that predicts, or an ONNX file from "
                                       "kdfine export (FILE.onnx; run by onnxruntime, without torch).")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="CSV to write (path,label,prob,...); default "
                                               "stdout.", rich_help_panel=P_OUT)] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes per image, most likely first.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    device: DeviceOpt = "auto", json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Predict the classes of image files and folders; print CSV (path,label,prob,...) or JSON.

    Each file is decoded as the model's training data was (EXIF orientation, 8 bits, alpha on
    white, --resize crop or squash as recorded); unreadable files and files above
    KDFINE_MAX_PIXELS pixels are reported on stderr and skipped.

    Example: kdfine predict --model s.safetensors photos/ --top-k 3 --out preds.csv
    """
    from kdfine import api
    from kdfine.inference.predict import to_csv

    doc = api.predict(model, paths, out=out, top_k=top_k, device=device, batch_size=batch_size)
    if json_out:
        emit_json(doc)
    elif out is None or out == "-":
        write_stdout(to_csv(doc["predictions"], doc["top_k"]))
    else:
        emit_line(out)
    note(f"{doc['n']} images predicted" + (f", {len(doc['skipped'])} skipped" if doc["skipped"] else ""), quiet)


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
    from kdfine.cli.render import info_text

    doc = api.info(ckpt, parents=parent or [])
    if json_out:
        emit_json(doc)
    else:
        emit_line(info_text(doc))


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
        emit_json(doc)
    elif doc["archs"]:
        params = doc["params"]
        emit_line("\n".join(f"{n}\t{params[n]}" if n in params else n for n in doc["archs"]))
    else:
        note(f"no architecture matches '{pattern}'", quiet)


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
    from kdfine import api

    doc = api.plot_log(logs, out, title=title)
    if json_out:
        emit_json(doc)
    else:
        emit_line(doc["path"])


__all__ = ["train_teacher", "distill", "eval_", "detect_noise", "clean", "export", "predict", "info", "list_archs",
           "plot_log"]

"""The Python API behind each subcommand: validate, declare the outputs, run, commit, report.

Each function checks its arguments' types (:mod:`kdfine.boundary`: an ArgumentError, before
anything runs) and its options first (:mod:`kdfine.options`, exit 2 before anything loads),
declares every file it reads and writes in one :class:`~kdfine.files.outputs.Outputs` (an output
that would overwrite an input or another output is refused; all outputs land together at the end,
or none), runs the work of its package, and returns a JSON-ready ``dict``. Nothing here prints to
stdout; progress and notes go to stderr. The CLI is a thin shell over these functions.

>>> from kdfine import api
>>> r = api.train_teacher("t.safetensors", data=api.DataOptions("digits"), cfg=api.TrainConfig(epochs=5))
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from kdfine.boundary import api_function
from kdfine.detect import command
from kdfine.errors import InputError, KdfineWarning, UsageError
from kdfine.files.inputs import regular_file
from kdfine.files.lock import run_lock
from kdfine.files.outputs import Outputs, is_special, is_stdout
from kdfine.files.tables import read_stdin_path
from kdfine.options import (DISTILL, TRAIN, DataOptions, DetectOptions, EvalOptions, ModelOptions, TrainConfig,
                            resume_keys)

if TYPE_CHECKING:  # torch-heavy modules are imported inside the commands that use them, so that
    # detect-noise (and `import kdfine.api`) never loads torch
    from kdfine.data.decode import DecodeSpec
    from kdfine.data.prepare import Prepared
    from kdfine.runtime import distributed

__all__ = ["DataOptions", "TrainConfig", "DetectOptions", "EvalOptions", "ModelOptions", "train_teacher", "distill",
           "evaluate", "clean", "detect_noise", "info", "list_archs", "export", "predict", "plot_log"]


# ------------------------------------------------------------------------------------- training


@api_function
def train_teacher(out: str, *, arch: str | None = None, data: DataOptions | None = None,
                  cfg: TrainConfig | None = None, model: ModelOptions | None = None, device: str = "auto",
                  log: str | None = None, resume: bool = False, force: bool = False,
                  quiet: bool = False) -> dict[str, Any]:
    """Train ``arch`` on ``data`` with ``cfg.loss`` (ce, gce, sce) and ``cfg.fine_strategy``, and
    write the checkpoint (the first network of a two-network strategy) to ``out``. Without
    ``arch``, ``cnn`` for images under 64 px and ``tv:resnet18`` from 64 px on."""
    cfg = (cfg or TrainConfig()).validate(TRAIN)  # options first: nothing loaded yet
    data = (data or DataOptions()).validate(TRAIN)
    sized = data.image_size is None
    arch, data, model = _model_options(arch, data, model, "teacher")
    extra = {"image_size_from_weights": True} if sized and data.image_size is not None else None
    from kdfine.data.prepare import prepare
    from kdfine.runtime import distributed

    ctx = distributed.setup(device)
    with _run_outputs(out, log, data, model) as outs, _lock(out, ctx):
        return _train(outs, out, log, prepare(data, quiet), cfg, model, ctx, arch=arch, stage="teacher",
                      resume=resume, force=force, quiet=quiet, extra_config=extra)


@api_function
def distill(out: str, teachers: list[str], *, arch: str | None = None, data: DataOptions | None = None,
            cfg: TrainConfig | None = None, model: ModelOptions | None = None, device: str = "auto",
            log: str | None = None, resume: bool = False, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Distil one or more teachers (logits averaged) into a new ``arch`` student, with ``cfg.loss``
    (default mse; ``ce`` trains on the labels alone, ignoring the teachers). Without ``arch``,
    ``cnn-16`` for images under 64 px and ``tv:mobilenet_v3_small`` from 64 px on."""
    cfg = (cfg or TrainConfig()).validate(DISTILL)  # options first: nothing loaded yet
    data = (data or DataOptions()).validate(DISTILL)
    if not teachers:
        raise UsageError("distill needs at least one --teacher")
    arch, _, model = _model_options(arch, data, model, "student")
    from kdfine.data.prepare import check_compatible, inherit_from, prepare
    from kdfine.models import checkpoint
    from kdfine.runtime import distributed

    ctx = distributed.setup(device)
    with _run_outputs(out, log, data, model) as outs:
        paths = [distributed.main_only(read_stdin_path, "--teacher") if t == "-" else t for t in teachers]
        for p in paths:  # a teacher read from stdin is known only now
            outs.input(p, "--teacher")
        with _lock(out, ctx):
            loaded = [checkpoint.load(p, "cpu", "--teacher") for p in paths]
            prepared = prepare(inherit_from(data, loaded[0].meta), quiet)
            for t in loaded:
                check_compatible(t, prepared.train)
            extra = {"teachers": [t.sha256 for t in loaded]}
            return _train(outs, out, log, prepared, cfg, model, ctx, arch=arch, stage="student", teachers=loaded,
                          resume=resume, force=force, quiet=quiet, extra_config=extra)


def _train(outs: Outputs, out: str, log: str | None, prepared: Prepared, cfg: TrainConfig, model: ModelOptions,
           ctx: distributed.Context, *, arch: str | None, stage: str, teachers: Sequence[Any] = (),
           resume: bool = False, force: bool = False, quiet: bool = False,
           extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run :func:`kdfine.train.run.train` and write its checkpoint through ``outs`` (rank 0); the
    resume state, written after every epoch, is removed once the checkpoint is in place. A
    ``resume`` of a run that had finished writes nothing (``already_finished`` in the result)."""
    from kdfine.files.rows import file_sha256
    from kdfine.models import checkpoint
    from kdfine.runtime import distributed
    from kdfine.train.loop import RunFiles
    from kdfine.train.run import train

    state = None if is_special(out) else _state_path(out)  # nothing is written beside /dev/null
    files = RunFiles(state=state, log=log, outputs=outs, resume=resume, force=force, compare=resume_keys(),
                     checkpoint=None if is_special(out) else Path(out))
    done = train(prepared, cfg, model, ctx, files, arch=arch, stage=stage, teachers=teachers, quiet=quiet,
                 extra_config=extra_config)
    if done.finished:
        return {"path": str(out), "sha256": file_sha256(out), **done.report}

    def save() -> str:
        data, sha = checkpoint.to_bytes(done.model, done.meta)
        with outs.open(out) as f:
            f.write(data)
        if state is not None:
            outs.add(state, "--out", remove=True)
        outs.commit()
        return sha

    return {"path": str(out), "sha256": distributed.main_only(save), **done.report}


def _state_path(out: str) -> Path:
    from kdfine.train.resume import state_path

    return state_path(out)


def _run_outputs(out: str, log: str | None, data: DataOptions, model: ModelOptions) -> Outputs:
    """The outputs of a training run, declared and checked now: the checkpoint (its resume state
    and lock beside it) and the log; none may be an input (the data, ``--init``, a teacher)."""
    outs = Outputs()
    _declare_data(outs, data)
    outs.input(model.init, "--init")
    outs.add(out, "--out", companions=(".state.safetensors", ".lock"))
    if not is_special(out):
        outs.add(_state_path(out), "--out")
    outs.add(log, "--log")
    return outs


def _model_options(arch: str | None, data: DataOptions, model_opts: ModelOptions | None,
                   stage: str) -> tuple[str | None, DataOptions, ModelOptions]:
    """Check the initial weights before any data loads (exit 3 now, not after a long decode): an
    ``--init`` file must hold a state dict of tensors, ``--pretrained``'s file must be in the
    library's cache (or be downloaded now) and be the published one. With ``--pretrained`` (the
    arch defaulting to a torchvision network) and no ``--image-size``, the weights' crop size."""
    from kdfine.models import check_arch

    mo = (model_opts or ModelOptions()).validate()
    if arch is not None:
        check_arch(arch)  # an unknown --arch fails here, before any data is loaded
    if mo.init:  # a FIFO would block the read; a missing file fails before any data loads
        regular_file(mo.init, "--init", "a .safetensors, .pth or .pt file")
        from kdfine.models.weights import read_state_dict

        read_state_dict(mo.init)  # missing, pickled, damaged or tensor-free: exit 3 now
    if mo.pretrained:
        from kdfine.models.zoo import is_zoo, pretrained_file, pretrained_weights
        from kdfine.train.run import DEFAULT_ARCH

        arch = arch or DEFAULT_ARCH[stage][1]
        weights = pretrained_weights(arch)
        pretrained_file(arch)
        if data.image_size is None and is_zoo(arch):
            data = replace(data, image_size=weights.image_size)
    return arch, data, mo


def _declare_data(outputs: Outputs, data: DataOptions) -> None:
    """The files a command reads through its data options: no output may overwrite them."""
    if data.data and data.data.partition(":")[0].strip().lower() == "npz":
        outputs.input(data.data.partition(":")[2], "--data")
    outputs.input(data.labels, "--labels")
    outputs.input(data.keep, "--keep")


def _lock(out: str, ctx: distributed.Context):
    """The lock beside ``out`` (rank 0 of a torchrun job takes it for all)."""
    return run_lock(out) if ctx.is_main else contextlib.nullcontext()


# ------------------------------------------------------------------------------------- eval


@api_function
def evaluate(models: list[str], *, data: DataOptions | None = None, split: str = "test",
             teachers: list[str] | None = None, dump_features: str | None = None, device: str = "auto",
             batch_size: int = 512, precision: str = "auto", plot: str | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Metrics of each model on a split; with ``teachers``, agreement with their (averaged) logits;
    with ``dump_features``, the feature dump of the (first) model; with ``plot``, reliability
    diagrams and confusion matrices (FILE.png, or PREFIX for PREFIX.reliability.png and
    PREFIX.confusion.png; needs matplotlib). The split is read batch by batch (from the decode
    cache's memory map for image folders; each torchrun rank reads its shard); ``skipped`` lists
    the unreadable image files left out."""
    ev = EvalOptions(split, batch_size, precision).validate("eval")  # options first: nothing loaded yet
    data = (data or DataOptions()).validate("eval")
    if not models:
        raise UsageError("eval needs at least one --model")
    if dump_features and len(models) > 1:
        raise UsageError("--dump-features takes a single --model")
    if plot:  # a missing matplotlib fails before anything loads
        from kdfine import plots

        plots.require()
    with Outputs() as outs:
        if plot:
            for p in plots.evaluation_paths(plot):
                outs.add(p, "--plot")
        return _evaluate(outs, models, data, ev, teachers or [], dump_features, device, plot, quiet)


def _evaluate(outs: Outputs, models: list[str], data: DataOptions, ev: EvalOptions, teachers: list[str],
              dump_features: str | None, device: str, plot: str | None, quiet: bool) -> dict[str, Any]:
    from kdfine.data.prepare import check_compatible, inherit_from, prepare
    from kdfine.detect import dump as dumps
    from kdfine.inference.evaluate import evaluate_models
    from kdfine.models import checkpoint
    from kdfine.runtime import distributed

    ctx = distributed.setup(device)
    _declare_data(outs, data)
    for m in models:
        outs.input(m, "--model")
    for t in teachers:
        outs.input(t, "--teacher")
    if dump_features:
        dumps.declare_dump(outs, dump_features)
    loaded = [checkpoint.load(m, "cpu", "--model") for m in models]
    tloaded = [checkpoint.load(t, "cpu", "--teacher") for t in teachers]
    prepared = prepare(inherit_from(data, loaded[0].meta), quiet)
    ds = prepared.source.split(ev.split) if ev.split == "test" else prepared.train
    for c in loaded:
        check_compatible(c, ds, "--model")
    for t in tloaded:
        check_compatible(t, ds)
    runs: list[dict[str, Any]] = []

    def collect(ck, logits, ds) -> None:  # the logits of each model, for --plot
        runs.append({"name": Path(ck.path).name, "logits": logits, "labels": ds.labels, "classes": ds.classes})

    results = evaluate_models(loaded, tloaded, prepared, ds, ev.split, ctx, batch_size=ev.batch_size,
                              precision=ev.precision, dump_features=dump_features, outputs=outs,
                              on_logits=collect if plot else None)
    doc = {"data": prepared.options.data, "split": ev.split, "n": len(ds), "models": results,
           "skipped": prepared.source.skipped}
    if plot and ctx.is_main:
        doc["plots"] = _stage_eval_plots(outs, plot, runs)
    distributed.main_only(outs.commit)
    return doc


def _stage_eval_plots(outs: Outputs, plot: str, runs: list[dict[str, Any]]) -> list[str]:
    """Draw the evaluation figures under a temporary prefix beside ``plot``, claimed by ``outs``."""
    import os

    from kdfine import plots

    p = Path(plot)
    tmp = str(p.with_name(f".kdfine-{os.urandom(4).hex()}-{p.name}"))
    finals = plots.evaluation_paths(plot)
    for final, staged in zip(finals, plots.evaluation_paths(tmp)):
        outs.claim(final, staged)
    plots.evaluation_figures(tmp, runs)
    return [str(f) for f in finals]


# ------------------------------------------------------------------------------------- noise


@api_function
def detect_noise(features: str, out: str, *, detect: DetectOptions | None = None, labels: str | None = None,
                 truth: str | None = None, vectors_from: str | None = None, noisy_out: str | None = None,
                 plot: str | None = None,
                 outputs: Outputs | None = None) -> tuple[dict[str, Any], Any, np.ndarray, np.ndarray | None]:
    """A detector (``detect.method``) on a feature dump; writes the kept (``out``) and rejected
    (``noisy_out``) CSVs with suggested labels, ``detect.labels_out`` (every sample's label, the
    likely suggestions applied), the review page ``detect.review`` and the per-class score histograms
    (``plot``, needs matplotlib), all or none (``outputs``: the caller's set to stage them in, which
    the caller commits). Returns the JSON-ready report, the detection, the labels used and the true
    labels (when known). Never imports torch (the review page of a torchvision dataset loads
    torchvision to read its images)."""
    d = (detect or DetectOptions()).validate("detect-noise")
    if plot:  # before reading anything: a missing matplotlib or a bad suffix fails at once
        from kdfine import plots

        plots.require()
        plots.check_image_path(plot)
    from kdfine.detect.dump import SIDECARS, sidecar

    with contextlib.ExitStack() as stack:
        outs = outputs if outputs is not None else stack.enter_context(Outputs())
        outs.input(features, "--features")
        for suffix in SIDECARS:
            outs.input(sidecar(features, suffix), "--features sidecar")
        for path, option in ((labels, "--labels"), (truth, "--truth"), (vectors_from, "--vectors-from")):
            outs.input(path, option)
        for path, option in ((plot, "--plot"), (out, "--out"), (noisy_out, "--noisy-out"),
                             (d.labels_out, "--labels-out"), (d.review, "--review")):
            outs.add(path, option)
        inp = command.read_inputs(features, labels=labels, truth=truth, method=d.method)
        det, report = command.run_detector(inp, zeta=d.zeta, method=d.method, vectors_from=vectors_from, seed=d.seed)
        _write_detection(outs, inp, det, report, d, out, noisy_out)
        if plot:
            outs.stage(plot, lambda tmp: _plot_detection(str(tmp), features, det, inp.labels, inp.truth))
            report["plot"] = plot
        if outputs is None:
            outs.commit()
    report.update(out=out, noisy_out=noisy_out, labels_out=d.labels_out, review=d.review)
    return report, det, inp.labels, inp.truth


def _write_detection(outs: Outputs, inp: Any, det: Any, report: dict[str, Any], d: DetectOptions, out: str,
                     noisy_out: str | None) -> None:
    """Suggest labels, then stage the CSVs, ``--labels-out`` and the review page; the suggestions'
    summary goes into ``report["suggest"]``."""
    from kdfine.detect.dump import class_names, row_paths
    from kdfine.detect.suggest import relabel

    suggested, p, evidence = command.suggest_labels(inp, det)
    names, paths = class_names(inp.dump.info, inp.num_classes), row_paths(inp.dump.info, inp.labels.shape[0])
    command.write_detection(det, inp.labels, outs, out, noisy_out, suggested=(suggested, p), names=names,
                            paths=paths)
    for c in report["classes"] if names else []:
        c["name"] = names[c["label"]]
    new = relabel(inp.labels, ~det.keep, suggested, p, d.relabel_min_p)
    report["suggest"] = command.suggestion_report(inp, det, suggested, new, evidence, d.relabel_min_p)
    if d.labels_out:
        command.write_labels(outs, d.labels_out, new)
    if d.review:
        from kdfine.inference import review as pages

        page = pages.Review(inp.labels, suggested, p, det.scores, det.p_clean, ~det.keep,
                            names or [str(c) for c in range(inp.num_classes)], paths, inp.dump.info, det.method,
                            evidence, d.relabel_min_p, _review_title(inp.path, inp.dump.info))
        text = pages.page_html(page, pages.stem_of(d.review))
        with outs.open(d.review, "w") as f:
            f.write(text)


def _review_title(features: str, info: dict[str, Any]) -> str:
    """"Suspects in DATA (split), features of MODEL", from what the dump's json knows."""
    data, model = info.get("data"), info.get("checkpoint")
    if isinstance(data, str) and isinstance(model, str):
        return f"Suspects in {data} ({info.get('split', 'train')}), features of {Path(model).name}"
    return f"Suspects of {Path(features).name}"


def _plot_detection(path: str, features_path: str, det, labels: np.ndarray, true: np.ndarray | None) -> str:
    from kdfine import plots
    from kdfine.detect import DETECTORS
    from kdfine.detect.dump import read_dump

    names = read_dump(features_path).info.get("classes")
    k = int(labels.max()) + 1 if labels.size else 1
    k = max(k, max((c.label + 1 for c in det.classes), default=k))
    if not names or len(names) < k:
        names = [str(c) for c in range(k)]
    thresholds = [float("nan")] * len(names)
    for c in det.classes:
        thresholds[c.label] = c.threshold
    info = DETECTORS.info.get(det.method, {})
    return plots.score_histograms(path, det.scores, labels, det.keep, names,
                                  is_clean=None if true is None else labels == true, thresholds=thresholds,
                                  title=f"{info.get('title', det.method)} of {Path(features_path).name}",
                                  xlabel=info.get("xlabel", "score"))


@api_function
def clean(model: str, out: str, *, data: DataOptions | None = None, detect: DetectOptions | None = None,
          export: str | None = None, export_dir: str | None = None, noisy_out: str | None = None,
          device: str = "auto", batch_size: int = 512, precision: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Features of the training split with ``model``, a detector, the kept index list, and optionally
    the kept samples as an ``npz:`` dataset (``export``) or an ImageFolder tree (``export_dir``); all
    outputs appear together or not at all; ``skipped`` lists the unreadable image files left out."""
    d = (detect or DetectOptions()).validate("clean")  # options first: nothing loaded yet
    data = (data or DataOptions()).validate("clean")
    ev = EvalOptions(batch_size=batch_size, precision=precision).validate("clean")
    if export and export_dir:
        raise UsageError("--export and --export-dir are alternatives; give one")
    import tempfile

    from kdfine.data.prepare import inherit_from
    from kdfine.detect.dump import read_dump
    from kdfine.models import checkpoint
    from kdfine.runtime import distributed

    with Outputs() as outs:
        outs.input(model, "--model")
        _declare_data(outs, data)
        outs.add(out, "--out")
        outs.add(noisy_out, "--noisy-out")
        outs.add(d.labels_out, "--labels-out")
        outs.add(d.review, "--review")
        outs.add(export, "--export")
        outs.add(export_dir, "--export-dir", directory=True)
        meta = checkpoint.read_meta(model)
        if export_dir:  # refused before the long work; the data's own names are checked again on export
            from kdfine.data.export import check_class_names

            check_class_names(list(meta["classes"]))
        opts = inherit_from(data, meta)
        with tempfile.TemporaryDirectory(prefix="kdfine-clean-") as tmp:
            dump = str(Path(tmp) / "features.npy")
            try:
                ev_doc = evaluate([model], data=data, split="train", dump_features=dump, device=device,
                                  batch_size=ev.batch_size, precision=ev.precision, quiet=quiet)
            except InputError as e:
                if tmp not in str(e):
                    raise
                raise InputError(f"clean: cannot write the temporary feature dump in {Path(tmp).parent} "
                                 f"({str(e).rpartition(': ')[2]}); set TMPDIR to a directory with room") from None

            def detect_and_write() -> dict[str, Any]:  # on rank 0, which holds the dump (rank-local tmp)
                report, det, _, _ = detect_noise(dump, out, detect=d, noisy_out=noisy_out, outputs=outs)
                info = read_dump(dump).info
                if export or export_dir:
                    _export_kept(outs, opts, det.clean_index, export, export_dir, quiet)
                outs.commit()
                report.pop("features", None)
                report.update(model=model, data=info["data"], label_noise=info["label_noise"],
                              train_top1=ev_doc["models"][0]["top1"], export=export or export_dir,
                              skipped=ev_doc["skipped"])
                return report

            return distributed.main_only(detect_and_write)


def _export_kept(outs: Outputs, opts: DataOptions, keep: np.ndarray, npz: str | None, folder: str | None,
                 quiet: bool) -> None:
    """Stage the kept samples as an npz file or an ImageFolder tree in ``outs``."""
    from kdfine.data.export import export_folder, export_npz
    from kdfine.data.prepare import prepare

    prepared = prepare(replace(opts, keep=None), quiet)
    if npz:
        outs.stage(npz, lambda tmp: export_npz(prepared.train, prepared.test, keep, tmp))
    else:
        outs.stage(folder, lambda tmp: export_folder(prepared.train, prepared.test, keep, tmp))


# ------------------------------------------------------------------------------------- leaving kdfine


@api_function
def export(model: str, out: str, *, fmt: str = "onnx", opset: int | None = None) -> dict[str, Any]:
    """Write ``model`` as an ONNX (or TorchScript) file with its normalisation inside, after
    checking the file's outputs against the checkpoint's (see :mod:`kdfine.inference.onnx`)."""
    from kdfine.inference import onnx as exporter

    exporter.require(fmt)  # missing packages fail before anything loads
    if is_stdout(out):  # `-`, /dev/stdout or the file stdout is redirected to
        raise UsageError(f"export --out {out}: the model is a binary file and stdout carries the written path; "
                         "give a file name (FILE.onnx or FILE.pt)")
    if opset is not None and not 7 <= opset <= 30:
        raise UsageError(f"--opset {opset}: expected an ONNX opset between 7 and 30")
    from kdfine.models import checkpoint

    with Outputs() as outs:
        outs.input(model, "--model")
        outs.add(out, "--out")
        ck = checkpoint.load(model, "cpu", "--model")
        data, checked = exporter.export(ck, fmt, opset, _recorded_test_split(ck.meta))
        with outs.open(out) as f:
            f.write(data)
        outs.commit()
    return {"path": out, "format": fmt, "model": model, "arch": ck.arch, "classes": ck.classes,
            "image_size": int(ck.meta["image_size"]), "bytes": len(data), "checked_on": checked}


def _recorded_test_split(meta: dict[str, Any]) -> Any:
    """The test split of a checkpoint's recorded data, or None when it cannot be loaded here."""
    from kdfine.data.prepare import inherit_from, prepare

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return prepare(inherit_from(DataOptions(), meta), quiet=True).test
    except Exception:  # data absent on this machine: the check still runs, on noise
        return None


@api_function
def predict(model: str, paths: list[str], *, out: str | None = None, top_k: int = 1, device: str = "auto",
            batch_size: int = 256) -> dict[str, Any]:
    """Class predictions of ``model`` (a checkpoint, or an ONNX file written by :func:`export`,
    run by onnxruntime without torch) for image files and folders, each decoded as the model's
    training data was (see :mod:`kdfine.inference.predict`); with ``out``, also the CSV
    ``path,label,prob,...``. Unreadable files and files above ``KDFINE_MAX_PIXELS`` are skipped."""
    if top_k < 1:
        raise UsageError(f"--top-k {top_k}: must be >= 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    if not paths:
        raise UsageError("predict needs at least one image or folder")
    from kdfine.data.decode import max_pixels
    from kdfine.inference import predict as predictor

    max_pixels()  # a bad KDFINE_MAX_PIXELS fails before anything loads
    with Outputs() as outs:
        outs.input(model, "--model")
        target = out if out not in (None, "-") else None
        outs.add(target, "--out")
        logits, classes, spec = _predictor(model, device, batch_size)
        files, missing = predictor.find_images(paths)
        for f in files:
            outs.input(f, "PATH")
        k = min(top_k, len(classes))
        rows, skipped = predictor.predict(logits, classes, files, spec, top_k=k)
        doc = {"model": model, "top_k": k, "n": len(rows), "decode": spec.record(), "skipped": missing + skipped,
               "predictions": rows}
        if target is not None:
            with outs.open(target, "w") as f:
                f.write(predictor.to_csv(rows, k))
            outs.commit()
            doc["out"] = target
    return doc


def _predictor(model: str, device: str, batch_size: int) -> tuple[Callable[[np.ndarray], np.ndarray], list[str],
                                                                   DecodeSpec]:
    """(logits function, class names, decoding) of a checkpoint or of an ONNX file (no torch)."""
    from kdfine.inference import predict as predictor

    if predictor.is_onnx(model):
        from kdfine.inference.onnx_run import load_onnx

        net = load_onnx(model, device, batch_size)
        return net.logits, net.classes, net.spec
    from kdfine.models import checkpoint
    from kdfine.runtime.device import resolve_device

    dev = resolve_device(device)
    ck = checkpoint.load(model, "cpu", "--model")
    return predictor.torch_logits(ck, dev, batch_size), ck.classes, predictor.spec_for(ck.meta, f"--model {model}")


@api_function
def plot_log(logs: list[str], out: str, *, title: str = "") -> dict[str, Any]:
    """Loss, accuracy, NLL and learning rate per epoch of one or more ``--log`` files, drawn to
    ``out`` (.png, .pdf or .svg; needs matplotlib)."""
    from kdfine import plots

    plots.require("plot-log")
    plots.check_image_path(out, "--out")
    with Outputs() as outs:
        for p in logs:
            outs.input(p, "RUN.jsonl")
        outs.add(out, "--out")
        records = [plots.read_log(p) for p in logs]
        stems = [Path(p).stem for p in logs]
        names = stems if len(set(stems)) == len(stems) else list(logs)
        outs.stage(out, lambda tmp: plots.training_curves(tmp, list(zip(names, records)), title=title, option="--out"))
        outs.commit()
    return {"path": out, "runs": [{"log": p, "name": n, "epochs": len(r), "last": r[-1]}
                                  for p, n, r in zip(logs, names, records)]}


# ------------------------------------------------------------------------------------- archs

#: list-archs counts the parameters of at most this many library networks (on the meta device).
COUNT_LIMIT = 50


@api_function
def list_archs(pattern: str | None = None, num_classes: int = 10) -> dict[str, Any]:
    """The arch names matching ``pattern`` and, for up to :data:`COUNT_LIMIT` tv:/timm: names,
    their parameter counts with a ``num_classes`` head."""
    from kdfine.models import list_archs as names
    from kdfine.models.zoo import is_zoo, param_count_cheap

    found = names(pattern)
    zoo = [n for n in found if is_zoo(n) and not n.endswith(":NAME")]
    counts = {n: param_count_cheap(n, num_classes) for n in zoo[:COUNT_LIMIT]}
    return {"pattern": pattern, "archs": found, "num_classes": num_classes,
            "params": {n: c for n, c in counts.items() if c is not None}}


# ------------------------------------------------------------------------------------- info


_INFO_KEYS = ("stage", "arch", "init", "num_classes", "classes", "in_channels", "image_size", "mean", "std", "data",
              "label_noise", "loss", "tau", "alpha", "seed", "epochs", "metrics")


@api_function
def info(path: str, *, parents: list[str] | None = None) -> dict[str, Any]:
    """What a checkpoint is: architecture and parameter count, classes, data and label noise,
    loss/tau/alpha, recorded metrics and options, file size, sha256, and its lineage (a tree of
    the teachers it was distilled from; see :mod:`kdfine.models.lineage`)."""
    from kdfine.models import checkpoint
    from kdfine.models.lineage import LineagePool, json_list

    meta = checkpoint.read_meta(path)
    p, pool, given = Path(path), LineagePool(), [Path(g) for g in parents or []]
    for g in given:
        checkpoint.read_meta(g, "--parent")
        pool.sha(g)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    doc: dict[str, Any] = {"path": str(p), "file_size": p.stat().st_size, "sha256": pool.sha(p),
                           "kdfine_version": meta.get("kdfine_version"), "schema": meta.get("schema")}
    doc.update({k: meta.get(k) for k in _INFO_KEYS})
    doc.update(noise_seed=config.get("noise_seed"), parents=json_list(meta.get("parents")),
               parent_paths=json_list(meta.get("parent_paths")), config=config, params=_params(meta, path))
    doc["lineage"] = pool.lineage(p, meta, given, {doc["sha256"]})
    for g in given:
        if pool.sha(g) not in pool.used:
            warnings.warn(f"--parent {g} is not an ancestor of {path}", KdfineWarning, stacklevel=2)
    return doc


def _params(meta: dict[str, Any], path: str) -> int | None:
    """The parameter count of the recorded arch, built on torch's meta device (no memory)."""
    import torch

    from kdfine.models import build, param_count

    try:
        with torch.device("meta"):
            return param_count(build(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"]))
    except UsageError:
        warnings.warn(f"{path}: arch {meta['arch']} is unknown to this kdfine version; no parameter count",
                      KdfineWarning, stacklevel=3)
        return None

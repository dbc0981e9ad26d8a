"""The Python API behind each subcommand: load data, build or load models, run, write files.

Each function validates its inputs before long work starts, returns a JSON-ready ``dict`` and
prints nothing to stdout (progress and notes go to stderr). The CLI is a thin shell over these.

>>> from kdfine import api
>>> r = api.train_teacher("t.safetensors", data=api.DataOptions("digits"), cfg=api.TrainConfig(epochs=5))
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kdfine import detection
from kdfine.data.noise import parse_noise
from kdfine.errors import InputError, KdfineWarning, UsageError
from kdfine.io import is_special, read_stdin_path
from kdfine.options import (LABEL_LOSSES, LOSSES, DataOptions, DetectOptions, EvalOptions, ModelOptions, TrainConfig,
                            check_choice)
from kdfine.outputs import Outputs, run_lock

if TYPE_CHECKING:  # torch-heavy modules are imported inside the commands that use them, so that
    # detect-noise (and `import kdfine.api`) never loads torch
    from kdfine import checkpoint, distributed
    from kdfine.data.prepare import Prepared
    from kdfine.data.sources import ArrayDataset

__all__ = ["DataOptions", "TrainConfig", "DetectOptions", "EvalOptions", "ModelOptions", "train_teacher", "distill",
           "evaluate", "clean", "detect_noise", "info", "list_archs", "export", "predict"]

#: --arch when none is given: (small images, images of at least LARGE_INPUT px) per stage. The
#: built-in CNNs convolve at full resolution, far too slow for large images.
DEFAULT_ARCH = {"teacher": ("cnn", "tv:resnet18"), "student": ("cnn-16", "tv:mobilenet_v3_small")}
LARGE_INPUT = 64


def _base_meta(arch: str, data: Prepared, cfg: TrainConfig, stage: str) -> dict[str, Any]:
    t = data.train
    return {"arch": arch, "num_classes": t.num_classes, "in_channels": t.in_channels, "image_size": t.image_size,
            "mean": list(t.mean), "std": list(t.std), "classes": t.classes, "data": data.options.data,
            "label_noise": str(parse_noise(data.options.label_noise)), "stage": stage, "loss": cfg.loss,
            "tau": cfg.tau, "alpha": cfg.alpha, "seed": cfg.seed, "epochs": cfg.epochs}


def _header(stage: str, arch: str, model: Any, data: Prepared, ctx: distributed.Context, chosen: bool = False,
            init: str | None = None) -> str:
    from kdfine.models import param_count

    train = data.train
    sel = f", {len(data.keep)} kept by --keep" if data.keep is not None else ""
    why = f" (default for {train.image_size}px images; --arch to change)" if chosen else ""
    start = f", from {init}" if init else ""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    head = f", backbone frozen ({frozen / 1e6:.2f}M)" if frozen else ""
    return (f"{stage} {arch}{why} ({param_count(model) / 1e6:.2f}M params{start}{head}) on {data.options.data}: "
            f"{len(train)} train "
            f"images{sel}, {len(data.test)} test, {train.num_classes} classes, device {ctx.device}"
            + (f" x{ctx.world_size}" if ctx.distributed else ""))


def _train(out: str, arch: str | None, data: Prepared, cfg: TrainConfig, ctx: distributed.Context, *,
           stage: str, model_opts: ModelOptions, teachers: list[checkpoint.Checkpoint] | None = None,
           log: str | None = None, resume: bool = False, force: bool = False, quiet: bool = False,
           extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from kdfine import checkpoint, distributed
    from kdfine.engine import TeacherEnsemble, fit
    from kdfine.progress import Reporter
    from kdfine.models.weights import initial_model
    from kdfine.state import state_path

    chosen = arch is None
    arch = arch or DEFAULT_ARCH[stage][data.train.image_size >= LARGE_INPUT]
    data = _with_weights_stats(data, arch, model_opts)
    train, teachers = _train_split(arch, data), teachers or []
    stream = _stream_choice(train, data.options.stream, cfg, ctx)

    def make(seed: int) -> tuple[torch.nn.Module, str | None]:
        """The network and where its weights came from; seeded, so that the second network of
        coteach and dividemix is built like the first from another seed."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return initial_model(arch, train.num_classes, train.in_channels, train.image_size,
                                 pretrained=model_opts.pretrained, init=model_opts.init,
                                 freeze=model_opts.freeze_backbone)

    torch.manual_seed(cfg.seed)
    model, init = make(cfg.seed)
    teacher = None
    if teachers:
        teacher = TeacherEnsemble([t.model.to(ctx.device) for t in teachers],
                                  [(t.meta["mean"], t.meta["std"]) for t in teachers], (train.mean, train.std),
                                  ctx.device)
    _check_batch(model, arch, cfg, data, ctx)
    run_config = {"arch": arch, **data.config(), **asdict(cfg), **asdict(model_opts), **(extra_config or {}),
                  "train_set": data.train_fingerprint(), "decoded": _decoded(data), "train_augment": train.augment}
    reporter = Reporter(quiet=quiet, enabled=ctx.is_main, title=stage)
    if ctx.is_main:
        reporter.print(_header(stage, arch, model, data, ctx, chosen, init)
                       + (", streamed from the decode cache" if stream else ""))
    state = None if is_special(out) else state_path(out)  # nothing is written beside /dev/null
    selection, val_index = data.keep, None
    if cfg.val_fraction > 0:
        from kdfine.data.prepare import split_validation

        selection, val_index = split_validation(train.labels, cfg.val_fraction, cfg.seed, data.keep)
        if ctx.is_main:
            reporter.print(f"validation: {val_index.size} training images held out (--val-fraction "
                           f"{cfg.val_fraction:g}), {selection.size} left to train on")
    result = fit(model, train, cfg, device=ctx.device, test=data.test, teacher=teacher, selection=selection,
                 truth=data.truth, state_file=state, resume=resume, force=force, run_config=run_config,
                 log_path=log, reporter=reporter, make_model=lambda seed: make(seed)[0], val_index=val_index,
                 stream=stream)
    final = _final_metrics(result)
    meta = _base_meta(arch, data, cfg, stage)
    meta.update(metrics=final, config=run_config, init=init, parents=[t.sha256 for t in teachers],
                parent_paths=[str(Path(t.path).resolve()) for t in teachers])

    def save() -> str:
        digest = checkpoint.save(out, result.model, meta)
        if state is not None:
            state.unlink(missing_ok=True)
        return digest

    sha = distributed.main_only(save)
    if result.selection is not None and cfg.fine_every > 0:
        final["fine_final_kept"] = int(result.selection.size)
    return {"path": str(out), "sha256": sha, "stage": stage, "arch": arch, "metrics": final,
            "best_epoch": result.best_epoch, "epochs": result.history, "streamed": stream,
            "skipped": data.source.skipped}


def _stream_choice(train: ArrayDataset, asked: bool | None, cfg: TrainConfig, ctx: distributed.Context) -> bool:
    """Whether the training batches are streamed (``--stream/--no-stream``, else by the memory
    budget); DivideMix, which needs the set in memory, is refused now, not after its warm-up."""
    from kdfine.data.batches import should_stream

    stream = should_stream(train.images.shape, train.augment, ctx.device, asked)
    if stream and cfg.fine_strategy == "dividemix":
        why = "" if asked else " (the training set exceeds the memory budget, KDFINE_MEMORY_BUDGET)"
        raise UsageError(f"--fine-strategy dividemix draws second views of any training image at any time: it "
                         f"needs the training set in memory{why}; give --no-stream")
    return stream


def _final_metrics(result: Any) -> dict[str, Any]:
    """The checkpoint's ``metrics`` from a :class:`kdfine.engine.FitResult`: test_* (of the best-
    validation epoch with --keep-best val, then also the last epoch's top-1) and the last epoch's
    training loss, accuracy and the median img/s."""
    final = {f"test_{k}": v for k, v in result.test.items() if k != "n"}
    if result.best_epoch is not None:
        final.update(best_epoch=result.best_epoch, val_top1_best=result.best_val,
                     test_top1_last=(result.test_last or {}).get("top1"))
    if result.history:
        last = result.history[-1]
        final.update(train_loss=last["loss"], train_acc=last["train_acc"],
                     img_per_s=float(np.median([h["img_per_s"] for h in result.history])))
    return final


def _train_split(arch: str, data: Prepared) -> ArrayDataset:
    """The training split with the arch's default augmentation when ``--augment`` was not given
    (rrc-flip for torchvision/timm archs at >= 96 px, :func:`kdfine.data.sources.arch_augment`)."""
    from kdfine.data.sources import arch_augment

    train = data.train
    if data.options.augment is None:
        train = replace(train, augment=arch_augment(arch, train.image_size, train.augment))
    return train


def _decoded(data: Prepared) -> dict[str, Any]:
    """How an image folder was decoded (square side, channels, resize mode, the original sizes),
    for the checkpoint's config; the cache's location is this machine's business and left out."""
    return {k: v for k, v in data.source.info.items() if k != "cache"}


def _with_weights_stats(data: Prepared, arch: str, model_opts: ModelOptions) -> Prepared:
    """With ``--pretrained``, the data normalised with the weights' mean/std (their channel
    average for grey images) instead of its own statistics."""
    if not model_opts.pretrained:
        return data
    from kdfine.models.zoo import pretrained_weights

    w = pretrained_weights(arch)
    c = data.train.in_channels
    mean, std = (w.mean, w.std) if c == len(w.mean) else ((float(np.mean(w.mean)),) * c, (float(np.mean(w.std)),) * c)
    return replace(data, train=replace(data.train, mean=mean, std=std), test=replace(data.test, mean=mean, std=std))


def _model_options(arch: str | None, data: DataOptions, model_opts: ModelOptions | None,
                   stage: str) -> tuple[str | None, DataOptions, ModelOptions]:
    """Check ``--pretrained``/``--init`` before any data loads; with ``--pretrained`` (the arch
    defaulting to a torchvision network) and no ``--image-size``, the weights' crop size."""
    from kdfine.models import check_arch

    mo = (model_opts or ModelOptions()).validate()
    if arch is not None:
        check_arch(arch)  # an unknown --arch fails here, before any data is loaded
    if mo.init and not Path(mo.init).is_file():
        raise InputError(f"--init {mo.init}: no such file")
    if mo.pretrained:
        from kdfine.models.zoo import is_zoo, pretrained_weights

        arch = arch or DEFAULT_ARCH[stage][1]
        weights = pretrained_weights(arch)
        if data.image_size is None and is_zoo(arch):
            data = replace(data, image_size=weights.image_size)
    return arch, data, mo


def _check_batch(model: Any, arch: str, cfg: TrainConfig, data: Prepared, ctx: distributed.Context) -> None:
    """BatchNorm needs two samples per batch: refuse a batch of one up front, not after an epoch."""
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    if cfg.batch_size // ctx.world_size < 2:
        per = f" per process of {ctx.world_size}" if ctx.world_size > 1 else ""
        raise UsageError(f"--batch-size {cfg.batch_size}: {arch} has BatchNorm layers, which need at least 2 "
                         f"samples per batch{per}")
    n = len(data.keep) if data.keep is not None else len(data.train)
    if n < 2 * ctx.world_size:
        what = f"--keep {data.options.keep} keeps" if data.keep is not None else "the training set has"
        raise InputError(f"{what} {n} sample(s); {arch} has BatchNorm layers, which need at least 2 per batch")


def _declare_data(outputs: Outputs, data: DataOptions) -> None:
    """The files a command reads through its data options: no output may overwrite them."""
    if data.data and data.data.partition(":")[0].strip().lower() == "npz":
        outputs.input(data.data.partition(":")[2], "--data")
    outputs.input(data.labels, "--labels")
    outputs.input(data.keep, "--keep")


def _check_outputs(out: str, log: str | None, data: DataOptions, teachers: list[str] = ()) -> None:
    """Every file a training run writes (the checkpoint, its resume state and lock, the log) is
    checked now, and none may be an input (a teacher, the data) or another output (exit 2)."""
    with Outputs() as outs:
        _declare_data(outs, data)
        for t in teachers:
            outs.input(t, "--teacher")
        outs.add(out, "--out", companions=(".state.safetensors", ".lock"))
        outs.add(log, "--log")


def _lock(out: str, ctx: distributed.Context):
    """The lock beside ``out`` (rank 0 of a torchrun job takes it for all)."""
    return run_lock(out) if ctx.is_main else contextlib.nullcontext()


def train_teacher(out: str, *, arch: str | None = None, data: DataOptions | None = None,
                  cfg: TrainConfig | None = None, model: ModelOptions | None = None, device: str = "auto",
                  log: str | None = None, resume: bool = False, force: bool = False,
                  quiet: bool = False) -> dict[str, Any]:
    """Train ``arch`` on ``data`` with ``cfg.loss`` (ce, gce, sce) and ``cfg.fine_strategy``, and
    write the checkpoint (the first network of a two-network strategy) to ``out``. Without
    ``arch``, ``cnn`` for images under 64 px and ``tv:resnet18`` from 64 px on."""
    cfg = (cfg or TrainConfig()).validate()  # options first: nothing loaded yet
    check_choice(cfg.loss, LABEL_LOSSES, "train-teacher --loss")
    data = (data or DataOptions()).validate()
    arch, data, model = _model_options(arch, data, model, "teacher")
    from kdfine import distributed
    from kdfine.data.prepare import prepare

    ctx = distributed.setup(device)
    _check_outputs(out, log, data)
    with _lock(out, ctx):
        return _train(out, arch, prepare(data, quiet), cfg, ctx, stage="teacher", model_opts=model, log=log, resume=resume,
                      force=force, quiet=quiet)


def distill(out: str, teachers: list[str], *, arch: str | None = None, data: DataOptions | None = None,
            cfg: TrainConfig | None = None, model: ModelOptions | None = None, device: str = "auto",
            log: str | None = None, resume: bool = False, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Distil one or more teachers (logits averaged) into a new ``arch`` student. Without ``arch``,
    ``cnn-16`` for images under 64 px and ``tv:mobilenet_v3_small`` from 64 px on."""
    cfg = (cfg or TrainConfig(loss="mse")).validate()  # options first: nothing loaded yet
    check_choice(cfg.loss, LOSSES, "distill --loss")
    if cfg.fine_strategy != "select":
        raise UsageError(f"--fine-strategy {cfg.fine_strategy} is for train-teacher; distill trains one student")
    data = (data or DataOptions()).validate()
    if not teachers:
        raise UsageError("distill needs at least one --teacher")
    arch, _, model = _model_options(arch, data, model, "student")
    from kdfine import checkpoint, distributed
    from kdfine.data.prepare import check_compatible, inherit_from, prepare

    ctx = distributed.setup(device)
    _check_outputs(out, log, data)
    paths = [distributed.main_only(read_stdin_path, "--teacher") if t == "-" else t for t in teachers]
    _check_outputs(out, log, data, paths)  # a teacher read from stdin is known only now
    with _lock(out, ctx):
        loaded = [checkpoint.load(p, "cpu", "--teacher") for p in paths]
        prepared = prepare(inherit_from(data, loaded[0].meta), quiet)
        for t in loaded:
            check_compatible(t, prepared.train)
        extra = {"teachers": [t.sha256 for t in loaded]}
        return _train(out, arch, prepared, cfg, ctx, stage="student", model_opts=model, teachers=loaded, log=log,
                      resume=resume, force=force, quiet=quiet, extra_config=extra)


# ------------------------------------------------------------------------------------- eval


def evaluate(models: list[str], *, data: DataOptions | None = None, split: str = "test",
             teachers: list[str] | None = None, dump_features: str | None = None, device: str = "auto",
             batch_size: int = 512, precision: str = "auto",
             on_logits: Callable[[checkpoint.Checkpoint, np.ndarray, ArrayDataset], None] | None = None,
             outputs: Outputs | None = None, quiet: bool = False) -> dict[str, Any]:
    """Metrics of each model on a split; with ``teachers``, agreement with their (averaged) logits;
    with ``dump_features``, the feature dump of the (first) model; ``on_logits(ckpt, logits (N, K),
    dataset)`` is called for each model (on rank 0), e.g. to plot. ``outputs``: the caller's set of
    outputs to stage the dump in (the caller commits); by default the dump is committed here.
    The split is read batch by batch (from the decode cache's memory map for image folders; each
    torchrun rank reads its shard); ``skipped`` lists the unreadable image files left out."""
    ev = EvalOptions(split, batch_size, precision).validate()  # options first: nothing loaded yet
    data = (data or DataOptions()).validate()
    if not models:
        raise UsageError("eval needs at least one --model")
    if dump_features and len(models) > 1:
        raise UsageError("--dump-features takes a single --model")
    from kdfine import checkpoint, distributed, features
    from kdfine.data.prepare import check_compatible, inherit_from, prepare

    ctx = distributed.setup(device)
    with contextlib.ExitStack() as stack:
        outs = outputs if outputs is not None else stack.enter_context(Outputs())
        _declare_data(outs, data)
        for m in models:
            outs.input(m, "--model")
        for t in teachers or []:
            outs.input(t, "--teacher")
        if dump_features:
            features.declare_dump(outs, dump_features)
        loaded = [checkpoint.load(m, "cpu", "--model") for m in models]
        tloaded = [checkpoint.load(t, "cpu", "--teacher") for t in (teachers or [])]
        prepared = prepare(inherit_from(data, loaded[0].meta), quiet)
        ds = prepared.source.split(split) if split == "test" else prepared.train
        if split == "train" and prepared.keep is not None:
            warnings.warn("--keep is ignored by eval: every training sample is evaluated", KdfineWarning, stacklevel=2)
        for c in loaded:
            check_compatible(c, ds, "--model")
        for t in tloaded:
            check_compatible(t, ds)
        run = _forward(ds, ctx, ev)
        teacher_logits = np.mean([run(t, False)[1] for t in tloaded], axis=0) if tloaded else None
        results = []
        for i, ck in enumerate(loaded):
            f, z = run(ck, bool(dump_features) and i == 0)
            r = _model_result(ck, z, ds, prepared, split, teacher_logits, tloaded)
            if on_logits is not None and ctx.is_main:
                on_logits(ck, z, ds)
            if f is not None:
                distributed.main_only(features.write_dump, dump_features, f, z, ds.labels,
                                      _dump_info(ck, prepared, ds, split, f),
                                      prepared.truth if split == "train" else None, outputs=outs)
                r["dump"] = dump_features
            results.append(r)
        if outputs is None:
            distributed.main_only(outs.commit)
    return {"data": prepared.options.data, "split": split, "n": len(ds), "models": results,
            "skipped": prepared.source.skipped}


def _forward(ds: ArrayDataset, ctx: distributed.Context, ev: EvalOptions) -> Callable:
    """``run(ckpt, want_features) -> (features or None, logits)`` of a checkpoint over ``ds``."""
    from kdfine import features
    from kdfine.device import use_channels_last

    def run(ck: checkpoint.Checkpoint, want_features: bool):
        ck.model.to(ctx.device)
        f, z = features.extract(ck.model, ds.images, ck.meta["mean"], ck.meta["std"], device=ctx.device,
                                batch_size=ev.batch_size, precision=ev.precision, features=want_features,
                                channels_last=use_channels_last("auto", ctx.device))
        ck.model.to("cpu")
        return f, z

    return run


def _model_result(ck, z, ds, prepared, split, teacher_logits, tloaded) -> dict[str, Any]:
    from kdfine import metrics

    r: dict[str, Any] = {"model": ck.path, "arch": ck.arch, "stage": ck.meta.get("stage"),
                         "parents": ck.meta.get("parents", []), **metrics.classification(z, ds.labels)}
    if split == "train" and prepared.truth is not None:
        r["top1_true_labels"] = metrics.topk_accuracy(z, prepared.truth, 1)
    if teacher_logits is not None:
        r.update(metrics.teacher_agreement(z, teacher_logits))
        r["teachers"] = [t.path for t in tloaded]
    return r


def _dump_info(ck, prepared: Prepared, ds: ArrayDataset, split: str, f: np.ndarray) -> dict[str, Any]:
    return {"checkpoint": str(Path(ck.path).resolve()), "checkpoint_sha256": ck.sha256,
            "data": prepared.options.data, "split": split, "label_noise": str(parse_noise(prepared.options.label_noise)),
            "noise_seed": prepared.options.noise_seed, "num_classes": ds.num_classes, "classes": ds.classes,
            "n": len(ds), "dim": int(f.shape[1])}


# ------------------------------------------------------------------------------------- noise


def detect_noise(features: str, out: str, *, detect: DetectOptions | None = None, labels: str | None = None,
                 truth: str | None = None, vectors_from: str | None = None, noisy_out: str | None = None,
                 outputs: Outputs | None = None) -> tuple[dict[str, Any], Any, np.ndarray, np.ndarray | None]:
    """FINE (or the small-loss detector) on a feature dump; writes the kept (``out``) and rejected
    (``noisy_out``) CSVs, both or neither (``outputs``: the caller's set to stage them in, which the
    caller commits). Returns the JSON-ready report, the detection, the labels used and the true
    labels (when known). Never imports torch."""
    d = (detect or DetectOptions()).validate()
    from kdfine.features import SIDECARS, sidecar

    with contextlib.ExitStack() as stack:
        outs = outputs if outputs is not None else stack.enter_context(Outputs())
        outs.input(features, "--features")
        for suffix in SIDECARS:
            outs.input(sidecar(features, suffix), "--features sidecar")
        for path, option in ((labels, "--labels"), (truth, "--truth"), (vectors_from, "--vectors-from")):
            outs.input(path, option)
        outs.add(out, "--out")
        outs.add(noisy_out, "--noisy-out")
        det, report, y, true = detection.detect_noise(features, labels=labels, truth=truth, zeta=d.zeta,
                                                      method=d.method, vectors_from=vectors_from, seed=d.seed)
        detection.write_detection(det, y, outs, out, noisy_out)
        if outputs is None:
            outs.commit()
    report.update(out=out, noisy_out=noisy_out)
    return report, det, y, true


def clean(model: str, out: str, *, data: DataOptions | None = None, detect: DetectOptions | None = None,
          export: str | None = None, export_dir: str | None = None, noisy_out: str | None = None,
          device: str = "auto", batch_size: int = 512, quiet: bool = False) -> dict[str, Any]:
    """Features of the training split with ``model``, FINE, the kept index list, and optionally the
    kept samples as an ``npz:`` dataset (``export``) or an ImageFolder tree (``export_dir``); all
    outputs appear together or not at all; ``skipped`` lists the unreadable image files left out."""
    d = (detect or DetectOptions()).validate()  # options first: nothing loaded yet
    data = (data or DataOptions()).validate()
    if export and export_dir:
        raise UsageError("--export and --export-dir are alternatives; give one")
    import tempfile

    from kdfine import checkpoint, distributed, features
    from kdfine.data.prepare import inherit_from

    with Outputs() as outs:
        outs.input(model, "--model")
        _declare_data(outs, data)
        outs.add(out, "--out")
        outs.add(noisy_out, "--noisy-out")
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
                ev = evaluate([model], data=data, split="train", dump_features=dump, device=device,
                              batch_size=batch_size, quiet=quiet)
            except InputError as e:
                if tmp not in str(e):
                    raise
                raise InputError(f"clean: cannot write the temporary feature dump in {Path(tmp).parent} "
                                 f"({str(e).rpartition(': ')[2]}); set TMPDIR to a directory with room") from None

            def detect_and_write() -> dict[str, Any]:  # on rank 0, which holds the dump (rank-local tmp)
                report, det, _, _ = detect_noise(dump, out, detect=d, noisy_out=noisy_out, outputs=outs)
                info = features.read_dump(dump).info
                if export or export_dir:
                    _export(outs, opts, det.clean_index, export, export_dir, quiet)
                outs.commit()
                report.pop("features", None)
                report.update(model=model, data=info["data"], label_noise=info["label_noise"],
                              train_top1=ev["models"][0]["top1"], export=export or export_dir,
                              skipped=ev["skipped"])
                return report

            return distributed.main_only(detect_and_write)


def _export(outs: Outputs, opts: DataOptions, keep: np.ndarray, npz: str | None, folder: str | None,
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


def export(model: str, out: str, *, fmt: str = "onnx", opset: int | None = None) -> dict[str, Any]:
    """Write ``model`` as an ONNX (or TorchScript) file with its normalisation inside, after
    checking the file's outputs against the checkpoint's (see :mod:`kdfine.export`)."""
    from kdfine import export as exporter

    exporter.require(fmt)  # missing packages fail before anything loads
    if opset is not None and not 7 <= opset <= 30:
        raise UsageError(f"--opset {opset}: expected an ONNX opset between 7 and 30")
    from kdfine import checkpoint
    from kdfine.io import atomic_write_bytes, check_writable

    check_writable(out)
    ck = checkpoint.load(model, "cpu", "--model")
    data, checked = exporter.export(ck, fmt, opset)
    atomic_write_bytes(out, data)
    return {"path": out, "format": fmt, "model": model, "arch": ck.arch, "classes": ck.classes,
            "image_size": int(ck.meta["image_size"]), "bytes": len(data), "checked_on": checked}


def predict(model: str, paths: list[str], *, top_k: int = 1, device: str = "auto",
            batch_size: int = 256) -> dict[str, Any]:
    """Class predictions of ``model`` for image files and folders (see :mod:`kdfine.predict`)."""
    if top_k < 1:
        raise UsageError(f"--top-k {top_k}: must be >= 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    if not paths:
        raise UsageError("predict needs at least one image or folder")
    from kdfine import checkpoint, predict as predictor
    from kdfine.device import resolve_device

    dev = resolve_device(device)
    ck = checkpoint.load(model, "cpu", "--model")
    files = predictor.find_images(paths)
    rows, skipped = predictor.predict(ck, files, top_k=min(top_k, ck.num_classes), device=dev,
                                      batch_size=batch_size)
    return {"model": model, "top_k": min(top_k, ck.num_classes), "n": len(rows), "skipped": skipped,
            "predictions": rows}


# ------------------------------------------------------------------------------------- archs

#: list-archs counts the parameters of at most this many library networks (on the meta device).
COUNT_LIMIT = 50


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


def info(path: str, *, parents: list[str] | None = None) -> dict[str, Any]:
    """What a checkpoint is: architecture and parameter count, classes, data and label noise,
    loss/tau/alpha, recorded metrics and options, file size, sha256, and its lineage (a tree of
    the teachers it was distilled from; see :mod:`kdfine.lineage`)."""
    from kdfine import checkpoint
    from kdfine.lineage import LineagePool, json_list

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
    from kdfine.models import build, param_count

    try:
        return param_count(build(meta["arch"], int(meta["num_classes"]), int(meta["in_channels"]),
                                 int(meta["image_size"])))
    except UsageError:
        warnings.warn(f"{path}: arch {meta['arch']} is unknown to this kdfine version; no parameter count",
                      KdfineWarning, stacklevel=3)
        return None

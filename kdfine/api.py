"""The Python API behind each subcommand: load data, build or load models, run, write files.

Each function validates its inputs before long work starts, returns a JSON-ready ``dict`` and
prints nothing to stdout (progress and notes go to stderr). The CLI is a thin shell over these.

>>> from kdfine import api
>>> r = api.train_teacher("t.safetensors", data=api.DataOptions("digits"), cfg=api.TrainConfig(epochs=5))
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kdfine import detection
from kdfine.data.noise import parse_noise
from kdfine.errors import InputError, KdfineWarning, UsageError
from kdfine.io import check_writable, is_special, read_stdin_path
from kdfine.options import DataOptions, DetectOptions, EvalOptions, TrainConfig

if TYPE_CHECKING:  # torch-heavy modules are imported inside the commands that use them, so that
    # detect-noise (and `import kdfine.api`) never loads torch
    from kdfine import checkpoint, distributed
    from kdfine.data.prepare import Prepared
    from kdfine.data.sources import ArrayDataset

__all__ = ["DataOptions", "TrainConfig", "DetectOptions", "EvalOptions", "train_teacher", "distill", "evaluate",
           "clean", "detect_noise", "info"]


def _base_meta(arch: str, data: Prepared, cfg: TrainConfig, stage: str) -> dict[str, Any]:
    t = data.train
    return {"arch": arch, "num_classes": t.num_classes, "in_channels": t.in_channels, "image_size": t.image_size,
            "mean": list(t.mean), "std": list(t.std), "classes": t.classes, "data": data.options.data,
            "label_noise": str(parse_noise(data.options.label_noise)), "stage": stage, "loss": cfg.loss,
            "tau": cfg.tau, "alpha": cfg.alpha, "seed": cfg.seed, "epochs": cfg.epochs}


def _header(stage: str, arch: str, model: Any, data: Prepared, ctx: distributed.Context) -> str:
    from kdfine.models import param_count

    train = data.train
    sel = f", {len(data.keep)} kept by --keep" if data.keep is not None else ""
    return (f"{stage} {arch} ({param_count(model) / 1e6:.2f}M params) on {data.options.data}: {len(train)} train "
            f"images{sel}, {len(data.test)} test, {train.num_classes} classes, device {ctx.device}"
            + (f" x{ctx.world_size}" if ctx.distributed else ""))


def _train(out: str, arch: str, data: Prepared, cfg: TrainConfig, ctx: distributed.Context, *,
           stage: str, teachers: list[checkpoint.Checkpoint] | None = None, log: str | None = None,
           resume: bool = False, force: bool = False, quiet: bool = False,
           extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from kdfine import checkpoint, distributed
    from kdfine.data.batches import should_stream
    from kdfine.engine import TeacherEnsemble, fit
    from kdfine.progress import Reporter
    from kdfine.state import state_path
    from kdfine.models import build

    train, teachers = _train_split(arch, data), teachers or []
    stream = should_stream(train.images.shape, train.augment, ctx.device, data.options.stream)
    torch.manual_seed(cfg.seed)
    model = build(arch, train.num_classes, train.in_channels, train.image_size)
    teacher = None
    if teachers:
        teacher = TeacherEnsemble([t.model.to(ctx.device) for t in teachers],
                                  [(t.meta["mean"], t.meta["std"]) for t in teachers], (train.mean, train.std),
                                  ctx.device)
    run_config = {"arch": arch, **data.config(), **asdict(cfg), **(extra_config or {}),
                  "decoded": _decoded(data), "train_augment": train.augment}
    reporter = Reporter(quiet=quiet, enabled=ctx.is_main, title=stage)
    if ctx.is_main:
        reporter.print(_header(stage, arch, model, data, ctx) + (", streamed from the decode cache" if stream else ""))
    state = None if is_special(out) else state_path(out)  # nothing is written beside /dev/null
    result = fit(model, train, cfg, device=ctx.device, test=data.test, teacher=teacher, selection=data.keep,
                 truth=data.truth, state_file=state, resume=resume, force=force, run_config=run_config,
                 log_path=log, reporter=reporter, stream=stream)
    final = {f"test_{k}": v for k, v in result.test.items() if k != "n"}
    if result.history:
        last = result.history[-1]
        final.update(train_loss=last["loss"], train_acc=last["train_acc"],
                     img_per_s=float(np.median([h["img_per_s"] for h in result.history])))
    meta = _base_meta(arch, data, cfg, stage)
    meta.update(metrics=final, config=run_config, parents=[t.sha256 for t in teachers],
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
            "epochs": result.history, "streamed": stream, "skipped": data.source.skipped}


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


def _check_outputs(out: str, log: str | None) -> None:
    check_writable(out)
    if log:
        check_writable(log, "--log")


def train_teacher(out: str, *, arch: str = "cnn", data: DataOptions | None = None, cfg: TrainConfig | None = None,
                  device: str = "auto", log: str | None = None, resume: bool = False, force: bool = False,
                  quiet: bool = False) -> dict[str, Any]:
    """Train ``arch`` on ``data`` with cross-entropy and write the checkpoint to ``out``."""
    cfg = replace(cfg or TrainConfig(), loss="ce").validate()  # options first: nothing loaded yet
    data = (data or DataOptions()).validate()
    from kdfine import distributed
    from kdfine.data.prepare import prepare
    from kdfine.models import check_arch

    check_arch(arch)  # an unknown --arch fails here, before any data is loaded
    ctx = distributed.setup(device)
    _check_outputs(out, log)
    return _train(out, arch, prepare(data, quiet), cfg, ctx, stage="teacher", log=log, resume=resume, force=force,
                  quiet=quiet)


def distill(out: str, teachers: list[str], *, arch: str = "cnn-16", data: DataOptions | None = None,
            cfg: TrainConfig | None = None, device: str = "auto", log: str | None = None, resume: bool = False,
            force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Distil one or more teachers (logits averaged) into a new ``arch`` student."""
    cfg = (cfg or TrainConfig(loss="mse")).validate()  # options first: nothing loaded yet
    data = (data or DataOptions()).validate()
    if not teachers:
        raise UsageError("distill needs at least one --teacher")
    from kdfine import checkpoint, distributed
    from kdfine.data.prepare import check_compatible, inherit_from, prepare
    from kdfine.models import check_arch

    check_arch(arch)
    ctx = distributed.setup(device)
    _check_outputs(out, log)
    paths = [distributed.main_only(read_stdin_path, "--teacher") if t == "-" else t for t in teachers]
    loaded = [checkpoint.load(p, "cpu", "--teacher") for p in paths]
    prepared = prepare(inherit_from(data, loaded[0].meta), quiet)
    for t in loaded:
        check_compatible(t, prepared.train)
    extra = {"teachers": [t.sha256 for t in loaded]}
    return _train(out, arch, prepared, cfg, ctx, stage="student", teachers=loaded, log=log, resume=resume,
                  force=force, quiet=quiet, extra_config=extra)


# ------------------------------------------------------------------------------------- eval


def evaluate(models: list[str], *, data: DataOptions | None = None, split: str = "test",
             teachers: list[str] | None = None, dump_features: str | None = None, device: str = "auto",
             batch_size: int = 512, precision: str = "auto",
             on_logits: Callable[[checkpoint.Checkpoint, np.ndarray, ArrayDataset], None] | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Metrics of each model on a split; with ``teachers``, agreement with their (averaged) logits;
    with ``dump_features``, the feature dump of the (first) model; ``on_logits(ckpt, logits (N, K),
    dataset)`` is called for each model (on rank 0), e.g. to plot. The split is read batch by batch
    (from the decode cache's memory map for image folders; each torchrun rank reads its shard);
    ``skipped`` lists the unreadable image files left out."""
    ev = EvalOptions(split, batch_size, precision).validate()  # options first: nothing loaded yet
    data = (data or DataOptions()).validate()
    if not models:
        raise UsageError("eval needs at least one --model")
    if dump_features and len(models) > 1:
        raise UsageError("--dump-features takes a single --model")
    from kdfine import checkpoint, distributed, features
    from kdfine.data.prepare import check_compatible, inherit_from, prepare

    ctx = distributed.setup(device)
    if dump_features:
        features.check_dump_path(dump_features)
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
                                  _dump_info(ck, prepared, ds, split, f), prepared.truth if split == "train" else None)
            r["dump"] = dump_features
        results.append(r)
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
                 truth: str | None = None, vectors_from: str | None = None,
                 noisy_out: str | None = None) -> tuple[dict[str, Any], Any, np.ndarray, np.ndarray | None]:
    """FINE (or the small-loss detector) on a feature dump; writes the kept (``out``) and rejected
    (``noisy_out``) CSVs. Returns the JSON-ready report, the detection, the labels used and the
    true labels (when known). Never imports torch."""
    d = (detect or DetectOptions()).validate()
    det, report, y, true = detection.detect_noise(features, labels=labels, truth=truth, zeta=d.zeta,
                                                  method=d.method, vectors_from=vectors_from, seed=d.seed)
    detection.write_detection(det, y, out, noisy_out)
    report.update(out=out, noisy_out=noisy_out)
    return report, det, y, true


def clean(model: str, out: str, *, data: DataOptions | None = None, detect: DetectOptions | None = None,
          export: str | None = None, export_dir: str | None = None, noisy_out: str | None = None,
          device: str = "auto", batch_size: int = 512, quiet: bool = False) -> dict[str, Any]:
    """Features of the training split with ``model``, FINE, the kept index list, and optionally the
    kept samples as an ``npz:`` dataset (``export``) or an ImageFolder tree (``export_dir``);
    ``skipped`` lists the unreadable image files left out."""
    d = (detect or DetectOptions()).validate()  # options first: nothing loaded yet
    data = (data or DataOptions()).validate()
    if export and export_dir:
        raise UsageError("--export and --export-dir are alternatives; give one")
    import tempfile

    from kdfine import checkpoint, distributed, features
    from kdfine.data.prepare import inherit_from

    if out != "-":
        check_writable(out)
    if export:
        check_writable(export, "--export")
    if export_dir and Path(export_dir).exists() and any(Path(export_dir).iterdir()):
        raise InputError(f"--export-dir {export_dir}: exists and is not empty; choose a new directory")
    opts = inherit_from(data, checkpoint.read_meta(model))
    with tempfile.TemporaryDirectory(prefix="kdfine-clean-") as tmp:
        dump = str(Path(tmp) / "features.npy")
        ev = evaluate([model], data=data, split="train", dump_features=dump, device=device, batch_size=batch_size,
                      quiet=quiet)

        def detect_and_write() -> dict[str, Any]:  # on rank 0, which holds the dump (rank-local tmp)
            report, det, _, _ = detect_noise(dump, out, detect=d, noisy_out=noisy_out)
            info = features.read_dump(dump).info
            if export or export_dir:
                _export(opts, det.clean_index, export, export_dir, quiet)
            report.pop("features", None)
            report.update(model=model, data=info["data"], label_noise=info["label_noise"],
                          train_top1=ev["models"][0]["top1"], export=export or export_dir, skipped=ev["skipped"])
            return report

        return distributed.main_only(detect_and_write)


def _export(opts: DataOptions, keep: np.ndarray, npz: str | None, folder: str | None, quiet: bool) -> None:
    from kdfine.data.export import export_folder, export_npz
    from kdfine.data.prepare import prepare

    prepared = prepare(replace(opts, keep=None), quiet)
    if npz:
        export_npz(prepared.train, prepared.test, keep, npz)
    else:
        export_folder(prepared.train, prepared.test, keep, folder)


# ------------------------------------------------------------------------------------- info


_INFO_KEYS = ("stage", "arch", "num_classes", "classes", "in_channels", "image_size", "mean", "std", "data",
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

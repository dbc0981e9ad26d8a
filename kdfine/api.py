"""The Python API behind each subcommand: load data, build or load models, run, write files.

Each function validates its inputs before long work starts, returns a JSON-ready ``dict`` and
prints nothing to stdout (progress and notes go to stderr). The CLI is a thin shell over these.

>>> from kdfine import api
>>> r = api.train_teacher("t.safetensors", data=api.DataOptions("digits"), cfg=api.TrainConfig(epochs=5))
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdfine import checkpoint, distributed, features, fine, metrics
from kdfine.data.noise import apply_noise, parse_noise
from kdfine.data.sources import ArrayDataset, Source, load_source
from kdfine.detection import detect_noise, write_detection  # noqa: F401  (torch-free, re-exported)
from kdfine.engine import Reporter, TeacherEnsemble, TrainConfig, fit, state_path
from kdfine.errors import InputError, KdfineWarning, UsageError
from kdfine.io import check_writable, read_index, read_labels, read_stdin_path
from kdfine.models import build, param_count

__all__ = ["DataOptions", "TrainConfig", "prepare_data", "train_teacher", "distill", "evaluate"]


@dataclass
class DataOptions:
    """Where the data comes from and how its training labels are changed (see ``--help``)."""

    data: str | None = None  # None: the checkpoint's recorded data, or digits for a new teacher
    data_root: str | None = None
    download: bool = False
    image_size: int | None = None
    test_fraction: float = 0.2
    augment: str | None = None
    label_noise: str | None = None
    noise_seed: int = 0
    labels: str | None = None
    keep: str | None = None

    def inherit(self, recorded: dict[str, Any]) -> "DataOptions":
        """Fill what was not given from a checkpoint's recorded ``config``: with no ``--data``,
        the same data, image size and label noise the checkpoint was trained on."""
        if self.data is not None:
            return self
        keys = ("data", "data_root", "image_size", "test_fraction")
        upd = {k: recorded.get(k) for k in keys if recorded.get(k) is not None}
        if self.label_noise is None and recorded.get("label_noise") not in (None, "none"):
            upd["label_noise"] = recorded["label_noise"]
            upd["noise_seed"] = int(recorded.get("noise_seed", 0))
        return replace(self, **upd)


@dataclass
class Prepared:
    """Data ready for training or evaluation: ``train`` carries the labels to train on (noisy
    ones included), ``truth`` the true labels when noise was injected, ``keep`` the ``--keep``
    subset."""

    source: Source
    train: ArrayDataset
    test: ArrayDataset
    truth: np.ndarray | None
    keep: np.ndarray | None
    options: DataOptions


def prepare_data(opts: DataOptions) -> Prepared:
    spec = opts.data or "digits"
    noise = parse_noise(opts.label_noise)
    source = load_source(spec, root=opts.data_root, download=opts.download, image_size=opts.image_size,
                         test_fraction=opts.test_fraction, augment=opts.augment)
    train, truth = source.train, None
    if opts.labels:
        train = train.with_labels(read_labels(opts.labels, len(train), train.num_classes))
    if noise.kind != "none":
        truth = train.labels
        train = train.with_labels(apply_noise(truth, noise, train.num_classes, opts.noise_seed, source.name,
                                              train.classes))
    keep = None
    if opts.keep:
        keep = np.sort(read_index(opts.keep, len(train), "--keep"))
        if keep.size == 0:
            raise InputError(f"--keep {opts.keep}: keeps no samples; nothing to train on")
        present = np.bincount(train.labels[keep], minlength=train.num_classes)
        empty = [train.classes[c] for c in np.flatnonzero(present == 0)]
        if empty:
            warnings.warn(f"--keep {opts.keep} leaves no sample of class {', '.join(empty[:5])}"
                          f"{' ...' if len(empty) > 5 else ''}", KdfineWarning, stacklevel=2)
    return Prepared(source, train, source.test, truth, keep, replace(opts, data=spec))


def _data_config(opts: DataOptions) -> dict[str, Any]:
    d = asdict(opts)
    d["label_noise"] = str(parse_noise(opts.label_noise))
    return d


def _base_meta(arch: str, data: Prepared, cfg: TrainConfig, stage: str) -> dict[str, Any]:
    t = data.train
    return {"arch": arch, "num_classes": t.num_classes, "in_channels": t.in_channels, "image_size": t.image_size,
            "mean": list(t.mean), "std": list(t.std), "classes": t.classes, "data": data.options.data,
            "label_noise": str(parse_noise(data.options.label_noise)), "stage": stage, "loss": cfg.loss,
            "tau": cfg.tau, "alpha": cfg.alpha, "seed": cfg.seed, "epochs": cfg.epochs}


def _train(out: str, arch: str, data: Prepared, cfg: TrainConfig, ctx: distributed.Context, *,
           stage: str, teachers: list[checkpoint.Checkpoint] | None = None, log: str | None = None,
           resume: bool = False, force: bool = False, quiet: bool = False,
           extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    train = data.train
    torch.manual_seed(cfg.seed)
    model = build(arch, train.num_classes, train.in_channels, train.image_size)
    teacher = None
    if teachers:
        teacher = TeacherEnsemble([t.model.to(ctx.device) for t in teachers],
                                  [(t.meta["mean"], t.meta["std"]) for t in teachers], (train.mean, train.std),
                                  ctx.device)
    run_config = {"arch": arch, **_data_config(data.options), **asdict(cfg), **(extra_config or {})}
    reporter = Reporter(quiet=quiet, enabled=ctx.is_main, title=stage)
    if ctx.is_main:
        sel = f", {len(data.keep)} kept by --keep" if data.keep is not None else ""
        reporter.print(f"{stage} {arch} ({param_count(model) / 1e6:.2f}M params) on {data.options.data}: "
                       f"{len(train)} train images{sel}, {len(data.test)} test, {train.num_classes} classes, "
                       f"device {ctx.device}" + (f" x{ctx.world_size}" if ctx.distributed else ""))
    result = fit(model, train, cfg, device=ctx.device, test=data.test, teacher=teacher, selection=data.keep,
                 truth=data.truth, state_file=state_path(out), resume=resume, force=force, run_config=run_config,
                 log_path=log, reporter=reporter)
    final = {f"test_{k}": v for k, v in result.test.items() if k != "n"}
    if result.history:
        last = result.history[-1]
        final.update(train_loss=last["loss"], train_acc=last["train_acc"],
                     img_per_s=float(np.median([h["img_per_s"] for h in result.history])))
    meta = _base_meta(arch, data, cfg, stage)
    meta.update(metrics=final, config=run_config,
                parents=[t.sha256 for t in teachers] if teachers else [],
                parent_paths=[str(Path(t.path).resolve()) for t in teachers] if teachers else [])
    sha = ""
    if ctx.is_main:
        sha = checkpoint.save(out, result.model, meta)
        state_path(out).unlink(missing_ok=True)
    distributed.barrier()
    if result.selection is not None and cfg.fine_every > 0:
        final["fine_final_kept"] = int(result.selection.size)
    return {"path": str(out), "sha256": sha, "stage": stage, "arch": arch, "metrics": final,
            "epochs": result.history}


def train_teacher(out: str, *, arch: str = "cnn", data: DataOptions | None = None, cfg: TrainConfig | None = None,
                  device: str = "auto", log: str | None = None, resume: bool = False, force: bool = False,
                  quiet: bool = False) -> dict[str, Any]:
    """Train ``arch`` on ``data`` with cross-entropy and write the checkpoint to ``out``."""
    cfg = cfg or TrainConfig()
    cfg = replace(cfg, loss="ce")
    cfg.validate()
    ctx = distributed.setup(device)
    check_writable(out)
    if log:
        check_writable(log, "--log")
    build(arch, 2)  # an unknown --arch fails here, before any data is loaded
    prepared = prepare_data(data or DataOptions())
    return _train(out, arch, prepared, cfg, ctx, stage="teacher", log=log, resume=resume, force=force, quiet=quiet)


def resolve_teacher_paths(teachers: list[str]) -> list[str]:
    """``-`` becomes the path read from stdin (rank 0 reads, every rank receives it)."""
    out = []
    for t in teachers:
        if t == "-":
            msg = None
            if distributed.context().is_main:
                try:
                    t = read_stdin_path("--teacher")
                except (InputError, UsageError) as e:
                    msg = (type(e).__name__, str(e))
            t, msg = distributed.broadcast_object((t, msg))
            if msg:
                raise (InputError if msg[0] == "InputError" else UsageError)(msg[1])
        out.append(t)
    return out


def check_compatible(ckpt: checkpoint.Checkpoint, data: ArrayDataset, what: str = "--teacher") -> None:
    """Exit 3 naming the field when a checkpoint cannot run on ``data``."""
    fields = [("num_classes", ckpt.num_classes, data.num_classes),
              ("in_channels", int(ckpt.meta["in_channels"]), data.in_channels),
              ("image_size", int(ckpt.meta["image_size"]), data.image_size)]
    for name, have, want in fields:
        if have != want:
            raise InputError(f"{what} {ckpt.path}: {name} is {have} but the data {data.spec} has {want}")
    if ckpt.classes != data.classes:
        diff = next(i for i, (a, b) in enumerate(zip(ckpt.classes, data.classes)) if a != b)
        raise InputError(f"{what} {ckpt.path}: classes differ from the data {data.spec} "
                         f"(class {diff} is '{ckpt.classes[diff]}' vs '{data.classes[diff]}')")


def distill(out: str, teachers: list[str], *, arch: str = "cnn-16", data: DataOptions | None = None,
            cfg: TrainConfig | None = None, device: str = "auto", log: str | None = None, resume: bool = False,
            force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Distil one or more teachers (logits averaged) into a new ``arch`` student."""
    cfg = cfg or TrainConfig(loss="mse")
    cfg.validate()
    if not teachers:
        raise UsageError("distill needs at least one --teacher")
    ctx = distributed.setup(device)
    check_writable(out)
    if log:
        check_writable(log, "--log")
    build(arch, 2)
    paths = resolve_teacher_paths(teachers)
    loaded = [checkpoint.load(p, "cpu", "--teacher") for p in paths]
    data = (data or DataOptions()).inherit(loaded[0].meta.get("config") or {"data": loaded[0].meta.get("data")})
    prepared = prepare_data(data)
    for t in loaded:
        check_compatible(t, prepared.train)
    extra = {"teachers": [t.sha256 for t in loaded]}
    return _train(out, arch, prepared, cfg, ctx, stage="student", teachers=loaded, log=log, resume=resume,
                  force=force, quiet=quiet, extra_config=extra)


def evaluate(models: list[str], *, data: DataOptions | None = None, split: str = "test",
             teachers: list[str] | None = None, dump_features: str | None = None, device: str = "auto",
             batch_size: int = 512, precision: str = "auto") -> dict[str, Any]:
    """Metrics of each model on a split; with ``teachers``, agreement with their (averaged) logits;
    with ``dump_features``, the feature dump of the (first) model."""
    if not models:
        raise UsageError("eval needs at least one --model")
    if dump_features and len(models) > 1:
        raise UsageError("--dump-features takes a single --model")
    ctx = distributed.setup(device)
    if dump_features:
        check_writable(dump_features, "--dump-features")
    loaded = [checkpoint.load(m, "cpu", "--model") for m in models]
    tloaded = [checkpoint.load(t, "cpu", "--teacher") for t in (teachers or [])]
    opts = (data or DataOptions()).inherit(loaded[0].meta.get("config") or {"data": loaded[0].meta.get("data")})
    prepared = prepare_data(opts)
    ds = prepared.source.split(split) if split == "test" else prepared.train
    if split == "train" and prepared.keep is not None:
        warnings.warn("--keep is ignored by eval: every training sample is evaluated", KdfineWarning, stacklevel=2)
    for c in loaded:
        check_compatible(c, ds, "--model")
    for t in tloaded:
        check_compatible(t, ds)
    prec = precision

    def run(ck: checkpoint.Checkpoint, want_features: bool):
        ck.model.to(ctx.device)
        f, z = features.extract(ck.model, ds.images, ck.meta["mean"], ck.meta["std"], device=ctx.device,
                                batch_size=batch_size, precision=prec, features=want_features,
                                channels_last=features.use_channels_last("auto", ctx.device))
        ck.model.to("cpu")
        return f, z

    teacher_logits = None
    if tloaded:
        teacher_logits = np.mean([run(t, False)[1] for t in tloaded], axis=0)
    results = []
    for i, ck in enumerate(loaded):
        f, z = run(ck, bool(dump_features) and i == 0)
        r: dict[str, Any] = {"model": ck.path, "arch": ck.arch, "stage": ck.meta.get("stage"),
                             "parents": ck.meta.get("parents", []), **metrics.classification(z, ds.labels)}
        if split == "train" and prepared.truth is not None:
            r["top1_true_labels"] = metrics.topk_accuracy(z, prepared.truth, 1)
        if teacher_logits is not None:
            r.update(metrics.teacher_agreement(z, teacher_logits))
            r["teachers"] = [t.path for t in tloaded]
        if f is not None and ctx.is_main:
            info = {"checkpoint": str(Path(ck.path).resolve()), "checkpoint_sha256": ck.sha256,
                    "data": prepared.options.data, "split": split,
                    "label_noise": str(parse_noise(prepared.options.label_noise)),
                    "noise_seed": prepared.options.noise_seed, "num_classes": ds.num_classes,
                    "classes": ds.classes, "n": len(ds), "dim": int(f.shape[1])}
            truth = prepared.truth if split == "train" else None
            features.write_dump(dump_features, f, z, ds.labels, info, truth)
            r["dump"] = dump_features
        results.append(r)
    distributed.barrier()
    return {"data": prepared.options.data, "split": split, "n": len(ds), "models": results}


def clean(model: str, out: str, *, data: DataOptions | None = None, zeta: float = 0.5, method: str = "gmm",
          seed: int = 0, export: str | None = None, export_dir: str | None = None, noisy_out: str | None = None,
          device: str = "auto", batch_size: int = 512) -> dict[str, Any]:
    """Features of the training split with ``model``, FINE, the kept index list, and optionally the
    kept samples as an ``npz:`` dataset (``export``) or an ImageFolder tree (``export_dir``)."""
    import tempfile

    if export and export_dir:
        raise UsageError("--export and --export-dir are alternatives; give one")
    if out != "-":
        check_writable(out)
    if export:
        check_writable(export, "--export")
    if export_dir and Path(export_dir).exists() and any(Path(export_dir).iterdir()):
        raise InputError(f"--export-dir {export_dir}: exists and is not empty; choose a new directory")
    with tempfile.TemporaryDirectory(prefix="kdfine-clean-") as tmp:
        dump = str(Path(tmp) / "features.npy")
        ev = evaluate([model], data=data, split="train", dump_features=dump, device=device, batch_size=batch_size)
        det, report, labels, _ = detect_noise(dump, zeta=zeta, method=method, seed=seed)
        info = features.read_dump(dump).info
    ckpt_meta = checkpoint.read_meta(model)
    opts = (data or DataOptions()).inherit(ckpt_meta.get("config") or {"data": ckpt_meta.get("data")})
    if distributed.context().is_main:
        write_detection(det, labels, out, noisy_out)
        if export or export_dir:
            prepared = prepare_data(replace(opts, keep=None))
            if export:
                export_npz(prepared, det.clean_index, export)
            else:
                export_folder(prepared, det.clean_index, export_dir)
    report.pop("features", None)
    report.update(model=model, data=info["data"], label_noise=info["label_noise"], out=out,
                  train_top1=ev["models"][0]["top1"], export=export or export_dir)
    return report


def export_npz(prepared: Prepared, keep: np.ndarray, path: str) -> None:
    from kdfine.io import atomic_open

    t, te = prepared.train, prepared.test
    with atomic_open(path, "wb", "--export") as f:
        np.savez(f, x=t.images[keep], y=t.labels[keep], x_test=te.images, y_test=te.labels,
                 classes=np.array(t.classes), index=keep)


def export_folder(prepared: Prepared, keep: np.ndarray, root: str) -> None:
    """``root/train/<class>/<index>.<ext>`` for kept samples (hard or symbolic links to the source
    files when the data is an image folder, PNGs otherwise) and ``root/test/...`` likewise. Built in
    a temporary directory and renamed into place, so a failure leaves nothing behind."""
    import os
    import shutil
    import tempfile

    from PIL import Image

    dest = Path(root)
    if not dest.parent.is_dir():
        raise InputError(f"--export-dir {root}: directory {dest.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for split, ds, idx in (("train", prepared.train, keep), ("test", prepared.test, np.arange(len(prepared.test)))):
            for c in ds.classes:
                (tmp / split / c).mkdir(parents=True, exist_ok=True)
            for i in idx.tolist():
                cls = ds.classes[int(ds.labels[i])]
                if ds.files is not None:
                    src = Path(ds.files[i])
                    target = tmp / split / cls / f"{i:06d}{src.suffix.lower()}"
                    try:
                        os.link(src, target)
                    except OSError:
                        os.symlink(src, target)
                else:
                    a = ds.images[i]
                    Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(tmp / split / cls / f"{i:06d}.png")
        if dest.exists():
            dest.rmdir()  # empty, checked before
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

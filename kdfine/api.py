"""The Python API behind each subcommand: load data, build or load models, run, write files.

Each function validates its inputs before long work starts, returns a JSON-ready ``dict`` and
prints nothing to stdout (progress and notes go to stderr). The CLI is a thin shell over these.

>>> from kdfine import api
>>> r = api.train_teacher("t.safetensors", data=api.DataOptions("digits"), cfg=api.TrainConfig(epochs=5))
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdfine import checkpoint, distributed, features, metrics
from kdfine.data.noise import apply_noise, parse_noise
from kdfine.data.sources import ArrayDataset, Source, load_source
from kdfine.detection import detect_noise, write_detection  # noqa: F401  (torch-free, re-exported)
from kdfine.engine import TeacherEnsemble, TrainConfig, fit
from kdfine.errors import InputError, KdfineWarning, UsageError
from kdfine.io import check_writable, is_special, read_index, read_labels, read_stdin_path
from kdfine.models import build, param_count
from kdfine.progress import Reporter
from kdfine.state import state_path

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
    state = None if is_special(out) else state_path(out)  # nothing is written beside /dev/null
    result = fit(model, train, cfg, device=ctx.device, test=data.test, teacher=teacher, selection=data.keep,
                 truth=data.truth, state_file=state, resume=resume, force=force, run_config=run_config,
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
    def save() -> str:
        digest = checkpoint.save(out, result.model, meta)
        if state is not None:
            state.unlink(missing_ok=True)
        return digest

    sha = distributed.main_only(save)
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
    return [distributed.main_only(read_stdin_path, "--teacher") if t == "-" else t for t in teachers]


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
             batch_size: int = 512, precision: str = "auto",
             on_logits: Callable[[checkpoint.Checkpoint, np.ndarray, ArrayDataset], None] | None = None
             ) -> dict[str, Any]:
    """Metrics of each model on a split; with ``teachers``, agreement with their (averaged) logits;
    with ``dump_features``, the feature dump of the (first) model; ``on_logits(ckpt, logits (N, K),
    dataset)`` is called for each model (on rank 0), e.g. to plot."""
    if not models:
        raise UsageError("eval needs at least one --model")
    if dump_features and len(models) > 1:
        raise UsageError("--dump-features takes a single --model")
    ctx = distributed.setup(device)
    if dump_features:
        features.check_dump_path(dump_features)
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
        if on_logits is not None and ctx.is_main:
            on_logits(ck, z, ds)
        if teacher_logits is not None:
            r.update(metrics.teacher_agreement(z, teacher_logits))
            r["teachers"] = [t.path for t in tloaded]
        if f is not None:
            info = {"checkpoint": str(Path(ck.path).resolve()), "checkpoint_sha256": ck.sha256,
                    "data": prepared.options.data, "split": split,
                    "label_noise": str(parse_noise(prepared.options.label_noise)),
                    "noise_seed": prepared.options.noise_seed, "num_classes": ds.num_classes,
                    "classes": ds.classes, "n": len(ds), "dim": int(f.shape[1])}
            truth = prepared.truth if split == "train" else None
            distributed.main_only(features.write_dump, dump_features, f, z, ds.labels, info, truth)
            r["dump"] = dump_features
        results.append(r)
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
    ckpt_meta = checkpoint.read_meta(model)
    opts = (data or DataOptions()).inherit(ckpt_meta.get("config") or {"data": ckpt_meta.get("data")})
    with tempfile.TemporaryDirectory(prefix="kdfine-clean-") as tmp:
        dump = str(Path(tmp) / "features.npy")
        ev = evaluate([model], data=data, split="train", dump_features=dump, device=device, batch_size=batch_size)

        def detect_and_write() -> dict[str, Any]:  # on rank 0, which holds the dump (rank-local tmp)
            det, report, labels, _ = detect_noise(dump, zeta=zeta, method=method, seed=seed)
            info = features.read_dump(dump).info
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

        return distributed.main_only(detect_and_write)


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


# ------------------------------------------------------------------------------------- info


def info(path: str, *, parents: list[str] | None = None) -> dict[str, Any]:
    """What a checkpoint is: architecture and parameter count, classes, data and label noise,
    loss/tau/alpha, recorded metrics and options, file size, sha256, and its lineage.

    The lineage is a tree of the teachers it was distilled from (recursively). Each recorded
    parent sha256 is looked up among the ``parents`` files, the recorded ``parent_paths`` and the
    ``.safetensors`` files in the same directory as the child, matched by sha256; a parent not
    found is reported with ``found: false``.
    """
    meta = checkpoint.read_meta(path)
    p = Path(path)
    pool = _LineagePool()
    given = []
    for g in parents or []:
        checkpoint.read_meta(g, "--parent")
        given.append(pool.sha(Path(g)))
    sha = pool.sha(p)
    doc = _describe(p, meta, sha)
    try:
        doc["params"] = param_count(build(meta["arch"], int(meta["num_classes"]), int(meta["in_channels"]),
                                          int(meta["image_size"])))
    except UsageError:
        doc["params"] = None
        warnings.warn(f"{path}: arch {meta['arch']} is unknown to this kdfine version; no parameter count",
                      KdfineWarning, stacklevel=2)
    doc["lineage"] = pool.lineage(p, meta, [Path(g) for g in parents or []], {sha})
    used = pool.used
    for g, gsha in zip(parents or [], given):
        if gsha not in used:
            warnings.warn(f"--parent {g} is not an ancestor of {path}", KdfineWarning, stacklevel=2)
    return doc


_INFO_KEYS = ("stage", "arch", "num_classes", "classes", "in_channels", "image_size", "mean", "std", "data",
              "label_noise", "loss", "tau", "alpha", "seed", "epochs", "metrics")


def _describe(p: Path, meta: dict[str, Any], sha: str) -> dict[str, Any]:
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    doc: dict[str, Any] = {"path": str(p), "file_size": p.stat().st_size, "sha256": sha,
                           "kdfine_version": meta.get("kdfine_version"), "schema": meta.get("schema")}
    doc.update({k: meta.get(k) for k in _INFO_KEYS})
    doc["noise_seed"] = config.get("noise_seed")
    doc["parents"] = _json_list(meta.get("parents"))
    doc["parent_paths"] = _json_list(meta.get("parent_paths"))
    doc["config"] = config
    return doc


def _json_list(v: Any) -> list:
    """Lists are stored as JSON strings; older files may hold them decoded or not at all."""
    if isinstance(v, str):
        import json

        try:
            v = json.loads(v)
        except ValueError:
            return []
    return list(v) if isinstance(v, list) else []


class _LineagePool:
    """Finds checkpoint files by sha256, hashing each candidate file at most once."""

    def __init__(self) -> None:
        self._sha: dict[Path, str] = {}
        self.used: set[str] = set()

    def sha(self, p: Path) -> str:
        key = p.resolve()
        if key not in self._sha:
            self._sha[key] = checkpoint.file_sha256(p)
        return self._sha[key]

    def _find(self, want: str, candidates: list[Path]) -> Path | None:
        for c in candidates:
            try:
                if c.is_file() and self.sha(c) == want:
                    return c
            except OSError:
                continue
        return None

    def lineage(self, child: Path, meta: dict[str, Any], given: list[Path], seen: set[str]) -> list[dict[str, Any]]:
        recorded = _json_list(meta.get("parent_paths"))
        nodes = []
        for i, want in enumerate(_json_list(meta.get("parents"))):
            hint = recorded[i] if i < len(recorded) else None
            beside = sorted(child.parent.glob("*.safetensors"))
            found = self._find(want, given + ([Path(hint)] if hint else []) + beside)
            node: dict[str, Any] = {"sha256": want, "found": found is not None,
                                    "path": str(found) if found else None, "recorded_path": hint}
            if found is not None and want not in seen:
                self.used.add(want)
                try:
                    pmeta = checkpoint.read_meta(found, "parent")
                except InputError as e:
                    node.update(found=False, path=None, error=str(e))
                    nodes.append(node)
                    continue
                node.update({k: pmeta.get(k) for k in ("stage", "arch", "data", "label_noise", "loss", "tau",
                                                        "alpha", "metrics")})
                node["parents"] = self.lineage(found, pmeta, given, seen | {want})
            else:
                node["parents"] = []
            nodes.append(node)
        return nodes

"""One training run from validated options and prepared data: the policy (the default network for
the image size, the augmentation a photo network gets, streaming or not), the networks and the
teachers, the run's record, then :func:`kdfine.train.loop.fit`. What ``train-teacher`` and
``distill`` share; :mod:`kdfine.api` declares and commits the files.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kdfine.data.noise import parse_noise
from kdfine.data.prepare import Prepared, split_validation
from kdfine.data.sources import ArrayDataset
from kdfine.errors import InputError, KdfineWarning, UsageError
from kdfine.models import param_count
from kdfine.runtime import distributed
from kdfine.runtime.device import teacher_precision, training_precision
from kdfine.runtime.precision import Choice
from kdfine.train.loop import FitResult, Job, RunFiles, fit

#: --arch when none is given: (small images, images of at least LARGE_INPUT px) per stage. The
#: built-in CNNs convolve at full resolution, far too slow for large images.
DEFAULT_ARCH = {"teacher": ("cnn", "tv:resnet18"), "student": ("cnn-16", "tv:mobilenet_v3_small")}
LARGE_INPUT = 64
RRC_MIN_SIZE = 96  # below this, random-resized crops of photos lose too much; the built-in defaults stay


def default_arch(stage: str, image_size: int) -> str:
    return DEFAULT_ARCH[stage][image_size >= LARGE_INPUT]


def arch_augment(arch: str, image_size: int, dataset_default: str) -> str:
    """The default training augmentation for ``arch``: rrc-flip for torchvision and timm archs
    (``tv:NAME``, ``timm:NAME``) at ``image_size`` >= 96 px, the dataset's default otherwise.
    Applies only when ``--augment`` was not given."""
    from kdfine.models.zoo import is_zoo

    if is_zoo(arch) and image_size >= RRC_MIN_SIZE:
        return "rrc-flip"
    return dataset_default


class TeacherEnsemble(nn.Module):
    """Frozen teachers whose logits are averaged. Each teacher sees the student's (augmented,
    normalised) batch re-normalised with its own recorded mean/std when those differ."""

    def __init__(self, teachers: Sequence[nn.Module], stats: Sequence[tuple], student_stats: tuple,
                 device: torch.device):
        super().__init__()
        self.teachers = nn.ModuleList(teachers).eval().requires_grad_(False)
        ms, ss = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in student_stats)
        self.affine = []
        for mean, std in stats:
            mt = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            st = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            same = torch.allclose(mt, ms) and torch.allclose(st, ss)
            # x_t = ((x * s_s + m_s) - m_t) / s_t
            self.affine.append(None if same else (ss / st, (ms - mt) / st))

    def train(self, mode: bool = True):
        return super().train(False)  # teachers stay in eval mode

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for t, aff in zip(self.teachers, self.affine):
            z = t(x if aff is None else x * aff[0] + aff[1]).float()
            out = z if out is None else out + z
        return out / len(self.teachers)


@dataclass
class Trained:
    """A finished run: the network to save, its checkpoint metadata and the JSON-ready report."""

    model: nn.Module | None
    meta: dict[str, Any]
    report: dict[str, Any]
    finished: bool = False  # --resume found this run finished: nothing was trained, its checkpoint stays


def train(data: Prepared, cfg: Any, model_opts: Any, ctx: distributed.Context, files: RunFiles, *,
          arch: str | None, stage: str, teachers: Sequence[Any] = (), quiet: bool = False,
          extra_config: dict[str, Any] | None = None) -> Trained:
    """Train ``arch`` (default: :func:`default_arch`) on ``data`` with ``cfg`` (validated
    TrainConfig) from the weights ``model_opts`` (ModelOptions) asks for, distilling ``teachers``
    (loaded checkpoints) if any; ``files``: where the run writes (its ``record`` is filled here)."""
    from kdfine.models.weights import initial_model
    from kdfine.train.progress import Reporter

    chosen = arch is None
    arch = arch or default_arch(stage, data.train.image_size)
    data, norm_from = with_norm(data, arch, model_opts)
    train_set = train_split(arch, data)
    stream = stream_choice(train_set, data.options.stream, cfg, ctx)

    def make(seed: int) -> tuple[nn.Module, str | None]:
        """The network and where its weights came from; seeded, so that the second network of
        coteach and dividemix is built like the first from another seed."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return initial_model(arch, train_set.num_classes, train_set.in_channels, train_set.image_size,
                                 pretrained=model_opts.pretrained, init=model_opts.init,
                                 freeze=model_opts.freeze_backbone)

    precision = run_precision(cfg.precision, ctx, bool(teachers))
    torch.manual_seed(cfg.seed)
    model, init = make(cfg.seed)
    teacher = None
    if teachers:
        teacher = TeacherEnsemble([t.model.to(ctx.device) for t in teachers],
                                  [(t.meta["mean"], t.meta["std"]) for t in teachers],
                                  (train_set.mean, train_set.std), ctx.device)
    check_batch(model, arch, cfg, data, ctx)
    files.record = {"arch": arch, **data.config(), **asdict(cfg), **asdict(model_opts), **(extra_config or {}),
                    "train_set": data.train_fingerprint(), "decoded": decoded(data), "train_augment": train_set.augment,
                    **precision.record(cfg.precision)}
    files.reporter = Reporter(quiet=quiet, enabled=ctx.is_main, title=stage)
    done = finished_run(files, data)
    if done is not None:
        return done
    if ctx.is_main:
        files.reporter.print(header(stage, arch, model, data, ctx, chosen, init, stream, precision))
        files.reporter.print(input_line(train_set, data.source.info, norm_from))
        if teachers and cfg.loss == "ce":
            files.reporter.print("--loss ce: the student learns from the labels alone; the teacher is not used "
                                 "(it stays recorded as the parent)")
    warn_if_upscaled(train_set.image_size, data.source.info, bool(files.record.get("image_size_from_weights")))
    result = fit(_job(model, train_set, data, cfg, ctx, files, teacher, make, stream, precision), cfg, files)
    return _trained(result, arch, data, cfg, stage, files, init, teachers, stream)


def _job(model: nn.Module, train_set: ArrayDataset, data: Prepared, cfg: Any, ctx: distributed.Context,
         files: RunFiles, teacher: nn.Module | None, make: Any, stream: bool, precision: RunPrecision) -> Job:
    """What :func:`fit` trains: the network, its data (with the validation split held out, when
    asked, announced on stderr), its teachers."""
    selection, val_index = data.keep, None
    if cfg.val_fraction > 0:
        selection, val_index = split_validation(train_set.labels, cfg.val_fraction, cfg.seed, data.keep)
        if ctx.is_main:
            files.reporter.print(f"validation: {val_index.size} training images held out (--val-fraction "
                                 f"{cfg.val_fraction:g}), {selection.size} left to train on")
    return Job(model, train_set, ctx.device, test=data.test, teacher=teacher, selection=selection, truth=data.truth,
               val_index=val_index, make_model=lambda seed: make(seed)[0], stream=stream,
               precision=(precision.student.precision, precision.teacher))


def _trained(result: FitResult, arch: str, data: Prepared, cfg: Any, stage: str, files: RunFiles, init: str | None,
             teachers: Sequence[Any], stream: bool) -> Trained:
    """The finished run: the checkpoint's metadata and metrics, the JSON-ready report."""
    train_set = data.train
    final = final_metrics(result)
    warn_if_diverged(final, train_set.num_classes, result.model, result.batchnorm is not None)
    meta = base_meta(arch, data, cfg, stage)
    meta.update(metrics=dict(final), config=files.record, init=init, parents=[t.sha256 for t in teachers],
                parent_paths=[str(Path(t.path).resolve()) for t in teachers])
    if result.selection is not None and cfg.fine_every > 0:  # reported, not recorded in the checkpoint
        final["fine_final_kept"] = int(result.selection.size)
    report = {"stage": stage, "arch": arch, "metrics": final, "best_epoch": result.best_epoch,
              "epochs": result.history, "batchnorm": result.batchnorm, "streamed": stream,
              "skipped": data.source.skipped}
    return Trained(result.model, meta, report)


def finished_run(files: RunFiles, data: Prepared) -> Trained | None:
    """``--resume`` with no resume state but a checkpoint at ``--out``: a finished run, whose state
    was removed with its end. The same run (its recorded options equal ``files.record`` in every
    resume key): nothing to train, the checkpoint stays as it is (returned ``finished``). Anything
    else is refused (exit 2) rather than trained from scratch over it: more ``--epochs`` cannot
    continue without the optimizer state, so ``--init OUT`` starts a new run from its weights.
    None when this is no such case (no ``--resume``, a state to resume from, no file at ``--out``)."""
    from kdfine.models.checkpoint import read_meta
    from kdfine.train.resume import config_differences

    out = files.checkpoint
    if not files.resume or out is None or files.state is None or files.state.exists() or not out.exists():
        return None
    try:
        meta = read_meta(out, "--out")
    except InputError as e:
        why = str(e).partition(f"{out}: ")[2] or str(e)
        raise InputError(f"--resume: {out} has no resume state beside it and is no finished kdfine run ({why}); "
                         "choose another --out, or delete it to train from scratch") from None
    saved = meta.get("config") or {}
    keys = tuple(files.record) if files.compare is None else files.compare
    diffs = config_differences(saved, files.record, keys)
    if diffs and all(d.startswith("epochs:") for d in diffs):
        raise UsageError(f"--resume: {out} is a finished run of {saved.get('epochs')} epochs, and a finished run "
                         f"keeps no optimizer state to extend; train on from its weights with --init {out} --epochs N "
                         f"--out NEW.safetensors (a new schedule), or delete {out} to train from scratch")
    if diffs:
        raise UsageError(f"--resume: {out} is a finished run with other options ({'; '.join(diffs)}); --force "
                         f"continues only an interrupted run: choose another --out, or delete {out} to train "
                         "from scratch")
    files.reporter.print(f"--resume: {out} is this run, finished ({saved.get('epochs')} epochs); nothing to train, "
                         "the checkpoint stays as it is")
    metrics = meta.get("metrics") or {}
    report = {"stage": meta.get("stage"), "arch": meta.get("arch"), "metrics": metrics,
              "best_epoch": metrics.get("best_epoch"), "epochs": [], "batchnorm": None, "streamed": False,
              "skipped": data.source.skipped, "already_finished": True}
    return Trained(None, meta, report, finished=True)


@dataclass(frozen=True)
class RunPrecision:
    """What ``--precision`` resolved to for a run: the student's arithmetic and why, and the
    teachers' forward passes (``distilling``: whether the run has teachers)."""

    student: Choice
    teacher: str
    distilling: bool = False

    def record(self, option: str) -> dict[str, Any]:
        """The run config's precision keys: the resolved precisions (what a resume compares; the
        teachers' is None without teachers), the option as given and the reason."""
        return {"precision": self.student.precision, "precision_option": option,
                "precision_reason": self.student.reason,
                "teacher_precision": self.teacher if self.distilling else None}

    def line(self) -> str:
        """The header's second line, e.g. ``precision bf16 (auto: native bf16 (AMX) ran ...)``."""
        teachers = f"; teachers in {self.teacher}" if self.distilling else ""
        kept = "; weights, optimizer state and loss stay fp32" if self.student.precision == "bf16" else ""
        return f"precision {self.student.precision} ({self.student.reason}){teachers}{kept}"


def run_precision(option: str, ctx: distributed.Context, teachers: bool) -> RunPrecision:
    """Resolve ``--precision`` once for the run (:func:`training_precision`); under torchrun rank 0
    decides (its probe is not timed against the other ranks' ones) and every rank takes its choice."""
    student = training_precision(option, ctx.device) if ctx.is_main else None
    student = distributed.broadcast_object(student)
    return RunPrecision(student, teacher_precision(option, ctx.device), teachers)


def base_meta(arch: str, data: Prepared, cfg: Any, stage: str) -> dict[str, Any]:
    t = data.train
    return {"arch": arch, "num_classes": t.num_classes, "in_channels": t.in_channels, "image_size": t.image_size,
            "mean": list(t.mean), "std": list(t.std), "classes": t.classes, "data": data.options.data,
            "label_noise": str(parse_noise(data.options.label_noise)), "stage": stage, "loss": cfg.loss,
            "tau": cfg.tau, "alpha": cfg.alpha, "seed": cfg.seed, "epochs": cfg.epochs}


def header(stage: str, arch: str, model: nn.Module, data: Prepared, ctx: distributed.Context, chosen: bool = False,
           init: str | None = None, stream: bool = False, precision: RunPrecision | None = None) -> str:
    """The lines that open a run on stderr: what trains on what, where; then in which precision and
    why (:meth:`RunPrecision.line`)."""
    train = data.train
    sel = f", {len(data.keep)} kept by --keep" if data.keep is not None else ""
    why = f" (default for {train.image_size}px images; --arch to change)" if chosen else ""
    start = f", from {init}" if init else ""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    head = f", backbone frozen ({frozen / 1e6:.2f}M)" if frozen else ""
    return (f"{stage} {arch}{why} ({param_count(model) / 1e6:.2f}M params{start}{head}) on {data.options.data}: "
            f"{len(train)} train "
            f"images{sel}, {len(data.test)} test, {train.num_classes} classes, device {ctx.device}"
            + (f" x{ctx.world_size}" if ctx.distributed else "") + (", streamed from the decode cache" if stream else "")
            + (f"\n{precision.line()}" if precision is not None else ""))


def stream_choice(train: ArrayDataset, asked: bool | None, cfg: Any, ctx: distributed.Context) -> bool:
    """Whether the training batches are streamed (``--stream/--no-stream``, else by the memory
    budget); DivideMix, which needs the set in memory, is refused now, not after its warm-up."""
    from kdfine.data.batches import should_stream

    stream = should_stream(train.images.shape, train.augment, ctx.device, asked)
    if stream and cfg.fine_strategy == "dividemix":
        why = "" if asked else " (the training set exceeds the memory budget, KDFINE_MEMORY_BUDGET)"
        raise UsageError(f"--fine-strategy dividemix draws second views of any training image at any time: it "
                         f"needs the training set in memory{why}; give --no-stream")
    return stream


def final_metrics(result: FitResult) -> dict[str, Any]:
    """The checkpoint's ``metrics`` from a :class:`kdfine.train.loop.FitResult`, all of the written
    weights: test_*, and the training loss and accuracy of the epoch they come from (the last, or
    with --keep-best val the best-validation epoch, when ``*_last`` add the last epoch's); the
    median img/s; with re-estimated BatchNorm statistics, ``bn_recomputed_images`` and the test
    top-1 the running statistics gave (``test_top1_running_stats``)."""
    final = {f"test_{k}": v for k, v in result.test.items() if k != "n"}
    if result.history:
        last = result.history[-1]
        final.update(train_loss=last["loss"], train_acc=last["train_acc"],
                     img_per_s=float(np.median([h["img_per_s"] for h in result.history])))
    if result.best_epoch is not None:
        best = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
        final.update(train_loss_last=final.get("train_loss"), train_acc_last=final.get("train_acc"),
                     test_top1_last=(result.test_last or {}).get("top1"))
        final.update(best_epoch=result.best_epoch, val_top1_best=result.best_val, train_loss=best.get("loss"),
                     train_acc=best.get("train_acc"))
    if result.batchnorm is not None:
        final["bn_recomputed_images"] = result.batchnorm["images"]
        if "test_top1_running_stats" in result.batchnorm:
            final["test_top1_running_stats"] = result.batchnorm["test_top1_running_stats"]
    return final


def near_chance(train_acc: float, test_top1: float, k: int) -> bool:
    """Whether a network fits its training batches yet guesses on the test set: test top-1 within
    5 points of chance (1/k) while the training accuracy is at least 25 points above it."""
    chance = 1.0 / k
    return test_top1 <= chance + 0.05 and train_acc >= chance + 0.25


def warn_if_diverged(final: dict[str, Any], k: int, model: nn.Module, recomputed: bool) -> None:
    """A warning when :func:`near_chance` holds for the written weights, with the likely cause."""
    train_acc, test = final.get("train_acc"), final.get("test_top1")
    if train_acc is None or test is None or not near_chance(train_acc, test, k):
        return
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    why = ("its BatchNorm running statistics may lag the weights: rerun with --bn-stats recompute"
           if has_bn and not recomputed else
           "check that the test images resemble the training ones (size, colours, class folders)")
    warnings.warn(f"test top-1 {100 * test:.2f}% is at chance (1/{k}) although training accuracy reached "
                  f"{100 * train_acc:.1f}%: {why}", KdfineWarning, stacklevel=2)


def train_split(arch: str, data: Prepared) -> ArrayDataset:
    """The training split with the arch's default augmentation when ``--augment`` was not given
    (rrc-flip for torchvision/timm archs at >= 96 px, :func:`arch_augment`)."""
    train = data.train
    if data.options.augment is None:
        train = replace(train, augment=arch_augment(arch, train.image_size, train.augment))
    return train


def decoded(data: Prepared) -> dict[str, Any]:
    """How an image folder was decoded (square side, channels, resize mode, the original sizes),
    for the checkpoint's config; the cache's location is this machine's business and left out."""
    return {k: v for k, v in data.source.info.items() if k != "cache"}


def with_norm(data: Prepared, arch: str, model_opts: Any) -> tuple[Prepared, str]:
    """The data normalised as ``--norm`` asks (:func:`kdfine.data.norm.resolve`; by default the
    pretrained weights' mean/std with ``--pretrained``, their channel average for grey images, and
    the training images' own otherwise), and where the statistics come from, in words."""
    from kdfine.data.norm import resolve

    weights = None
    if model_opts.pretrained:
        from kdfine.models.zoo import pretrained_weights

        w = pretrained_weights(arch)
        weights = (w.mean, w.std)
    t = data.train
    (mean, std), where = resolve(model_opts.norm, t.in_channels, (tuple(t.mean), tuple(t.std)), weights)
    if (mean, std) == (tuple(t.mean), tuple(t.std)):
        return data, where
    return replace(data, train=replace(t, mean=mean, std=std), test=replace(data.test, mean=mean, std=std)), where


def source_side(info: dict[str, Any]) -> int | None:
    """The shorter side of the largest original image size that ``info["source_sizes"]`` lists
    (``WxH`` strings), or None when unknown."""
    sides = []
    for s in info.get("source_sizes") or []:
        w, _, h = str(s).partition("x")
        if w.isdigit() and h.isdigit():
            sides.append(min(int(w), int(h)))
    return max(sides) if sides else None


def input_line(train: ArrayDataset, info: dict[str, Any], norm_from: str) -> str:
    """The second line of a run: image size (and the original sizes when resized), augmentation and
    normalisation."""
    s = train.image_size
    sizes = [str(v) for v in info.get("source_sizes") or []]
    size = f"{s}x{s} px"
    if sizes and sizes != [f"{s}x{s}"]:
        side = source_side(info)
        scale = f", {s / side:.1f}x" if side and side != s else ""
        size += f" (resized from {', '.join(sizes[:3])}{', ...' if len(sizes) > 3 else ''}{scale})"
    fmt = lambda v: ",".join(f"{x:.3f}" for x in v)
    return (f"input {size}, augmentation {train.augment}, normalised with {norm_from} mean {fmt(train.mean)} "
            f"std {fmt(train.std)}")


#: a default image size more than this many times the images' own draws a warning.
UPSCALE_WARN = 2.0


def warn_if_upscaled(size: int, info: dict[str, Any], by_default: bool) -> None:
    """A warning when the image size that ``--pretrained`` chose (``by_default``) upscales every
    image more than :data:`UPSCALE_WARN` times: the compute grows with the square."""
    side = source_side(info)
    if not by_default or not side or size <= UPSCALE_WARN * side:
        return
    f = size / side
    warnings.warn(f"images are upscaled {f:.1f}x ({side} to {size} px, about {f * f:.0f}x the compute per image) "
                  f"because --pretrained resizes to its weights' {size} px; --image-size {side} keeps their own "
                  "size", KdfineWarning, stacklevel=2)


def check_batch(model: nn.Module, arch: str, cfg: Any, data: Prepared, ctx: distributed.Context) -> None:
    """BatchNorm needs two samples per batch: refuse a batch of one up front, not after an epoch."""
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

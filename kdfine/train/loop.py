"""The epoch loop shared by ``train-teacher`` and ``distill``: :func:`fit`.

``fit(job, cfg, files)``: what to train (:class:`Job`: the network, its data, its teachers), how
(``cfg``, a validated :class:`~kdfine.options.TrainConfig`) and where to write (:class:`RunFiles`:
the resume state, the per-epoch log, progress). Each step reads as forward and loss (the
strategy's), backward, step (:func:`_train_epoch`). What varies between training methods
(networks, optimizers, what an epoch trains on, the loss of a batch) is a
:class:`kdfine.train.strategies.Strategy`; the resume state is :mod:`kdfine.train.resume`, the
clean stop on SIGINT/SIGTERM :mod:`kdfine.runtime.signals`. With a validation split
(``job.val_index``), every epoch is scored on it and ``--keep-best val`` returns the weights of the
best epoch. bf16 autocast where ``--precision`` resolves to it (:func:`resolve`), channels_last on
CUDA and CPU, DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

import numpy as np
import torch
from torch import nn

from kdfine import metrics
from kdfine.data.prepare import validation_subset
from kdfine.data.sources import ArrayDataset
from kdfine.errors import InputError, Interrupted, UsageError
from kdfine.features import extract
from kdfine.runtime import distributed
from kdfine.runtime.device import teacher_precision, training_precision, use_channels_last
from kdfine.runtime.signals import StopFlag
from kdfine.train import batchnorm, resume
from kdfine.train.optim import lr_function
from kdfine.train.progress import Reporter
from kdfine.train.strategies import Strategy, TrainSetup
from kdfine.train.strategies import build as build_strategy

if TYPE_CHECKING:
    from kdfine.files.outputs import Outputs

__all__ = ["Job", "RunFiles", "FitResult", "fit", "evaluate"]


@dataclass
class Job:
    """What a run trains. ``selection``: dataset indices to train on (``--keep``); ``truth``: true
    labels (N,), only to report the quality of dynamic FINE selections; ``val_index``: training
    indices held out for validation (never in ``selection``); ``make_model(seed)``: a new network of
    ``model``'s architecture (the second network of coteach and dividemix); ``stream``: batches
    streamed from the decode cache (True), held on the device (False) or by the memory budget (None);
    ``precision``: the resolved (student, teacher) precisions, fp32 or bf16 (None: resolved from
    ``cfg.precision`` by :func:`fit`)."""

    model: nn.Module
    train: ArrayDataset
    device: torch.device
    test: ArrayDataset | None = None
    teacher: nn.Module | None = None
    selection: np.ndarray | None = None
    truth: np.ndarray | None = None
    val_index: np.ndarray | None = None
    make_model: Callable[[int], nn.Module] | None = None
    stream: bool | None = None
    precision: tuple[str, str] | None = None


@dataclass
class RunFiles:
    """Where a run writes and what it resumes from. ``state``: the per-epoch resume state (rank 0
    writes it; None: none), read back when ``resume`` (``force``: even when ``record`` differs from
    the saved one in a ``compare`` key; None: in any key); ``log``: one JSON line per epoch (rank 0); ``outputs``: the
    command's declared outputs, through which the state and the log are written; ``checkpoint``:
    the run's ``--out``, which ``resume`` reads when no state is left (a finished run, see
    :func:`kdfine.train.run.finished_run`); ``record``: the run's configuration, saved with the state."""

    state: Path | None = None
    log: str | None = None
    outputs: Outputs | None = None
    checkpoint: Path | None = None
    resume: bool = False
    force: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    compare: tuple[str, ...] | None = None
    reporter: Reporter | None = None


def evaluate(model: nn.Module, data: ArrayDataset, device: torch.device, precision: str = "auto",
             channels_last: bool = False) -> dict[str, float]:
    """Classification metrics of ``model`` on ``data`` (normalised with the training statistics
    that ``data`` carries)."""
    _, logits = extract(model, data.images, data.mean, data.std, device=device, precision=precision,
                        channels_last=channels_last, features=False)
    return metrics.classification(logits, data.labels)


@dataclass
class FitResult:
    """``test``: metrics of the returned weights (the best-validation epoch's with ``--keep-best
    val``); ``test_last``: the last epoch's, when those differ in kind; ``best_epoch`` (1-based)
    and ``best_val`` (its validation top-1) with ``--keep-best val``; ``batchnorm``: what the
    re-estimation of the BatchNorm statistics did (``--bn-stats``, :func:`_settle_batchnorm`),
    None when they were kept."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    selection: np.ndarray | None = None
    test_last: dict[str, float] | None = None
    best_epoch: int | None = None
    best_val: float | None = None
    batchnorm: dict[str, Any] | None = None


@dataclass
class _Best:
    """The epoch of best validation accuracy so far and a CPU copy of its weights."""

    epoch: int | None = None
    acc: float = -1.0
    weights: dict[str, torch.Tensor] | None = None

    def offer(self, epoch: int, acc: float, model: nn.Module) -> None:
        """Keep ``model``'s weights when ``acc`` beats the best (ties keep the earlier epoch)."""
        if acc > self.acc:
            self.epoch, self.acc = epoch, acc
            self.weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class _Run:
    """The fixed pieces of one :func:`fit` call, shared by the functions of the epoch loop."""

    cfg: Any
    job: Job
    files: RunFiles
    setup: TrainSetup
    strategy: Strategy
    reporter: Reporter
    lr_at: Callable[[float], float]
    log: TextIO | None = None
    val: ArrayDataset | None = None
    best: _Best = field(default_factory=_Best)
    bn_start: list[dict[str, int]] = field(default_factory=list)  # per network: BatchNorm batches before epoch 1


def fit(job: Job, cfg: Any, files: RunFiles | None = None) -> FitResult:
    """Train ``job.model`` in place on ``job.train`` (labels as given, noisy or not) with the
    options ``cfg`` (a TrainConfig); returns it with the per-epoch history and the final test
    metrics (of ``job.test``). ``files``: where to write (default: nothing, quietly)."""
    cfg = cfg.validate("distill" if job.teacher is not None else "train-teacher")
    files = files or RunFiles()
    if cfg.keep_best == "val" and job.val_index is None:
        raise UsageError("--keep-best val needs a validation split (--val-fraction)")
    reporter = files.reporter or Reporter(enabled=distributed.context().is_main)
    setup = _setup(job, cfg)
    val = None if job.val_index is None else validation_subset(job.train, job.val_index)
    run = _Run(cfg, job, files, setup, build_strategy(setup), reporter, lr_function(cfg), val=val)
    run.bn_start = [batchnorm.tracked(m) for m in run.strategy.models]
    start, history = _restore(run)
    run.log = _open_log(files, history)
    last_test: dict[str, float] = {}  # metrics of the last epoch's evaluation, reused as the final ones
    try:
        with StopFlag() as stop:
            for epoch in range(start, cfg.epochs):
                rec: dict[str, Any] = {"epoch": epoch + 1, **run.strategy.begin_epoch(epoch)}
                rec["lr"] = cfg.lr * run.lr_at(epoch)
                rec.update(_train_epoch(run, epoch, stop))
                last_test = _finish_epoch(run, epoch, rec, history)
    finally:
        run.strategy.close()
        reporter.close()
        _close_log(run.log)
    final = last_test or (_evaluate(run) if job.test is not None else {})
    result = FitResult(job.model, history, final, run.strategy.selection())
    if cfg.keep_best == "val" and run.best.weights is not None:
        job.model.load_state_dict(run.best.weights)
        result.test_last, result.best_epoch, result.best_val = final, run.best.epoch, run.best.acc
        result.test = _evaluate(run) if job.test is not None else {}
    result.batchnorm = _settle_batchnorm(run, result)
    return result


def _settle_batchnorm(run: _Run, result: FitResult) -> dict[str, Any] | None:
    """``--bn-stats``: re-estimate the BatchNorm statistics of every network (on the training
    images the run may use, un-augmented, :data:`batchnorm.BN_IMAGES` at most) when asked, or
    when they lag (auto); then the test metrics again. Returns what was done (for the checkpoint's
    metrics and the report), None when the statistics were kept."""
    cfg, job, s = run.cfg, run.job, run.setup
    lags = [batchnorm.lag(m, start) for m, start in zip(run.strategy.models, run.bn_start)]
    if cfg.bn_stats == "keep" or all(g is None for g in lags):
        return None
    if cfg.bn_stats == "auto" and not any(g is not None and g.lagging for g in lags):
        return None
    universe = np.arange(len(job.train)) if job.selection is None else np.asarray(job.selection, np.int64)
    index = batchnorm.sample(universe, batchnorm.BN_IMAGES, cfg.seed)
    used = 0
    for model, g in zip(run.strategy.models, lags):
        if g is not None:
            used = batchnorm.recompute(model, g.names, job.train.images, index, job.train.mean, job.train.std,
                                       device=s.device, batch_size=cfg.batch_size, precision=s.eval_precision,
                                       channels_last=s.channels_last)
    worst = min((g for g in lags if g is not None), key=lambda g: g.share)
    done = {"images": used, **worst.record()}
    before = result.test.get("top1")
    if job.test is not None:
        result.test = _evaluate(run)
        done["test_top1_running_stats"] = before
    run.reporter.print(_batchnorm_line(done, result.test.get("top1"), cfg.bn_stats))
    return done


def _batchnorm_line(done: dict[str, Any], after: float | None, mode: str) -> str:
    """The stderr line after a re-estimation: why, on how many images, and its effect."""
    why = ("" if mode == "recompute" else
           f": the running ones drew {100 * done['recent_share']:.0f}% from the last tenth of the run "
           f"(momentum {done['momentum']}, {done['steps']} steps)")
    line = f"BatchNorm statistics re-estimated on {done['images']} training images{why}"
    before = done.get("test_top1_running_stats")
    if before is not None and after is not None:
        line += f"; test top-1 {100 * before:.2f}% -> {100 * after:.2f}%"
    return line


def _setup(job: Job, cfg: Any) -> TrainSetup:
    """Resolve the device policy and put the networks on the device."""
    device = job.device
    precision, t_precision = job.precision or resolve(cfg.precision, device)
    channels_last = use_channels_last(cfg.channels_last, device)
    job.model.to(device)
    if channels_last:
        job.model.to(memory_format=torch.channels_last)
        if job.teacher is not None:
            job.teacher.to(memory_format=torch.channels_last)
    s = TrainSetup(cfg, job.model, job.train, device, precision, t_precision, channels_last, job.teacher,
                   job.selection, job.truth)
    s.make_model, s.stream = job.make_model, job.stream
    return s


def resolve(precision: str, device: torch.device) -> tuple[str, str]:
    """The (student, teacher) precisions, fp32 or bf16, that ``--precision`` means for a training
    run on ``device`` (:func:`kdfine.runtime.device.training_precision`, :func:`teacher_precision`)."""
    return training_precision(precision, device).precision, teacher_precision(precision, device)


def _restore(run: _Run) -> tuple[int, list[dict[str, Any]]]:
    """(first epoch to train, history so far): from the state file when resuming, else (0, [])."""
    files, path, ctx = run.files, run.files.state, distributed.context()
    start, history = 0, []
    if files.resume and path is not None and path.exists():
        tensors, info = resume.load_state(path)
        info["config"] = resume.upgrade_precision(info.get("config", {}), run.setup.device.type,
                                                  run.setup.teacher_precision)
        keys = tuple(files.record) if files.compare is None else files.compare
        resume.check_config(path, info, files.record, files.force, keys)
        resume.restore(path, tensors, info, run.strategy.models, run.strategy.optimizers)
        resume.check_indices(path, tensors, len(run.job.train))
        run.strategy.load(tensors)
        _restore_validation(run, path, tensors, info)
        start, history = int(info["epoch"]), list(info.get("history", []))
        run.bn_start = [dict(d) for d in info.get("bn_start", [{} for _ in run.strategy.models])]
        run.reporter.print(f"resuming from {path} after epoch {start}/{run.cfg.epochs}")
    elif files.resume and ctx.is_main:
        run.reporter.print(f"--resume: no saved state at {path}; starting from scratch")
    if files.resume and not distributed.agree(start):
        raise InputError(f"--resume: the processes of this job found different states at {path}; "
                         "--out must be on a file system that every process sees")
    return start, history


def _train_epoch(run: _Run, epoch: int, stop: StopFlag) -> dict[str, Any]:
    """One epoch of steps (learning rate per step from the schedule); its loss, accuracy and speed,
    summed over ranks. Raises Interrupted at a batch boundary after SIGINT/SIGTERM."""
    cfg, strategy, reporter, device = run.cfg, run.strategy, run.reporter, run.setup.device
    steps = strategy.steps()
    reporter.start_epoch(epoch, cfg.epochs, steps)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, t0 = 0, time.perf_counter()
    for step, batch in enumerate(strategy.batches(epoch)):
        _set_lr(strategy.optimizers, cfg.lr * run.lr_at(epoch + step / steps))
        net, loss, logits, y = strategy.forward(batch)  # forward and loss
        opt = strategy.optimizers[net]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach().double() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        if reporter.live and (step % 10 == 9 or step == steps - 1):
            reporter.step(step + 1, f"loss {loss_sum.item() / seen:.4f}")
        if stop.should_stop(step):
            raise Interrupted(_interrupt_message(run.files.state, epoch))
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
    loss_total, correct_total, n = distributed.all_reduce_sum(totals).tolist()
    if not math.isfinite(loss_total):  # the synced total: every rank stops in the same epoch
        raise InputError(_divergence_message(run, epoch, loss_total))
    elapsed = time.perf_counter() - t0
    return dict(loss=loss_total / max(n, 1), train_acc=correct_total / max(n, 1), train_images=int(n),
                img_per_s=n / max(elapsed, 1e-9), time_s=elapsed)


def _set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = lr


def _finish_epoch(run: _Run, epoch: int, rec: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, float]:
    """Test metrics (every ``eval_every`` epochs and after the last), the epoch line, the log line
    and the resume state. Returns the test metrics when this was the last epoch, else {}."""
    cfg, last = run.cfg, {}
    if run.val is not None:
        v = evaluate(run.strategy.models[0], run.val, run.setup.device, run.setup.eval_precision,
                     run.setup.channels_last)
        rec.update(val_acc=v["top1"], val_nll=v["nll"])
        if cfg.keep_best == "val":
            run.best.offer(epoch + 1, v["top1"], run.strategy.models[0])
    if run.job.test is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
        m = _evaluate(run)
        rec.update(test_acc=m["top1"], test_nll=m["nll"])
        # two-network strategies: each network's and the ensemble's accuracy (top1_net2, top1_ensemble)
        rec.update({f"test_acc_{k[5:]}": v for k, v in m.items() if k.startswith("top1_")})
        last = m if epoch + 1 == cfg.epochs else {}
    history.append(rec)
    run.reporter.close()
    run.reporter.epoch_line(rec, cfg.epochs)
    if run.log is not None:
        try:
            run.log.write(json.dumps(rec) + "\n")
            run.log.flush()
        except OSError as e:
            raise InputError(f"--log {run.files.log}: cannot write ({e.strerror or e})") from None
    if run.files.state is not None:
        distributed.main_only(_save, run, epoch, history)
    return last


def _save(run: _Run, epoch: int, history: list[dict[str, Any]]) -> None:
    info = {"epoch": epoch + 1, "history": history, "config": run.files.record, "train_config": asdict(run.cfg),
            "best_epoch": run.best.epoch, "best_val": run.best.acc, "bn_start": run.bn_start}
    tensors = dict(run.strategy.state())
    if run.job.val_index is not None:
        tensors["val_index"] = torch.from_numpy(np.ascontiguousarray(run.job.val_index, dtype=np.int64))
    tensors.update({f"best.{k}": v.contiguous() for k, v in (run.best.weights or {}).items()})
    resume.save_state(run.files.state, run.strategy.models, run.strategy.optimizers, tensors, info, run.files.outputs)


def _restore_validation(run: _Run, path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """The saved validation split must be this run's; the best epoch's weights come back."""
    saved = tensors.get("val_index")
    now = run.job.val_index
    if (saved is None) != (now is None) or (now is not None and not np.array_equal(saved.numpy(), now)):
        raise UsageError(f"--resume: {path} was written with another validation split; rerun with the recorded "
                         "--val-fraction, --seed and data, or delete it to start from scratch")
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    if best and info.get("best_epoch") is not None:
        run.best = _Best(int(info["best_epoch"]), float(info["best_val"]), best)


def _evaluate(run: _Run) -> dict[str, float]:
    return run.strategy.evaluate(run.job.test)


def _open_log(files: RunFiles, history: list[dict[str, Any]]) -> TextIO | None:
    """The ``--log`` file on rank 0; a resumed run's log restates the saved epochs, never a lost one twice."""
    if not files.log or not distributed.context().is_main:
        return None
    outputs = files.outputs
    if outputs is None:  # a library caller without a declared set: the log is declared (checked) here
        from kdfine.files.outputs import Outputs

        outputs = Outputs()
        outputs.add(files.log, "--log")
    log = outputs.live(files.log)
    for rec in history:
        log.write(json.dumps(rec) + "\n")
    return log


def _close_log(log: TextIO | None) -> None:
    if log is not None:
        try:
            log.close()
        except OSError:
            pass  # a failed write was already reported; the error of close() would hide it


def _divergence_message(run: _Run, epoch: int, loss: float) -> str:
    """Why training stopped with a non-finite loss, and what was kept (no checkpoint is written)."""
    state = run.files.state
    kept = (f"the state after epoch {epoch} is kept in {state}" if state is not None and epoch > 0
            and state.exists() else "no checkpoint was written")
    return (f"training diverged in epoch {epoch + 1}: the loss became {loss}; the learning rate (--lr {run.cfg.lr:g}) "
            f"is the likely cause: lower it; {kept}")


def _interrupt_message(state_file: Path | None, epoch: int) -> str:
    if state_file is not None and epoch > 0 and state_file.exists():
        return (f"interrupted in epoch {epoch + 1}; the state after epoch {epoch} is saved in {state_file}; "
                "run the same command with --resume to continue")
    return f"interrupted in epoch {epoch + 1}; no epoch was completed, so nothing was saved"

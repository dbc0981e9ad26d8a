"""The training loop shared by ``train-teacher`` and ``distill``.

:func:`fit` is the epoch loop: restore the resume state, train one epoch, finish it (metrics,
log line, state file). What varies between training methods (networks, optimizers, what an epoch
trains on, the step) is a :class:`kdfine.strategies.Strategy`; the resume state is
:mod:`kdfine.state`, progress :mod:`kdfine.progress`, the clean stop on SIGINT/SIGTERM
:mod:`kdfine.signals`; the optimizer and the lr function :mod:`kdfine.optim`. With a validation
split (``val_index``), every epoch is scored on it and ``--keep-best val`` returns the weights of
the best epoch. bf16 autocast and channels_last on CUDA, DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np
import torch
from torch import nn

from kdfine import distributed, metrics, state
from kdfine.data.sources import ArrayDataset
from kdfine.errors import InputError, Interrupted, UsageError
from kdfine.device import resolve_precision, teacher_precision, use_channels_last
from kdfine.data.prepare import validation_subset
from kdfine.features import extract
from kdfine.optim import lr_function, param_groups
from kdfine.options import TrainConfig, parse_schedule
from kdfine.progress import Reporter
from kdfine.signals import StopFlag
from kdfine.state import state_path
from kdfine.strategies import Strategy, TrainSetup
from kdfine.strategies import build as build_strategy

__all__ = ["TrainConfig", "parse_schedule", "param_groups", "TeacherEnsemble", "Reporter", "state_path",
           "FitResult", "fit", "evaluate"]


# ----------------------------------------------------------------------------------- teachers


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


# ----------------------------------------------------------------------------------- the loop


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
    and ``best_val`` (its validation top-1) with ``--keep-best val``."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    selection: np.ndarray | None = None
    test_last: dict[str, float] | None = None
    best_epoch: int | None = None
    best_val: float | None = None


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

    cfg: TrainConfig
    setup: TrainSetup
    strategy: Strategy
    test: ArrayDataset | None
    reporter: Reporter
    state_file: Path | None
    run_config: dict[str, Any]
    lr_at: Callable[[float], float]
    log: TextIO | None = None
    log_path: str | None = None
    val: ArrayDataset | None = None
    val_index: np.ndarray | None = None
    best: _Best = field(default_factory=_Best)


def fit(model: nn.Module, train: ArrayDataset, cfg: TrainConfig, *, device: torch.device,
        test: ArrayDataset | None = None, teacher: TeacherEnsemble | None = None,
        selection: np.ndarray | None = None, truth: np.ndarray | None = None,
        state_file: Path | None = None, resume: bool = False, force: bool = False,
        run_config: dict[str, Any] | None = None, log_path: str | None = None,
        reporter: Reporter | None = None, make_model: Callable[[int], nn.Module] | None = None,
        val_index: np.ndarray | None = None, stream: bool | None = None) -> FitResult:
    """Train ``model`` in place on ``train`` (labels as given, noisy or not) and return it with the
    per-epoch history and final test metrics.

    selection: dataset indices to train on (``--keep``); truth: true labels (N,), only to report
    the quality of dynamic FINE selections; state_file: per-epoch resume state (rank 0 writes it),
    read back when ``resume`` (``force``: even when ``run_config`` differs from the saved one);
    log_path: one JSON line per epoch (rank 0); make_model(seed): a new network of ``model``'s
    architecture (the second network of ``--fine-strategy coteach|dividemix``).
    val_index: training indices held out for validation (never in ``selection``), scored after
    every epoch (``val_acc``) and, with ``cfg.keep_best == "val"``, the source of the returned weights.
    stream: batches streamed from the decode cache (True), held on the device (False) or chosen by
    the memory budget (None).
    """
    cfg.validate()
    if cfg.keep_best == "val" and val_index is None:
        raise UsageError("--keep-best val needs a validation split (--val-fraction)")
    reporter = reporter or Reporter(enabled=distributed.context().is_main)
    setup = _setup(model, train, cfg, device, teacher, selection, truth)
    setup.make_model, setup.stream = make_model, stream
    run = _Run(cfg, setup, build_strategy(setup), test, reporter, state_file, dict(run_config or {}),
               lr_function(cfg), log_path=log_path, val_index=val_index,
               val=None if val_index is None else validation_subset(train, val_index))
    start, history = _restore(run, resume, force)
    run.log = _open_log(log_path, history)
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
    final = last_test or (_evaluate(run) if test is not None else {})
    result = FitResult(model, history, final, run.strategy.selection())
    if cfg.keep_best == "val" and run.best.weights is not None:
        model.load_state_dict(run.best.weights)
        result.test_last, result.best_epoch, result.best_val = final, run.best.epoch, run.best.acc
        result.test = _evaluate(run) if test is not None else {}
    return result


def _setup(model: nn.Module, train: ArrayDataset, cfg: TrainConfig, device: torch.device,
           teacher: nn.Module | None, selection: np.ndarray | None, truth: np.ndarray | None) -> TrainSetup:
    """Resolve the device policy and put the networks on the device."""
    precision = resolve_precision(cfg.precision, device)
    t_precision = teacher_precision(cfg.precision, device)
    channels_last = use_channels_last(cfg.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    return TrainSetup(cfg, model, train, device, precision, t_precision, channels_last, teacher, selection, truth)


def _restore(run: _Run, resume: bool, force: bool) -> tuple[int, list[dict[str, Any]]]:
    """(first epoch to train, history so far): from the state file when resuming, else (0, [])."""
    path, ctx = run.state_file, distributed.context()
    start, history = 0, []
    if resume and path is not None and path.exists():
        tensors, info = state.load_state(path)
        state.check_config(path, info, run.run_config, force)
        state.restore(path, tensors, info, run.strategy.models, run.strategy.optimizers)
        run.strategy.load(tensors)
        _restore_validation(run, path, tensors, info)
        start, history = int(info["epoch"]), list(info.get("history", []))
        run.reporter.print(f"resuming from {path} after epoch {start}/{run.cfg.epochs}")
    elif resume and ctx.is_main:
        run.reporter.print(f"--resume: no saved state at {path}; starting from scratch")
    if resume and not distributed.agree(start):
        raise InputError(f"--resume: the processes of this job found different states at {path}; "
                         "--out must be on a file system that every process sees")
    return start, history


def _train_epoch(run: _Run, epoch: int, stop: StopFlag) -> dict[str, Any]:
    """One epoch of steps (learning rate per step from the schedule); its loss, accuracy and speed,
    summed over ranks. Raises Interrupted at a batch boundary after SIGINT/SIGTERM."""
    cfg, strategy, reporter = run.cfg, run.strategy, run.reporter
    device = run.setup.device
    steps = strategy.steps()
    reporter.start_epoch(epoch, cfg.epochs, steps)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    t0 = time.perf_counter()
    for step, batch in enumerate(strategy.batches(epoch)):
        lr = cfg.lr * run.lr_at(epoch + step / steps)
        for opt in strategy.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr
        loss, logits, y = strategy.train_step(batch)
        loss_sum += loss.double() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        if reporter.live and (step % 10 == 9 or step == steps - 1):
            reporter.step(step + 1, f"loss {loss_sum.item() / seen:.4f}")
        if stop.should_stop(step):
            raise Interrupted(_interrupt_message(run.state_file, epoch))
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
    loss_total, correct_total, n = distributed.all_reduce_sum(totals).tolist()
    if not math.isfinite(loss_total):  # the synced total: every rank stops in the same epoch
        raise InputError(_divergence_message(run, epoch, loss_total))
    elapsed = time.perf_counter() - t0
    return dict(loss=loss_total / max(n, 1), train_acc=correct_total / max(n, 1), train_images=int(n),
                img_per_s=n / max(elapsed, 1e-9), time_s=elapsed)


def _finish_epoch(run: _Run, epoch: int, rec: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, float]:
    """Test metrics (every ``eval_every`` epochs and after the last), the epoch line, the log line
    and the resume state. Returns the test metrics when this was the last epoch, else {}."""
    cfg, last = run.cfg, {}
    if run.val is not None:
        v = evaluate(run.strategy.models[0], run.val, run.setup.device, run.setup.precision, run.setup.channels_last)
        rec.update(val_acc=v["top1"], val_nll=v["nll"])
        if cfg.keep_best == "val":
            run.best.offer(epoch + 1, v["top1"], run.strategy.models[0])
    if run.test is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
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
            raise InputError(f"--log {run.log_path}: cannot write ({e.strerror or e})") from None
    if run.state_file is not None:
        distributed.main_only(_save, run, epoch, history)
    return last


def _save(run: _Run, epoch: int, history: list[dict[str, Any]]) -> None:
    info = {"epoch": epoch + 1, "history": history, "config": run.run_config, "train_config": asdict(run.cfg),
            "best_epoch": run.best.epoch, "best_val": run.best.acc}
    tensors = dict(run.strategy.state())
    if run.val_index is not None:
        tensors["val_index"] = torch.from_numpy(np.ascontiguousarray(run.val_index, dtype=np.int64))
    tensors.update({f"best.{k}": v.contiguous() for k, v in (run.best.weights or {}).items()})
    state.save_state(run.state_file, run.strategy.models, run.strategy.optimizers, tensors, info)


def _restore_validation(run: _Run, path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """The saved validation split must be this run's; the best epoch's weights come back."""
    saved = tensors.get("val_index")
    now = run.val_index
    if (saved is None) != (now is None) or (now is not None and not np.array_equal(saved.numpy(), now)):
        raise UsageError(f"--resume: {path} was written with another validation split; rerun with the recorded "
                         "--val-fraction, --seed and data, or delete it to start from scratch")
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    if best and info.get("best_epoch") is not None:
        run.best = _Best(int(info["best_epoch"]), float(info["best_val"]), best)


def _evaluate(run: _Run) -> dict[str, float]:
    return run.strategy.evaluate(run.test)


def _open_log(log_path: str | None, history: list[dict[str, Any]]) -> TextIO | None:
    """The ``--log`` file on rank 0; a resumed run's log restates the saved epochs, never a lost one twice."""
    if not log_path or not distributed.context().is_main:
        return None
    log = open(log_path, "w")
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
    kept = (f"the state after epoch {epoch} is kept in {run.state_file}" if run.state_file is not None and epoch > 0
            and run.state_file.exists() else "no checkpoint was written")
    return (f"training diverged in epoch {epoch + 1}: the loss became {loss}; the learning rate (--lr {run.cfg.lr:g}) "
            f"is the likely cause: lower it; {kept}")


def _interrupt_message(state_file: Path | None, epoch: int) -> str:
    if state_file is not None and epoch > 0 and state_file.exists():
        return (f"interrupted in epoch {epoch + 1}; the state after epoch {epoch} is saved in {state_file}; "
                "run the same command with --resume to continue")
    return f"interrupted in epoch {epoch + 1}; no epoch was completed, so nothing was saved"

"""The training loop shared by ``train-teacher`` and ``distill``.

One function, :func:`fit`, holds the whole loop: SGD (Nesterov, no weight decay on BatchNorm and
biases), a multistep or cosine schedule, bf16 autocast and channels_last on CUDA, frozen teachers
for distillation, dynamic FINE selection, DistributedDataParallel under torchrun, a per-epoch
state file for ``--resume`` and a clean stop on SIGINT/SIGTERM. Progress goes to stderr.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from kdfine import distributed, fine, metrics
from kdfine.data.batches import TrainBatches
from kdfine.data.sources import ArrayDataset
from kdfine.errors import InputError, Interrupted, UsageError
from kdfine.features import autocast, extract, resolve_precision, teacher_precision, use_channels_last
from kdfine.losses import check_options, kd_loss


@dataclass
class TrainConfig:
    """Every option of the training loop, with the defaults of the CLI."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    channels_last: str = "auto"  # auto (on for CUDA and CPU) | on | off
    compile: bool = False
    loss: str = "ce"
    tau: float = 4.0
    alpha: float = 1.0
    eval_every: int = 1
    fine_warmup: int = 10
    fine_every: int = 0  # 0: no dynamic FINE selection
    fine_zeta: float = 0.5
    fine_method: str = "gmm"

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: must be > 0")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay {self.weight_decay}: must be >= 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UsageError(f"--precision '{self.precision}': expected auto, fp32 or bf16")
        if self.fine_every < 0 or self.fine_warmup < 0:
            raise UsageError("--fine-every and --fine-warmup must be >= 0")
        if not 0.0 <= self.fine_zeta < 1.0:
            raise UsageError(f"--fine-zeta {self.fine_zeta}: must lie in [0, 1)")
        if self.fine_method not in ("gmm", "kmeans"):
            raise UsageError(f"--fine-method '{self.fine_method}': expected gmm or kmeans")
        check_options(self.loss, self.tau, self.alpha)
        parse_schedule(self.schedule, self.epochs)


# ----------------------------------------------------------------------------------- schedule


def parse_schedule(spec: str, epochs: int) -> Callable[[float], float]:
    """LR multiplier as a function of fractional epoch ``t`` in [0, epochs).

    ``multistep`` (x0.1 at 50% and 75% of the epochs), ``multistep:E1,E2,...`` (x0.1 at those
    epochs), ``cosine`` (per step, to 0), ``constant``.
    """
    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "constant" and not arg:
        return lambda t: 1.0
    if kind == "cosine" and not arg:
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t / epochs, 1.0)))
    if kind == "multistep":
        if arg:
            try:
                milestones = sorted(int(m) for m in arg.split(","))
            except ValueError:
                raise UsageError(f"--schedule '{spec}': milestones must be integers, e.g. multistep:100,150") from None
            if any(m < 1 for m in milestones):
                raise UsageError(f"--schedule '{spec}': milestones must be >= 1")
        else:
            milestones = [max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75))]
        return lambda t: 0.1 ** sum(int(t) >= m for m in milestones)
    raise UsageError(f"--schedule '{spec}': expected multistep, multistep:E1,E2,..., cosine or constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only (not on BatchNorm parameters or biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


# ----------------------------------------------------------------------------------- progress


class Reporter:
    """Training progress on stderr: a rich progress bar when stderr is a terminal, one plain line
    per epoch otherwise (readable in CI logs), nothing when quiet or not on rank 0."""

    def __init__(self, quiet: bool = False, enabled: bool = True, title: str = "train"):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.show = enabled and not quiet
        self.live = self.show and sys.stderr.isatty()
        self.title = title
        self.progress = None
        self.task = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.start()
        desc = f"{self.title} epoch {epoch + 1}/{epochs}"
        if self.task is None:
            self.task = self.progress.add_task(desc, total=steps, info="")
        else:
            self.progress.reset(self.task, total=steps, description=desc, info="")

    def step(self, done: int, info: str = "") -> None:
        if self.live and self.task is not None:
            self.progress.update(self.task, completed=done, **({"info": info} if info else {}))

    def epoch_line(self, rec: dict[str, Any], epochs: int) -> None:
        if not self.show:
            return
        parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec['loss']:.4f}", f"train {100 * rec['train_acc']:.1f}%"]
        if "test_acc" in rec:
            parts.append(f"test {100 * rec['test_acc']:.2f}%")
        if "fine_kept" in rec:
            s = f"FINE kept {rec['fine_kept']}/{rec['fine_total']}"
            if "fine_precision" in rec:
                s += f" (P {rec['fine_precision']:.3f} R {rec['fine_recall']:.3f})"
            parts.append(s)
        parts += [f"{rec['img_per_s']:.0f} img/s", f"{rec['time_s']:.1f}s"]
        self.print("  ".join(parts))

    def print(self, text: str) -> None:
        if self.show:
            self.console.print(text, markup=False, soft_wrap=True)  # one line per epoch, never wrapped

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task = None


# ----------------------------------------------------------------------------------- resume state


def state_path(out: str | os.PathLike) -> Path:
    """Where the per-epoch resume state of a run writing ``out`` lives."""
    return Path(f"{out}.state.safetensors")


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, selection: np.ndarray | None,
               info: dict[str, Any]) -> None:
    """Model, optimizer momentum buffers, selection and RNG as tensors; the rest as JSON metadata.
    One file, written atomically, so a crash leaves either the previous state or the new one."""
    from safetensors.torch import save as st_save

    from kdfine.checkpoint import state_tensors
    from kdfine.io import atomic_write_bytes

    tensors = {f"model.{k}": v for k, v in state_tensors(model).items()}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.{gi}.{pi}"] = buf.detach().cpu().contiguous().clone()
    if selection is not None:
        tensors["selection"] = torch.from_numpy(np.ascontiguousarray(selection, dtype=np.int64))
    tensors["rng.cpu"] = torch.get_rng_state()
    data = st_save(tensors, metadata={"kdfine_state": json.dumps(info, sort_keys=True)})
    atomic_write_bytes(path, data, option="state")


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            info = json.loads((f.metadata() or {})["kdfine_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise InputError(f"resume state {path}: unreadable ({str(e).splitlines()[0][:120] if str(e) else e}); "
                         "delete it to start from scratch") from None
    return tensors, info


RESUME_KEYS = ("arch", "data", "label_noise", "noise_seed", "labels", "keep", "loss", "tau", "alpha", "teachers",
               "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "seed", "fine_warmup",
               "fine_every", "fine_zeta", "fine_method", "image_size", "augment", "test_fraction")


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != now.get(k)]


# ----------------------------------------------------------------------------------- the loop


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop stops at the next batch boundary. A second signal more
    than a second later stops at once (one Ctrl-C reaches torchrun and its workers together)."""

    def __init__(self):
        self.signum = 0
        self.when = 0.0
        self.previous = {}

    def __enter__(self):
        if threading_main():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:
            if time.monotonic() - self.when > 1.0:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return
        self.signum, self.when = signum, time.monotonic()

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    selection: np.ndarray | None = None


def fit(model: nn.Module, train: ArrayDataset, cfg: TrainConfig, *, device: torch.device,
        test: ArrayDataset | None = None, teacher: TeacherEnsemble | None = None,
        selection: np.ndarray | None = None, truth: np.ndarray | None = None,
        state_file: Path | None = None, resume: bool = False, force: bool = False,
        run_config: dict[str, Any] | None = None, log_path: str | None = None,
        reporter: Reporter | None = None) -> FitResult:
    """Train ``model`` in place on ``train`` (labels as given, noisy or not) and return it with the
    per-epoch history and final test metrics.

    selection: dataset indices to train on (``--keep``); truth: true labels, only to report the
    quality of dynamic FINE selections; state_file: per-epoch resume state (rank 0 writes it).
    """
    cfg.validate()
    ctx = distributed.context()
    reporter = reporter or Reporter(enabled=ctx.is_main)
    precision = resolve_precision(cfg.precision, device)
    t_precision = teacher_precision(cfg.precision, device)
    channels_last = use_channels_last(cfg.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    distributed.check_split(cfg.batch_size, len(train) if selection is None else len(selection))
    batches = TrainBatches(train.images, train.labels, train.mean, train.std, batch_size=cfg.batch_size,
                           device=device, augment=train.augment, seed=cfg.seed, channels_last=channels_last,
                           rank=ctx.rank, world_size=ctx.world_size)
    universe = np.arange(len(train)) if selection is None else np.sort(np.asarray(selection, np.int64))
    current = universe
    batches.set_selection(current)
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.momentum > 0)
    lr_at = parse_schedule(cfg.schedule, cfg.epochs)
    history: list[dict[str, Any]] = []
    start = 0
    run_config = dict(run_config or {})

    if resume and state_file is not None and state_file.exists():
        tensors, info = load_state(state_file)
        diffs = config_differences(info.get("config", {}), run_config)
        if diffs and not force:
            raise UsageError(f"--resume: {state_file} was written with other options ({'; '.join(diffs)}); "
                             "rerun with the recorded options, or add --force")
        try:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            for gi, group in enumerate(optimizer.param_groups):
                for pi, p in enumerate(group["params"]):
                    if f"optim.{gi}.{pi}" in tensors:
                        buf = tensors[f"optim.{gi}.{pi}"]
                        if buf.shape != p.shape:
                            raise RuntimeError(f"momentum buffer {gi}.{pi} has shape {tuple(buf.shape)}")
                        optimizer.state[p]["momentum_buffer"] = buf.to(device)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:200]
            raise InputError(f"--resume: {state_file} does not fit this model ({detail}); "
                             "delete it to start from scratch") from None
        if "selection" in tensors:
            current = tensors["selection"].numpy()
            batches.set_selection(current)
        torch.set_rng_state(tensors["rng.cpu"])
        start, history = int(info["epoch"]), list(info.get("history", []))
        reporter.print(f"resuming from {state_file} after epoch {start}/{cfg.epochs}")
    elif resume and ctx.is_main:
        reporter.print(f"--resume: no saved state at {state_file}; starting from scratch")
    if resume and not distributed.agree(start):
        raise InputError(f"--resume: the processes of this job found different states at {state_file}; "
                         "--out must be on a file system that every process sees")

    log = None
    if log_path and ctx.is_main:
        log = open(log_path, "w")
        for rec in history:  # a resumed run's log restates the saved epochs, never a lost one twice
            log.write(json.dumps(rec) + "\n")
    net: nn.Module = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        import logging

        # torch's C++ builder logs a CUDA_HOME notice on machines without CUDA: noise, not a problem
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        net = torch.compile(net)
    fine_on = cfg.fine_every > 0
    steps = len(batches)
    last_test: dict[str, float] = {}  # metrics of the last epoch's evaluation, reused as the final ones

    try:
        with _StopFlag() as stop:
            for epoch in range(start, cfg.epochs):
                rec: dict[str, Any] = {"epoch": epoch + 1}
                if fine_on and epoch >= cfg.fine_warmup and (epoch - cfg.fine_warmup) % cfg.fine_every == 0:
                    current, fine_rec = _fine_select(model, train, universe, current, truth, cfg, device,
                                                     precision, channels_last, first=epoch == cfg.fine_warmup)
                    batches.set_selection(current)
                    steps = len(batches)
                    rec.update(fine_rec)
                rec["lr"] = cfg.lr * lr_at(epoch)
                net.train()
                reporter.start_epoch(epoch, cfg.epochs, steps)
                loss_sum = torch.zeros((), device=device, dtype=torch.float64)
                correct = torch.zeros((), device=device, dtype=torch.int64)
                seen = 0
                t0 = time.perf_counter()
                for step, (x, y, _) in enumerate(batches.epoch(epoch)):
                    lr = cfg.lr * lr_at(epoch + step / steps)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    zt = None
                    if teacher is not None:
                        with autocast(device, t_precision):
                            zt = teacher(x).clone()
                    with autocast(device, precision):
                        logits = net(x)
                    loss = kd_loss(logits, zt, y, loss=cfg.loss, tau=cfg.tau, alpha=cfg.alpha)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.detach().double() * y.shape[0]
                    correct += (logits.detach().argmax(1) == y).sum()
                    seen += y.shape[0]
                    if reporter.live and (step % 10 == 9 or step == steps - 1):
                        reporter.step(step + 1, f"loss {loss_sum.item() / seen:.4f}")
                    if _should_stop(stop, step):
                        raise Interrupted(_interrupt_message(state_file, epoch, ctx))
                totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device,
                                                                               dtype=torch.float64)])
                totals = distributed.all_reduce_sum(totals).tolist()
                elapsed = time.perf_counter() - t0
                rec.update(loss=totals[0] / max(totals[2], 1), train_acc=totals[1] / max(totals[2], 1),
                           train_images=int(totals[2]), img_per_s=totals[2] / max(elapsed, 1e-9), time_s=elapsed)
                if test is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    test_metrics = evaluate(model, test, device, precision, channels_last)
                    rec.update(test_acc=test_metrics["top1"], test_nll=test_metrics["nll"])
                    last_test = test_metrics if epoch + 1 == cfg.epochs else {}
                history.append(rec)
                reporter.close()
                reporter.epoch_line(rec, cfg.epochs)
                if log is not None:
                    try:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                    except OSError as e:
                        raise InputError(f"--log {log_path}: cannot write ({e.strerror or e})") from None
                if state_file is not None:
                    distributed.main_only(
                        save_state, state_file, model, optimizer, current if fine_on or selection is not None else None,
                        {"epoch": epoch + 1, "history": history, "config": run_config, "train_config": asdict(cfg)})
    finally:
        net = None  # DDP's reducer holds the process group; a traceback keeping this frame must not keep it
        reporter.close()
        if log is not None:
            try:
                log.close()
            except OSError:
                pass  # a failed write was already reported; the error of close() would hide it
    final = last_test or (evaluate(model, test, device, precision, channels_last) if test is not None else {})
    return FitResult(model, history, final, current if fine_on or selection is not None else None)


def _should_stop(stop: _StopFlag, step: int) -> bool:
    """Whether to stop after this batch. Under torchrun all ranks agree (flag all-reduced every
    few steps) so that no rank waits forever in a collective."""
    if not distributed.context().distributed:
        return bool(stop.signum)
    if step % 8:
        return False
    flag = torch.tensor([1.0 if stop.signum else 0.0], device=distributed.context().device)
    return distributed.all_reduce_sum(flag).item() > 0


def _interrupt_message(state_file: Path | None, epoch: int, ctx) -> str:
    if state_file is not None and epoch > 0 and state_file.exists():
        return (f"interrupted in epoch {epoch + 1}; the state after epoch {epoch} is saved in {state_file}; "
                "run the same command with --resume to continue")
    return f"interrupted in epoch {epoch + 1}; no epoch was completed, so nothing was saved"


def evaluate(model: nn.Module, data: ArrayDataset, device: torch.device, precision: str = "auto",
             channels_last: bool = False) -> dict[str, float]:
    """Classification metrics of ``model`` on ``data`` (normalised with the training statistics
    that ``data`` carries)."""
    _, logits = extract(model, data.images, data.mean, data.std, device=device, precision=precision,
                        channels_last=channels_last, features=False)
    return metrics.classification(logits, data.labels)


def _fine_select(model, train, universe, current, truth, cfg, device, precision, channels_last, first):
    """One dynamic FINE round: features of the training universe, class vectors from the current
    selection (all samples the first time), scores, per-class split."""
    feats, _ = extract(model, train.images[universe], train.mean, train.std, device=device,
                       precision=precision, channels_last=channels_last)
    labels = train.labels[universe]
    basis = None if first else np.searchsorted(universe, current)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fine.FineWarning)
        det = fine.detect(feats, labels, train.num_classes, zeta=cfg.fine_zeta, method=cfg.fine_method,
                          seed=cfg.seed, vectors_from=basis)
    selected = universe[det.clean_index]
    if selected.size < max(2, distributed.context().world_size):
        selected = universe  # a degenerate split never stops training
    rec = {"fine_kept": int(selected.size), "fine_total": int(universe.size)}
    if truth is not None:
        is_clean = train.labels[universe] == truth[universe]
        keep = np.isin(universe, selected)
        q = metrics.detection(keep, is_clean)
        rec.update(fine_precision=q["precision"], fine_recall=q["recall"], fine_f1=q["f1"])
    return selected, rec

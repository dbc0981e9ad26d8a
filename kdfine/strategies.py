"""Training strategies: what varies between training methods inside the one epoch loop of
:func:`kdfine.engine.fit`.

The loop owns the schedule, progress, the per-epoch record, evaluation, the log, the resume
state and stopping; a :class:`Strategy` owns the networks, their optimizers, what each epoch
trains on and one training step. :class:`SelectStrategy` is plain training (with ``--keep``) and
dynamic FINE selection; strategies with two networks (co-teaching, DivideMix) list both in
``models`` and ``optimizers`` and the loop saves, restores and schedules them all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from kdfine import distributed, fine, metrics
from kdfine.data.batches import train_batches
from kdfine.data.sources import ArrayDataset
from kdfine.device import autocast
from kdfine.features import extract
from kdfine.losses import kd_loss


@dataclass
class TrainSetup:
    """What every strategy is built from: the options (a ``TrainConfig``), the data and the device
    policy that :func:`kdfine.engine.fit` resolved. ``selection``: ``--keep`` indices or None;
    ``truth``: true labels (N,) or None, only to report the quality of FINE selections; ``stream``:
    batches streamed from the decode cache (True), held on the device (False), or by the budget."""

    cfg: Any
    model: nn.Module
    train: ArrayDataset
    device: torch.device
    precision: str
    teacher_precision: str
    channels_last: bool
    teacher: nn.Module | None = None
    selection: np.ndarray | None = None
    truth: np.ndarray | None = None
    stream: bool | None = None  # --stream/--no-stream; None: by the memory budget (batches.should_stream)


class Strategy:
    """The interface between the epoch loop and a training method.

    ``models[0]`` is the network the checkpoint holds; ``optimizers``' learning rates follow the
    schedule (the loop sets them before every step). Per epoch the loop calls
    :meth:`begin_epoch`, then :meth:`train_step` for each batch of :meth:`batches`."""

    models: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]

    def begin_epoch(self, epoch: int) -> dict[str, Any]:
        """Work before epoch ``epoch`` (0-based), e.g. re-selection; returns fields for its record."""
        return {}

    def steps(self) -> int:
        """Batches in the coming epoch."""
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterable[Any]:
        """The batches of epoch ``epoch``, in a seeded order."""
        raise NotImplementedError

    def train_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step on ``batch``: (loss, logits (B, K), labels (B,)) for the record."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The strategy's own tensors for the resume state (networks and optimizers are saved by
        the loop)."""
        return {}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what :meth:`state` saved."""

    def selection(self) -> np.ndarray | None:
        """The training indices that the result reports (None: the whole training set)."""
        return None

    def close(self) -> None:
        """Drop the training wrappers when the loop ends, however it ends: a DDP wrapper holds the
        process group through its reducer, and a traceback that keeps this strategy alive must not
        keep the group from being destroyed (torchrun's exit). The networks themselves stay."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only (not on BatchNorm parameters or biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def sgd(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (when momentum > 0), no weight decay on BatchNorm and biases."""
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.momentum > 0)


def for_training(model: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    """``model`` as the step calls it: DistributedDataParallel under torchrun, compiled on request."""
    net = model
    if distributed.context().distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        import logging

        # torch's C++ builder logs a CUDA_HOME notice on machines without CUDA: noise, not a problem
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        net = torch.compile(net)
    return net


def build(setup: TrainSetup) -> Strategy:
    """The strategy that ``setup.cfg`` asks for (today plain training or dynamic FINE selection)."""
    return SelectStrategy(setup)


class SelectStrategy(Strategy):
    """One network trained on all samples (or ``--keep``), or on a dynamic FINE selection that is
    re-made after ``fine_warmup`` epochs, every ``fine_every`` epochs; optional frozen teachers."""

    def __init__(self, s: TrainSetup):
        cfg, ctx = s.cfg, distributed.context()
        self.setup, self.cfg = s, cfg
        distributed.check_split(cfg.batch_size, len(s.train) if s.selection is None else len(s.selection))
        self.loader = train_batches(s.train.images, s.train.labels, s.train.mean, s.train.std, stream=s.stream,
                                    batch_size=cfg.batch_size, device=s.device, augment=s.train.augment,
                                    seed=cfg.seed, channels_last=s.channels_last, rank=ctx.rank,
                                    world_size=ctx.world_size)
        self.universe = (np.arange(len(s.train)) if s.selection is None
                         else np.sort(np.asarray(s.selection, np.int64)))
        self.current = self.universe
        self.loader.set_selection(self.current)
        self.models, self.optimizers = [s.model], [sgd(s.model, cfg)]
        self.net = for_training(s.model, s.device, cfg.compile)
        self.fine_on = cfg.fine_every > 0

    def begin_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        if not (self.fine_on and epoch >= cfg.fine_warmup and (epoch - cfg.fine_warmup) % cfg.fine_every == 0):
            return {}
        self.current, rec = fine_select(self.setup, self.universe, self.current, first=epoch == cfg.fine_warmup)
        self.loader.set_selection(self.current)
        return rec

    def steps(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int) -> Iterable[Any]:
        self.net.train()
        return self.loader.epoch(epoch)

    def train_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, cfg, opt = self.setup, self.cfg, self.optimizers[0]
        x, y, _ = batch
        zt = None
        if s.teacher is not None:
            with autocast(s.device, s.teacher_precision):
                zt = s.teacher(x).clone()
        with autocast(s.device, s.precision):
            logits = self.net(x)
        loss = kd_loss(logits, zt, y, loss=cfg.loss, tau=cfg.tau, alpha=cfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), logits.detach(), y

    def state(self) -> dict[str, torch.Tensor]:
        sel = self.selection()
        return {} if sel is None else {"selection": torch.from_numpy(np.ascontiguousarray(sel, dtype=np.int64))}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if "selection" in tensors:
            self.current = tensors["selection"].numpy()
            self.loader.set_selection(self.current)

    def selection(self) -> np.ndarray | None:
        return self.current if self.fine_on or self.setup.selection is not None else None

    def close(self) -> None:
        self.net = None


FEATURE_ROWS = 8192  # rows gathered at a time for the features of a subset (bounded memory)


def features_of(s: TrainSetup, rows: np.ndarray) -> np.ndarray:
    """Features (len(rows), D) of the training images at the sorted dataset indices ``rows``.
    The whole set is read in order (a memory map batch by batch, each rank its shard); a subset
    is gathered ``FEATURE_ROWS`` at a time, never as one copy of the set."""
    images, train = s.train.images, s.train
    run = lambda x: extract(s.model, x, train.mean, train.std, device=s.device, precision=s.precision,
                            channels_last=s.channels_last)[0]
    if rows.size == images.shape[0]:
        return run(images)
    return np.concatenate([run(images[rows[lo:lo + FEATURE_ROWS]]) for lo in range(0, rows.size, FEATURE_ROWS)])


def fine_select(s: TrainSetup, universe: np.ndarray, current: np.ndarray,
                first: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """One dynamic FINE round: features of the training ``universe`` (sorted dataset indices),
    class vectors from the ``current`` selection (all samples when ``first``), scores, per-class
    split. Returns the new selection (sorted dataset indices) and the record's fields."""
    cfg, train = s.cfg, s.train
    feats = features_of(s, universe)
    labels = train.labels[universe]
    basis = None if first else np.searchsorted(universe, current)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fine.FineWarning)
        det = fine.detect(feats, labels, train.num_classes, zeta=cfg.fine_zeta, method=cfg.fine_method,
                          seed=cfg.seed, vectors_from=basis)
    selected = universe[det.clean_index]
    if selected.size < max(2, distributed.context().world_size):
        selected = universe  # a degenerate split never stops training
    rec = {"fine_kept": int(selected.size), "fine_total": int(universe.size)}
    if s.truth is not None:
        is_clean = train.labels[universe] == s.truth[universe]
        keep = np.isin(universe, selected)
        q = metrics.detection(keep, is_clean)
        rec.update(fine_precision=q["precision"], fine_recall=q["recall"], fine_f1=q["f1"])
    return selected, rec

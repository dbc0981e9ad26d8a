"""The interface between the epoch loop of :func:`kdfine.train.loop.fit` and a training method, and
the pieces every strategy uses: the setup, SGD, DDP wrapping, the loss of one batch, evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from kdfine.runtime import distributed
from kdfine.runtime.device import resolve_precision
from kdfine import metrics
from kdfine.data.sources import ArrayDataset
from kdfine.features import extract
from kdfine.train.losses import LABEL_LOSSES, kd_loss, label_loss
from kdfine.registry import Registry
from kdfine.train.optim import build_optimizer

#: ``--fine-strategy``: the Strategy classes by name, registered where they are defined.
STRATEGIES: Registry = Registry("training strategy")


@dataclass
class TrainSetup:
    """What every strategy is built from: the options (a ``TrainConfig``), the data and the device
    policy that :func:`kdfine.train.loop.fit` resolved. ``selection``: ``--keep`` indices or None;
    ``truth``: true labels (N,) or None, only to report the quality of FINE selections;
    ``make_model(seed)``: a new network of the same architecture (two-network strategies);
    ``stream``: batches streamed from the decode cache (True), held on the device (False), or
    chosen by the memory budget (None, :func:`kdfine.data.batches.should_stream`).
    :attr:`eval_precision`: the precision of the test and validation passes and of the BatchNorm
    re-estimation."""

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
    make_model: Callable[[int], nn.Module] | None = None
    stream: bool | None = None

    @property
    def eval_precision(self) -> str:
        """The precision ``kdfine eval`` uses by default on this device (fp32 on a CPU under ``auto``,
        even where the steps train in bf16), so that the accuracy a checkpoint records is the one
        eval reports for it."""
        return resolve_precision(self.cfg.precision, self.device)


class Strategy:
    """The interface between the epoch loop and a training method.

    ``models[0]`` is the network the checkpoint holds; ``optimizers``' learning rates follow the
    schedule (the loop sets them before every step). Per epoch the loop calls
    :meth:`begin_epoch`, then for each batch of :meth:`batches` :meth:`forward` (the loop does the
    backward pass and the step of the optimizer it names), then
    :meth:`evaluate` when the test set is due."""

    setup: TrainSetup
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

    def forward(self, batch: Any) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward pass and loss of one batch: (the index of the network and optimizer that it
        trains, the loss to back-propagate, logits (B, K) and labels (B,) for the record)."""
        raise NotImplementedError

    def evaluate(self, test: ArrayDataset) -> dict[str, float]:
        """Test metrics of ``models[0]`` (``metrics.classification``); two-network strategies add
        ``top1_net2`` and ``top1_ensemble``, which the loop records as ``test_acc_net2`` and
        ``test_acc_ensemble``."""
        return metrics.classification(test_logits(self.setup, self.models[0], test), test.labels)

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
        """Drop the training wrappers (``net``, ``nets``) when the loop ends, however it ends: a
        DDP wrapper holds the process group through its reducer, and a traceback that keeps this
        strategy alive must not keep the group from being destroyed (torchrun's exit). The
        networks themselves (``models``) stay."""
        for name in ("net", "nets"):
            if hasattr(self, name):
                setattr(self, name, None)


def test_logits(s: TrainSetup, model: nn.Module, data: ArrayDataset) -> np.ndarray:
    """Logits (N, K) of ``model`` on ``data``, normalised with the statistics ``data`` carries."""
    _, logits = extract(model, data.images, data.mean, data.std, device=s.device, precision=s.eval_precision,
                        channels_last=s.channels_last, features=False)
    return logits


def sgd(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The optimizer that ``cfg`` asks for (:func:`kdfine.train.optim.build_optimizer`: SGD or AdamW, no
    decay on norms and biases unless ``--decay-all``)."""
    return build_optimizer(model, cfg)


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


def batch_loss(cfg: Any, logits: torch.Tensor, labels: torch.Tensor,
               teacher_logits: torch.Tensor | None = None, epoch: int | None = None) -> torch.Tensor:
    """The loss of one batch: a label loss (``--loss ce|gce|sce``) without a teacher, the
    distillation loss with one. labels: (B,) int64 or soft targets (B, K); epoch: the 1-based
    epoch in progress, for losses with a warm-up (``--dkd-warmup``)."""
    if teacher_logits is None and cfg.loss in LABEL_LOSSES:
        return label_loss(logits, labels, loss=cfg.loss, gce_q=cfg.gce_q, sce_alpha=cfg.sce_alpha,
                          sce_beta=cfg.sce_beta, label_smoothing=cfg.label_smoothing)
    return kd_loss(logits, teacher_logits, labels, loss=cfg.loss, tau=cfg.tau, alpha=cfg.alpha,
                   label_smoothing=cfg.label_smoothing, dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta,
                   dkd_warmup=cfg.dkd_warmup, epoch=epoch)

"""The optimizer and the learning-rate function of a run, from its :class:`~kdfine.options.TrainConfig`.

- :func:`param_groups`: weight decay on conv and linear weights only (BatchNorm parameters and
  biases exempt, as the KD paper's code does), or on every parameter with ``decay_all`` (FINE's
  official code).
- :func:`build_optimizer`: SGD (momentum 0.9, Nesterov unless ``--no-nesterov``) or AdamW
  (decoupled weight decay, the same groups).
- :func:`lr_function`: the multiplier of ``--lr`` at fractional epoch ``t``: the ``--schedule``
  times the linear ``--warmup-epochs`` ramp.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from kdfine.train.schedule import parse_schedule, warmup_factor


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict[str, Any]]:
    """Two groups of the trainable parameters: decayed (conv and linear weights, ndim > 1; every
    parameter when ``decay_all``) and not decayed (BatchNorm parameters and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decay_all or p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over :func:`param_groups`: SGD with momentum ``cfg.momentum`` (Nesterov when
    ``cfg.nesterov`` and momentum > 0) or AdamW (torch's default betas and eps)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_all)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_function(cfg: Any) -> Callable[[float], float]:
    """``t -> multiplier of cfg.lr`` at fractional epoch ``t`` (epoch + step / steps): the schedule
    times the warm-up ramp (1 after ``cfg.warmup_epochs``)."""
    schedule, warmup = parse_schedule(cfg.schedule, cfg.epochs), cfg.warmup_epochs
    if warmup == 0:
        return schedule
    return lambda t: schedule(t) * warmup_factor(t, warmup)

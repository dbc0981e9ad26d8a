"""BatchNorm running statistics at the end of a run (``--bn-stats``): whether they lag the weights,
and their re-estimation on training images.

A BatchNorm layer's running mean and variance are an exponential average of batch statistics
with weight ``momentum`` per step (torch's convention: new = (1 - m) * old + m * batch). With a
small momentum (torchvision's MobileNets and EfficientNets use 0.01) or a short run, the average
still describes weights of long ago, or the values from before training, and the network in eval
mode can predict one class for every image. :func:`lag` measures this from the momentum and the
steps of the run alone: the share of the running statistics that comes from the last tenth of
the run's steps. :func:`recompute` replaces them by a cumulative average of batch statistics over
a bounded, seeded subset of un-augmented training images (the images the test set resembles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kdfine.runtime import distributed
from kdfine.runtime.device import autocast
from kdfine.train import BN_STATS  # noqa: F401 (the choices of --bn-stats, declared torch-free)
#: at most this many training images re-estimate the statistics (a cumulative average of their batches).
BN_IMAGES = 2048
#: ``auto`` re-estimates when less than RECENT_SHARE of the running statistics come from the last
#: RECENT_PART of the run's steps.
RECENT_PART = 0.1
RECENT_SHARE = 0.5


def bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics, by module name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.num_batches_tracked is not None}


def tracked(model: nn.Module) -> dict[str, int]:
    """Batches each BatchNorm layer has averaged so far (``num_batches_tracked``), by name."""
    return {n: int(m.num_batches_tracked) for n, m in bn_layers(model).items()}


def recent_share(momentum: float | None, steps: int, part: float = RECENT_PART) -> float:
    """The weight that running statistics averaged over ``steps`` batches give to the last
    ``part`` of them (at least one batch): 1 - (1 - m)^k for an exponential average of momentum
    m, k / steps for a cumulative one (``momentum`` None). 1.0 for ``steps`` <= 0."""
    if steps <= 0:
        return 1.0
    k = max(1, math.ceil(part * steps))
    if momentum is None:
        return k / steps
    return 1.0 - (1.0 - float(momentum)) ** k


@dataclass
class Lag:
    """How far behind the running statistics of one network are: over the BatchNorm layers that
    trained in this run (``layers`` of them, names in ``names``), the smallest
    :func:`recent_share` (``share``), with that layer's ``momentum`` and ``steps``."""

    names: tuple[str, ...]
    share: float
    momentum: float | None
    steps: int

    @property
    def lagging(self) -> bool:
        return self.share < RECENT_SHARE

    def record(self) -> dict[str, Any]:
        return {"layers": len(self.names), "steps": self.steps, "momentum": self.momentum,
                "recent_share": round(self.share, 6)}


def lag(model: nn.Module, start: dict[str, int]) -> Lag | None:
    """The :class:`Lag` of ``model``'s BatchNorm layers since ``start`` (:func:`tracked` when the
    run began); None when none of them averaged a batch in this run (no BatchNorm, a frozen
    backbone, zero epochs)."""
    worst: tuple[float, float | None, int] | None = None
    names = []
    for name, m in bn_layers(model).items():
        steps = int(m.num_batches_tracked) - int(start.get(name, 0))
        if steps <= 0:
            continue
        names.append(name)
        share = recent_share(m.momentum, steps)
        if worst is None or share < worst[0]:
            worst = (share, m.momentum, steps)
    if worst is None:
        return None
    return Lag(tuple(names), worst[0], worst[1], worst[2])


def sample(universe: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of the dataset indices ``universe`` in an order drawn with ``seed``. Never
    in dataset order: an image folder lists its classes one after the other, and batches of one
    class have batch statistics far from the population's."""
    universe = np.asarray(universe, np.int64)
    return np.random.default_rng(seed).permutation(universe)[:limit]


@torch.no_grad()
def recompute(model: nn.Module, names: Sequence[str], images: np.ndarray, index: np.ndarray, mean, std, *,
              device: torch.device, batch_size: int, precision: str = "fp32", channels_last: bool = False) -> int:
    """Replace the running statistics of ``model``'s BatchNorm layers ``names`` by the cumulative
    average of their batch statistics over the un-augmented uint8 NHWC ``images[index]``
    (normalised with ``mean``/``std``), in global batches of ``batch_size`` (a torchrun rank takes
    its slice of each, and the ranks' averages are averaged); ``index`` in a random order (:func:`sample`).
    Every other layer runs in eval mode;
    momentum, ``num_batches_tracked`` and the train/eval modes are restored. Returns the images used
    (whole batches only, at least one batch)."""
    from kdfine.data.batches import Normalizer

    ctx = distributed.context()
    layers = [m for n, m in bn_layers(model).items() if n in set(names)]
    if not layers or index.size == 0:
        return 0
    b = min(batch_size, index.size)
    local, steps = b // ctx.world_size, index.size // b
    norm = Normalizer(mean, std, device, channels_last)
    modes = {m: m.training for m in model.modules()}
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
            m.train()
        for step in range(steps):
            lo = step * b + ctx.rank * local
            rows = np.asarray(images[np.sort(index[lo:lo + local])])  # sorted: a forward read of a memory map
            x = torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2).to(device)
            with autocast(device, precision):
                model(norm(x))
        for m in layers:  # equal batch counts on every rank: the mean of the ranks' means
            distributed.all_reduce_sum(m.running_mean).div_(ctx.world_size)
            distributed.all_reduce_sum(m.running_var).div_(ctx.world_size)
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        for m, mode in modes.items():
            m.training = mode
    return steps * b

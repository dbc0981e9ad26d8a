"""What the two-network strategies (co-teaching, DivideMix) share: the second network, one
optimizer and one batch order per network, the interleaved epoch, the warm-up step on the labels
and the evaluation of both networks and their ensemble."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from kdfine.runtime import distributed
from kdfine import metrics
from kdfine.data.batches import TrainBatches
from kdfine.data.sources import ArrayDataset
from kdfine.runtime.device import autocast
from kdfine.train import SEED_MAX
from kdfine.train.strategies.base import Strategy, TrainSetup, batch_loss, for_training, sgd, test_logits
from kdfine.train.strategies.select import train_batches, universe_of


def second_network(s: TrainSetup) -> nn.Module:
    """A second network of ``s.model``'s architecture, initialised from seed + 1 (``make_model``;
    without it, a copy of ``s.model`` with every layer's ``reset_parameters`` under that seed)."""
    seed = (s.cfg.seed + 1) % (SEED_MAX + 1)
    if s.make_model is not None:
        model = s.make_model(seed)
    else:
        model = copy.deepcopy(s.model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    model.to(s.device)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def interleave(*iterables: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """``(i, item)`` from each iterable in turn until all are exhausted (round robin)."""
    its = [iter(x) for x in iterables]
    live = list(range(len(its)))
    while live:
        for i in list(live):
            try:
                yield i, next(its[i])
            except StopIteration:
                live.remove(i)


def copy_loader(loader: TrainBatches, seed: int) -> TrainBatches:
    """Another order over the same device images (shared, not copied) with its own selection."""
    other = copy.copy(loader)
    other.seed = seed
    return other


class TwoNetworks(Strategy):
    """Two networks of one architecture (the second from seed + 1), each with its own optimizer
    and batch order (seeds ``seed`` and ``seed + 1``); an epoch interleaves their batches, each
    network seeing its own training set once. Until a subclass narrows the sets, both train on
    every sample with the label loss (the warm-up)."""

    def __init__(self, s: TrainSetup):
        cfg = s.cfg
        if s.teacher is not None:
            raise ValueError("two-network strategies train teachers; they take no teacher")
        self.setup, self.cfg = s, cfg
        distributed.check_split(cfg.batch_size, len(s.train) if s.selection is None else len(s.selection))
        self.models = [s.model, second_network(s)]
        self.optimizers = [sgd(m, cfg) for m in self.models]
        self.nets = [for_training(m, s.device, cfg.compile) for m in self.models]
        first = train_batches(s, cfg.seed)
        self.loaders = [first, copy_loader(first, cfg.seed + 1)]
        self.universe = universe_of(s)
        for loader in self.loaders:
            loader.set_selection(self.universe)

    def steps(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def batches(self, epoch: int) -> Iterable[Any]:
        for net in self.nets:
            net.train()
        return interleave(*(loader.epoch(epoch) for loader in self.loaders))

    def warm_step(self, i: int, x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward pass of network ``i`` with the label loss (``--loss``) on ``(x, y)``."""
        with autocast(self.setup.device, self.setup.precision):
            logits = self.nets[i](x)
        loss = batch_loss(self.cfg, logits, y)
        return i, loss, logits.detach(), y

    def evaluate(self, test: ArrayDataset) -> dict[str, float]:
        z1, z2 = (test_logits(self.setup, m, test) for m in self.models)
        m = metrics.classification(z1, test.labels)
        m["top1_net2"] = metrics.topk_accuracy(z2, test.labels, 1)
        m["top1_ensemble"] = metrics.topk_accuracy((z1 + z2) / 2, test.labels, 1)  # the averaged prediction
        return m


def index_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

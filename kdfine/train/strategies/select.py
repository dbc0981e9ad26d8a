"""``--fine-strategy select``: one network trained on all samples (or ``--keep``), or on a dynamic
FINE selection; and the FINE round that every strategy's selection comes from."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from kdfine.runtime import distributed
from kdfine.detect import FineWarning, detect
from kdfine import metrics
from kdfine.data.augment import Draws, apply_draws, augment_draws
from kdfine.data.batches import TrainBatches, epoch_seed
from kdfine.data.batches import train_batches as make_batches
from kdfine.runtime.device import autocast
from kdfine.features import extract
from kdfine.train.strategies.base import STRATEGIES, Strategy, TrainSetup, batch_loss, for_training, sgd


def train_batches(s: TrainSetup, seed: int) -> TrainBatches:
    """The training set batched for this rank, in the order of ``seed``: held on the device, or
    streamed from the decode cache (``s.stream``; the same batches either way)."""
    ctx = distributed.context()
    return make_batches(s.train.images, s.train.labels, s.train.mean, s.train.std, stream=s.stream,
                        batch_size=s.cfg.batch_size, device=s.device, augment=s.train.augment, seed=seed,
                        channels_last=s.channels_last, rank=ctx.rank, world_size=ctx.world_size)


def universe_of(s: TrainSetup) -> np.ndarray:
    """The training indices a run may use: all, or ``--keep`` (sorted)."""
    return np.arange(len(s.train)) if s.selection is None else np.sort(np.asarray(s.selection, np.int64))


def selects_at(cfg: Any, epoch: int) -> bool:
    """Whether a FINE round runs before epoch ``epoch`` (after ``fine_warmup``, every ``fine_every``)."""
    return cfg.fine_every > 0 and epoch >= cfg.fine_warmup and (epoch - cfg.fine_warmup) % cfg.fine_every == 0


@STRATEGIES.register("select")
class SelectStrategy(Strategy):
    """One network trained on all samples (or ``--keep``), or on a dynamic FINE selection that is
    re-made after ``fine_warmup`` epochs, every ``fine_every`` epochs; optional frozen teachers."""

    def __init__(self, s: TrainSetup):
        cfg = s.cfg
        self.setup, self.cfg = s, cfg
        distributed.check_split(cfg.batch_size, len(s.train) if s.selection is None else len(s.selection))
        self.loader = train_batches(s, cfg.seed)
        self.universe = universe_of(s)
        self.current = self.universe
        self.loader.set_selection(self.current)
        self.models, self.optimizers = [s.model], [sgd(s.model, cfg)]
        self.net = for_training(s.model, s.device, cfg.compile)
        self.fine_on = cfg.fine_every > 0
        self.epoch = 1  # the epoch in progress, 1-based: the distillation loss's warm-up reads it

    def begin_epoch(self, epoch: int) -> dict[str, Any]:
        if not selects_at(self.cfg, epoch):
            return {}
        first = epoch == self.cfg.fine_warmup
        self.current, _, rec = fine_round(self.setup, self.setup.model, self.universe,
                                          None if first else self.current, self.cfg.fine_zeta, epoch=epoch)
        self.loader.set_selection(self.current)
        return rec

    def steps(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int) -> Iterable[Any]:
        self.net.train()
        self.epoch = epoch + 1
        return self.loader.epoch(epoch)

    def forward(self, batch: Any) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.setup
        x, y, _ = batch
        zt = None
        if s.teacher is not None:
            with autocast(s.device, s.teacher_precision):
                zt = s.teacher(x).clone()
        with autocast(s.device, s.precision):
            logits = self.net(x)
        loss = batch_loss(self.cfg, logits, y, zt, epoch=self.epoch)
        return 0, loss, logits.detach(), y

    def state(self) -> dict[str, torch.Tensor]:
        sel = self.selection()
        return {} if sel is None else {"selection": torch.from_numpy(np.ascontiguousarray(sel, dtype=np.int64))}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if "selection" in tensors:
            self.current = tensors["selection"].numpy()
            self.loader.set_selection(self.current)

    def selection(self) -> np.ndarray | None:
        return self.current if self.fine_on or self.setup.selection is not None else None


def fine_round(s: TrainSetup, model: nn.Module, universe: np.ndarray, basis: np.ndarray | None, zeta: float,
               prefix: str = "fine", *, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One FINE round: ``model``'s un-augmented features of the training ``universe`` (sorted
    dataset indices), class vectors from the ``basis`` selection (all samples when None), scores,
    per-class split at ``zeta``. Returns the selection (sorted dataset indices), p_clean (float64,
    one per universe row) and the record's fields, named ``PREFIX_kept`` etc. With ``epoch`` and
    ``--fine-features augmented`` the images pass through the training augmentation first (drawn
    from ``--seed`` and ``epoch``), as the official dynamic selection does; DivideMix's split
    passes no epoch (its recipe scores un-augmented images)."""
    train = s.train
    draws = None
    if epoch is not None and s.cfg.fine_features == "augmented":
        draws = augment_draws(universe.size, train.augment, epoch_seed(s.cfg.seed, 10_000 + epoch))
    feats = universe_features(s, model, universe, draws)
    labels = train.labels[universe]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FineWarning)
        det = detect(feats, labels, train.num_classes, zeta=zeta, method=s.cfg.fine_method, seed=s.cfg.seed,
                          vectors_from=None if basis is None else np.searchsorted(universe, basis))
    selected = universe[det.clean_index]
    if selected.size < max(2, distributed.context().world_size):
        selected = universe  # a degenerate split never stops training
    return selected, np.asarray(det.p_clean, np.float64), selection_record(s, universe, selected, prefix)


FEATURE_CHUNK_BYTES = 256 << 20  # images gathered at a time for the features of a subset


def universe_features(s: TrainSetup, model: nn.Module, universe: np.ndarray, draws: Draws | None) -> np.ndarray:
    """Features (len(universe), D) of the training images at the sorted dataset indices
    ``universe``, with the augmentation ``draws`` (one per universe row) applied. The whole set
    un-augmented is read in order (from the cache's memory map batch by batch); otherwise the
    images are gathered and augmented ``FEATURE_CHUNK_BYTES`` at a time, never as one copy."""
    images, train = s.train.images, s.train
    run = lambda x: extract(model, x, train.mean, train.std, device=s.device, precision=s.precision,
                            channels_last=s.channels_last)[0]
    if draws is None and universe.size == images.shape[0]:
        return run(images)
    step = max(1, FEATURE_CHUNK_BYTES // max(1, int(np.prod(images.shape[1:]))))
    parts = [run(apply_draws(images[universe[lo:lo + step]], None if draws is None else draws.rows(lo, lo + step)))
             for lo in range(0, universe.size, step)]
    return np.concatenate(parts) if parts else run(images[:0])


def selection_record(s: TrainSetup, universe: np.ndarray, selected: np.ndarray, prefix: str = "fine") -> dict[str, Any]:
    """``PREFIX_kept``, ``PREFIX_total`` and, when the true labels are known, the selection's
    precision, recall and F1 (clean = positive)."""
    rec = {f"{prefix}_kept": int(selected.size), f"{prefix}_total": int(universe.size)}
    if s.truth is not None:
        is_clean = s.train.labels[universe] == s.truth[universe]
        q = metrics.detection(np.isin(universe, selected), is_clean)
        rec.update({f"{prefix}_precision": q["precision"], f"{prefix}_recall": q["recall"], f"{prefix}_f1": q["f1"]})
    return rec

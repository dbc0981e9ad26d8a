"""``--fine-strategy dividemix``: F-DivideMix, DivideMix (Li et al., ICLR 2020) with FINE's
per-class posterior p_clean in place of the small-loss mixture (Kim et al., 2021).

Both networks warm up on the labels for ``fine_warmup`` epochs. Then, every ``fine_every``
epochs (the recipe: every epoch), each network's FINE split (un-augmented features, class vectors
from all samples) divides the training set *for the other network*: labelled where p_clean >
``ssl_threshold``, unlabelled otherwise. A step of network i takes a labelled batch x (two views),
its labels y and weights w = p_clean, and an unlabelled batch u (two views):

- label refinement: t_x = sharpen(w * onehot(y) + (1 - w) * mean of net_i's two softmaxes, T);
- co-guessing: t_u = sharpen(mean of both networks' softmaxes over u's two views, T);
- MixMatch: lambda ~ Beta(alpha, alpha), lambda = max(lambda, 1 - lambda), inputs and targets
  of [x, x', u, u'] mixed with a permutation of themselves;
- loss = Lx (the label loss, ``--loss``, on the soft targets) + lambda_u * ramp * Lu (MSE of the
  softmax to the targets, mean over B*K) + sum_k pi_k log(pi_k / mean softmax_k) (pi uniform),
  with ramp rising linearly from 0 to 1 over 16 epochs after the warm-up.

``--batch-size`` is the labelled batch (and the unlabelled one); an epoch runs each network over
its labelled set once, the unlabelled set cycling alongside.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from kdfine.runtime import distributed
from kdfine.data.batches import epoch_seed
from kdfine.runtime.device import autocast
from kdfine.train.strategies.base import STRATEGIES, TrainSetup, batch_loss
from kdfine.train.strategies.pair import TwoNetworks, copy_loader, index_tensor, interleave
from kdfine.train.strategies.select import fine_round, selection_record, selects_at

RAMPUP_EPOCHS = 16  # DivideMix's linear ramp-up of lambda_u after the warm-up


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) renormalised per row; p: (B, K) probabilities."""
    q = p.pow(1.0 / temperature)
    return q / q.sum(dim=1, keepdim=True)


def refine(probs: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w * onehot(labels) + (1 - w) * probs; probs (B, K), labels (B,), w (B,) in [0, 1]."""
    w = w.view(-1, 1).to(probs.dtype)
    return w * F.one_hot(labels, probs.shape[1]).to(probs.dtype) + (1 - w) * probs


def mixup(x: torch.Tensor, t: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam * x + (1 - lam) * x[perm], the same for the targets t)."""
    return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]


def prior_penalty(logits: torch.Tensor) -> torch.Tensor:
    """sum_k pi_k log(pi_k / mean_b softmax_k) with pi uniform: keeps the mean prediction from
    collapsing onto a few classes."""
    mean = torch.softmax(logits, dim=1).mean(0)
    prior = torch.full_like(mean, 1.0 / mean.numel())
    return (prior * (prior / mean).log()).sum()


def ramp(t: float, warmup: int, length: int = RAMPUP_EPOCHS) -> float:
    """Weight of the unlabelled term at fractional epoch ``t``: 0 at the warm-up's end, 1 after ``length``."""
    return float(np.clip((t - warmup) / length, 0.0, 1.0))


@STRATEGIES.register("dividemix")
class DivideMixStrategy(TwoNetworks):
    """Records ``fine_*`` for network 1's labelled set (from network 2's split) and ``fine2_*`` for
    network 2's."""

    def __init__(self, s: TrainSetup):
        super().__init__(s)
        self.labelled: list[np.ndarray] | None = None  # labelled[i]: network i's labelled set
        self.p_clean: list[np.ndarray] | None = None  # p_clean[i]: network i's split (per universe row)
        self.unlabelled = [copy_loader(self.loaders[i], s.cfg.seed + 2 + i) for i in range(2)]
        self.has_unlabelled = [False, False]
        self.weights = [torch.ones(len(s.train), device=s.device) for _ in range(2)]

    def begin_epoch(self, epoch: int) -> dict[str, Any]:
        if not selects_at(self.cfg, epoch):
            return {}
        splits = [fine_round(self.setup, m, self.universe, None, self.cfg.ssl_threshold) for m in self.models]
        self.labelled = [splits[1][0], splits[0][0]]  # each network learns from the other's split
        self.p_clean = [splits[0][1], splits[1][1]]
        self._apply()
        return {**selection_record(self.setup, self.universe, self.labelled[0], "fine"),
                **selection_record(self.setup, self.universe, self.labelled[1], "fine2")}

    def _apply(self) -> None:
        world = distributed.context().world_size
        for i in range(2):
            self.loaders[i].set_selection(self.labelled[i])
            rest = np.setdiff1d(self.universe, self.labelled[i])
            self.has_unlabelled[i] = rest.size >= world
            if self.has_unlabelled[i]:
                self.unlabelled[i].set_selection(rest)
            w = torch.ones(len(self.setup.train), dtype=torch.float32)
            w[torch.from_numpy(self.universe)] = torch.from_numpy(self.p_clean[1 - i]).float()
            self.weights[i] = w.to(self.setup.device)

    def batches(self, epoch: int) -> Iterable[Any]:
        if self.labelled is None:
            return super().batches(epoch)
        for net in self.nets:
            net.train()
        self.epoch, self.done = epoch, [0, 0]
        self.gen = torch.Generator().manual_seed(epoch_seed(self.cfg.seed + 4, epoch))
        self.rng = np.random.default_rng(epoch_seed(self.cfg.seed + 5, epoch))
        return interleave(*(self._network_batches(i, epoch) for i in range(2)))

    def _network_batches(self, i: int, epoch: int) -> Iterator[tuple]:
        cycle = self._cycle(i, epoch) if self.has_unlabelled[i] else None
        for x, y, idx in self.loaders[i].epoch(epoch):
            yield ("ssl", x, y, idx, next(cycle) if cycle is not None else None)

    def _cycle(self, i: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Unlabelled batches of network ``i``, a fresh seeded order each time the set runs out."""
        for rerun in range(10**9):
            for u, _, uidx in self.unlabelled[i].epoch(epoch * 1000 + rerun):
                yield u, uidx

    def forward(self, batch: Any) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        i, item = batch
        if not isinstance(item[0], str):  # a warm-up batch (x, y, idx)
            x, y, _ = item
            return self.warm_step(i, x, y)
        _, x, y, idx, unl = item
        self.done[i] += 1
        t = self.epoch + self.done[i] / len(self.loaders[i])
        return self._ssl_step(i, x, y, idx, unl, ramp(t, self.cfg.fine_warmup))

    @torch.no_grad()
    def _targets(self, i: int, x: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                 u: torch.Tensor | None, u2: torch.Tensor | None):
        """(logits of x, refined labelled targets, co-guessed unlabelled targets or None)."""
        s, T = self.setup, self.cfg.ssl_temperature
        net, other = self.models[i], self.models[1 - i]
        other.eval()  # the peer guesses in eval mode; the network being trained stays in train mode
        with autocast(s.device, s.precision):
            z1, z2 = net(x).float(), net(x2).float()
            tx = sharpen(refine((z1.softmax(1) + z2.softmax(1)) / 2, y, w), T)
            tu = None
            if u is not None:
                guesses = [m(v).float().softmax(1) for m in (net, other) for v in (u, u2)]
                tu = sharpen(sum(guesses) / 4, T)
        other.train()
        return z1, tx, tu

    def _ssl_step(self, i: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, unl, weight_u: float):
        s, cfg = self.setup, self.cfg
        x2 = self.loaders[i].view(idx, self.gen)
        u, uidx = unl if unl is not None else (None, None)
        u2 = self.unlabelled[i].view(uidx, self.gen) if u is not None else None
        z1, tx, tu = self._targets(i, x, x2, y, self.weights[i][idx], u, u2)
        inputs = torch.cat([x, x2] + ([u, u2] if u is not None else []))
        targets = torch.cat([tx, tx] + ([tu, tu] if u is not None else []))
        lam = float(self.rng.beta(cfg.ssl_alpha, cfg.ssl_alpha))
        perm = torch.randperm(inputs.shape[0], generator=self.gen).to(s.device)
        mixed, mixed_t = mixup(inputs, targets, max(lam, 1 - lam), perm)
        with autocast(s.device, s.precision):
            logits = self.nets[i](mixed).float()
        nx = 2 * x.shape[0]
        loss = batch_loss(cfg, logits[:nx], mixed_t[:nx]) + prior_penalty(logits)
        if u is not None:
            lu = (logits[nx:].softmax(1) - mixed_t[nx:]).pow(2).mean()
            loss = loss + cfg.ssl_lambda_u * weight_u * lu
        return i, loss, z1, y

    def state(self) -> dict[str, torch.Tensor]:
        if self.labelled is None:
            return {}
        out = {f"labelled{i}": index_tensor(a) for i, a in enumerate(self.labelled)}
        out.update({f"p_clean{i}": torch.from_numpy(np.ascontiguousarray(p)) for i, p in enumerate(self.p_clean)})
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if "labelled0" in tensors:
            self.labelled = [tensors[f"labelled{i}"].numpy() for i in range(2)]
            self.p_clean = [tensors[f"p_clean{i}"].numpy() for i in range(2)]
            self._apply()

    def selection(self) -> np.ndarray | None:
        return None if self.labelled is None else self.labelled[0]

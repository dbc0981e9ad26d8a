"""``--fine-strategy coteach``: F-Coteaching (Kim et al., 2021). Two networks; after
``fine_warmup`` epochs, every ``fine_every`` epochs, each network's FINE selection (its own
features, class vectors from its previous selection, all samples the first time) becomes the
*other* network's training set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdfine.train.strategies.base import STRATEGIES, TrainSetup
from kdfine.train.strategies.pair import TwoNetworks, index_tensor
from kdfine.train.strategies.select import fine_round, selects_at


@STRATEGIES.register("coteach")
class CoteachStrategy(TwoNetworks):
    """Records ``fine_*`` for network 1's training set (network 2's selection) and ``fine2_*`` for
    network 2's."""

    def __init__(self, s: TrainSetup):
        super().__init__(s)
        self.own: list[np.ndarray] | None = None  # own[i]: network i's selection (trains network 1 - i)

    def begin_epoch(self, epoch: int) -> dict[str, Any]:
        if not selects_at(self.cfg, epoch):
            return {}
        rec: dict[str, Any] = {}
        own = []
        for i, model in enumerate(self.models):
            basis = None if self.own is None else self.own[i]
            prefix = "fine2" if i == 0 else "fine"  # named after the network that trains on it
            sel, _, r = fine_round(self.setup, model, self.universe, basis, self.cfg.fine_zeta, prefix, epoch=epoch)
            own.append(sel)
            rec.update(r)
        self.own = own
        self._apply()
        return dict(sorted(rec.items()))

    def _apply(self) -> None:
        self.loaders[0].set_selection(self.own[1])
        self.loaders[1].set_selection(self.own[0])

    def forward(self, batch: Any) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        i, (x, y, _) = batch
        return self.warm_step(i, x, y)

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.own is None else {f"own{i}": index_tensor(o) for i, o in enumerate(self.own)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if "own0" in tensors:
            self.own = [tensors["own0"].numpy(), tensors["own1"].numpy()]
            self._apply()

    def selection(self) -> np.ndarray | None:
        return None if self.own is None else self.own[1]  # network 1's training set

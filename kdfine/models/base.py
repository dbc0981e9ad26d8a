"""The interface of every kdfine network: features (B, D) and a linear head to K logits."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """A backbone producing features (B, D) and a linear head to K logits."""

    feature_dim: int
    frozen_backbone: bool = False  # set by kdfine.models.weights.freeze_backbone

    def train(self, mode: bool = True) -> "Classifier":
        """As ``nn.Module.train``; with a frozen backbone only the head changes mode, so that the
        backbone's BatchNorm statistics stay those of its weights (linear probing)."""
        super().train(mode)
        if self.frozen_backbone:
            for name, child in self.named_children():
                if name != "head":
                    child.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) from one pass."""
        f = self.features(x)
        return f, self.head(f)

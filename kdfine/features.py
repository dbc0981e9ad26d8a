"""Penultimate features and logits of a model over a dataset, in dataset order (what ``eval
--dump-features`` writes with :mod:`kdfine.detect.dump`, and what dynamic FINE selects on)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from kdfine.runtime.device import autocast

if TYPE_CHECKING:  # torch is imported where it is used: reading a dump (detect-noise) never loads it
    import torch


def _inference_mode(fn):
    """``torch.inference_mode()`` as a decorator that imports torch only when called."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


@_inference_mode
def extract(model: torch.nn.Module, images: np.ndarray, mean, std, *, device: torch.device,
            batch_size: int = 512, precision: str = "auto", channels_last: bool = False,
            features: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Features (N, D) float32 (or None when ``features`` is False) and logits (N, K) float32 of
    uint8 NHWC ``images``. Under torchrun each rank computes its shard and all ranks receive the
    full arrays in dataset order."""
    import torch

    from kdfine.runtime import distributed
    from kdfine.data.batches import eval_batches

    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    n = images.shape[0]
    lo, hi = distributed.shard(n)
    feats, logits = [], []
    with autocast(device, precision):
        for x in eval_batches(images[lo:hi], mean, std, batch_size=batch_size, device=device,
                              channels_last=channels_last):
            if features:
                f, z = model.forward_both(x)
                feats.append(f.float())
            else:
                z = model(x)
            logits.append(z.float())
    model.train(was_training)
    k = _out_dim(model)
    z = torch.cat(logits) if logits else torch.zeros((0, k), device=device)
    z = distributed.gather_rows(z, n).cpu().numpy()
    if not features:
        return None, z
    f = torch.cat(feats) if feats else torch.zeros((0, model.feature_dim), device=device)
    return distributed.gather_rows(f, n).cpu().numpy(), z


def _out_dim(model: torch.nn.Module) -> int:
    from kdfine.models.checkpoint import unwrap

    return unwrap(model).head.out_features

"""Training strategies: what varies between training methods inside the one epoch loop of
:func:`kdfine.train.loop.fit`.

The loop owns the schedule, progress, the per-epoch record, evaluation, the log, the resume
state and stopping; a :class:`Strategy` owns the networks, their optimizers, what each epoch
trains on and one training step. ``--fine-strategy`` picks FINE's application:

- ``select`` (:class:`SelectStrategy`): plain training (with ``--keep``) and dynamic FINE selection;
- ``coteach`` (:class:`CoteachStrategy`): two networks, each trained on the other's FINE selection;
- ``dividemix`` (:class:`DivideMixStrategy`): F-DivideMix, two networks trained semi-supervised on
  the other's FINE split.

Two-network strategies list both in ``models`` and ``optimizers``; the loop saves, restores and
schedules them all, and the checkpoint holds ``models[0]``.
"""

from __future__ import annotations

from kdfine.train.strategies.base import STRATEGIES, Strategy, TrainSetup, for_training, sgd
from kdfine.train.strategies.select import SelectStrategy  # noqa: I001 (registration order: select first)
from kdfine.train.strategies.coteach import CoteachStrategy
from kdfine.train.strategies.dividemix import DivideMixStrategy

__all__ = ["Strategy", "TrainSetup", "SelectStrategy", "CoteachStrategy", "DivideMixStrategy", "STRATEGIES", "build",
           "for_training", "sgd"]

#: the modules that register strategies, for :func:`kdfine.registry.declared_names`
STRATEGY_MODULES = ("kdfine.train.strategies.select", "kdfine.train.strategies.coteach",
                    "kdfine.train.strategies.dividemix")


def build(setup: TrainSetup) -> Strategy:
    """The strategy that ``setup.cfg.fine_strategy`` names (``select`` when it has none)."""
    return STRATEGIES.get(getattr(setup.cfg, "fine_strategy", "select"))(setup)

"""Training strategies: what varies between training methods inside the one epoch loop of
:func:`kdfine.engine.fit`.

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

from kdfine.strategies.base import Strategy, TrainSetup, for_training, sgd
from kdfine.strategies.coteach import CoteachStrategy
from kdfine.strategies.dividemix import DivideMixStrategy
from kdfine.strategies.select import SelectStrategy, fine_select

__all__ = ["Strategy", "TrainSetup", "SelectStrategy", "CoteachStrategy", "DivideMixStrategy", "build",
           "fine_select", "for_training", "sgd"]

STRATEGY_CLASSES = {"select": SelectStrategy, "coteach": CoteachStrategy, "dividemix": DivideMixStrategy}


def build(setup: TrainSetup) -> Strategy:
    """The strategy that ``setup.cfg.fine_strategy`` names (``select`` when it has none)."""
    return STRATEGY_CLASSES[getattr(setup.cfg, "fine_strategy", "select")](setup)

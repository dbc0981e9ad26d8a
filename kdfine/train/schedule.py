"""Learning-rate schedules as functions of the fractional epoch; torch-free, so that the options
can check ``--schedule`` before anything is loaded."""

from __future__ import annotations

import math
from typing import Callable

from kdfine.errors import UsageError

SCHEDULES = ("multistep", "multistep:E1,E2,...", "multistep:E1,E2,...:GAMMA", "cosine", "constant")


def parse_schedule(spec: str, epochs: int) -> Callable[[float], float]:
    """LR multiplier as a function of fractional epoch ``t`` in [0, epochs).

    ``multistep`` (x0.1 at 50% and 75% of the epochs), ``multistep:E1,E2,...`` (x0.1 at those
    epochs), ``multistep:E1,E2,...:GAMMA`` (xGAMMA at each, e.g. FINE's 0.01: the lr of epoch e,
    1-based, is lr * GAMMA**(number of milestones < e)), ``cosine`` (per step, to 0), ``constant``.
    """
    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "constant" and not arg:
        return lambda t: 1.0
    if kind == "cosine" and not arg:
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t / epochs, 1.0)))
    if kind == "multistep":
        milestones, gamma = _multistep(spec, arg, epochs)
        return lambda t: gamma ** sum(int(t) >= m for m in milestones)
    raise UsageError(f"--schedule '{spec}': expected one of {', '.join(SCHEDULES)}")


def _multistep(spec: str, arg: str, epochs: int) -> tuple[list[int], float]:
    """(milestones, gamma) of ``multistep[:E1,E2,...[:GAMMA]]``."""
    steps, _, g = arg.partition(":")
    gamma = 0.1
    if g:
        try:
            gamma = float(g)
        except ValueError:
            raise UsageError(f"--schedule '{spec}': the decay factor must be a number, e.g. multistep:40,80:0.01") \
                from None
        if not (math.isfinite(gamma) and 0.0 < gamma <= 1.0):
            raise UsageError(f"--schedule '{spec}': the decay factor must lie in (0, 1]")
    if not steps:
        if g:
            raise UsageError(f"--schedule '{spec}': a decay factor needs its milestones, e.g. multistep:40,80:0.01")
        return [max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75))], gamma
    try:
        milestones = sorted(int(m) for m in steps.split(","))
    except ValueError:
        raise UsageError(f"--schedule '{spec}': milestones must be integers, e.g. multistep:100,150") from None
    if any(m < 1 for m in milestones):
        raise UsageError(f"--schedule '{spec}': milestones must be >= 1")
    return milestones, gamma


def warmup_factor(t: float, warmup_epochs: int) -> float:
    """The linear warm-up's multiplier at fractional epoch ``t``: (t + 1) / (N + 1) for t < N, then
    1 — never 0, so the first step already learns, and exactly 1 from epoch N (0-based) on."""
    return 1.0 if t >= warmup_epochs else (t + 1.0) / (warmup_epochs + 1.0)

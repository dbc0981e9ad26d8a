"""What torchrun announced in the environment, readable without importing torch (commands such as
``detect-noise`` and ``info`` never load it)."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return env_int("WORLD_SIZE", 1) > 1 and "RANK" in os.environ


def launch_rank() -> int:
    """This process's rank as torchrun announced it (0 outside torchrun), known before the process
    group exists."""
    return env_int("RANK", 0) if launched_by_torchrun() else 0


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default

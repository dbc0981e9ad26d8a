"""Signal handling, in one place: SIGTERM as Ctrl-C for every command, and the training loop's
stop-at-the-next-batch flag. Torch-free at import (``detect-noise`` and ``info`` use it too)."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable


def on_main_thread() -> bool:
    """Python accepts signal handlers only on the main thread (library use from a worker thread
    installs none and keeps the default behaviour)."""
    return threading.current_thread() is threading.main_thread()


def sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt like Ctrl-C (so it ends with exit 130 and cleans up
    temporary files). Returns the function that puts the previous handler back (a no-op off the
    main thread)."""
    if not on_main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


class StopFlag:
    """While entered, SIGINT/SIGTERM set a flag and the training loop stops at the next batch
    boundary (after saving nothing half-done). A second signal more than a second later stops at
    once: one Ctrl-C reaches torchrun and its workers together, so the first must not be doubled."""

    def __init__(self) -> None:
        self.signum = 0
        self.when = 0.0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if on_main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            if time.monotonic() - self.when > 1.0:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return
        self.signum, self.when = signum, time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def should_stop(self, step: int) -> bool:
        """Whether to stop after batch ``step``. Under torchrun all ranks agree (the flag is
        all-reduced every 8 steps) so that no rank waits forever in a collective."""
        from kdfine.runtime import distributed

        ctx = distributed.context()
        if not ctx.distributed:
            return bool(self.signum)
        if step % 8:
            return False
        import torch

        flag = torch.tensor([1.0 if self.signum else 0.0], device=ctx.device)
        return distributed.all_reduce_sum(flag).item() > 0

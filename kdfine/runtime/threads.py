"""Threads and the BLAS/OpenMP pools: how many CPUs a process may use, and a pool of kdfine's own.

numpy and scipy each load their own BLAS/OpenMP pool, and on a small machine pools that spin
for work fight for the cores: an ``eigh`` of a 512 x 512 matrix ran 10x slower. So FINE limits
every pool to one thread and parallelises its passes itself (:class:`Workers`), over classes
(grams) and row slices (scores), with one thread per usable CPU (:func:`cpu_threads`).
"""

from __future__ import annotations

import contextlib
import os


def cpu_threads() -> int:
    """CPUs this process may use, shared among the ranks of this host under torchrun."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(cpus // max(local, 1), 1)


def row_slices(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) slices of ``rows`` rows, as equal as they come; empty ones left out."""
    cuts = [rows * w // parts for w in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


@contextlib.contextmanager
def thread_limit(threads: int):
    """Limit the BLAS and OpenMP pools of numpy and scipy to ``threads`` for the duration. The
    libraries are loaded first: a limit only reaches the pools already loaded."""
    import scipy.linalg.blas  # noqa: F401
    import scipy.sparse.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        yield


class Workers:
    """A thread pool with every BLAS/OpenMP pool limited to one thread: kdfine parallelises over
    classes and row slices itself. numpy and BLAS release the GIL, and such coarse tasks keep
    their speed when other processes share the cores, where one multi-threaded BLAS call stalls
    each time one of its threads is descheduled."""

    def __init__(self, threads: int, limit_blas: bool = True):
        """limit_blas=False: no BLAS pool limit (for tasks that call no BLAS: nothing to limit, and
        no scipy import)."""
        self.threads = threads
        self.limit = thread_limit(1) if limit_blas else contextlib.nullcontext()
        self.pool = None

    def __enter__(self) -> "Workers":
        self.limit.__enter__()
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kdfine-workers")
        return self

    def run(self, fn, arg_lists) -> None:
        """``fn(*args)`` for each args in ``arg_lists``, in parallel; returns when all are done."""
        if self.pool is None:
            for args in arg_lists:
                fn(*args)
            return
        for f in [self.pool.submit(fn, *args) for args in arg_lists]:
            f.result()

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.limit.__exit__(*exc)

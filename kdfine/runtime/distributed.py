"""Devices and torchrun: launch detection, the process group, rank-0-only side effects, gathers.

kdfine runs under ``torchrun`` with no extra flag: when torchrun's environment (``WORLD_SIZE`` > 1)
is present, :func:`setup` joins the process group (nccl on CUDA, gloo on CPU) and pins each rank to
``cuda:LOCAL_RANK``. Single-process runs never touch ``torch.distributed``.

Side effects (files, stdout) belong to rank 0. :func:`main_only` runs such a step on rank 0 and
hands its outcome to every rank, so that a failure there (a full disk, say) ends every rank with
the same error instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdfine.runtime.device import resolve_device
from kdfine.errors import KdfineError, UsageError
from kdfine.runtime.launch import launched_by_torchrun


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_ctx = Context()


def context() -> Context:
    return _ctx


def setup(device_option: str = "auto") -> Context:
    """Resolve the device and, under torchrun, join the process group. Idempotent."""
    global _ctx
    if not launched_by_torchrun():
        _ctx = Context(device=resolve_device(device_option))
        return _ctx
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_option, local)
    if device.type == "cuda" and device_option.strip().lower() in ("auto", "cuda"):
        device = torch.device("cuda", local % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # DistributedDataParallel imports torch._dynamo on first use; imported after the group exists,
        # it keeps a reference to the group's backend that destroy_process_group never drops, so
        # gloo's worker threads would outlive teardown into interpreter exit (see teardown).
        import torch._dynamo  # noqa: F401
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    _ctx = Context(rank, world, local, device)
    return _ctx


def teardown(clean: bool = True) -> None:
    """Leave the process group (if joined) and forget the context.

    The order matters: a backend that outlives ``destroy_process_group`` keeps its worker threads
    into interpreter exit, where a thread that releases the last reference to a tensor needs the
    GIL, is ended by Python, and the C++ runtime aborts ("terminate called without an active
    exception", SIGABRT) after the command has succeeded. So: after a success (``clean``), a
    barrier lets every rank's last collective finish on both sides; then the garbage (a DDP
    wrapper kept by a cycle or a traceback holds the group through its reducer) is collected, and
    only then is the group destroyed, which joins gloo's threads while Python is fully alive.
    After a failure no barrier: a peer may be gone or inside another collective.
    """
    global _ctx
    if dist.is_available() and dist.is_initialized():
        if clean and _ctx.distributed:
            try:
                if _ctx.device.type == "cuda":
                    dist.barrier(device_ids=[_ctx.device.index])
                else:
                    dist.barrier()
            except Exception:  # noqa: BLE001 - a peer that failed reports its own error
                pass
        gc.collect()
        if _ctx.device.type == "cuda":
            torch.cuda.synchronize(_ctx.device)  # NCCL: no kernel of ours in flight when communicators go
        dist.destroy_process_group()
    _ctx = Context()


def backend_threads() -> list[str]:
    """Names of this process's threads that belong to a c10d backend (gloo's ``pt_gloo_runloop``
    and ``gloo_tcp_loop``; NCCL's watchdog); empty after a clean :func:`teardown`. Linux only
    (``/proc``); elsewhere always empty."""
    names = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(("pt_gloo", "gloo_", "pt_nccl")))


def check_split(batch_size: int, samples: int) -> None:
    """Raise :class:`UsageError` when the global ``batch_size`` cannot be split evenly across the
    ranks, or there are fewer training ``samples`` than ranks."""
    w = _ctx.world_size
    if batch_size % w:
        raise UsageError(f"--batch-size {batch_size}: the global batch must be divisible by the {w} processes "
                         f"of this torchrun job (e.g. {max(w, batch_size - batch_size % w)})")
    if samples < w:
        raise UsageError(f"only {samples} training samples for {w} processes; use fewer processes")


class PeerFailed(KdfineError):
    """A step that rank 0 ran on behalf of every rank failed there (same exit code as rank 0's)."""


def main_only(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and return its result on every rank.

    When ``fn`` raises on rank 0, rank 0 re-raises the exception and every other rank raises
    :class:`PeerFailed` with the same message and exit code, so nobody waits for a rank that has
    gone. The result travels with ``broadcast_object_list`` (keep it small: a path, a string).
    """
    result, failure, error = None, None, None
    if _ctx.is_main:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            error = e
            failure = (str(e), getattr(e, "exit_code", 1))
    if _ctx.distributed:
        result, failure = broadcast_object((result, failure))
    if error is not None:
        raise error
    if failure is not None:
        err = PeerFailed(f"rank 0 failed: {failure[0]}")
        err.exit_code = failure[1]
        raise err
    return result


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank of the job has gone (it
    crashed or was stopped): such a rank has already reported the real cause."""
    if not _ctx.distributed:
        return False
    text = str(error)
    return isinstance(error, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place) and return it; a no-op for a single process."""
    if _ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree(value: int) -> bool:
    """Whether every rank holds the same integer ``value`` (always true for a single process)."""
    if not _ctx.distributed:
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=_ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == -t[1].item()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (e.g. a path read from stdin, or an error message)."""
    if not _ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int) -> tuple[int, int]:
    """This rank's contiguous range ``[lo, hi)`` of ``n`` rows (sizes differ by at most one)."""
    base, extra = divmod(n, _ctx.world_size)
    lo = _ctx.rank * base + min(_ctx.rank, extra)
    return lo, lo + base + (1 if _ctx.rank < extra else 0)


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's :func:`shard` of an ``n``-row tensor back into dataset order."""
    if not _ctx.distributed:
        return local
    base, extra = divmod(n, _ctx.world_size)
    size = base + (1 if extra else 0)
    padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(_ctx.world_size)]
    dist.all_gather(parts, padded)
    rows = [parts[r][: base + (1 if r < extra else 0)] for r in range(_ctx.world_size)]
    return torch.cat(rows)

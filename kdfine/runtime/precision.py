"""Whether training on this CPU runs in bf16 autocast (``--precision auto``): the instruction set
first, then a short timed probe whose result is cached per machine.

Why both. Without native bf16 arithmetic (AMX, AVX512-BF16, Arm's BF16 extension) torch emulates
bf16 matmuls and convolutions: on a Zen 3 (AVX2) bf16 ``torch.mm`` ran 27x slower than fp32 and
wrn-16-1 trained 3.6x slower (bench/RESULTS.md). Such CPUs train in fp32, and nothing is timed.
With native bf16, whether it *pays* depends on the CPU and on torch's kernels, which the flags
cannot tell: an Intel Xeon with AMX ran ``torch.mm`` 6.9x faster in bf16 and trained wrn-16-1 1.73x
faster, while AVX512-BF16 without AMX (Zen 4) adds only a dot-product instruction. So where the
flags say native, :func:`measure` times a training step of a WRN-like block (two 3x3 convolutions
with BatchNorm and ReLU, channels_last, forward and backward) in fp32 and in bf16 autocast,
alternately, and bf16 is chosen when its best step is at least :data:`MIN_SPEEDUP` times faster
than fp32's best. The probe runs once per machine (:func:`measure`); its timings are cached in
``$KDFINE_CACHE/precision/`` under a key of the CPU's name, its bf16 instruction set and the torch
version, so that every later run on the machine reads the same decision in milliseconds and a
resumed run finds the precision it was written with. ``KDFINE_BF16_PROBE=0`` turns the probe off:
``auto`` is then fp32 on every CPU. ``--precision fp32|bf16`` bypasses all of this.

The cache is a machine-local file like the decode cache, not an output of a command: it is written
to a temporary file and renamed into place, and a cache that cannot be written only means that
the next run probes again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from kdfine.runtime.paths import cache_dir

#: bf16 must run the probe's training step at least this much faster than fp32. A real step also
#: spends time where bf16 does not help (augmentation, the optimizer step, the loss), so a block
#: 1.3x faster makes training about 1.2x faster: below that the gain is within the noise of a
#: shared machine and not worth bf16's rounding.
MIN_SPEEDUP = 1.3
#: ``KDFINE_BF16_PROBE=0`` turns the probe off (``--precision auto`` is then fp32 on CPUs).
PROBE_ENV = "KDFINE_BF16_PROBE"
#: Part of the cache key: bump it when the probe's workload changes, so old timings are ignored.
PROBE_VERSION = 1
#: If bf16's warm-up step is this much slower than fp32's, bf16 is emulated: the probe stops there.
EMULATED = 2.0


@dataclass(frozen=True)
class Choice:
    """A resolved precision (``fp32`` or ``bf16``) and why, in words for the training header."""

    precision: str
    reason: str


@dataclass(frozen=True)
class Probe:
    """The best time (seconds) of the probe's training step in fp32 and in bf16 autocast."""

    fp32_s: float
    bf16_s: float

    @property
    def speedup(self) -> float:
        return self.fp32_s / self.bf16_s if self.bf16_s > 0 else 0.0


# ------------------------------------------------------------------------------- the decision


def native_bf16(flags: Iterable[str]) -> str | None:
    """The native bf16 instruction set that a CPU's feature flags (Linux's /proc/cpuinfo names)
    name, or None: ``AMX`` (amx_bf16 / amx_tile), ``AVX512-BF16`` (avx512_bf16) or ``Arm BF16``
    (aarch64's ``bf16`` feature)."""
    f = set(flags)
    if f & {"amx_bf16", "amx_tile"}:
        return "AMX"
    if "avx512_bf16" in f:
        return "AVX512-BF16"
    if "bf16" in f:
        return "Arm BF16"
    return None


def decide(isa: str | None, probe: Probe | None, min_speedup: float = MIN_SPEEDUP) -> Choice:
    """``--precision auto`` on a CPU, from the native bf16 instruction set (None: emulated) and the
    probe's timings (None: the probe is off). bf16 only when both say so."""
    if isa is None:
        return Choice("fp32", "this CPU has no native bf16 arithmetic, so bf16 would be emulated and slower")
    if probe is None:
        return Choice("fp32", f"native bf16 ({isa}), but {PROBE_ENV}=0 turns the speed probe off")
    s = probe.speedup
    if s >= min_speedup:
        return Choice("bf16", f"native bf16 ({isa}) ran this machine's probe step {s:.2f}x as fast as fp32")
    return Choice("fp32", f"native bf16 ({isa}) ran this machine's probe step only {s:.2f}x as fast as fp32 "
                          f"(bf16 needs {min_speedup:g}x)")


# ------------------------------------------------------------------------------- this machine


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: Linux's /proc/cpuinfo (x86 ``flags``, aarch64 ``Features``), plus
    torch's own checks of AMX and AVX512-BF16 (which also work off Linux)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    try:
        import torch

        for name, flag in (("_is_amx_tile_supported", "amx_tile"), ("_is_avx512_bf16_supported", "avx512_bf16")):
            check = getattr(torch.cpu, name, None)
            if check is not None and check():
                flags.add(flag)
    except Exception:  # a torch without these private checks: the kernel's flags decide
        pass
    return frozenset(flags)


def cpu_name() -> str:
    """The CPU's model name (``model name`` of /proc/cpuinfo), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_key(cpu: str, isa: str, torch_version: str) -> dict[str, Any]:
    """What a cached probe is valid for. The instruction set is part of it because virtual
    machines often show one generic name ("AMD EPYC") for CPUs of different generations."""
    return {"cpu": cpu, "isa": isa, "torch": torch_version, "probe": PROBE_VERSION}


def cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "precision" / f"{digest}.json"


def read_probe(path: Path, key: dict[str, Any]) -> Probe | None:
    """The cached probe at ``path`` when it is readable and made for ``key``, else None."""
    try:
        doc = json.loads(path.read_text())
        if doc.get("key") != key:
            return None
        probe = Probe(float(doc["fp32_s"]), float(doc["bf16_s"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = all(math.isfinite(t) and t > 0 for t in (probe.fp32_s, probe.bf16_s))
    return probe if ok else None


def write_probe(path: Path, key: dict[str, Any], probe: Probe) -> bool:
    """Cache ``probe`` at ``path`` (a temporary file renamed into place: readers see the whole file
    or none). False when the cache directory cannot be written."""
    doc = {"key": key, "fp32_s": probe.fp32_s, "bf16_s": probe.bf16_s, "speedup": round(probe.speedup, 3),
           "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return False


def measure(rounds: int = 5) -> Probe:
    """Time the probe's training step in fp32 and in bf16 autocast, alternately (so that other load
    on the machine falls on both), ``rounds`` times after one warm-up; the best time of each.
    Leaves torch's random state as it found it. Six steps of 3.6 GFLOP in each precision: about
    0.1 s of fp32 arithmetic at the 200 GFLOP/s of a 2-core AVX-512 machine."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block, x = _probe_block()
        warm = [_step(block, x, bf16) for bf16 in (False, True)]  # oneDNN builds its kernels here
        if warm[1] > EMULATED * warm[0]:  # emulated after all: do not spend more time proving it
            return Probe(*warm)
        best = [math.inf, math.inf]
        for _ in range(rounds):
            for i, bf16 in enumerate((False, True)):
                best[i] = min(best[i], _step(block, x, bf16))
    return Probe(*best)


def _probe_block():
    """Two 3x3 convolution blocks of 64 channels with BatchNorm and ReLU, as in a WRN, and a
    batch (32, 64, 16, 16), channels_last as kdfine trains on CPUs."""
    import torch
    from torch import nn

    layers = []
    for _ in range(2):
        layers += [nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    block = nn.Sequential(*layers).to(memory_format=torch.channels_last)
    x = torch.randn(32, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    return block, x


def _step(block, x, bf16: bool) -> float:
    """Seconds of one forward and backward pass of ``block`` (fp32 loss, as in training)."""
    import torch

    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = block(x)
    y.float().square().mean().backward()
    block.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


_memo: dict[tuple[str, str], Choice] = {}


def cpu_choice() -> Choice:
    """``--precision auto`` for training on this CPU (:func:`decide` on this machine's flags and its
    cached or fresh probe). Computed once per process, so that every part of a run agrees."""
    switch = os.environ.get(PROBE_ENV, "1").strip().lower()
    memo_key = (switch, str(cache_dir()))
    if memo_key not in _memo:
        _memo[memo_key] = _choose(switch not in ("0", "off", "no", "false"))
    return _memo[memo_key]


def _choose(probe_on: bool) -> Choice:
    isa = native_bf16(cpu_flags())
    if isa is None or not probe_on:
        return decide(isa, None)
    import torch

    return decide(isa, cached_probe(probe_key(cpu_name(), isa, torch.__version__)))


def cached_probe(key: dict[str, Any], run: Callable[[], Probe] = measure) -> Probe:
    """The probe cached for ``key``, else ``run()``'s (then cached for the next run). Runs started
    together on a fresh machine take turns: one measures, the others read its timings, so that they
    decide alike and no probe is timed against another."""
    path = cache_file(key)
    probe = read_probe(path, key)
    if probe is not None:
        return probe
    with _lock(path.with_suffix(".lock")):
        probe = read_probe(path, key)
        if probe is None:
            probe = run()
            write_probe(path, key, probe)
    return probe


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive ``flock`` on ``path`` for the duration; nothing where it cannot be had (no
    fcntl, an unwritable cache): the probe then runs unguarded."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield

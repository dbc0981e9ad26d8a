"""Device resolution and the precision policy: bf16 autocast and channels_last.

torch is imported inside the functions: :mod:`kdfine.features` imports this module, and reading a
feature dump (detect-noise) must not load torch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from kdfine.errors import DeviceError, UsageError

if TYPE_CHECKING:
    import torch

#: ``--precision`` values: auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16.
PRECISIONS = ("auto", "fp32", "bf16")
#: ``--channels-last`` values: auto (on for CUDA and CPU), on, off.
CHANNELS_LAST = ("auto", "on", "off")


def resolve_device(option: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA if present, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``;
    ``local_rank`` picks the GPU of a torchrun rank. Raises :class:`DeviceError` (exit 4) when the
    requested device is missing."""
    import torch

    opt = option.strip().lower()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if opt == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("mps") if mps else torch.device("cpu")
    if opt == "cpu":
        return torch.device("cpu")
    if opt == "mps":
        if not mps:
            raise DeviceError("--device mps: MPS is not available on this machine; use --device cpu")
        return torch.device("mps")
    if opt == "cuda" or opt.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {option}: CUDA is not available on this machine "
                              "(no GPU or no CUDA driver); use --device cpu")
        n = torch.cuda.device_count()
        if opt == "cuda":
            return torch.device("cuda", local_rank % n)
        try:
            index = int(opt.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"--device '{option}': expected auto, cpu, cuda, cuda:N or mps") from None
        if not 0 <= index < n:
            raise DeviceError(f"--device {option}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", index)
    raise UsageError(f"--device '{option}': expected auto, cpu, cuda, cuda:N or mps")


def autocast(device: torch.device, precision: str):
    """bf16 autocast when ``precision`` resolves to bf16 on ``device``, else a no-op context."""
    import torch

    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(option: str, device: torch.device) -> bool:
    """``auto``: channels_last on CUDA and CPU, where convolutions run measurably faster in it
    (see the README's Performance section); ``on``/``off`` force it."""
    if option not in CHANNELS_LAST:
        raise UsageError(f"--channels-last '{option}': expected {', '.join(CHANNELS_LAST)}")
    return option == "on" or (option == "auto" and device.type in ("cuda", "cpu"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def teacher_precision(precision: str, device: torch.device) -> str:
    """The precision of frozen teachers' forward passes: as :func:`resolve_precision`, except that
    ``auto`` on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX) is bf16. There a teacher's
    forward runs twice as fast in bf16 (the README's Performance section), its logits move by a
    fraction of a percent, and the student's own arithmetic stays fp32."""
    if precision == "auto" and device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return resolve_precision(precision, device)


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX tiles)."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)

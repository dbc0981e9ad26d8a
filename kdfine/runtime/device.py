"""Device resolution and the precision policy: bf16 autocast and channels_last.

``--precision auto`` means, for training (:func:`training_precision`): bf16 autocast on CUDA; on a
CPU, bf16 where the CPU multiplies in bf16 natively and a timed probe shows that it pays
(:mod:`kdfine.runtime.precision`), fp32 elsewhere. For forward passes outside training (``eval``,
``eval --dump-features``, ``predict``, ``clean``; :func:`resolve_precision`) it stays bf16 on
CUDA and fp32 on every CPU: there bf16 would move accuracies, FINE's selection and predicted
probabilities that users compare across machines (bench/RESULTS.md measures by how much), for a
speed that matters little next to decoding and training. Frozen teachers (:func:`teacher_precision`)
run in bf16 on any CPU with native bf16. Master weights, optimizer state and the loss stay fp32, as
with CUDA autocast.

torch is imported inside the functions: :mod:`kdfine.features` imports this module, and reading a
feature dump (detect-noise) must not load torch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from kdfine.errors import DeviceError, UsageError
from kdfine.runtime.precision import Choice, cpu_choice, cpu_flags, native_bf16

if TYPE_CHECKING:
    import torch

#: ``--precision`` values: auto (see the module docstring), fp32, bf16.
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
    (see docs/at-scale.md, Performance); ``on``/``off`` force it."""
    if option not in CHANNELS_LAST:
        raise UsageError(f"--channels-last '{option}': expected {', '.join(CHANNELS_LAST)}")
    return option == "on" or (option == "auto" and device.type in ("cuda", "cpu"))


def training_precision(precision: str, device: torch.device) -> Choice:
    """The precision a training run's own arithmetic uses and why (for its header): ``fp32`` and
    ``bf16`` as asked; ``auto``: bf16 on CUDA, fp32 on MPS, and on a CPU what
    :func:`kdfine.runtime.precision.cpu_choice` decides (native bf16 and a probe that shows a gain;
    cached per machine)."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision '{precision}': expected {', '.join(PRECISIONS)}")
    if precision != "auto":
        slow = precision == "bf16" and device.type == "cpu" and not cpu_has_bf16()
        return Choice(precision, f"--precision {precision}" + (
            "; this CPU has no native bf16 arithmetic, so it is emulated and slower than fp32" if slow else ""))
    if device.type == "cuda":
        return Choice("bf16", "auto: bf16 autocast on CUDA")
    if device.type != "cpu":
        return Choice("fp32", f"auto: fp32 on {device.type}")
    choice = cpu_choice()
    return Choice(choice.precision, f"auto: {choice.reason}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision of forward passes outside training (eval, feature dumps, predict): ``auto`` is
    bf16 on CUDA and fp32 elsewhere (the module docstring says why)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def teacher_precision(precision: str, device: torch.device) -> str:
    """The precision of frozen teachers' forward passes: as :func:`resolve_precision`, except that
    ``auto`` on a CPU with native bf16 arithmetic (AVX512-BF16, AMX, Arm BF16) is bf16. There a
    teacher's forward runs twice as fast in bf16 (docs/at-scale.md, Performance), its logits
    move by a fraction of a percent, and the student's arithmetic follows :func:`training_precision`."""
    if precision == "auto" and device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return resolve_precision(precision, device)


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AMX, AVX512-BF16 or Arm BF16)."""
    return native_bf16(cpu_flags()) is not None

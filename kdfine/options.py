"""The option dataclasses of every command, declared once, and their validation.

Each field carries its command-line flag, help text and panel in its metadata (:func:`opt`), so
that :mod:`kdfine.cli` builds every command's options from these classes: an option shared by
several commands (``--epochs``, ``--data``, ``--zeta``...) is written here once. ``validate()``
checks every value before any data is read or any model is built; a bad value is a
:class:`~kdfine.errors.UsageError` (exit 2) naming the option and what it accepts.

Torch-free: ``detect-noise`` builds :class:`DetectOptions` without loading torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from kdfine.device import CHANNELS_LAST, PRECISIONS  # torch-free at import
from kdfine.errors import UsageError

SPLITS = ("train", "test")
SCHEDULES = ("multistep", "multistep:E1,E2,...", "cosine", "constant")
LOSSES = ("ce", "kl", "mse", "kl-inf")  # kdfine.losses implements exactly these (a test checks)
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds; larger values would wrap silently

P_DATA, P_TRAIN, P_OUT, P_FINE, P_DEVICE, P_DETECT = (
    "Data", "Training", "Output", "Dynamic FINE selection", "Device", "Detection")


@dataclass(frozen=True)
class Flag:
    """How a dataclass field appears on the command line. ``choices`` returns the library's own
    list of names (a callable, so that the list is looked up where it lives)."""

    flag: str
    help: str
    panel: str | None = None
    choices: Callable[[], Sequence[str]] | None = None
    min: float | None = None
    short: str | None = None
    completions: Callable[[], Sequence[str]] | None = None  # shell completion of an open-ended value


def opt(default: Any, flag: str, help: str, **kw: Any) -> Any:
    """A dataclass field with its command-line declaration (see :class:`Flag`)."""
    return dataclasses.field(default=default, metadata={"cli": Flag(flag, help, **kw)})


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of option class ``cls`` (for messages)."""
    return next(f.metadata["cli"].flag for f in dataclasses.fields(cls) if f.name == name)


# ------------------------------------------------------------------------------------ the lists

def _losses() -> Sequence[str]:
    return LOSSES


def _methods() -> Sequence[str]:
    from kdfine.fine import METHODS

    return METHODS


def _augmentations() -> Sequence[str]:
    from kdfine.data.sources import AUGMENTATIONS

    return AUGMENTATIONS


def _resize_modes() -> Sequence[str]:
    from kdfine.data.sources import RESIZE_MODES

    return RESIZE_MODES


# ------------------------------------------------------------------------------------ checks

def check_choice(value: str, allowed: Iterable[str], flag: str) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise UsageError(f"{flag} '{value}': expected one of {', '.join(allowed)}")


def check_number(value: float, flag: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite number within [low, high] (open ends where asked): NaN and inf are usage errors."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{flag} {value}: must be a finite number")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        rng = f"lie in {lo}, {hi}" if low is not None and high is not None else (
            f"be {'>' if low_open else '>='} {low:g}" if low is not None else f"be {'<' if high_open else '<='} {high:g}")
        raise UsageError(f"{flag} {value}: must {rng}")


def check_seed(value: int, flag: str = "--seed") -> None:
    if not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise UsageError(f"{flag} {value}: must be an integer in [0, {SEED_MAX}]")


def check_zeta(value: float, flag: str) -> None:
    check_number(value, flag, low=0.0, high=1.0, high_open=True)


def parse_schedule(spec: str, epochs: int) -> Callable[[float], float]:
    """LR multiplier as a function of fractional epoch ``t`` in [0, epochs).

    ``multistep`` (x0.1 at 50% and 75% of the epochs), ``multistep:E1,E2,...`` (x0.1 at those
    epochs), ``cosine`` (per step, to 0), ``constant``.
    """
    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "constant" and not arg:
        return lambda t: 1.0
    if kind == "cosine" and not arg:
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t / epochs, 1.0)))
    if kind == "multistep":
        if arg:
            try:
                milestones = sorted(int(m) for m in arg.split(","))
            except ValueError:
                raise UsageError(f"--schedule '{spec}': milestones must be integers, e.g. multistep:100,150") from None
            if any(m < 1 for m in milestones):
                raise UsageError(f"--schedule '{spec}': milestones must be >= 1")
        else:
            milestones = [max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75))]
        return lambda t: 0.1 ** sum(int(t) >= m for m in milestones)
    raise UsageError(f"--schedule '{spec}': expected one of {', '.join(SCHEDULES)}")


# ------------------------------------------------------------------------------------ data

@dataclass
class DataOptions:
    """Where the data comes from and how its training labels are changed."""

    data: str | None = opt(None, "--data", "Dataset: digits (default for new teachers), cifar10, cifar100, "
                           "mnist, fashion-mnist, svhn, imagefolder:PATH, npz:PATH. Commands given a checkpoint "
                           "default to its recorded data.", panel=P_DATA)
    data_root: str | None = opt(None, "--data-root", "Directory of torchvision datasets (default: "
                                "$KDFINE_CACHE/data, else ~/.cache/kdfine/data).", panel=P_DATA)
    download: bool = opt(False, "--download", "Fetch torchvision datasets into --data-root.", panel=P_DATA)
    image_size: int | None = opt(None, "--image-size", "Resize images to N x N (see --resize).", panel=P_DATA, min=4)
    resize: str = opt("crop", "--resize", "How images of another size or shape become N x N: crop (shorter side "
                      "to N, centre crop) or squash (both sides to N, distorting).", panel=P_DATA,
                      choices=_resize_modes)
    strict: bool = opt(False, "--strict", "An unreadable file in an image folder is an error (exit 3) instead of "
                       "being skipped with a warning.", panel=P_DATA)
    stream: bool | None = opt(None, "--stream/--no-stream", "Stream training batches from the decode cache on "
                              "disk instead of holding the training set on the device (default: stream when it "
                              "does not fit the memory budget, KDFINE_MEMORY_BUDGET).", panel=P_DATA)
    test_fraction: float = opt(0.2, "--test-fraction", "Test share when a folder or npz has no test split.",
                               panel=P_DATA)
    augment: str | None = opt(None, "--augment", "Training augmentation (default: by dataset; crop-flip for "
                              "CIFAR-like images, none for digits and MNIST); rrc-flip is random-resized crop "
                              "and flip, for photos.", panel=P_DATA,
                              choices=_augmentations)
    label_noise: str | None = opt(None, "--label-noise", "Inject label noise into the training split: sym:R, "
                                  "uniform:R, asym:R, pairflip:R or none.", panel=P_DATA)
    noise_seed: int = opt(0, "--noise-seed", "Seed of the injected label noise.", panel=P_DATA)
    labels: str | None = opt(None, "--labels", "Replace the training labels: .npy (N,) or CSV with a 'label' "
                             "column.", panel=P_DATA)
    keep: str | None = opt(None, "--keep", "Train on these training indices only (CSV with an 'index' column, "
                           "e.g. from detect-noise).", panel=P_DATA)

    def validate(self) -> "DataOptions":
        from kdfine.data.noise import parse_noise
        from kdfine.data.sources import parse_data_spec

        if self.data is not None:
            parse_data_spec(self.data)
        if self.image_size is not None and self.image_size < 4:
            raise UsageError(f"--image-size {self.image_size}: must be >= 4")
        check_number(self.test_fraction, "--test-fraction", low=0.0, high=1.0, low_open=True, high_open=True)
        if self.augment is not None:
            check_choice(self.augment, _augmentations(), "--augment")
        check_choice(self.resize, _resize_modes(), "--resize")
        if self.stream not in (None, True, False):
            raise UsageError(f"--stream {self.stream!r}: expected true, false or None (by the memory budget)")
        parse_noise(self.label_noise)
        check_seed(self.noise_seed, "--noise-seed")
        return self


# ------------------------------------------------------------------------------------ training

@dataclass
class TrainConfig:
    """Every option of the training loop, with the defaults of the CLI."""

    epochs: int = opt(30, "--epochs", "Training epochs.", panel=P_TRAIN, min=1)
    batch_size: int = opt(128, "--batch-size", "Global batch size (split across torchrun ranks).", panel=P_TRAIN,
                          min=1)
    lr: float = opt(0.1, "--lr", "Peak learning rate (SGD, momentum 0.9, Nesterov).", panel=P_TRAIN)
    momentum: float = 0.9  # not an option (yet): the recipes of both papers use 0.9
    weight_decay: float = opt(5e-4, "--weight-decay", "Weight decay (not on BatchNorm or biases).", panel=P_TRAIN)
    schedule: str = opt("multistep", "--schedule", "multistep (x0.1 at 50% and 75%), multistep:E1,E2, cosine or "
                        "constant.", panel=P_TRAIN, completions=lambda: SCHEDULES)
    seed: int = opt(0, "--seed", "Seed of initialisation, data order and augmentation.", panel=P_TRAIN)
    precision: str = opt("auto", "--precision", "auto (bf16 autocast on CUDA; fp32 on a CPU, where distillation "
                         "teachers run in bf16 if the CPU has native bf16), fp32 or bf16.", panel=P_DEVICE,
                         choices=lambda: PRECISIONS)
    channels_last: str = opt("auto", "--channels-last", "auto (on for CUDA and CPU), on or off.", panel=P_DEVICE,
                             choices=lambda: CHANNELS_LAST)
    compile: bool = opt(False, "--compile/--no-compile", "torch.compile the training step.", panel=P_DEVICE)
    loss: str = opt("ce", "--loss", "Distillation loss: mse matches logits, kl the tau-softened outputs, kl-inf "
                    "is kl's tau -> inf limit, ce uses the labels alone.", panel=P_TRAIN, choices=_losses)
    tau: float = opt(4.0, "--tau", "KL temperature.", panel=P_TRAIN)
    alpha: float = opt(1.0, "--alpha", "Weight of the distillation term; 1 - alpha goes to CE on the labels.",
                       panel=P_TRAIN)
    eval_every: int = opt(1, "--eval-every", "Test-set evaluation every N epochs.", panel=P_TRAIN, min=1)
    fine_warmup: int = opt(10, "--fine-warmup", "Epochs before the first FINE selection.", panel=P_FINE, min=0)
    fine_every: int = opt(0, "--fine-every", "Re-select the training set with FINE every N epochs (0: off).",
                          panel=P_FINE, min=0)
    fine_zeta: float = opt(0.5, "--fine-zeta", "Keep samples with P(clean) above this.", panel=P_FINE)
    fine_method: str = opt("gmm", "--fine-method", "Mixture of the FINE split.", panel=P_FINE,
                           choices=lambda: ("gmm", "kmeans"))

    def validate(self) -> "TrainConfig":
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        check_number(self.lr, "--lr", low=0.0, low_open=True, high=1e4)
        check_number(self.weight_decay, "--weight-decay", low=0.0, high=1.0)
        check_number(self.momentum, "--momentum", low=0.0, high=1.0, high_open=True)
        check_seed(self.seed)
        check_choice(self.precision, PRECISIONS, "--precision")
        check_choice(self.channels_last, CHANNELS_LAST, "--channels-last")
        if self.fine_every < 0 or self.fine_warmup < 0:
            raise UsageError("--fine-every and --fine-warmup must be >= 0")
        check_zeta(self.fine_zeta, "--fine-zeta")
        check_choice(self.fine_method, ("gmm", "kmeans"), "--fine-method")
        check_choice(self.loss, _losses(), "--loss")
        check_number(self.tau, "--tau", low=0.0, low_open=True)
        check_number(self.alpha, "--alpha", low=0.0, high=1.0)
        parse_schedule(self.schedule, self.epochs)
        return self


# ------------------------------------------------------------------------------------ detection

@dataclass
class DetectOptions:
    """How detect-noise and clean split clean from noisy samples."""

    zeta: float = opt(0.5, "--zeta", "Keep samples with P(clean) above this.", panel=P_DETECT)
    method: str = opt("gmm", "--method", "gmm (FINE), kmeans (FINE with 2-means), small-loss (GMM on "
                      "cross-entropy, from the logits sidecar), auto (FINE and the loss together) or knn "
                      "(neighbours' labels, no training).", panel=P_DETECT, choices=_methods)
    seed: int = opt(0, "--seed", "Seed of the mixture fit (GMM or 2-means).", panel=P_DETECT)

    def validate(self) -> "DetectOptions":
        check_zeta(self.zeta, "--zeta")
        check_choice(self.method, _methods(), "--method")
        check_seed(self.seed)
        return self


@dataclass
class EvalOptions:
    """How eval, clean and feature extraction run their forward passes."""

    split: str = opt("test", "--split", "Which split to evaluate.", choices=lambda: SPLITS)
    batch_size: int = opt(512, "--batch-size", "Evaluation batch size.", min=1)
    precision: str = opt("auto", "--precision", "auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16.",
                         panel=P_DEVICE, choices=lambda: PRECISIONS)

    def validate(self) -> "EvalOptions":
        check_choice(self.split, SPLITS, "--split")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be >= 1")
        check_choice(self.precision, PRECISIONS, "--precision")
        return self

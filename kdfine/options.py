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
SCHEDULES = ("multistep", "multistep:E1,E2,...", "multistep:E1,E2,...:GAMMA", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
KEEP_BEST = ("last", "val")
FINE_FEATURES = ("augmented", "plain")
LOSSES = ("ce", "kl", "mse", "kl-inf")  # distill --loss; kdfine.losses implements exactly these (a test checks)
LABEL_LOSSES = ("ce", "gce", "sce")  # train-teacher --loss: on the labels alone, noise-robust or not
STRATEGIES = ("select", "coteach", "dividemix")  # --fine-strategy: FINE's three applications
# TrainConfig fields that only train-teacher takes (distill has a teacher, one network and --loss from LOSSES)
TEACHER_ONLY = ("fine_strategy", "gce_q", "sce_alpha", "sce_beta", "ssl_lambda_u", "ssl_threshold", "ssl_alpha",
                "ssl_temperature")
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds; larger values would wrap silently

P_DATA, P_TRAIN, P_OUT, P_FINE, P_DEVICE, P_DETECT, P_SSL = (
    "Data", "Training", "Output", "Dynamic FINE selection", "Device", "Detection", "F-DivideMix")


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


def _label_losses() -> Sequence[str]:
    return LABEL_LOSSES


def _strategies() -> Sequence[str]:
    return STRATEGIES


def _methods() -> Sequence[str]:
    from kdfine.fine import METHODS

    return METHODS


def _augmentations() -> Sequence[str]:
    from kdfine.data.sources import AUGMENTATIONS

    return AUGMENTATIONS


def _resize_modes() -> Sequence[str]:
    from kdfine.data.sources import RESIZE_MODES

    return RESIZE_MODES


# train-teacher's --loss: the TrainConfig field ``loss`` with the label losses as its choices
TEACHER_LOSS_FLAG = Flag("--loss", "Loss on the labels: ce, gce (generalized CE, --gce-q) or sce (symmetric CE, "
                         "--sce-alpha, --sce-beta); alone or with any --fine-strategy.", P_TRAIN,
                         choices=_label_losses)


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

    epochs: int = opt(30, "--epochs", "Training epochs (0: write the initialised model, e.g. pretrained "
                      "features for eval --dump-features).", panel=P_TRAIN, min=0)
    batch_size: int = opt(128, "--batch-size", "Global batch size (split across torchrun ranks).", panel=P_TRAIN,
                          min=1)
    optimizer: str = opt("sgd", "--optimizer", "sgd (momentum 0.9) or adamw (decoupled weight decay; give it a "
                         "smaller --lr, e.g. 1e-3).", panel=P_TRAIN, choices=lambda: OPTIMIZERS)
    lr: float = opt(0.1, "--lr", "Peak learning rate.", panel=P_TRAIN)
    momentum: float = 0.9  # not an option (yet): the recipes of both papers use 0.9
    nesterov: bool = opt(True, "--nesterov/--no-nesterov", "SGD with Nesterov momentum (the KD paper's code) or "
                         "plain momentum (FINE's official code).", panel=P_TRAIN)
    weight_decay: float = opt(5e-4, "--weight-decay", "Weight decay (not on BatchNorm or biases unless "
                              "--decay-all).", panel=P_TRAIN)
    decay_all: bool = opt(False, "--decay-all/--no-decay-all", "Weight decay on every parameter, BatchNorm and "
                          "biases included (FINE's official code).", panel=P_TRAIN)
    schedule: str = opt("multistep", "--schedule", "multistep (x0.1 at 50% and 75%), multistep:E1,E2 (x0.1 at "
                        "those epochs), multistep:E1,E2:GAMMA (xGAMMA), cosine or constant.", panel=P_TRAIN,
                        completions=lambda: SCHEDULES)
    warmup_epochs: int = opt(0, "--warmup-epochs", "Linear learning-rate warm-up over the first N epochs (per "
                             "step, from lr/(N+1)), then the schedule.", panel=P_TRAIN, min=0)
    label_smoothing: float = opt(0.0, "--label-smoothing", "Label smoothing of the cross-entropy terms, in "
                                 "[0, 1).", panel=P_TRAIN)
    val_fraction: float = opt(0.0, "--val-fraction", "Hold out this share of the training set for validation "
                              "(stratified by label, seeded by --seed; never the test set). 0: none.",
                              panel=P_TRAIN)
    keep_best: str = opt("last", "--keep-best", "Which weights to write: last (the last epoch's) or val (the "
                         "epoch of best validation accuracy; needs --val-fraction).", panel=P_TRAIN,
                         choices=lambda: KEEP_BEST)
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
    fine_features: str = opt("augmented", "--fine-features", "Features for the selection from the training "
                             "images with the training augmentation (augmented, as the official code) or without "
                             "it (plain).", panel=P_FINE, choices=lambda: FINE_FEATURES)
    fine_strategy: str = opt("select", "--fine-strategy", "select: train on FINE's selection; coteach: two "
                             "networks, each trained on the other's selection; dividemix: two networks, "
                             "semi-supervised on the other's split (needs --fine-every).", panel=P_FINE,
                             choices=_strategies)
    gce_q: float = opt(0.7, "--gce-q", "GCE's exponent q in (0, 1] (--loss gce).", panel=P_TRAIN)
    sce_alpha: float = opt(0.1, "--sce-alpha", "SCE's weight of CE (--loss sce).", panel=P_TRAIN)
    sce_beta: float = opt(1.0, "--sce-beta", "SCE's weight of reverse CE (--loss sce).", panel=P_TRAIN)
    ssl_lambda_u: float = opt(25.0, "--ssl-lambda-u", "Weight of the unlabelled (MSE) term, ramped up over 16 "
                              "epochs after the warm-up.", panel=P_SSL)
    ssl_threshold: float = opt(0.5, "--ssl-threshold", "Labelled when FINE's p_clean is above this.", panel=P_SSL)
    ssl_alpha: float = opt(4.0, "--ssl-alpha", "Mixup Beta(alpha, alpha) parameter.", panel=P_SSL)
    ssl_temperature: float = opt(0.5, "--ssl-temperature", "Sharpening temperature of the guessed labels.",
                                 panel=P_SSL)

    def validate(self) -> "TrainConfig":
        if self.epochs < 0:
            raise UsageError(f"--epochs {self.epochs}: must be >= 0")
        for name in ("batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        check_choice(self.optimizer, OPTIMIZERS, "--optimizer")
        check_number(self.lr, "--lr", low=0.0, low_open=True, high=1e4)
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise UsageError(f"--warmup-epochs {self.warmup_epochs}: must be an integer >= 0")
        check_number(self.label_smoothing, "--label-smoothing", low=0.0, high=1.0, high_open=True)
        check_number(self.val_fraction, "--val-fraction", low=0.0, high=1.0, high_open=True)
        check_choice(self.keep_best, KEEP_BEST, "--keep-best")
        if self.keep_best == "val" and self.val_fraction == 0:
            raise UsageError("--keep-best val needs a validation split: add --val-fraction F (e.g. 0.1)")
        check_choice(self.fine_features, FINE_FEATURES, "--fine-features")
        check_number(self.weight_decay, "--weight-decay", low=0.0, high=1.0)
        check_number(self.momentum, "--momentum", low=0.0, high=1.0, high_open=True)
        check_seed(self.seed)
        check_choice(self.precision, PRECISIONS, "--precision")
        check_choice(self.channels_last, CHANNELS_LAST, "--channels-last")
        if self.fine_every < 0 or self.fine_warmup < 0:
            raise UsageError("--fine-every and --fine-warmup must be >= 0")
        check_zeta(self.fine_zeta, "--fine-zeta")
        check_choice(self.fine_method, ("gmm", "kmeans"), "--fine-method")
        check_choice(self.loss, tuple(dict.fromkeys(LOSSES + LABEL_LOSSES)), "--loss")
        self._validate_strategy()
        check_number(self.tau, "--tau", low=0.0, low_open=True)
        check_number(self.alpha, "--alpha", low=0.0, high=1.0)
        parse_schedule(self.schedule, self.epochs)
        return self

    def _validate_strategy(self) -> None:
        """--fine-strategy and the options of the noise-robust losses and of F-DivideMix."""
        check_choice(self.fine_strategy, STRATEGIES, "--fine-strategy")
        if self.fine_strategy != "select" and self.fine_every < 1:
            raise UsageError(f"--fine-strategy {self.fine_strategy}: re-selects every --fine-every epochs after "
                             "--fine-warmup; give --fine-every N (N >= 1; F-DivideMix's recipe is 1)")
        check_number(self.gce_q, "--gce-q", low=0.0, low_open=True, high=1.0)
        check_number(self.sce_alpha, "--sce-alpha", low=0.0)
        check_number(self.sce_beta, "--sce-beta", low=0.0)
        check_number(self.ssl_lambda_u, "--ssl-lambda-u", low=0.0)
        check_number(self.ssl_threshold, "--ssl-threshold", low=0.0, high=1.0, high_open=True)
        check_number(self.ssl_alpha, "--ssl-alpha", low=0.0, low_open=True)
        check_number(self.ssl_temperature, "--ssl-temperature", low=0.0, low_open=True, high=1.0)


# ------------------------------------------------------------------------------------ weights

P_WEIGHTS = "Initial weights"


@dataclass
class ModelOptions:
    """Where a new network's initial weights come from and which of its parameters train."""

    pretrained: bool = opt(False, "--pretrained", "Start from the library's default pretrained weights (tv: and "
                           "timm: archs; cached by torch hub under TORCH_HOME or by Hugging Face); images are then "
                           "resized to the weights' size unless --image-size is given, and normalised with their "
                           "mean/std.", panel=P_WEIGHTS)
    init: str | None = opt(None, "--init", "Start from a local state dict: .safetensors (a kdfine checkpoint too) "
                           "or .pth/.pt (tensors only); a head of another size starts fresh.", panel=P_WEIGHTS)
    freeze_backbone: bool = opt(False, "--freeze-backbone", "Train the head only (linear probing); the backbone "
                                "stays in eval mode.", panel=P_WEIGHTS)

    def validate(self) -> "ModelOptions":
        if self.pretrained and self.init:
            raise UsageError("--pretrained and --init are alternatives; give one")
        if self.init is not None and not self.init.strip():
            raise UsageError("--init: expected a file name")
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

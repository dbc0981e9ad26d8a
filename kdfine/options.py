"""The option dataclasses of every command, each option declared once, with its constraints.

Each field carries a :class:`Flag` in its metadata (:func:`opt`): the command-line flag, help text
and panel, and the constraints on its value (choices, a numeric range and whether its ends are
open, a parser for structured values), which commands take it, a per-command default where one
differs, and whether a ``--resume`` must find it unchanged. Everything else is derived from these
declarations: :meth:`Options.validate` (one generic check, then the few relations between fields),
the command-line options and their shell completions (:mod:`kdfine.cli.bridge`), the man pages
(``scripts/gen_man.py``) and the resume keys (:func:`resume_keys`). A bad value is a
:class:`~kdfine.errors.UsageError` (exit 2) naming the option and what it accepts, raised before
any data is read or any model is built.

Torch-free: the names of torch modules' losses and strategies are read from their sources
(:func:`kdfine.registry.declared_names`), so ``detect-noise`` never loads torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from kdfine.errors import UsageError
from kdfine.registry import declared_names
from kdfine.train import BN_STATS, SEED_MAX

SPLITS = ("train", "test")
OPTIMIZERS = ("sgd", "adamw")
KEEP_BEST = ("last", "val")
FINE_FEATURES = ("augmented", "plain")
FINE_METHODS = ("gmm", "kmeans")  # the mixtures of FINE's split (the FINE detectors of kdfine.detect)
TRAIN, DISTILL = "train-teacher", "distill"

P_DATA, P_TRAIN, P_OUT, P_FINE, P_DEVICE, P_DETECT, P_SSL = (
    "Data", "Training", "Output", "Dynamic FINE selection", "Device", "Detection", "F-DivideMix")
P_WEIGHTS = "Initial weights"

Choices = Callable[[], Sequence[str]]


@dataclass(frozen=True)
class Flag:
    """One option's declaration. ``flag`` None: not on the command line (a library setting).
    ``choices`` and ``help`` may map a command to its own value; ``low``/``high`` bound
    numbers (``*_open``: the bound itself is excluded); ``parse`` checks a structured value (a data
    spec, a noise spec, a schedule) and raises UsageError; ``commands`` lists the commands that take
    the option (None: every command that takes its dataclass); ``defaults``: per-command defaults of
    a field whose own default is None; ``resume``: a resumed run must have
    the same value; ``completions`` completes an open-ended value in the shell."""

    flag: str | None
    help: str | Mapping[str, str]
    panel: str | None = None
    choices: Choices | Mapping[str, Choices] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    parse: Callable[[Any], Any] | None = None
    commands: tuple[str, ...] | None = None
    defaults: Mapping[str, Any] | None = None  # per-command defaults, where a command differs
    resume: bool = False
    short: str | None = None
    completions: Choices | None = None

    def takes(self, command: str | None) -> bool:
        return command is None or self.commands is None or command in self.commands

    def help_for(self, command: str | None) -> str:
        return self.help if isinstance(self.help, str) else self.help[command or next(iter(self.help))]

    def choices_for(self, command: str | None) -> Sequence[str] | None:
        c = self.choices
        if isinstance(c, Mapping):
            c = c.get(command) if command in c else next(iter(c.values()))
        return None if c is None else tuple(c())

    def default_for(self, command: str | None, default: Any) -> Any:
        return self.defaults.get(command, default) if self.defaults and command else default

    def range_text(self) -> str | None:
        """The numeric range in words (man pages): "At least 0", "In [0, 1)", "Above 0"."""
        lo, hi = self.low, self.high
        fmt = lambda x: f"{x:.0f}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"
        if lo is not None and hi is not None:
            return f"In {'(' if self.low_open else '['}{fmt(lo)}, {fmt(hi)}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'Above' if self.low_open else 'At least'} {fmt(lo)}"
        if hi is not None:
            return f"{'Below' if self.high_open else 'At most'} {fmt(hi)}"
        return None


def opt(default: Any, flag: str | None, help: str | Mapping[str, str], **kw: Any) -> Any:
    """A dataclass field with its declaration (see :class:`Flag`)."""
    return dataclasses.field(default=default, metadata={"cli": Flag(flag, help, **kw)})


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of option class ``cls`` (for messages)."""
    return next(f.metadata["cli"].flag for f in dataclasses.fields(cls) if f.name == name)


def declarations(cls: type, command: str | None = None) -> list[tuple[dataclasses.Field, Flag, Any]]:
    """(field, its Flag, its type hint) of every declared field of ``cls`` that ``command`` takes."""
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata["cli"], hints[f.name]) for f in dataclasses.fields(cls)
            if "cli" in f.metadata and f.metadata["cli"].takes(command)]


def declared_flag(command: str, name: str) -> Flag | None:
    """The declaration of option ``name`` (a field name) as ``command`` takes it, or None for the
    options that belong to the command line alone."""
    for cls in (DataOptions, TrainConfig, ModelOptions, DetectOptions, EvalOptions):
        for f, meta, _ in declarations(cls, command):
            if f.name == name:
                return meta
    return None


# ------------------------------------------------------------------------------------ the lists

def _kd_losses() -> Sequence[str]:
    return declared_names("kdfine.train.losses", "KD_LOSSES")


def _label_losses() -> Sequence[str]:
    return declared_names("kdfine.train.losses", "LABEL_LOSSES")


def _strategies() -> Sequence[str]:
    return tuple(n for m in ("select", "coteach", "dividemix")
                 for n in declared_names(f"kdfine.train.strategies.{m}", "STRATEGIES"))


def _methods() -> Sequence[str]:
    from kdfine.detect import methods

    return methods()


def _augmentations() -> Sequence[str]:
    from kdfine.data.sources import AUGMENTATIONS

    return AUGMENTATIONS


def _resize_modes() -> Sequence[str]:
    from kdfine.data.sources import RESIZE_MODES

    return RESIZE_MODES


def _precisions() -> Sequence[str]:
    from kdfine.runtime.device import PRECISIONS

    return PRECISIONS


def _channels_last() -> Sequence[str]:
    from kdfine.runtime.device import CHANNELS_LAST

    return CHANNELS_LAST


def _schedules() -> Sequence[str]:
    from kdfine.train.schedule import SCHEDULES

    return SCHEDULES


def _data_spec(value: str) -> None:
    from kdfine.data.sources import parse_data_spec

    parse_data_spec(value)


def _noise_spec(value: str | None) -> None:
    from kdfine.data.noise import parse_noise

    parse_noise(value)


def _norm(value: str | None) -> None:
    from kdfine.data.norm import parse_norm

    if value is not None:
        parse_norm(value)


def _schedule(value: str) -> None:
    from kdfine.train.schedule import parse_schedule

    parse_schedule(value, 1)


def _file_name(option: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if not value.strip():
            raise UsageError(f"{option}: expected a file name")
    return check


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


def _check_int(value: Any, flag: str, low: float | None, high: float | None) -> None:
    """An integer within the closed range [low, high] (either end may be None)."""
    bad = isinstance(value, bool) or not isinstance(value, int)
    if bad or (low is not None and value < low) or (high is not None and value > high):
        rng = (f" in [{low:.0f}, {high:.0f}]" if low is not None and high is not None else
               f" >= {low:.0f}" if low is not None else f" <= {high:.0f}" if high is not None else "")
        raise UsageError(f"{flag} {value}: must be an integer{rng}")


def _check_field(value: Any, meta: Flag, hint: Any, command: str | None) -> None:
    """The generic check of one value against its declaration."""
    flag = meta.flag or "--?"
    optional = type(None) in typing.get_args(hint)
    if value is None and optional:
        return
    kind = next((t for t in (bool, int, float, str) if t is hint or t in typing.get_args(hint)), None)
    if kind is bool and not isinstance(value, bool):
        raise UsageError(f"{flag} {value!r}: expected true or false" + (" or None" if optional else ""))
    if kind is int:
        _check_int(value, flag, meta.low, meta.high)
    if kind is float:
        check_number(value, flag, low=meta.low, high=meta.high, low_open=meta.low_open, high_open=meta.high_open)
    if kind is str and not isinstance(value, str):
        raise UsageError(f"{flag} {value!r}: expected a string")
    choices = meta.choices_for(command)
    if choices is not None:
        check_choice(value, choices, flag)
    if meta.parse is not None:
        meta.parse(value)


O = TypeVar("O", bound="Options")


class Options:
    """The generic validation of every option dataclass (see the module docstring)."""

    def validate(self: O, command: str | None = None) -> O:
        """Check every field that ``command`` takes (all of them without a command) against its
        declaration, refuse a changed value of a field it does not take, resolve per-command
        defaults (a field whose value is None and whose declaration names a default for
        ``command``), then check the relations between fields. Returns the validated copy."""
        resolved = {}
        for f, meta, hint in declarations(type(self)):
            value = getattr(self, f.name)
            if not meta.takes(command):
                if value != f.default:
                    raise UsageError(f"{meta.flag} is for {' and '.join(meta.commands)}; {command} does not take it")
                continue
            if value is None and meta.default_for(command, None) is not None:
                value = resolved[f.name] = meta.default_for(command, None)
            _check_field(value, meta, hint, command)
        out = dataclasses.replace(self, **resolved) if resolved else self
        out._relations(command)
        return out

    def _relations(self, command: str | None) -> None:
        """Constraints between fields (none by default)."""


def resume_keys() -> tuple[str, ...]:
    """The run-config keys that a ``--resume`` must find unchanged: the architecture, the teachers,
    the training set's fingerprint and the teachers' resolved precision, then every option declared
    ``resume=True`` (the run config records what ``--precision`` resolved to, not "auto")."""
    fields = [f.name for cls in (DataOptions, TrainConfig, ModelOptions) for f, meta, _ in declarations(cls)
              if meta.resume]
    return ("arch", "teachers", "train_set", "teacher_precision", *fields)


# ------------------------------------------------------------------------------------ data

_FIT = (TRAIN, DISTILL)


@dataclass
class DataOptions(Options):
    """Where the data comes from and how its training labels are changed."""

    data: str | None = opt(None, "--data", "Dataset: digits (default for new teachers), cifar10, cifar100, "
                           "mnist, fashion-mnist, svhn, imagefolder:PATH, npz:PATH. Commands given a checkpoint "
                           "default to its recorded data.", panel=P_DATA, parse=_data_spec, resume=True)
    data_root: str | None = opt(None, "--data-root", "Directory of torchvision datasets (default: "
                                "$KDFINE_CACHE/data, else ~/.cache/kdfine/data).", panel=P_DATA)
    download: bool = opt(False, "--download", "Fetch torchvision datasets into --data-root.", panel=P_DATA)
    image_size: int | None = opt(None, "--image-size", "Resize images to N x N (see --resize).", panel=P_DATA, low=4,
                                 resume=True)
    resize: str = opt("crop", "--resize", "How images of another size or shape become N x N: crop (shorter side "
                      "to N, centre crop) or squash (both sides to N, distorting).", panel=P_DATA,
                      choices=_resize_modes, resume=True)
    strict: bool = opt(False, "--strict", "An unreadable file in an image folder is an error (exit 3) instead of "
                       "being skipped with a warning.", panel=P_DATA)
    stream: bool | None = opt(None, "--stream/--no-stream", "Stream training batches from the decode cache on "
                              "disk instead of holding the training set on the device (default: stream when it "
                              "does not fit the memory budget, KDFINE_MEMORY_BUDGET).", panel=P_DATA, commands=_FIT)
    test_fraction: float = opt(0.2, "--test-fraction", "Test share when a folder or npz has no test split.",
                               panel=P_DATA, low=0.0, high=1.0, low_open=True, high_open=True, resume=True)
    augment: str | None = opt(None, "--augment", "Training augmentation (default: by dataset; crop-flip for "
                              "CIFAR-like images, none for digits and MNIST); rrc-flip is random-resized crop "
                              "and flip, for photos.", panel=P_DATA, choices=_augmentations, commands=_FIT,
                              resume=True)
    label_noise: str | None = opt(None, "--label-noise", "Inject label noise into the training split: sym:R, "
                                  "uniform:R, asym:R, pairflip:R or none.", panel=P_DATA, parse=_noise_spec,
                                  resume=True)
    noise_seed: int = opt(0, "--noise-seed", "Seed of the injected label noise.", panel=P_DATA, low=0, high=SEED_MAX,
                          resume=True)
    labels: str | None = opt(None, "--labels", "Replace the training labels: .npy (N,) or CSV with a 'label' "
                             "column.", panel=P_DATA, resume=True)
    keep: str | None = opt(None, "--keep", "Train on these training indices only (CSV with an 'index' column, "
                           "e.g. from detect-noise).", panel=P_DATA, commands=_FIT, resume=True)


# ------------------------------------------------------------------------------------ training

_LOSS_HELP = {DISTILL: "Distillation loss: mse matches logits, kl the tau-softened outputs, kl-inf is kl's tau -> "
                       "inf limit, dkd is decoupled KD (--dkd-alpha, --dkd-beta, --dkd-warmup; reads the labels), "
                       "kl-std is kl on per-sample standardised logits, ce uses the labels alone (the teacher is "
                       "then ignored).",
              TRAIN: "Loss on the labels: ce, gce (generalized CE, --gce-q) or sce (symmetric CE, --sce-alpha, "
                     "--sce-beta); alone or with any --fine-strategy."}


@dataclass
class TrainConfig(Options):
    """Every option of the training loop, with the defaults of the CLI (``loss`` None: the
    command's own, mse for distill and ce for train-teacher)."""

    epochs: int = opt(30, "--epochs", "Training epochs (0: write the initialised model, e.g. pretrained "
                      "features for eval --dump-features).", panel=P_TRAIN, low=0, resume=True)
    batch_size: int = opt(128, "--batch-size", "Global batch size (split across torchrun ranks).", panel=P_TRAIN,
                          low=1, resume=True)
    optimizer: str = opt("sgd", "--optimizer", "sgd (momentum 0.9) or adamw (decoupled weight decay; give it a "
                         "smaller --lr, e.g. 1e-3).", panel=P_TRAIN, choices=lambda: OPTIMIZERS, resume=True)
    lr: float = opt(0.1, "--lr", "Peak learning rate.", panel=P_TRAIN, low=0.0, low_open=True, high=1e4, resume=True)
    momentum: float = opt(0.9, None, "SGD momentum (the recipes of both papers use 0.9).", low=0.0, high=1.0,
                          high_open=True, resume=True)
    nesterov: bool = opt(True, "--nesterov/--no-nesterov", "SGD with Nesterov momentum (the KD paper's code) or "
                         "plain momentum (FINE's official code).", panel=P_TRAIN, resume=True)
    weight_decay: float = opt(5e-4, "--weight-decay", "Weight decay (not on BatchNorm or biases unless "
                              "--decay-all).", panel=P_TRAIN, low=0.0, high=1.0, resume=True)
    decay_all: bool = opt(False, "--decay-all/--no-decay-all", "Weight decay on every parameter, BatchNorm and "
                          "biases included (FINE's official code).", panel=P_TRAIN, resume=True)
    schedule: str = opt("multistep", "--schedule", "multistep (x0.1 at 50% and 75%), multistep:E1,E2 (x0.1 at "
                        "those epochs), multistep:E1,E2:GAMMA (xGAMMA), cosine or constant.", panel=P_TRAIN,
                        parse=_schedule, completions=_schedules, resume=True)
    warmup_epochs: int = opt(0, "--warmup-epochs", "Linear learning-rate warm-up over the first N epochs (per "
                             "step, from lr/(N+1)), then the schedule.", panel=P_TRAIN, low=0, resume=True)
    label_smoothing: float = opt(0.0, "--label-smoothing", "Label smoothing of the cross-entropy terms.", panel=P_TRAIN, low=0.0, high=1.0, high_open=True, resume=True)
    val_fraction: float = opt(0.0, "--val-fraction", "Hold out this share of the training set for validation "
                              "(stratified by label, seeded by --seed; never the test set). 0: none.",
                              panel=P_TRAIN, low=0.0, high=1.0, high_open=True, resume=True)
    keep_best: str = opt("last", "--keep-best", "Which weights to write: last (the last epoch's) or val (the "
                         "epoch of best validation accuracy; needs --val-fraction).", panel=P_TRAIN,
                         choices=lambda: KEEP_BEST, resume=True)
    seed: int = opt(0, "--seed", "Seed of initialisation, data order and augmentation.", panel=P_TRAIN, low=0,
                    high=SEED_MAX, resume=True)
    precision: str = opt("auto", "--precision", "auto (bf16 autocast on CUDA, and on a CPU with native bf16 "
                         "arithmetic where a timed probe, cached per machine, shows that it pays; fp32 otherwise; "
                         "distillation teachers run in bf16 on any CPU with native bf16), fp32 or bf16. A resume "
                         "compares what auto resolved to.", panel=P_DEVICE, choices=_precisions, resume=True)
    channels_last: str = opt("auto", "--channels-last", "auto (on for CUDA and CPU), on or off.", panel=P_DEVICE,
                             choices=_channels_last)
    compile: bool = opt(False, "--compile/--no-compile", "torch.compile the training step.", panel=P_DEVICE)
    loss: str | None = opt(None, "--loss", _LOSS_HELP, panel=P_TRAIN, choices={DISTILL: _kd_losses, TRAIN: _label_losses},
                           defaults={DISTILL: "mse", TRAIN: "ce"}, resume=True)
    tau: float = opt(4.0, "--tau", "Temperature of kl, dkd and kl-std (the kl-std authors use 2 on CIFAR-100).",
                     panel=P_TRAIN, low=0.0, low_open=True, commands=(DISTILL,), resume=True)
    alpha: float = opt(1.0, "--alpha", "Weight of the distillation term; 1 - alpha goes to CE on the labels.",
                       panel=P_TRAIN, low=0.0, high=1.0, commands=(DISTILL,), resume=True)
    bn_stats: str = opt("auto", "--bn-stats", "BatchNorm running statistics of the written model: auto (re-"
                        "estimated on up to 2048 un-augmented training images when less than half of them come "
                        "from the last tenth of the run: a small BatchNorm momentum, e.g. torchvision's MobileNets "
                        "(0.01), or a short run), recompute (always) or keep (as training left them).",
                        panel=P_TRAIN, choices=lambda: BN_STATS)
    dkd_alpha: float = opt(1.0, "--dkd-alpha", "dkd's weight of TCKD, the KL between the teacher's and the "
                           "student's (target, rest) probabilities; the target is the label, so dkd reads the "
                           "labels even at --alpha 1.", panel=P_TRAIN, low=0.0, commands=(DISTILL,), resume=True)
    dkd_beta: float = opt(8.0, "--dkd-beta", "dkd's weight of NCKD, the KL between their distributions over the "
                          "non-target classes (8: the authors' CIFAR-100 value).", panel=P_TRAIN, low=0.0,
                          commands=(DISTILL,), resume=True)
    dkd_warmup: int = opt(20, "--dkd-warmup", "dkd's linear warm-up: epoch E (1-based) weighs the dkd term by "
                          "min(E/N, 1), as the authors' code; a schedule shorter than N never reaches full weight "
                          "(10 epochs with N = 20 end at 0.5). 0: no warm-up.", panel=P_TRAIN, low=0,
                          commands=(DISTILL,), resume=True)
    eval_every: int = opt(1, "--eval-every", "Test-set evaluation every N epochs.", panel=P_TRAIN, low=1)
    fine_warmup: int = opt(10, "--fine-warmup", "Epochs before the first FINE selection.", panel=P_FINE, low=0,
                           resume=True)
    fine_every: int = opt(0, "--fine-every", "Re-select the training set with FINE every N epochs (0: off).",
                          panel=P_FINE, low=0, resume=True)
    fine_zeta: float = opt(0.5, "--fine-zeta", "Keep samples with P(clean) above this.", panel=P_FINE, low=0.0,
                           high=1.0, high_open=True, resume=True)
    fine_method: str = opt("gmm", "--fine-method", "Mixture of the FINE split.", panel=P_FINE,
                           choices=lambda: FINE_METHODS, resume=True)
    fine_features: str = opt("augmented", "--fine-features", "Features for the selection from the training "
                             "images with the training augmentation (augmented, as the official code) or without "
                             "it (plain).", panel=P_FINE, choices=lambda: FINE_FEATURES, resume=True)
    fine_strategy: str = opt("select", "--fine-strategy", "select: train on FINE's selection; coteach: two "
                             "networks, each trained on the other's selection; dividemix: two networks, "
                             "semi-supervised on the other's split (needs --fine-every).", panel=P_FINE,
                             choices=_strategies, commands=(TRAIN,), resume=True)
    gce_q: float = opt(0.7, "--gce-q", "GCE's exponent q in (0, 1] (--loss gce).", panel=P_TRAIN, low=0.0,
                       low_open=True, high=1.0, commands=(TRAIN,), resume=True)
    sce_alpha: float = opt(0.1, "--sce-alpha", "SCE's weight of CE (--loss sce).", panel=P_TRAIN, low=0.0,
                           commands=(TRAIN,), resume=True)
    sce_beta: float = opt(1.0, "--sce-beta", "SCE's weight of reverse CE (--loss sce).", panel=P_TRAIN, low=0.0,
                          commands=(TRAIN,), resume=True)
    ssl_lambda_u: float = opt(25.0, "--ssl-lambda-u", "Weight of the unlabelled (MSE) term, ramped up over 16 "
                              "epochs after the warm-up.", panel=P_SSL, low=0.0, commands=(TRAIN,), resume=True)
    ssl_threshold: float = opt(0.5, "--ssl-threshold", "Labelled when FINE's p_clean is above this.", panel=P_SSL,
                               low=0.0, high=1.0, high_open=True, commands=(TRAIN,), resume=True)
    ssl_alpha: float = opt(4.0, "--ssl-alpha", "Mixup Beta(alpha, alpha) parameter.", panel=P_SSL, low=0.0,
                           low_open=True, commands=(TRAIN,), resume=True)
    ssl_temperature: float = opt(0.5, "--ssl-temperature", "Sharpening temperature of the guessed labels.",
                                 panel=P_SSL, low=0.0, low_open=True, high=1.0, commands=(TRAIN,), resume=True)

    def _relations(self, command: str | None) -> None:
        if self.keep_best == "val" and self.val_fraction == 0:
            raise UsageError("--keep-best val needs a validation split: add --val-fraction F (e.g. 0.1)")
        if self.fine_strategy != "select" and self.fine_every < 1:
            raise UsageError(f"--fine-strategy {self.fine_strategy}: re-selects every --fine-every epochs after "
                             "--fine-warmup; give --fine-every N (N >= 1; F-DivideMix's recipe is 1)")


# ------------------------------------------------------------------------------------ weights

@dataclass
class ModelOptions(Options):
    """Where a new network's initial weights come from and which of its parameters train."""

    pretrained: bool = opt(False, "--pretrained", "Start from the library's default pretrained weights (tv: and "
                           "timm: archs; cached by torch hub under TORCH_HOME or by Hugging Face); images are then "
                           "resized to the weights' size unless --image-size is given, and normalised with their "
                           "mean/std.", panel=P_WEIGHTS)
    init: str | None = opt(None, "--init", "Start from a local state dict: .safetensors (a kdfine checkpoint too) "
                           "or .pth/.pt (tensors only); a head of another size starts fresh.", panel=P_WEIGHTS,
                           parse=_file_name("--init"))
    freeze_backbone: bool = opt(False, "--freeze-backbone", "Train the head only (linear probing); the backbone "
                                "stays in eval mode.", panel=P_WEIGHTS)
    norm: str | None = opt(None, "--norm", "Input normalisation: data (the training images' mean/std; the default "
                           "without --pretrained), weights (the pretrained weights' mean/std; the default with "
                           "--pretrained), imagenet (for --init weights trained on ImageNet) or MEAN/STD, one value or "
                           "one per channel each (0.5/0.5).", panel=P_WEIGHTS, parse=_norm, resume=True)

    def _relations(self, command: str | None) -> None:
        if self.pretrained and self.init:
            raise UsageError("--pretrained and --init are alternatives; give one")
        if self.norm is not None and self.norm.strip().lower() == "weights" and not self.pretrained:
            raise UsageError("--norm weights: needs --pretrained (the weights whose statistics to use); give "
                             "--norm imagenet or MEAN/STD for --init weights")


# ------------------------------------------------------------------------------------ detection

@dataclass
class DetectOptions(Options):
    """How detect-noise and clean split clean from noisy samples."""

    zeta: float = opt(0.5, "--zeta", "Keep samples with P(clean) above this.", panel=P_DETECT, low=0.0, high=1.0,
                      high_open=True)
    method: str = opt("auto", "--method", "auto (FINE, the loss and the neighbours' labels together; FINE's "
                      "gmm alone when the dump has no logits), gmm (FINE, the official method), kmeans (FINE "
                      "with 2-means), small-loss (GMM on cross-entropy, from the logits sidecar) or knn "
                      "(neighbours' labels, no training).", panel=P_DETECT, choices=_methods)
    seed: int = opt(0, "--seed", "Seed of the mixture fit (GMM or 2-means).", panel=P_DETECT, low=0, high=SEED_MAX)
    relabel_min_p: float = opt(0.5, "--relabel-min-p", "--labels-out relabels a rejected sample when its suggested "
                               "label's probability (given that its label is wrong) is at least this.",
                               panel=P_DETECT, low=0.0, high=1.0)
    labels_out: str | None = opt(None, "--labels-out", "Write index,label for every sample: the suggested label "
                                 "where the sample is rejected and --relabel-min-p is met, the given label "
                                 "elsewhere (for train-teacher --labels).", panel=P_OUT,
                                 parse=_file_name("--labels-out"))
    review: str | None = opt(None, "--review", "Write a review page (one self-contained HTML file): the rejected "
                             "samples with thumbnails and suggested labels, decided by keyboard or mouse and "
                             "downloaded as CSVs for train-teacher --labels and --keep.", panel=P_OUT,
                             parse=_file_name("--review"))


@dataclass
class EvalOptions(Options):
    """How eval, clean and feature extraction run their forward passes."""

    split: str = opt("test", "--split", "Which split to evaluate.", choices=lambda: SPLITS, commands=("eval",))
    batch_size: int = opt(512, "--batch-size", {"eval": "Evaluation batch size.",
                                                "clean": "Feature-extraction batch size."}, low=1)
    precision: str = opt("auto", "--precision", "auto (bf16 on CUDA, fp32 elsewhere: on a CPU, features, "
                         "predictions and metrics stay fp32 even where training picks bf16), fp32 or bf16.",
                         panel=P_DEVICE, choices=_precisions)

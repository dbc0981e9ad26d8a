"""The input normalisation of a new network (``--norm``): which mean and standard deviation (per
channel, [0, 1] pixel units) its images are normalised with, and where they come from.

``data``: the training images' own statistics (the default without ``--pretrained``); ``weights``:
those the pretrained weights expect (the default with ``--pretrained``); ``imagenet``: ImageNet's
(what most published ``.pth`` files were trained with, for ``--init``); ``MEAN/STD``: one value,
or one per channel, each (``0.5/0.5``, ``0.49,0.48,0.45/0.25,0.24,0.26``). Torch-free.
"""

from __future__ import annotations

import math
from typing import Sequence

from kdfine.errors import UsageError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NAMED = ("data", "weights", "imagenet")
Stats = tuple[tuple[float, ...], tuple[float, ...]]


def parse_norm(spec: str) -> tuple[str, Stats | None]:
    """``(kind, stats)``: a named normalisation (``stats`` None, or ImageNet's) or ``custom`` with
    the given values. UsageError for anything else: a missing part, a value that is not a
    finite number, a standard deviation that is not positive, mean and std of different lengths."""
    text = spec.strip().lower()
    if text in NAMED:
        return text, (IMAGENET if text == "imagenet" else None)
    mean_text, sep, std_text = text.partition("/")
    try:
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        mean = std = ()
    if not sep or not mean or not std or not all(math.isfinite(v) for v in mean + std):
        raise UsageError(f"--norm '{spec}': expected {', '.join(NAMED)} or MEAN/STD (one value or one per channel "
                         "each, e.g. 0.5/0.5 or 0.485,0.456,0.406/0.229,0.224,0.225)")
    if min(std) <= 0:
        raise UsageError(f"--norm '{spec}': a standard deviation must be above 0")
    if len(mean) != len(std):
        raise UsageError(f"--norm '{spec}': {len(mean)} mean value(s) but {len(std)} standard deviation(s)")
    return "custom", (mean, std)


def per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """``values`` for ``channels`` channels: one value repeated, a list of that length kept, three
    (RGB) values averaged for grey images; UsageError otherwise."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise UsageError(f"--norm: {len(values)} values for images of {channels} channels; give one value or {channels}")


def resolve(spec: str | None, channels: int, data_stats: Stats, weights_stats: Stats | None) -> tuple[Stats, str]:
    """The (mean, std) for images of ``channels`` channels and where they come from (for the
    training header): ``spec`` (None: ``weights`` when there are pretrained weights, ``data``
    otherwise); ``weights`` needs ``weights_stats``."""
    kind, stats = parse_norm(spec) if spec else ("weights" if weights_stats else "data", None)
    if kind == "data":
        return data_stats, "the training images' own"
    if kind == "weights":
        if weights_stats is None:
            raise UsageError("--norm weights: needs --pretrained (the weights whose statistics to use); give "
                             "--norm imagenet or MEAN/STD for --init weights")
        stats, where = weights_stats, "the pretrained weights'"
    else:
        where = "ImageNet's" if kind == "imagenet" else "--norm's"
    return (per_channel(stats[0], channels), per_channel(stats[1], channels)), where

"""The model metadata that kdfine trusts to rebuild and feed a network, checked before it is used.

A checkpoint's (and an exported ONNX file's) metadata decides what is allocated and computed:
the input size, the number of classes, the normalisation. It comes from a file a user hands us,
so every such field is checked here, once, when the file is read: whole numbers within bounds
(never booleans), finite mean/std with one value per channel, std above 0, one class name per
class. Torch-free, so that ``predict`` on an ONNX file checks it without loading torch.
"""

from __future__ import annotations

import math
from typing import Any

#: The largest square side kdfine builds or decodes for (a 4096 x 4096 x 3 float image is 200 MB).
MAX_IMAGE_SIZE = 4096
#: The most classes a head may have (face-recognition heads reach about a million).
MAX_CLASSES = 1_000_000
#: The most input channels (images decode to 1 or 3; npz data may carry a few more).
MAX_CHANNELS = 64


def _whole(meta: dict[str, Any], key: str, high: int) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
        raise ValueError(f"'{key}' must be a whole number in [1, {high}], not {str(v)[:40]}")
    return v


def _finite_list(meta: dict[str, Any], key: str, n: int, positive: bool = False) -> None:
    v = meta.get(key)
    ok = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    if not ok or len(v) != n or not all(math.isfinite(x) and (x > 0 or not positive) for x in v):
        what = "positive finite numbers" if positive else "finite numbers"
        raise ValueError(f"'{key}' must be {n} {what} (one per input channel), not {str(v)[:60]}")


def check_model_meta(meta: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad field among ``image_size``, ``num_classes``,
    ``in_channels`` (whole numbers within :data:`MAX_IMAGE_SIZE`, :data:`MAX_CLASSES`,
    :data:`MAX_CHANNELS`), ``mean``/``std`` (finite, one per channel, std > 0) and ``classes``
    (``num_classes`` strings). Values are the decoded JSON ones."""
    _whole(meta, "image_size", MAX_IMAGE_SIZE)
    k = _whole(meta, "num_classes", MAX_CLASSES)
    c = _whole(meta, "in_channels", MAX_CHANNELS)
    _finite_list(meta, "mean", c)
    _finite_list(meta, "std", c, positive=True)
    classes = meta.get("classes")
    if not isinstance(classes, list) or not all(isinstance(x, str) for x in classes):
        raise ValueError("'classes' must be a JSON list of strings")
    if len(classes) != k:
        raise ValueError(f"'classes' names {len(classes)} classes but 'num_classes' is {k}")

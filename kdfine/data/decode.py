"""THE image decoder: one file -> uint8 pixels (N, N, C), the same for training, predict and thumbnails.

Every path that turns an image file into pixels goes through :func:`decode` (the decode cache of
image folders, ``kdfine predict``, the review page's thumbnails), so that a model sees in
production the pixels it was trained on. The steps, in order:

1. the header is read and the pixel count checked against the limit (:func:`max_pixels`,
   ``KDFINE_MAX_PIXELS``): a decompression bomb is refused before anything is decoded;
2. JPEGs much larger than needed are decoded by libjpeg at 1/2, 1/4 or 1/8 scale (``draft``);
3. the EXIF orientation is applied (the image is upright);
4. 16/32-bit and float grey are scaled to 0..255 (not clipped); palette transparency and alpha
   are composited on white; CMYK and every other mode become RGB (3 channels) or L (1 channel),
   grey replicated to 3 channels for a colour model;
5. ``crop`` resizes the shorter side to N and takes the centre square, ``squash`` resizes both
   sides to N; both with Pillow's BILINEAR filter (which filters when shrinking), in one call.

Torch-free: Pillow and numpy only.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdfine.errors import UsageError

GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
RESIZE_MODES = ("crop", "squash")
#: Pixels (width x height, as the header declares) above which a file is refused; see max_pixels().
DEFAULT_MAX_PIXELS = 120_000_000
MAX_PIXELS_ENV = "KDFINE_MAX_PIXELS"


def max_pixels() -> int:
    """The per-file pixel limit: ``$KDFINE_MAX_PIXELS`` (a whole number, or with a K, M or G
    suffix: ``200M``) or 120 million (above the largest camera sensors, about 102 MP; a 20000 x
    20000 bomb has 400 million). A decode may hold one image of that size at 4 bytes a pixel per
    decode thread, so the limit bounds memory."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    value = int(digits) * scale if digits.isdigit() else 0
    if value < 1:
        raise UsageError(f"{MAX_PIXELS_ENV}={text[:40]}: expected a positive whole number of pixels, optionally "
                         f"with K, M or G (default {DEFAULT_MAX_PIXELS // 10**6}M)")
    return value


class TooManyPixels(ValueError):
    """A file whose header declares more pixels than the limit: skipped like an unreadable file."""


@dataclass(frozen=True)
class DecodeSpec:
    """How every image is decoded: ``size`` x ``size`` pixels, ``channels`` 1 (grey) or 3;
    ``resize`` 'crop' (shorter side to ``size``, centre crop) or 'squash' (both sides to
    ``size``); ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when that is still larger
    than needed; ``max_pixels``: the per-file limit (default :func:`max_pixels`)."""

    size: int
    channels: int
    resize: str = "crop"
    draft: bool = True
    max_pixels: int = field(default_factory=max_pixels)

    def record(self) -> dict[str, Any]:
        """The decoding as a JSON-ready record (what a checkpoint or an ONNX file carries); the
        pixel limit is this machine's policy and is left out."""
        out = {k: v for k, v in asdict(self).items() if k != "max_pixels"}
        return {**out, "orientation": "exif", "alpha": "white", "high_bits": "scaled", "resample": "bilinear"}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "DecodeSpec":
        """The spec of a :meth:`record` (unknown keys ignored; missing ``resize``/``draft``: defaults)."""
        return cls(int(record["size"]), int(record["channels"]), str(record.get("resize", "crop")),
                   bool(record.get("draft", True)))


@dataclass(frozen=True)
class Decoded:
    """One decoded file: ``pixels`` (size, size, channels) uint8; whether the file holds colour;
    the upright original ``(width, height)``; the EXIF orientation applied (1: none), the
    file's Pillow mode and whether libjpeg decoded at a reduced scale."""

    pixels: np.ndarray
    colour: bool
    size: tuple[int, int]
    orientation: int
    mode: str
    drafted: bool

    def how(self, spec: DecodeSpec) -> dict[str, Any]:
        """The "decoded how" record of this file: the spec's record and this file's facts."""
        return {**spec.record(), "source_size": list(self.size), "source_mode": self.mode,
                "orientation_applied": self.orientation, "drafted": self.drafted}


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block is no orientation, not an unreadable image
        return 1


def _open(path: str | Path, limit: int):
    """Pillow's lazy open (header only) with the pixel limit applied; Pillow's own bomb check,
    a process-wide setting, is raised to at least ``limit`` so that it never refuses first."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit
    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        # Pillow warns about files between its limit and twice it; kdfine refuses those itself
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:  # beyond twice Pillow's limit: its message has the count
        found = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{int(found.group(1)):,}" if found else f"more than {2 * Image.MAX_IMAGE_PIXELS:,}"
        raise TooManyPixels(f"{count} pixels, above the limit of {limit:,} ({MAX_PIXELS_ENV})") from None
    w, h = im.size
    if w * h > limit:
        im.close()
        raise TooManyPixels(f"{w}x{h} = {w * h:,} pixels, above the limit of {limit:,} ({MAX_PIXELS_ENV})")
    return im


def probe(path: str | Path, limit: int | None = None) -> tuple[bool, int, int]:
    """Header only: ``(is colour, width, height)`` of the upright image (EXIF orientation
    applied). Raises on files Pillow cannot identify and on files above the pixel limit."""
    with _open(path, limit or max_pixels()) as im:
        w, h = im.size
        if _orientation(im) in (5, 6, 7, 8):
            w, h = h, w
        return im.mode not in GREY_MODES, w, h


def _eight_bit(im, channels: int):
    """Any Pillow mode -> 'L' or 'RGB': 16/32-bit and float grey scaled to 0..255 (not clipped),
    palette and alpha composited on white, grey replicated to 3 channels when ``channels`` is 3."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        peak = a.max(initial=0)
        top = 1.0 if im.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
        im = Image.fromarray(np.round(np.clip(a, 0, top) * (255.0 / top)).astype(np.uint8), "L")
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB" if channels == 3 else "L")


def _draft(im, spec: DecodeSpec) -> bool:
    """Ask libjpeg for a reduced-scale decode still at least the size needed; True if it took."""
    w, h = im.size
    s = spec.size
    if not (spec.draft and im.format == "JPEG" and min(w, h) > s):
        return False
    short = min(w, h)
    want = (s, s) if spec.resize == "squash" else (math.ceil(w * s / short), math.ceil(h * s / short))
    return im.draft(im.mode, want) is not None


def _to_square(im, spec: DecodeSpec):
    """``im`` resized to ``spec.size`` squared: centre square of the shorter side (crop) or the
    whole image (squash), in one bilinear resize."""
    from PIL import Image

    s = spec.size
    if im.size == (s, s):
        return im
    box = None
    if spec.resize == "crop":
        cw, ch = im.size
        short = min(cw, ch)
        box = ((cw - short) / 2, (ch - short) / 2, (cw + short) / 2, (ch + short) / 2)
    return im.resize((s, s), Image.BILINEAR, box=box)


def decode(path: str | Path, spec: DecodeSpec) -> Decoded:
    """One file -> :class:`Decoded` (pixels upright, 8-bit, ``spec.size`` squared). Raises
    :class:`TooManyPixels` above the pixel limit and Pillow's errors (OSError, SyntaxError,
    ValueError, ...) for files it cannot read."""
    from PIL import ImageOps

    if spec.channels not in (1, 3):
        raise ValueError(f"images decode to 1 or 3 channels, not {spec.channels}")
    with _open(path, spec.max_pixels) as im:
        w, h = im.size
        mode, colour, orientation = im.mode, im.mode not in GREY_MODES, _orientation(im)
        drafted = _draft(im, spec)
        if orientation > 1:
            im = ImageOps.exif_transpose(im)
            w, h = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        im = _eight_bit(im, spec.channels)
    a = np.asarray(_to_square(im, spec), dtype=np.uint8)
    return Decoded(a[..., None] if a.ndim == 2 else a, colour, (w, h), orientation, mode, drafted)


def decode_image(path: str | Path, spec: DecodeSpec) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """One file -> ``(pixels, is colour, (width, height))``, as :func:`decode` (the decode cache's form)."""
    d = decode(path, spec)
    return d.pixels, d.colour, d.size

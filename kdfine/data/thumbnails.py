"""Thumbnails of a feature dump's rows: the pixels a person looks at on the review page.

A dump's json records where its rows came from (:func:`kdfine.data.sources.row_sources`): an image
folder's rows are its files, decoded here with the decoder training used (upright by their EXIF
orientation, alpha on white, cropped or squashed as training was), at thumbnail size; the rows of
digits, npz and torchvision's sets are read from the split's arrays (small images are enlarged by
pixel repetition, so that an 8x8 digit stays sharp). Torch-free for image folders, digits and npz.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kdfine.data.cache import decode_workers
from kdfine.data.decode import DecodeSpec, decode_image
from kdfine.data.sources import parse_data_spec, split_arrays
from kdfine.errors import InputError, KdfineWarning, UsageError

SIZE = 96  # the side of an image folder's thumbnails; arrays keep their size up to this
MIN_SIDE = 64  # smaller arrays are enlarged by an integer factor to at least this


def thumbnails(info: dict[str, Any], rows: np.ndarray, size: int = SIZE) -> list[np.ndarray | None]:
    """Thumbnails (h, w, C) uint8 of the dump rows ``rows``, in that order, from the data its json
    ``info`` records; None for a row whose image cannot be read (a file that has gone since). An
    empty list of Nones, with a warning, when the data cannot be found."""
    rows = np.asarray(rows, np.int64)
    try:
        get = _row_reader(info, size)
    except (InputError, UsageError, OSError, ValueError) as e:
        warnings.warn(f"review page: no thumbnails ({str(e).rstrip('.')})", KdfineWarning, stacklevel=2)
        return [None] * rows.size
    with ThreadPoolExecutor(decode_workers()) as pool:  # PIL releases the GIL while it decodes
        out = list(pool.map(get, rows.tolist()))
    missing = sum(t is None for t in out)
    if missing:
        warnings.warn(f"review page: {missing} of {rows.size} images could not be read; they show no thumbnail",
                      KdfineWarning, stacklevel=2)
    return out


def _row_reader(info: dict[str, Any], size: int) -> Callable[[int], np.ndarray | None]:
    """``row -> thumbnail or None`` for the data of a dump's json."""
    spec, split = info.get("data"), info.get("split", "train")
    if not isinstance(spec, str):
        raise InputError("the dump's json does not say which data it was made from")
    kind, _ = parse_data_spec(spec)
    if kind == "imagefolder":
        root, paths = info.get("root"), info.get("paths")
        if not isinstance(root, str) or not isinstance(paths, list):
            raise InputError("the dump's json lists no image files; re-run `kdfine eval --dump-features`")
        decode = DecodeSpec(size, 3, info.get("resize") if info.get("resize") in ("crop", "squash") else "crop")
        return lambda i: _decoded(Path(root) / str(paths[i]), decode)
    fraction = info.get("test_fraction", 0.2)
    images = split_arrays(spec, "test" if split == "test" else "train", root=info.get("data_root"),
                          test_fraction=fraction if isinstance(fraction, float) else 0.2)
    if images.shape[0] != info.get("n", images.shape[0]):
        raise InputError(f"the {split} split of {spec} now has {images.shape[0]} images, the dump {info.get('n')}")
    return lambda i: fit(np.asarray(images[i]), size)


def _decoded(path: Path, spec: DecodeSpec) -> np.ndarray | None:
    try:
        return decode_image(path, spec)[0]
    except MemoryError:
        raise
    except Exception:  # a file removed or damaged since the dump: no thumbnail for it
        return None


def fit(image: np.ndarray, size: int = SIZE, min_side: int = MIN_SIDE) -> np.ndarray:
    """An (H, W, C) uint8 image as a thumbnail: enlarged by pixel repetition (nearest neighbour) to
    at least ``min_side`` when smaller, shrunk (bilinear, aspect kept) to at most ``size`` when larger."""
    h, w = image.shape[:2]
    if max(h, w) < min_side:
        f = -(-min_side // max(h, w, 1))
        return np.repeat(np.repeat(image, f, axis=0), f, axis=1)
    if max(h, w) > size:
        from PIL import Image

        scale = size / max(h, w)
        im = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        a = np.asarray(im, np.uint8)
        return a[..., None] if a.ndim == 2 else a
    return image

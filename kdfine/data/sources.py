"""Dataset specs -> uint8 arrays (in memory, or memory-mapped from the decode cache).

A source gives both splits as :class:`ArrayDataset`: uint8 images (N, H, W, C), int64 labels,
class names, per-channel mean/std of the *training* images (in [0, 1] pixel units) and the default
augmentation. Specs (``--data``):

- ``digits``            scikit-learn's bundled 8x8 digits (1797 images), stratified 80/20 split, seed 0.
- ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``, ``svhn``
                        torchvision's datasets under ``--data-root`` (``--download`` fetches them).
- ``imagefolder:PATH``  ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``, or one ``PATH/<class>/*``
                        tree split by ``test_fraction``; decoded once into the cache
                        (:mod:`kdfine.data.cache`) and memory-mapped from it.
- ``npz:PATH``          arrays ``x`` (N,H,W[,C]) and ``y``; optional ``x_test``, ``y_test``, ``classes``.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kdfine.data import cache, decode, identity
from kdfine.data.cache import cache_dir
from kdfine.data.decode import RESIZE_MODES
from kdfine.errors import InputError, KdfineWarning, UsageError

TORCHVISION_SETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "svhn")
AUGMENTATIONS = ("crop-flip", "crop", "flip", "rrc-flip", "none")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

__all__ = ["AUGMENTATIONS", "RESIZE_MODES", "ArrayDataset", "Source", "cache_dir", "load_source"]


def default_data_root() -> Path:
    return cache_dir() / "data"


@dataclass
class ArrayDataset:
    """One split of a dataset; ``images`` is an array or a memory map of the decode cache.

    images: (N, H, W, C) uint8; labels: (N,) int64 (possibly noisy); classes: K names;
    mean/std: per-channel statistics of the training split in [0, 1] units; augment: default
    training augmentation; spec: the ``--data`` string; split: ``train`` or ``test``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    spec: str
    split: str
    files: list[str] | None = None  # source image paths (image folders), for exports that link

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[3])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def with_labels(self, labels: np.ndarray) -> "ArrayDataset":
        return replace(self, labels=np.asarray(labels, dtype=np.int64))


@dataclass
class Source:
    """Both splits of a dataset. ``skipped``: the unreadable image files left out, as
    ``{"file", "reason"}`` (image folders; for ``--json``'s ``skipped``); ``info``: how an image
    folder was decoded (``image_size``, ``channels``, ``resize``, ``source_sizes`` -- the distinct
    original WxH, at most 10 (any source: the size of its arrays) --, ``cache``: the entry's
    directory or None when decoded in memory)."""

    train: ArrayDataset
    test: ArrayDataset
    name: str  # e.g. "cifar10", "imagefolder"
    skipped: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None  # an image folder's content fingerprint (kdfine.data.identity)

    def split(self, name: str) -> ArrayDataset:
        """``train`` or ``test`` (checked by :class:`kdfine.options.EvalOptions`)."""
        return self.train if name == "train" else self.test


def parse_data_spec(spec: str) -> tuple[str, str]:
    """Split a ``--data`` spec into ``(kind, argument)``: ``digits`` -> ("digits", ""),
    ``npz:PATH`` -> ("npz", "PATH"). Raises :class:`UsageError` for anything else."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if (kind == "digits" or kind in TORCHVISION_SETS) and not arg or kind in ("imagefolder", "npz") and arg:
        return kind, arg
    raise UsageError(f"--data '{spec}': unknown data spec; expected digits, "
                     f"{', '.join(TORCHVISION_SETS)}, imagefolder:PATH or npz:PATH")


def load_source(spec: str, *, root: str | os.PathLike | None = None, download: bool = False,
                image_size: int | None = None, test_fraction: float = 0.2, augment: str | None = None,
                resize: str = "crop", strict: bool = False, quiet: bool = False) -> Source:
    """Load both splits of ``spec`` (see the module docstring). The values are those of
    :class:`kdfine.options.DataOptions`, whose ``validate()`` checks them; call that first.

    image_size: square side to decode or resize to (default: the data's own; an image folder of
    one non-square size becomes square at its shorter side); resize: 'crop' (shorter side to
    ``image_size``, centre crop) or 'squash' (both sides, distorting); strict: an unreadable
    file in an image folder is an error (exit 3) instead of a warning; quiet: no decode progress bar.
    """
    kind, arg = parse_data_spec(spec)
    ftr = fte = None
    manifest: dict[str, Any] = {}
    where = expand_path(arg, spec) if kind in ("imagefolder", "npz") else None
    if kind == "digits":
        xtr, ytr, xte, yte, classes = _digits()
    elif kind in TORCHVISION_SETS:
        xtr, ytr, xte, yte, classes = _torchvision(kind, Path(root) if root else default_data_root(), download)
    elif kind == "imagefolder":
        manifest, a = _imagefolder(where, image_size, test_fraction, resize, strict, quiet)
        xtr, ytr, xte, yte, classes = a["train"], a["train_labels"], a["test"], a["test_labels"], manifest["classes"]
        ftr, fte = manifest["files"]["train"], manifest["files"]["test"]
    else:
        xtr, ytr, xte, yte, classes = _npz(where, test_fraction)
    own = [f"{xtr.shape[2]}x{xtr.shape[1]}"]  # the arrays' size before any resize (W x H)
    if xtr.shape[1] != xtr.shape[2] or image_size is not None and image_size != xtr.shape[1]:
        size = image_size or min(xtr.shape[1:3])
        xtr, xte = _resize(xtr, size, resize), _resize(xte, size, resize)
    if manifest:  # from the decode: no pass over the (possibly memory-mapped) images
        t = manifest["splits"]["train"]
        mean, std = stats_from_sums(np.array(t["sums"], np.float64), np.array(t["squares"], np.float64),
                                    xtr.shape[0] * xtr.shape[1] * xtr.shape[2])
    else:
        mean, std = channel_stats(xtr)
    aug = augment or default_augment(kind, xtr)
    make = lambda x, y, split, f: ArrayDataset(x, y.astype(np.int64), list(classes), mean, std, aug, spec, split, f)
    info = {k: manifest[k] for k in ("image_size", "channels", "resize", "source_sizes", "cache") if k in manifest}
    info.setdefault("source_sizes", own)
    return Source(make(xtr, ytr, "train", ftr), make(xte, yte, "test", fte), kind,
                  list(manifest.get("skipped", [])), info, manifest.get("content"))


def expand_path(arg: str, spec: str) -> Path:
    """The PATH of a ``--data`` spec with ``~`` expanded; exit 2 when ``~`` cannot be (no home)."""
    try:
        return Path(arg).expanduser()
    except RuntimeError:
        raise UsageError(f"--data {spec}: cannot expand '~' (this user has no home directory); "
                         "give the full path") from None


def row_sources(ds: ArrayDataset, spec: str, *, test_fraction: float, resize: str,
                data_root: str | None) -> dict[str, Any]:
    """What a feature dump of ``ds`` records so that each row can be traced to its image: how the
    split was made (``test_fraction``, ``resize``, ``data_root``) and, for an image folder ``spec``,
    its ``root`` (absolute) and ``paths`` (each row's file, relative to the root)."""
    out: dict[str, Any] = {"test_fraction": test_fraction, "resize": resize, "data_root": data_root}
    kind, arg = parse_data_spec(spec)
    if kind == "imagefolder" and ds.files is not None:
        root = str(Path(arg).expanduser().resolve())
        cut = len(root) + 1  # the decode records each file as the resolved root + its relative path
        out.update(root=root, paths=[f[cut:] if f.startswith(root + os.sep) else os.path.relpath(f, root)
                                     for f in map(str, ds.files)])
    return out


def split_arrays(spec: str, split: str, *, root: str | os.PathLike | None = None,
                 test_fraction: float = 0.2) -> np.ndarray:
    """The images (N, H, W, C) uint8 of one split of an array dataset (digits, npz, torchvision's)
    as stored, not resized: the pixels of a dump's rows for the review page's thumbnails. Numpy only
    for digits and npz (detect-noise stays torch-free); torchvision's sets load torchvision."""
    kind, arg = parse_data_spec(spec)
    if kind == "imagefolder":
        raise ValueError("an image folder's rows are its files: decode them (kdfine.data.cache.decode_image)")
    if kind == "digits":
        xtr, _, xte, _, _ = _digits()
    elif kind in TORCHVISION_SETS:
        xtr, _, xte, _, _ = _torchvision(kind, Path(root) if root else default_data_root(), False)
    else:
        xtr, _, xte, _, _ = _npz(Path(arg).expanduser(), test_fraction)
    return xtr if split == "train" else xte


def default_augment(kind: str, images: np.ndarray) -> str:
    """Pad-crop + flip for natural colour images, crop only for SVHN, nothing for digit-like data."""
    if kind == "svhn":
        return "crop"
    if kind in ("digits", "mnist", "fashion-mnist"):
        return "none"
    if kind in ("cifar10", "cifar100"):
        return "crop-flip"
    return "crop-flip" if images.shape[3] == 3 and images.shape[1] >= 24 else "none"


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units (exact integer sums)."""
    c = images.shape[3]
    sums = np.zeros(c, np.uint64)
    squares = np.zeros(c, np.uint64)
    for start in range(0, images.shape[0], 4096):
        flat = np.ascontiguousarray(images[start:start + 4096]).reshape(-1, c)
        sums += flat.sum(0, dtype=np.uint64)
        squares += (flat.astype(np.uint16) ** 2).sum(0, dtype=np.uint64)
    return stats_from_sums(sums.astype(np.float64), squares.astype(np.float64), images.size // max(c, 1))


def stats_from_sums(sums: np.ndarray, squares: np.ndarray, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std in [0, 1] units from per-channel sums of uint8 pixels and of their squares
    over ``n`` pixels per channel; a constant channel gets std 1."""
    n = max(n, 1)
    mean = sums / n / 255.0
    std = np.sqrt(np.maximum(squares / n / 65025.0 - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _resize(images: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """Resize uint8 NHWC arrays to ``size`` x ``size`` (antialiased bilinear); ``mode`` 'crop'
    first centre-crops non-square images to their shorter side."""
    import torch
    import torch.nn.functional as F

    h, w = images.shape[1:3]
    if mode == "crop" and h != w:
        s = min(h, w)
        images = images[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    out = []
    for start in range(0, images.shape[0], 4096):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + 4096])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, size, size, images.shape[3]), np.uint8)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices (sorted) with round(test_fraction * n_c) of each class c in the test
    split, drawn with a seeded generator; works for any class size, including 1."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: int(round(test_fraction * members.size))])
    te = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    tr = np.setdiff1d(np.arange(labels.shape[0]), te)
    return tr, te


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 8, 8) pixel values 0..16 and labels. Read straight
    from the CSV that scikit-learn ships, which skips importing sklearn.datasets (about a second
    of start-up for every command); ``load_digits`` is the fallback."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                a = np.loadtxt(f, delimiter=",", dtype=np.float64)
            if a.shape == (1797, 65):
                return a[:, :64].reshape(-1, 8, 8), a[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def _digits():
    images, y = _digits_arrays()
    x = np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    tr, te = stratified_split(y, 0.2, seed=0)
    return x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)]


def _torchvision(kind: str, root: Path, download: bool):
    import torchvision.datasets as tvd

    ctor = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
            "fashion-mnist": tvd.FashionMNIST, "svhn": tvd.SVHN}[kind]
    out = []
    for train in (True, False):
        try:
            if kind == "svhn":
                ds = ctor(str(root), split="train" if train else "test", download=download)
            else:
                ds = ctor(str(root), train=train, download=download)
        except RuntimeError as e:
            raise InputError(f"--data {kind}: dataset files not found under {root}; point --data-root at "
                             f"them or add --download to fetch them ({e})") from None
        except OSError as e:  # download failures: no network, disk full
            raise InputError(f"--data {kind}: could not fetch into {root}: {e}") from None
        if kind == "svhn":
            x = np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1))
            y = np.asarray(ds.labels, dtype=np.int64)
            classes = [str(i) for i in range(10)]
        else:
            data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
            x = data[..., None] if data.ndim == 3 else data
            y = np.asarray(ds.targets, dtype=np.int64)
            classes = list(ds.classes)
        out += [np.ascontiguousarray(x.astype(np.uint8)), y]
    return out[0], out[1], out[2], out[3], classes


# ---------------------------------------------------------------------------------------- folders

def _image_files(d: str) -> list[str]:
    """Image files under ``d`` as strings (no Path objects: 50,000 of them cost seconds), depth
    first with the entries of each folder sorted by name (the order of
    ``sorted(Path(d).rglob("*"))``), without a stat per file."""
    out: list[str] = []
    with os.scandir(d) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.is_dir():
            out += _image_files(e.path)
        elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file():
            out.append(e.path)
    return out


def _list_tree(root: Path) -> dict[str, list[str]]:
    """{class name: sorted image files} of a ``root/<class>/...`` tree; warns about class folders
    without any image file (they are left out)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    tree, empty = {}, []
    for c in classes:
        files = _image_files(str(root / c))
        if files:
            tree[c] = files
        else:
            empty.append(c)
    if empty and tree:
        warnings.warn(f"--data imagefolder: {len(empty)} class folder(s) under {root} hold no image and are left "
                      f"out: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}", KdfineWarning, stacklevel=4)
    return tree


def folder_splits(path: Path, test_fraction: float) -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
    """The files and labels of each split of an image folder, and the class names. A tree
    without ``test/`` (or with an empty one) is split by ``test_fraction``, stratified, seed 0."""
    if not path.is_dir():
        raise InputError(f"--data imagefolder:{path}: no such directory")
    split_layout = (path / "train").is_dir()
    trees = {"train": _list_tree(path / "train")} if split_layout else {"all": _list_tree(path)}
    if split_layout and (path / "test").is_dir():
        trees["test"] = _list_tree(path / "test")
    if not next(iter(trees.values())):
        raise InputError(f"--data imagefolder:{path}: no images found; expected {path}/train/<class>/*.png "
                         f"(and {path}/test/<class>/*) or {path}/<class>/*")
    classes = sorted(set().union(*[set(t) for t in trees.values()]))
    cindex = {c: i for i, c in enumerate(classes)}
    flat = {}
    for split, tree in trees.items():
        files = [f for c in sorted(tree) for f in tree[c]]
        flat[split] = (files, np.array([cindex[c] for c in sorted(tree) for _ in tree[c]], dtype=np.int64))
    if "test" not in flat or not flat["test"][0]:
        files, labels = flat.pop("all" if "all" in flat else "train")
        tr, te = stratified_split(labels, test_fraction, seed=0)
        flat = {"train": ([files[i] for i in tr], labels[tr]), "test": ([files[i] for i in te], labels[te])}
    return flat, classes


def _first_size(files: list[str]) -> tuple[int, int] | None:
    """The upright (width, height) of the first file that PIL can read, or None."""
    for f in files:
        try:
            return decode.probe(f)[1:]
        except MemoryError:
            raise
        except Exception:  # unreadable: decode_into will skip and list it
            continue
    return None


def _decode_folder(path: Path, splits: dict, tree: identity.Tree, key: str, image_size: int | None, resize: str,
                   quiet: bool, content: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Decode every split of an image folder into cache entry ``key``: colour if any image is
    colour (decoded as RGB, reduced to one channel at the end if none was); unreadable files
    skipped and listed (by position) in the manifest; without ``image_size`` all images must share
    one size. The tree's ``content`` fingerprint, when not known yet, is computed on the way."""
    first = _first_size([f for files, _ in splits.values() for f in files])
    require = None if image_size or first is None else first
    spec = decode.DecodeSpec(image_size or (min(first) if first else 1), 3, resize)
    manifest: dict[str, Any] = {"root": str(path.resolve()), "image_size": spec.size, "resize": resize, "splits": {}}
    digests = None if content else np.zeros((len(tree.rel), 32), np.uint8)
    where = np.empty(len(tree.order), np.int64)  # position in the listing -> position in the tree
    where[tree.order] = np.arange(len(tree.order))
    colour, sizes, arrays, offset = False, set(), {}, 0
    with cache.EntryWriter(key) as writer:
        for name, (files, labels) in splits.items():
            sink = writer.sink(name, (spec.size, spec.size, 3), len(files))
            try:
                done = cache.decode_into(sink, files, spec, quiet=quiet, label=f"decoding {path.name}/{name}",
                                         require=require, digests=digests is not None)
            except cache.SizeMismatch as e:
                raise InputError(f"--data imagefolder:{path}: images have different sizes ({e.expected[0]}x"
                                 f"{e.expected[1]} and {e.size[0]}x{e.size[1]}: {e.path}); pass --image-size N "
                                 "(shorter side resized to N, then centre-cropped; --resize squash stretches)") from None
            if digests is not None:
                digests[where[offset:offset + len(files)]] = done.digests
            offset += len(files)
            arrays[name] = sink.finish()
            writer.add(name, arrays[name])
            writer.add(f"{name}_labels", labels[done.kept])
            writer.add(f"{name}_kept", done.kept)
            skipped = [{"position": i, "file": files[i], "reason": why[:500]} for i, why in done.skipped]
            manifest["splits"][name] = {"files": len(files), "skipped": skipped,
                                        "sums": done.sums.tolist(), "squares": done.squares.tolist()}
            colour, sizes = colour or done.colour, sizes | done.sizes
        if not colour:
            for name, split in manifest["splits"].items():
                writer.grey(name, arrays[name])
                split["sums"], split["squares"] = split["sums"][:1], split["squares"][:1]
        manifest.update(channels=3 if colour else 1, source_sizes=sorted(f"{w}x{h}" for w, h in sizes)[:10],
                        content=content or identity.combine(tree, digests))
        out = writer.commit(manifest)
        manifest["cache"] = str(writer.final) if writer.on_disk else None
    return manifest, out


def _check_entry(manifest: dict[str, Any], arrays: dict[str, np.ndarray], *, path: Path, splits: dict,
                 image_size: int | None, resize: str) -> None:
    """Raise :class:`cache.Damaged` unless a cache entry describes a decode of this listing: its
    fields, and per split the images (n, S, S, C) uint8, the labels (n,) equal to the listing's at
    the kept positions (strictly increasing, in range), and every other file listed as skipped."""
    s, c = manifest.get("image_size"), manifest.get("channels")
    if (manifest.get("root") != str(path.resolve()) or manifest.get("resize") != resize or not isinstance(s, int)
            or isinstance(s, bool) or s < 1 or image_size not in (None, s) or c not in (1, 3)):
        raise cache.Damaged("the manifest's root, image size, resize mode or channels are not this decode's")
    if not identity.is_content(manifest.get("content")) or not isinstance(manifest.get("source_sizes"), list):
        raise cache.Damaged("the manifest has no content fingerprint or source sizes")
    if not isinstance(manifest.get("splits"), dict) or set(manifest["splits"]) != set(splits):
        raise cache.Damaged("the manifest's splits are not the folder's")
    for name, (files, labels) in splits.items():
        entry, images = manifest["splits"][name], arrays.get(name)
        kept, got = arrays.get(f"{name}_kept"), arrays.get(f"{name}_labels")
        missing = images is None or kept is None or got is None
        if missing or not isinstance(entry, dict) or entry.get("files") != len(files):
            raise cache.Damaged(f"the {name} split's record or arrays are missing")
        n = len(kept)
        if images.dtype != np.uint8 or images.shape != (n, s, s, c) or kept.shape != (n,) or kept.dtype != np.int64:
            raise cache.Damaged(f"the {name} arrays have shapes {images.shape}, {kept.shape}, not ({n}, {s}, {s}, {c})")
        if n and (kept[0] < 0 or kept[-1] >= len(files) or (np.diff(kept) <= 0).any()):
            raise cache.Damaged(f"the {name} split's kept positions are not increasing positions of its files")
        if got.shape != (n,) or got.dtype != np.int64 or not np.array_equal(got, labels[kept]):
            raise cache.Damaged(f"the {name} labels are not the folder's")
        _check_split_record(entry, name, files, c, kept)


def _check_split_record(entry: dict[str, Any], name: str, files: list[str], channels: int, kept: np.ndarray) -> None:
    """The skipped files complete the kept ones (each a file of the listing, at its position);
    the pixel sums are ``channels`` non-negative numbers."""
    skipped = entry.get("skipped")
    ok = isinstance(skipped, list) and len(skipped) == len(files) - len(kept) and all(
        isinstance(r, dict) and type(r.get("position")) is int and 0 <= r["position"] < len(files)
        and r.get("file") == files[r["position"]] and isinstance(r.get("reason"), str) for r in skipped)
    if not ok or np.isin([r["position"] for r in skipped], kept).any():
        raise cache.Damaged(f"the {name} split's skipped files do not complete its kept ones")
    for key in ("sums", "squares"):
        v = entry.get(key)
        if not (isinstance(v, list) and len(v) == channels and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < float("inf") for x in v)):
            raise cache.Damaged(f"the {name} split's '{key}' are not {channels} non-negative numbers")


def _imagefolder(path: Path, image_size: int | None, test_fraction: float, resize: str = "crop",
                 strict: bool = False, quiet: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An image folder through the decode cache: the manifest (with ``files`` per split, from the
    listing, and the tree's ``content`` fingerprint) and the arrays ``train``, ``train_labels``,
    ``test``, ``test_labels`` (memory maps when cached). The entry is checked; one whose files
    changed in place (same names, sizes and mtimes, other bytes) is decoded again."""
    splits, classes = folder_splits(path, test_fraction)
    listed = [(name, f) for name, (fs, _) in splits.items() for f in fs]
    try:
        tree = identity.stat_tree(path, [f for _, f in listed])
    except FileNotFoundError as e:
        raise InputError(f"--data imagefolder:{path}: {e.filename} vanished while the folder was read; "
                         "run again") from None
    params = {"root": str(path.resolve()), "image_size": image_size, "resize": resize, "test_fraction": test_fraction,
              "max_pixels": decode.max_pixels()}  # another limit skips other files: another entry
    key = cache.tree_key(tree, [f"{listed[i][0]}/{r}" for i, r in zip(tree.order.tolist(), tree.rel)], params)
    store = fingerprint_store()
    content = identity.recall(tree, store)
    check = functools.partial(_check_entry, path=path, splits=splits, image_size=image_size, resize=resize)
    hit = cache.open_entry(key, check)
    if hit is not None:
        content = content or identity.fingerprint(tree, store, cache.decode_workers())
        if hit[0]["content"] != content:
            warnings.warn(f"--data imagefolder:{path}: files were changed in place since they were decoded (same "
                          "names, sizes and modification times); decoding them again", KdfineWarning, stacklevel=3)
            hit = None
    if hit is not None:
        manifest, arrays = hit
        manifest["cache"] = str(cache.entry_dir(key))
    else:
        manifest, arrays = _decode_folder(path, splits, tree, key, image_size, resize, quiet, content)
        identity.remember(tree, store, manifest["content"])
    manifest["classes"] = classes
    _listed_files(manifest, arrays, path, splits)
    _report_skipped(manifest["skipped"], path, strict)
    for split in ("train", "test"):
        if len(arrays[split]) == 0 and splits[split][0]:
            raise InputError(f"--data imagefolder:{path}: the {split} split has no readable image")
    return manifest, arrays


def fingerprint_store() -> Path:
    """Where image folders' content fingerprints are remembered (:mod:`kdfine.data.identity`)."""
    return cache_dir() / "fingerprints"


def _listed_files(manifest: dict[str, Any], arrays: dict[str, np.ndarray], path: Path, splits: dict) -> None:
    """``manifest['files']`` (per split, the decoded files as absolute paths) and
    ``manifest['skipped']`` ({file, reason}), taken from this run's listing at the entry's
    positions: a file name never comes from the cache."""
    given, base = str(path), str(path.resolve())
    prefix = len(given) if given != "." else -1  # the listing of "." names "train/...", not "./train/..."
    manifest["files"], manifest["skipped"] = {}, []
    for name, (files, _) in splits.items():
        manifest["files"][name] = [base + (os.sep + files[i] if prefix < 0 else files[i][prefix:])
                                   for i in arrays[f"{name}_kept"].tolist()]
        manifest["skipped"] += [{"file": files[r["position"]], "reason": r["reason"]}
                                for r in manifest["splits"][name]["skipped"]]


def _report_skipped(skipped: list[dict[str, str]], path: Path, strict: bool) -> None:
    if not skipped:
        return
    first = f"{skipped[0]['file']} ({skipped[0]['reason']})"
    if strict:
        raise InputError(f"--data imagefolder:{path}: {len(skipped)} unreadable image file(s), the first "
                         f"{first}; remove them, or drop --strict to skip them")
    warnings.warn(f"--data imagefolder:{path}: skipped {len(skipped)} unreadable image file(s), the first "
                  f"{first}", KdfineWarning, stacklevel=4)


def _npz(path: Path, test_fraction: float):
    if not path.is_file():
        raise InputError(f"--data npz:{path}: no such file")
    try:
        z = dict(np.load(path, allow_pickle=False))
    except Exception as e:
        raise InputError(f"--data npz:{path}: not a readable .npz archive ({e})") from None
    if "x" not in z or "y" not in z:
        raise InputError(f"--data npz:{path}: needs arrays 'x' and 'y' (found {', '.join(sorted(z)) or 'none'})")

    def images(a, name):
        if a.ndim == 3:
            a = a[..., None]
        if a.ndim != 4:
            raise InputError(f"--data npz:{path}: '{name}' must be (N,H,W) or (N,H,W,C), got {a.shape}")
        if a.dtype != np.uint8:
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise InputError(f"--data npz:{path}: '{name}' must be uint8, or float in [0, 1]")
            a = np.round(a * 255).astype(np.uint8)
        return np.ascontiguousarray(a)

    def labels(a, n, name):
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or a.shape[0] != n:
            raise InputError(f"--data npz:{path}: '{name}' must be {n} integer labels, got {a.dtype} {a.shape}")
        if a.size and a.min() < 0:
            raise InputError(f"--data npz:{path}: '{name}' has negative labels")
        return a.astype(np.int64)

    x = images(z["x"], "x")
    y = labels(z["y"], x.shape[0], "y")
    if "x_test" in z:
        xte = images(z["x_test"], "x_test")
        yte = labels(z.get("y_test", np.zeros(0, np.int64)), xte.shape[0], "y_test")
        if xte.shape[1:] != x.shape[1:]:
            raise InputError(f"--data npz:{path}: x_test images are {xte.shape[1:]}, x images {x.shape[1:]}")
    else:
        tr, te = stratified_split(y, test_fraction, seed=0)
        x, y, xte, yte = x[tr], y[tr], x[te], y[te]
    k = int(max(y.max(initial=0), yte.max(initial=0))) + 1
    classes = [str(c) for c in z["classes"].tolist()] if "classes" in z else [str(i) for i in range(k)]
    if len(classes) < k:
        raise InputError(f"--data npz:{path}: 'classes' names {len(classes)} classes but labels go up to {k - 1}")
    return x, y, xte, yte, classes

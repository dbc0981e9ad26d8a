"""Dataset specs -> in-memory arrays.

A source gives both splits as :class:`ArrayDataset`: uint8 images (N, H, W, C), int64 labels,
class names, per-channel mean/std of the *training* images (in [0, 1] pixel units) and the default
augmentation. Specs (``--data``):

- ``digits``            scikit-learn's bundled 8x8 digits (1797 images), stratified 80/20 split, seed 0.
- ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``, ``svhn``
                        torchvision's datasets under ``--data-root`` (``--download`` fetches them).
- ``imagefolder:PATH``  ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``, or one ``PATH/<class>/*``
                        tree split by ``test_fraction``; decoded once and cached.
- ``npz:PATH``          arrays ``x`` (N,H,W[,C]) and ``y``; optional ``x_test``, ``y_test``, ``classes``.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kdfine.errors import InputError, UsageError

TORCHVISION_SETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "svhn")
AUGMENTATIONS = ("crop-flip", "crop", "flip", "none")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CACHE_VERSION = 2


def cache_dir() -> Path:
    """``$KDFINE_CACHE`` or ``~/.cache/kdfine``: decoded image folders live here."""
    return Path(os.environ.get("KDFINE_CACHE") or Path.home() / ".cache" / "kdfine")


def default_data_root() -> Path:
    return cache_dir() / "data"


@dataclass
class ArrayDataset:
    """One split of a dataset, held in memory.

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
    train: ArrayDataset
    test: ArrayDataset
    name: str  # e.g. "cifar10", "imagefolder"

    def split(self, name: str) -> ArrayDataset:
        if name not in ("train", "test"):
            raise UsageError(f"--split '{name}': expected train or test")
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
                image_size: int | None = None, test_fraction: float = 0.2,
                augment: str | None = None) -> Source:
    """Load both splits of ``spec`` (see the module docstring)."""
    kind, arg = parse_data_spec(spec)
    if not 0.0 < test_fraction < 1.0:
        raise UsageError(f"--test-fraction {test_fraction}: must lie strictly between 0 and 1")
    if augment is not None and augment not in AUGMENTATIONS:
        raise UsageError(f"--augment '{augment}': expected one of {', '.join(AUGMENTATIONS)}")
    ftr = fte = None
    if kind == "digits":
        xtr, ytr, xte, yte, classes = _digits()
    elif kind in TORCHVISION_SETS:
        xtr, ytr, xte, yte, classes = _torchvision(kind, Path(root) if root else default_data_root(), download)
    elif kind == "imagefolder":
        xtr, ytr, xte, yte, classes, ftr, fte = _imagefolder(Path(arg).expanduser(), image_size, test_fraction)
    else:
        xtr, ytr, xte, yte, classes = _npz(Path(arg).expanduser(), test_fraction)
    if image_size is not None and image_size != xtr.shape[1]:
        xtr, xte = _resize(xtr, image_size), _resize(xte, image_size)
    mean, std = channel_stats(xtr)
    aug = augment or default_augment(kind, xtr)
    make = lambda x, y, split, f: ArrayDataset(x, y.astype(np.int64), list(classes), mean, std, aug, spec, split, f)
    return Source(make(xtr, ytr, "train", ftr), make(xte, yte, "test", fte), kind)


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
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units (float64 accumulation)."""
    c = images.shape[3]
    flat = images.reshape(-1, c)
    s = np.zeros(c)
    ss = np.zeros(c)
    for start in range(0, flat.shape[0], 1 << 22):
        chunk = flat[start:start + (1 << 22)].astype(np.float64)
        s += chunk.sum(0)
        ss += (chunk * chunk).sum(0)
    n = max(flat.shape[0], 1)
    mean = s / n / 255.0
    std = np.sqrt(np.maximum(ss / n / 65025.0 - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, images.shape[0], 4096):
        x = torch.from_numpy(images[start:start + 4096]).permute(0, 3, 1, 2).float()
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

def _list_tree(root: Path) -> dict[str, list[Path]]:
    """{class name: sorted image files} of a ``root/<class>/...`` tree."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    tree = {}
    for c in classes:
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if files:
            tree[c] = files
    return tree


def _imagefolder(path: Path, image_size: int | None, test_fraction: float):
    if not path.is_dir():
        raise InputError(f"--data imagefolder:{path}: no such directory")
    split_layout = (path / "train").is_dir()
    trees = {"train": _list_tree(path / "train")} if split_layout else {"all": _list_tree(path)}
    if split_layout and (path / "test").is_dir():
        trees["test"] = _list_tree(path / "test")
    if not any(trees.values()) or not next(iter(trees.values())):
        raise InputError(f"--data imagefolder:{path}: no images found; expected {path}/train/<class>/*.png "
                         f"(and {path}/test/<class>/*) or {path}/<class>/*")
    key = hashlib.sha256()
    key.update(json.dumps([CACHE_VERSION, str(path.resolve()), image_size, test_fraction]).encode())
    for split, tree in trees.items():
        for c, files in tree.items():
            for f in files:
                st = f.stat()
                key.update(f"{split}/{c}/{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache = cache_dir() / "imagefolder" / f"{key.hexdigest()[:24]}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return (z["xtr"], z["ytr"], z["xte"], z["yte"], [str(c) for c in z["classes"]],
                        z["ftr"].tolist(), z["fte"].tolist())
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below
    classes = sorted(set().union(*[set(t) for t in trees.values()]))
    cindex = {c: i for i, c in enumerate(classes)}

    def decode(tree):
        files = [f for c in sorted(tree) for f in tree[c]]
        labels = np.array([cindex[c] for c in sorted(tree) for _ in tree[c]], dtype=np.int64)
        return _decode_images(files, image_size, path), labels, np.array([str(f.resolve()) for f in files])

    if "all" in trees:
        x, y, f = decode(trees["all"])
        tr, te = stratified_split(y, test_fraction, seed=0)
        xtr, ytr, ftr, xte, yte, fte = x[tr], y[tr], f[tr], x[te], y[te], f[te]
    else:
        xtr, ytr, ftr = decode(trees["train"])
        if "test" in trees and trees["test"]:
            xte, yte, fte = decode(trees["test"])
            if xte.shape[1:] != xtr.shape[1:]:
                raise InputError(f"--data imagefolder:{path}: test images are {xte.shape[1:3]}, train images "
                                 f"{xtr.shape[1:3]}; pass --image-size N to resize both")
        else:
            tr, te = stratified_split(ytr, test_fraction, seed=0)
            xtr, ytr, ftr, xte, yte, fte = xtr[tr], ytr[tr], ftr[tr], xtr[te], ytr[te], ftr[te]
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        from kdfine.io import atomic_open

        with atomic_open(cache, "wb", option="cache") as f:
            np.savez(f, xtr=xtr, ytr=ytr, xte=xte, yte=yte, classes=np.array(classes), ftr=ftr, fte=fte)
    except Exception:
        pass  # a cache that cannot be written only costs time on the next run
    return xtr, ytr, xte, yte, classes, ftr.tolist(), fte.tolist()


def _decode_images(files: list[Path], image_size: int | None, root: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    with Image.open(files[0]) as first:
        gray = first.mode in ("1", "L", "I", "I;16", "F", "LA")
    mode = "L" if gray else "RGB"

    def one(f: Path) -> np.ndarray:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"--data imagefolder:{root}: cannot decode {f}: {e}") from None
        return a[..., None] if a.ndim == 2 else a

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        arrays = list(pool.map(one, files, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise InputError(f"--data imagefolder:{root}: images have different sizes ({a[1]}x{a[0]} and "
                         f"{b[1]}x{b[0]}); pass --image-size N to resize them")
    return np.stack(arrays)


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
